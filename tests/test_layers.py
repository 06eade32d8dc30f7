"""Layer correctness on every backend: gradients, reference loops, dtype, purity."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import to_numpy
from xpnet import backend
from xpnet.gradcheck import check_layer
from xpnet.layers import (
    Affine,
    AvgPooling,
    BatchNormalization,
    Convolution,
    Dropout,
    Flatten,
    Pooling,
    ReLU,
    Sigmoid,
    SoftmaxWithLoss,
    Tanh,
)
from xpnet.layers.im2col import col2im, im2col

TOL = 1e-6


def away_from_zero(rng, shape, margin=0.05):
    """Random inputs kept at least ``margin`` away from 0 (ReLU's kink)."""
    v = rng.standard_normal(shape)
    return np.where(v >= 0, v + margin, v - margin)


def distinct_values(rng, shape, gap=0.02):
    """Inputs whose values are pairwise at least ``gap`` apart (no max-pool ties)."""
    n = int(np.prod(shape))
    return (rng.permutation(n) * gap - n * gap / 2).reshape(shape) + rng.uniform(0, gap / 4)


# ------------------------------------------------------------------ reference loops
def naive_conv(x, W, b, stride, pad):
    n, c, h, w = x.shape
    fn, _, kh, kw = W.shape
    xp_ = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh, ow = (h + 2 * pad - kh) // stride + 1, (w + 2 * pad - kw) // stride + 1
    out = np.zeros((n, fn, oh, ow))
    for i in range(n):
        for f in range(fn):
            for y in range(oh):
                for z in range(ow):
                    patch = xp_[i, :, y * stride : y * stride + kh, z * stride : z * stride + kw]
                    out[i, f, y, z] = (patch * W[f]).sum() + b[f]
    return out


def naive_pool(x, ph, pw, stride, pad, reduce):
    fill = -np.inf if reduce is np.max else 0.0
    xp_ = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)), constant_values=fill)
    n, c, h, w = xp_.shape
    oh, ow = (h - ph) // stride + 1, (w - pw) // stride + 1
    out = np.zeros((n, c, oh, ow))
    for y in range(oh):
        for z in range(ow):
            win = xp_[:, :, y * stride : y * stride + ph, z * stride : z * stride + pw]
            out[:, :, y, z] = reduce(win, axis=(2, 3))
    return out


CONV_CASES = [
    # (N, C, H, W), (FN, KH, KW), stride, pad
    ((2, 3, 7, 7), (4, 3, 3), 1, 1),
    ((1, 2, 6, 8), (3, 3, 3), 1, 0),  # batch 1, non-square input
    ((2, 2, 9, 7), (3, 3, 3), 2, 1),  # stride 2
    ((2, 1, 6, 6), (2, 2, 2), 2, 0),  # non-overlapping windows
    ((2, 2, 6, 5), (2, 3, 2), 1, 2),  # non-square kernel, pad 2
    ((3, 2, 5, 5), (2, 3, 3), 1, 2),  # pad 2 = K - 1
    ((2, 2, 8, 8), (3, 5, 5), 1, 2),
    ((2, 3, 5, 5), (2, 1, 1), 1, 0),  # 1x1 conv
]

POOL_CASES = [
    ((2, 3, 6, 6), 2, 2, 2, 0),
    ((1, 2, 5, 7), 3, 3, 2, 1),  # pad honoured, batch 1, non-square
    ((2, 2, 7, 7), 3, 3, 1, 1),  # overlapping windows
    ((2, 2, 6, 5), 2, 1, 2, 0),  # non-square window
    ((2, 1, 4, 4), 4, 4, 1, 2),  # pad 2
    ((1, 1, 18, 17), 17, 17, 1, 0),  # 289 cells: window offsets beyond uint8
    ((2, 2, 6, 9), 3, 3, 3, 0),  # windows tiling the input, 3x3
    ((3, 1, 4, 2), 1, 1, 1, 0),  # 1x1 windows
]


@pytest.mark.parametrize("x_shape, w_shape, stride, pad", CONV_CASES)
def test_convolution_forward_matches_loops(xp, rng, x_shape, w_shape, stride, pad):
    x = rng.standard_normal(x_shape)
    fn, kh, kw = w_shape
    W = rng.standard_normal((fn, x_shape[1], kh, kw))
    b = rng.standard_normal(fn)
    layer = Convolution(xp.asarray(W), xp.asarray(b), stride, pad)
    out = to_numpy(layer.forward(xp.asarray(x)))
    np.testing.assert_allclose(out, naive_conv(x, W, b, stride, pad), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("x_shape, w_shape, stride, pad", CONV_CASES)
def test_convolution_gradients(xp, rng, x_shape, w_shape, stride, pad):
    fn, kh, kw = w_shape
    layer = Convolution(xp.asarray(rng.standard_normal((fn, x_shape[1], kh, kw))),
                        xp.asarray(rng.standard_normal(fn)), stride, pad)
    x = xp.asarray(rng.standard_normal(x_shape))
    dout = xp.asarray(rng.standard_normal(layer.forward(x).shape))
    errors = check_layer(layer, x, dout)
    assert set(errors) == {"x", "W", "b"}
    assert max(errors.values()) <= TOL, errors


@pytest.mark.parametrize("fold", [True, False])
@pytest.mark.parametrize("x_shape, w_shape, stride, pad", CONV_CASES[:4])
def test_convolution_bias_in_or_after_the_gemm(xp, rng, monkeypatch, fold, x_shape, w_shape,
                                               stride, pad):
    """Both ways of adding the bias (the CPU's row of ones, the GPU's add after) and
    of getting db agree with the loops, with and without the fused ReLU."""
    from xpnet.layers import conv_functions
    from xpnet.layers.conv import ConvReLU

    monkeypatch.setattr(conv_functions, "_fold_bias", lambda xp: fold)
    fn, kh, kw = w_shape
    x = rng.standard_normal(x_shape)
    W = rng.standard_normal((fn, x_shape[1], kh, kw))
    b = rng.standard_normal(fn)
    layer = Convolution(xp.asarray(W), xp.asarray(b), stride, pad)
    expected = naive_conv(x, W, b, stride, pad)
    y = layer.forward(xp.asarray(x))
    np.testing.assert_allclose(to_numpy(y), expected, rtol=1e-12, atol=1e-12)
    relu = ConvReLU(xp.asarray(W), xp.asarray(b), stride, pad).forward(xp.asarray(x))
    np.testing.assert_allclose(to_numpy(relu), np.maximum(expected, 0), rtol=1e-12, atol=1e-12)
    dout = rng.standard_normal(y.shape)
    layer.backward(xp.asarray(dout))
    np.testing.assert_allclose(to_numpy(layer.grads["b"]), dout.sum(axis=(0, 2, 3)),
                               rtol=1e-12, atol=1e-12)
    errors = check_layer(layer, xp.asarray(x), xp.asarray(dout))
    assert max(errors.values()) <= TOL, errors


def test_convolution_small_chunks_agree(xp, rng, monkeypatch):
    """The chunked CPU path (tiny chunks) gives the same result as one chunk."""
    from xpnet.layers import conv_functions as conv

    x = xp.asarray(rng.standard_normal((5, 2, 6, 6)))
    W = xp.asarray(rng.standard_normal((3, 2, 3, 3)))
    b = xp.asarray(rng.standard_normal(3))
    dout = xp.asarray(rng.standard_normal((5, 3, 6, 6)))
    big = Convolution(W, b, 1, 1)
    y_big, dx_big = big.forward(x), big.backward(dout)
    monkeypatch.setattr(conv, "CPU_CHUNK_BYTES", 1)
    monkeypatch.setattr(conv, "GPU_CHUNK_BYTES", 1)
    small = Convolution(W, b, 1, 1)
    y_small, dx_small = small.forward(x), small.backward(dout)
    np.testing.assert_allclose(to_numpy(y_small), to_numpy(y_big), rtol=1e-12)
    np.testing.assert_allclose(to_numpy(dx_small), to_numpy(dx_big), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(to_numpy(small.grads["W"]), to_numpy(big.grads["W"]), rtol=1e-12)


@pytest.mark.parametrize("x_shape, k, k2, stride, pad", [(s, 3, 2, 1, 1) for s in [(2, 2, 6, 6)]]
                         + [((2, 2, 6, 5), 2, 2, 2, 0), ((1, 3, 7, 7), 3, 3, 2, 1)])
def test_im2col_col2im_adjoint(xp, rng, x_shape, k, k2, stride, pad):
    """<im2col(x), c> == <x, col2im(c)>: col2im is the exact adjoint of im2col."""
    x = xp.asarray(rng.standard_normal(x_shape))
    col = im2col(x, k, k2, stride, pad)
    c = xp.asarray(rng.standard_normal(col.shape))
    lhs = float((col * c).sum())
    rhs = float((x * col2im(c, x_shape, k, k2, stride, pad)).sum())
    assert abs(lhs - rhs) <= 1e-10 * max(1.0, abs(lhs))


@pytest.mark.parametrize("layer_cls, reduce", [(Pooling, np.max), (AvgPooling, np.mean)])
@pytest.mark.parametrize("x_shape, ph, pw, stride, pad", POOL_CASES)
def test_pooling_forward_matches_loops(xp, rng, layer_cls, reduce, x_shape, ph, pw, stride, pad):
    x = rng.standard_normal(x_shape)
    out = to_numpy(layer_cls(ph, pw, stride, pad).forward(xp.asarray(x)))
    expected = naive_pool(x, ph, pw, stride, pad, reduce)
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layer_cls", [Pooling, AvgPooling])
@pytest.mark.parametrize("x_shape, ph, pw, stride, pad", POOL_CASES)
def test_pooling_gradients(xp, rng, layer_cls, x_shape, ph, pw, stride, pad):
    layer = layer_cls(ph, pw, stride, pad)
    x = xp.asarray(distinct_values(rng, x_shape))
    dout = xp.asarray(rng.standard_normal(layer.forward(x).shape))
    errors = check_layer(layer, x, dout)
    assert errors["x"] <= TOL, errors


@pytest.mark.parametrize("x_shape", [(4, 6), (1, 6), (3, 2, 3), (2, 3, 2, 1)])
def test_affine_gradients_any_rank(xp, rng, x_shape):
    d = int(np.prod(x_shape[1:]))
    layer = Affine(xp.asarray(rng.standard_normal((d, 5))), xp.asarray(rng.standard_normal(5)))
    x = xp.asarray(rng.standard_normal(x_shape))
    dout = xp.asarray(rng.standard_normal((x_shape[0], 5)))
    errors = check_layer(layer, x, dout)
    assert layer.backward(dout).shape == x_shape
    assert max(errors.values()) <= TOL, errors


@pytest.mark.parametrize("layer_cls", [ReLU, Sigmoid, Tanh])
@pytest.mark.parametrize("shape", [(3, 5), (1, 4), (2, 3, 4, 4)])
def test_activation_gradients(xp, rng, layer_cls, shape):
    x = xp.asarray(away_from_zero(rng, shape))
    dout = xp.asarray(rng.standard_normal(shape))
    errors = check_layer(layer_cls(), x, dout)
    assert errors["x"] <= TOL, errors


def test_flatten_roundtrip(xp, rng):
    layer = Flatten()
    x = xp.asarray(rng.standard_normal((2, 3, 4, 5)))
    y = layer.forward(x)
    assert y.shape == (2, 60)
    np.testing.assert_array_equal(to_numpy(layer.backward(y)), to_numpy(x))


@pytest.mark.parametrize("shape", [(6, 4), (1, 3), (4, 3, 3, 2), (1, 2, 3, 3)])
@pytest.mark.parametrize("train", [True, False])
def test_batchnorm_gradients(xp, rng, shape, train):
    d = shape[1]
    layer = BatchNormalization(xp.asarray(rng.uniform(0.5, 1.5, d)),
                               xp.asarray(rng.standard_normal(d)),
                               running_mean=xp.asarray(rng.standard_normal(d)),
                               running_var=xp.asarray(rng.uniform(0.5, 2, d)))
    if train and shape[0] * int(np.prod(shape[2:])) == 1:
        pytest.skip("batch statistics of a single value have zero variance")
    x = xp.asarray(rng.standard_normal(shape) * 2 + 1)
    dout = xp.asarray(rng.standard_normal(shape))
    errors = check_layer(layer, x, dout, train=train)
    assert max(errors.values()) <= TOL, errors


def test_batchnorm_statistics(xp, rng):
    """Training output is normalised per channel; running stats follow the momentum rule."""
    layer = BatchNormalization(xp.ones(3), xp.zeros(3), momentum=0.9)
    x = xp.asarray(rng.standard_normal((8, 3, 4, 4)) * 3 + 2)
    y = to_numpy(layer.forward(x, train=True))
    np.testing.assert_allclose(y.mean(axis=(0, 2, 3)), 0, atol=1e-10)
    np.testing.assert_allclose(y.var(axis=(0, 2, 3)), 1, rtol=1e-4)
    xh = to_numpy(x)
    np.testing.assert_allclose(to_numpy(layer.buffers["running_mean"]),
                               0.1 * xh.mean(axis=(0, 2, 3)), rtol=1e-10)
    np.testing.assert_allclose(to_numpy(layer.buffers["running_var"]),
                               0.1 * xh.var(axis=(0, 2, 3)), rtol=1e-10)
    y_eval = to_numpy(layer.forward(x, train=False))
    rm, rv = (to_numpy(layer.buffers[k]) for k in ("running_mean", "running_var"))
    expected = (xh - rm.reshape(1, 3, 1, 1)) / np.sqrt(rv.reshape(1, 3, 1, 1) + 1e-6)
    np.testing.assert_allclose(y_eval, expected, rtol=1e-10)


def test_dropout_gradients_and_scaling(xp, rng):
    backend.seed(7)  # each Dropout draws its generator's seed at construction
    layer = Dropout(0.3)
    x = xp.asarray(rng.standard_normal((50, 40)))
    dout = xp.asarray(rng.standard_normal((50, 40)))
    y = to_numpy(layer.forward(x))
    kept = y != 0
    assert 0.6 < kept.mean() < 0.8
    np.testing.assert_allclose(y[kept], to_numpy(x)[kept] / 0.7, rtol=1e-12)
    dx = to_numpy(layer.backward(dout))
    np.testing.assert_allclose(dx, to_numpy(dout) * kept / 0.7, rtol=1e-12)
    # Inference is the identity (inverted dropout).
    np.testing.assert_array_equal(to_numpy(layer.forward(x, train=False)), to_numpy(x))
    # Same seed, same mask.
    backend.seed(7)
    np.testing.assert_array_equal(to_numpy(Dropout(0.3).forward(x)), y)


def test_dropout_gradient_check(xp, rng):
    x = xp.asarray(rng.standard_normal((4, 6)))
    dout = xp.asarray(rng.standard_normal((4, 6)))

    class FixedMask:  # a fresh, equally seeded layer per forward: every pass, one mask
        def __init__(self, ratio):
            self.ratio, self.params, self.grads = ratio, {}, {}

        def forward(self, x, train=True):
            self.inner = Dropout(self.ratio, seed=3)
            return self.inner.forward(x, train)

        def backward(self, d):
            return self.inner.backward(d)

    assert check_layer(FixedMask(0.4), x, dout)["x"] <= TOL


@pytest.mark.parametrize("one_hot", [False, True])
@pytest.mark.parametrize("n", [1, 5])
def test_softmax_with_loss_gradient(xp, rng, one_hot, n):
    x = xp.asarray(rng.standard_normal((n, 4)) * 3)
    labels = rng.integers(0, 4, n)
    t = xp.asarray(np.eye(4)[labels] if one_hot else labels)
    layer = SoftmaxWithLoss()
    loss = float(layer.forward(x, t))
    logp = to_numpy(x) - np.log(np.exp(to_numpy(x)).sum(axis=1, keepdims=True))
    assert loss == pytest.approx(-logp[np.arange(n), labels].mean(), rel=1e-12)
    dx = layer.backward()
    from xpnet.gradcheck import numerical_gradient, relative_error

    num = numerical_gradient(lambda: layer.forward(x, t), x, 1e-5)
    assert relative_error(dx, num) <= TOL


def test_softmax_stable_for_huge_logits(xp):
    x = xp.asarray(np.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 1e4]], dtype=np.float32))
    layer = SoftmaxWithLoss()
    loss = float(layer.forward(x, xp.asarray(np.array([0, 2]))))
    assert np.isfinite(loss)
    assert loss == pytest.approx(np.log(2) / 2, rel=1e-5)
    assert np.isfinite(to_numpy(layer.backward())).all()


def test_sigmoid_no_overflow(xp):
    x = xp.asarray(np.array([-1000.0, -50.0, 0.0, 50.0, 1000.0], dtype=np.float32))
    y = to_numpy(Sigmoid().forward(x))  # RuntimeWarnings are errors in this suite
    np.testing.assert_allclose(y, [0, 0, 0.5, 1, 1], atol=1e-7)


# ------------------------------------------------------ dtype, purity, determinism
def make_layers(xp, rng, dtype):
    """One instance of every layer with an input and an upstream gradient."""
    def arr(*shape, scale=1.0):
        return xp.asarray((rng.standard_normal(shape) * scale).astype(dtype))

    x4 = xp.asarray(distinct_values(rng, (2, 3, 6, 6)).astype(dtype))
    cases = [
        (Affine(arr(108, 5), arr(5)), x4),
        (Convolution(arr(4, 3, 3, 3), arr(4), 1, 1), x4),
        (Convolution(arr(4, 3, 3, 3), arr(4), 2, 2), xp.asarray(
            rng.standard_normal((2, 3, 5, 5)).astype(dtype))),
        (Pooling(2, 2, 2), x4),
        (AvgPooling(3, 3, 1, 1), x4),
        (ReLU(), x4),
        (Sigmoid(), x4),
        (Tanh(), x4),
        (BatchNormalization(xp.ones(3, dtype=dtype), xp.zeros(3, dtype=dtype)), x4),
        (Dropout(0.5), x4),
        (Flatten(), x4),
    ]
    return cases


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_preserved(xp, rng, dtype):
    for layer, x in make_layers(xp, rng, dtype):
        y = layer.forward(x)
        assert y.dtype == dtype, layer.name
        dx = layer.backward(xp.ones_like(y))
        assert dx.dtype == dtype, layer.name
        for key, g in layer.grads.items():
            assert g.dtype == dtype, (layer.name, key)
    loss_layer = SoftmaxWithLoss()
    logits = xp.asarray(rng.standard_normal((3, 4)).astype(dtype))
    assert loss_layer.forward(logits, xp.asarray(np.array([0, 1, 2]))).dtype == dtype
    assert loss_layer.backward().dtype == dtype


def test_inputs_not_mutated_and_backward_repeatable(xp, rng):
    for layer, x in make_layers(xp, rng, np.float64):
        x_before = to_numpy(x).copy()
        y = layer.forward(x)
        dout = xp.asarray(rng.standard_normal(y.shape))
        dout_before = to_numpy(dout).copy()
        dx1 = to_numpy(layer.backward(dout)).copy()
        g1 = {k: to_numpy(v).copy() for k, v in layer.grads.items()}
        dx2 = to_numpy(layer.backward(dout))
        np.testing.assert_array_equal(to_numpy(x), x_before, err_msg=layer.name)
        np.testing.assert_array_equal(to_numpy(dout), dout_before, err_msg=layer.name)
        np.testing.assert_array_equal(dx1, dx2, err_msg=layer.name)
        for k, v in layer.grads.items():
            np.testing.assert_array_equal(to_numpy(v), g1[k], err_msg=f"{layer.name}.{k}")


@pytest.mark.parametrize("x_shape, ph, pw, stride, pad", POOL_CASES)
def test_max_pooling_backward_after_inference_forward(xp, rng, x_shape, ph, pw, stride, pad):
    """Inference skips the argmax; a backward after it finds the same winners."""
    x = xp.asarray(rng.standard_normal(x_shape))
    trained = Pooling(ph, pw, stride, pad)
    y_train = trained.forward(x, train=True)
    dout = xp.asarray(rng.standard_normal(y_train.shape))
    dx_train = trained.backward(dout)
    evaluated = Pooling(ph, pw, stride, pad)
    y_eval = evaluated.forward(x, train=False)
    np.testing.assert_array_equal(to_numpy(y_eval), to_numpy(y_train))
    np.testing.assert_array_equal(to_numpy(evaluated.backward(dout)), to_numpy(dx_train))


def naive_max_pool_backward(x, dout, ph, pw, stride, pad):
    """Each dout to the first maximum of its window in raster order."""
    xp_ = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)), constant_values=-np.inf)
    dx = np.zeros(xp_.shape)
    n, c, oh, ow = dout.shape
    for i in range(n):
        for ch in range(c):
            for y in range(oh):
                for z in range(ow):
                    win = xp_[i, ch, y * stride : y * stride + ph, z * stride : z * stride + pw]
                    r, q = np.unravel_index(np.argmax(win), win.shape)  # first maximum
                    dx[i, ch, y * stride + r, z * stride + q] += dout[i, ch, y, z]
    return dx[:, :, pad : pad + x.shape[2], pad : pad + x.shape[3]]


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("x_shape, ph, pw, stride, pad", POOL_CASES)
def test_max_pooling_ties_go_to_the_first_maximum(xp, rng, train, x_shape, ph, pw, stride, pad):
    """As after a ReLU: many equal cells per window; one of them gets the gradient."""
    x = np.maximum(rng.integers(-2, 3, size=x_shape), 0).astype(float)
    layer = Pooling(ph, pw, stride, pad)
    y = layer.forward(xp.asarray(x), train=train)
    dout = rng.standard_normal(y.shape)
    np.testing.assert_array_equal(to_numpy(y), naive_pool(x, ph, pw, stride, pad, np.max))
    # Overlapping windows add several douts into one cell: the order may differ.
    np.testing.assert_allclose(to_numpy(layer.backward(xp.asarray(dout))),
                               naive_max_pool_backward(x, dout, ph, pw, stride, pad),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("x_shape, ph, pw, stride, pad", POOL_CASES)
def test_max_pooling_keeps_a_non_finite_gradient_in_its_cell(xp, rng, x_shape, ph, pw, stride,
                                                             pad):
    """An inf or NaN in dout reaches its window's winner only; the other cells get 0."""
    x = distinct_values(rng, x_shape)
    layer = Pooling(ph, pw, stride, pad)
    y = layer.forward(xp.asarray(x))
    dout = rng.standard_normal(y.shape)
    dout.flat[0] = np.inf
    dout.flat[-1] = np.nan if dout.size > 1 else np.inf
    dx = to_numpy(layer.backward(xp.asarray(dout)))
    expected = naive_max_pool_backward(x, dout, ph, pw, stride, pad)
    np.testing.assert_array_equal(np.isfinite(dx), np.isfinite(expected))
    np.testing.assert_allclose(dx, expected, rtol=1e-12, atol=1e-12)  # overlaps: sum order


def test_relu_backward_after_inference_forward(xp, rng):
    x = xp.asarray(rng.standard_normal((4, 5)))
    dout = xp.asarray(rng.standard_normal((4, 5)))
    layer = ReLU()
    y = layer.forward(x, train=False)
    expected = np.where(to_numpy(x) > 0, to_numpy(dout), 0.0)
    np.testing.assert_array_equal(to_numpy(layer.backward(dout)), expected)
    np.testing.assert_array_equal(to_numpy(y), np.maximum(to_numpy(x), 0.0))


def test_free_workspace_releases_the_scratch_buffers(xp, rng):
    from xpnet.layers import base, free_workspace

    layer = Convolution(xp.asarray(rng.standard_normal((2, 1, 3, 3))), xp.zeros(2), 1, 1)
    x = xp.asarray(rng.standard_normal((2, 1, 5, 5)))
    y = to_numpy(layer.forward(x))
    assert base._scratch.__dict__.get("buffers")
    free_workspace()
    assert not base._scratch.__dict__.get("buffers")
    np.testing.assert_array_equal(to_numpy(layer.forward(x)), y)  # allocated again
