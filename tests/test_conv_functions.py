"""The convolution functions and the layers on top of them: Convolution, ConvReLU,
Deconvolution; GlobalAveragePooling; against reference loops and numerical gradients."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import to_numpy
from xpnet import backend
from xpnet.backend import threads
from xpnet.gradcheck import check_layer
from xpnet.layers import ReLU, conv_functions
from xpnet.layers.conv import Convolution, ConvReLU, Deconvolution, bilinear_kernel
from xpnet.layers.conv_functions import conv2d, conv2d_grad_input, conv2d_grad_weight
from xpnet.layers.pool import GlobalAveragePooling

TOL = 1e-6


# ------------------------------------------------------------------ reference loops
def naive_conv(x, W, b, stride, pad):
    """y[n, f, i, j] = sum over c, ki, kj of x_padded[n, c, i*s + ki, j*s + kj] W[f, c, ki, kj]."""
    n, _, h, w = x.shape
    fn, _, kh, kw = W.shape
    xpad = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh, ow = (h + 2 * pad - kh) // stride + 1, (w + 2 * pad - kw) // stride + 1
    y = np.zeros((n, fn, oh, ow))
    for i in range(oh):
        for j in range(ow):
            patch = xpad[:, :, i * stride : i * stride + kh, j * stride : j * stride + kw]
            y[:, :, i, j] = np.einsum("nckl,fckl->nf", patch, W)
    return y if b is None else y + b.reshape(1, -1, 1, 1)


def naive_conv_grads(x, W, dout, stride, pad):
    """(dx, dW, db) of naive_conv by scattering each output's gradient over its window."""
    _, _, h, w = x.shape
    _, _, kh, kw = W.shape
    xpad = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    dxpad = np.zeros(xpad.shape)
    dW = np.zeros(W.shape)
    for i in range(dout.shape[2]):
        for j in range(dout.shape[3]):
            rows, cols = slice(i * stride, i * stride + kh), slice(j * stride, j * stride + kw)
            d = dout[:, :, i, j]
            dxpad[:, :, rows, cols] += np.einsum("nf,fckl->nckl", d, W)
            dW += np.einsum("nf,nckl->fckl", d, xpad[:, :, rows, cols])
    return dxpad[:, :, pad : pad + h, pad : pad + w], dW, dout.sum(axis=(0, 2, 3))


def naive_deconv(x, W, b, stride, pad):
    """Transposed convolution by scattering: each input pixel adds x * W[c_in] to its window."""
    n, _, h, w = x.shape
    _, c_out, kh, kw = W.shape
    full = np.zeros((n, c_out, (h - 1) * stride + kh, (w - 1) * stride + kw))
    for i in range(h):
        for j in range(w):
            full[:, :, i * stride : i * stride + kh, j * stride : j * stride + kw] += \
                np.einsum("nc,cokl->nokl", x[:, :, i, j], W)
    y = full[:, :, pad : full.shape[2] - pad, pad : full.shape[3] - pad]
    return y + b.reshape(1, -1, 1, 1)


CASES = [
    # (N, C, H, W), (FN, KH, KW), stride, pad
    ((2, 3, 7, 7), (4, 3, 3), 1, 1),
    ((1, 2, 6, 9), (3, 3, 3), 1, 0),  # batch 1, non-square input
    ((2, 2, 9, 7), (3, 3, 3), 2, 1),  # stride 2, non-square
    ((2, 2, 10, 7), (2, 4, 4), 3, 0),  # stride 3
    ((2, 1, 6, 6), (2, 2, 2), 2, 0),  # non-overlapping windows
    ((2, 2, 6, 5), (2, 3, 2), 1, 2),  # non-square kernel, pad 2
    ((2, 2, 5, 5), (3, 2, 2), 1, 2),  # pad > K - 1 at stride 1 (the col2im path)
    ((3, 2, 5, 5), (2, 3, 3), 1, 2),  # pad = K - 1
    ((2, 3, 5, 4), (2, 1, 1), 1, 0),  # 1x1
]


def case_arrays(rng, x_shape, w_shape):
    fn, kh, kw = w_shape
    return (rng.standard_normal(x_shape), rng.standard_normal((fn, x_shape[1], kh, kw)),
            rng.standard_normal(fn))


@pytest.fixture(params=["fold", "add"])
def bias_path(request, monkeypatch):
    """Both ways of adding the bias: in the GEMM (CPU default) and after it (GPU default)."""
    monkeypatch.setattr(conv_functions, "_fold_bias", lambda xp: request.param == "fold")
    return request.param


@pytest.fixture
def small_chunks(monkeypatch):
    """Several chunks per call on either backend."""
    monkeypatch.setattr(conv_functions, "CPU_CHUNK_BYTES", 1)
    monkeypatch.setattr(conv_functions, "GPU_CHUNK_BYTES", 1)


# ------------------------------------------------------------------ the functions
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("x_shape, w_shape, stride, pad", CASES)
def test_conv2d_matches_loops(xp, rng, bias_path, x_shape, w_shape, stride, pad, relu):
    x, W, b = case_arrays(rng, x_shape, w_shape)
    expected = naive_conv(x, W, b, stride, pad)
    y = conv2d(xp.asarray(x), xp.asarray(W), xp.asarray(b), stride, pad, relu)
    np.testing.assert_allclose(to_numpy(y), np.maximum(expected, 0) if relu else expected,
                               rtol=1e-12, atol=1e-12)
    no_bias = conv2d(xp.asarray(x), xp.asarray(W), None, stride, pad)
    np.testing.assert_allclose(to_numpy(no_bias), naive_conv(x, W, None, stride, pad),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("x_shape, w_shape, stride, pad", CASES)
def test_conv2d_gradients_match_loops(xp, rng, bias_path, x_shape, w_shape, stride, pad):
    x, W, _ = case_arrays(rng, x_shape, w_shape)
    dout = rng.standard_normal(naive_conv(x, W, None, stride, pad).shape)
    dx_ref, dW_ref, db_ref = naive_conv_grads(x, W, dout, stride, pad)
    X, Wx, D = xp.asarray(x), xp.asarray(W), xp.asarray(dout)
    dx = conv2d_grad_input(D, Wx, x.shape, stride, pad)
    np.testing.assert_allclose(to_numpy(dx), dx_ref, rtol=1e-12, atol=1e-12)
    dW, db = conv2d_grad_weight(X, D, W.shape, stride, pad)
    np.testing.assert_allclose(to_numpy(dW), dW_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(to_numpy(db), db_ref, rtol=1e-12, atol=1e-12)
    dW_only, none = conv2d_grad_weight(X, D, W.shape, stride, pad, bias=False)
    assert none is None
    np.testing.assert_allclose(to_numpy(dW_only), dW_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("x_shape, w_shape, stride, pad", [CASES[0], CASES[2], CASES[6]])
def test_small_chunks_and_two_threads_agree(xp, rng, small_chunks, x_shape, w_shape, stride,
                                            pad):
    """Many chunks on 2 threads give the loops' results, bit for bit from run to run."""
    x, W, b = (xp.asarray(a) for a in case_arrays(rng, x_shape, w_shape))
    before = threads.get_num_threads()
    try:
        threads.set_num_threads(2)
        runs = []
        for _ in range(2):
            y = conv2d(x, W, b, stride, pad)
            dout = xp.asarray(np.linspace(-1, 1, y.size).reshape(y.shape))
            runs.append([to_numpy(a).copy() for a in (
                y, conv2d_grad_input(dout, W, x.shape, stride, pad),
                *conv2d_grad_weight(x, dout, W.shape, stride, pad))])
    finally:
        threads.set_num_threads(before)
    for a, b_ in zip(*runs, strict=True):
        np.testing.assert_array_equal(a, b_)
    xn, Wn = to_numpy(x), to_numpy(W)
    dout = np.linspace(-1, 1, runs[0][0].size).reshape(runs[0][0].shape)
    expected = [naive_conv(xn, Wn, to_numpy(b), stride, pad),
                *naive_conv_grads(xn, Wn, dout, stride, pad)]
    for got, ref in zip(runs[0], expected, strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)


def test_function_errors_name_the_caller(xp):
    x = xp.zeros((1, 2, 5, 5))
    W = xp.zeros((3, 2, 3, 3))
    with pytest.raises(ValueError, match=r"conv2d: input channels: expected 2, received 3"):
        conv2d(xp.zeros((1, 3, 5, 5)), W)
    with pytest.raises(ValueError, match=r"Mine: \(padded width - kernel\) divisible by stride"):
        conv2d(xp.zeros((1, 2, 5, 6)), W, stride=2, name="Mine")
    with pytest.raises(ValueError, match=r"conv2d: dout.shape: expected \(1, 3, 3, 3\)"):
        conv2d_grad_input(xp.zeros((1, 3, 4, 4)), W, x.shape)
    with pytest.raises(ValueError, match=r"conv2d: dout.shape: expected \(1, 3, 3, 3\)"):
        conv2d_grad_weight(x, xp.zeros((1, 2, 3, 3)), W.shape)


# ------------------------------------------------------------------ layers: gradients
def layer_cases(xp, rng):
    """(id, layer, input) for every layer of this module, float64."""
    def arr(*shape):
        return xp.asarray(rng.standard_normal(shape))

    return [
        ("conv-s1-p1", Convolution(arr(4, 3, 3, 3), arr(4), 1, 1), arr(2, 3, 6, 5)),
        ("conv-s2-p1", Convolution(arr(4, 3, 3, 3), arr(4), 2, 1), arr(2, 3, 7, 5)),
        ("convrelu-s1-p1", ConvReLU(arr(4, 3, 3, 3), arr(4), 1, 1), arr(2, 3, 6, 5)),
        ("convrelu-s2-p0", ConvReLU(arr(3, 3, 2, 2), arr(3), 2, 0), arr(2, 3, 6, 4)),
        ("deconv-s2-p1", Deconvolution(arr(3, 4, 4, 4), arr(4), 2, 1), arr(2, 3, 4, 3)),
        ("deconv-s2-p1-k3", Deconvolution(arr(3, 2, 3, 3), arr(2), 2, 1), arr(2, 3, 3, 4)),
        ("deconv-s1-p0", Deconvolution(arr(2, 3, 3, 3), arr(3), 1, 0), arr(2, 2, 4, 3)),
        ("deconv-s3-p2", Deconvolution(arr(2, 2, 4, 2), arr(2), 3, 2), arr(1, 2, 3, 3)),
        ("gap", GlobalAveragePooling(), arr(3, 4, 3, 5)),
    ]


LAYER_IDS = [c[0] for c in layer_cases(np, np.random.default_rng(0))]


@pytest.mark.parametrize("case", LAYER_IDS)
def test_layer_gradient_check(xp, rng, case):
    _, layer, x = next(c for c in layer_cases(xp, rng) if c[0] == case)
    dout = xp.asarray(rng.standard_normal(layer.forward(x).shape))
    errors = check_layer(layer, x, dout)
    assert set(errors) == {"x", *layer.params}
    assert max(errors.values()) <= TOL, errors


@pytest.mark.parametrize("case", LAYER_IDS)
def test_layer_dtype_purity_and_skipped_input_gradient(xp, rng, case):
    """float32 in, float32 out; x and dout untouched; need_input_grad=False gives None
    and the same parameter gradients."""
    _, layer, x = next(c for c in layer_cases(xp, rng) if c[0] == case)
    for p in layer.params.values():
        p[...] = p.astype(np.float32).astype(p.dtype)  # exact in float32 too
    for dtype in (np.float64, np.float32):
        for k, p in layer.params.items():
            layer.params[k] = p.astype(dtype)
        xd = x.astype(dtype)
        y = layer.forward(xd)
        assert y.dtype == dtype
        dout = xp.asarray(rng.standard_normal(y.shape).astype(dtype))
        x0, d0 = to_numpy(xd).copy(), to_numpy(dout).copy()
        dx = layer.backward(dout)
        assert dx.dtype == dtype and dx.shape == xd.shape
        grads = {k: to_numpy(g).copy() for k, g in layer.grads.items()}
        assert all(g.dtype == dtype for g in grads.values())
        if layer.params:
            assert layer.backward(dout, need_input_grad=False) is None
            for k, g in layer.grads.items():
                np.testing.assert_array_equal(to_numpy(g), grads[k])
        np.testing.assert_array_equal(to_numpy(xd), x0)
        np.testing.assert_array_equal(to_numpy(dout), d0)


# ------------------------------------------------------------------ ConvReLU
@pytest.mark.parametrize("x_shape, w_shape, stride, pad", CASES)
def test_convrelu_equals_convolution_then_relu_exactly(xp, rng, bias_path, x_shape, w_shape,
                                                       stride, pad):
    x, W, b = (xp.asarray(a) for a in case_arrays(rng, x_shape, w_shape))
    conv, relu = Convolution(W, b, stride, pad), ReLU()
    fused = ConvReLU(W, b, stride, pad)
    y_ref = relu.forward(conv.forward(x))
    y = fused.forward(x)
    assert (to_numpy(y) == 0).any() and (to_numpy(y) > 0).any()
    np.testing.assert_array_equal(to_numpy(y), to_numpy(y_ref))
    dout = xp.asarray(rng.standard_normal(y.shape))
    dx_ref = conv.backward(relu.backward(dout))
    np.testing.assert_array_equal(to_numpy(fused.backward(dout)), to_numpy(dx_ref))
    assert set(fused.params) == {"W", "b"} and fused.params["W"] is W
    for k in ("W", "b"):
        np.testing.assert_array_equal(to_numpy(fused.grads[k]), to_numpy(conv.grads[k]))


def test_convrelu_checks(xp):
    layer = ConvReLU(xp.zeros((2, 1, 3, 3)), xp.zeros(2))
    with pytest.raises(RuntimeError, match="ConvReLU.backward called before forward"):
        layer.backward(xp.zeros((1, 2, 3, 3)))
    layer.forward(xp.zeros((1, 1, 5, 5)))
    with pytest.raises(ValueError, match=r"ConvReLU: dout.shape: expected \(1, 2, 3, 3\)"):
        layer.backward(xp.zeros((1, 2, 3, 1)))
    with pytest.raises(ValueError, match=r"ConvReLU: \(padded height - kernel\) divisible"):
        ConvReLU(xp.zeros((2, 1, 3, 3)), xp.zeros(2), stride=2).forward(xp.zeros((1, 1, 6, 5)))


# ------------------------------------------------------------------ Deconvolution
DECONV_CASES = [
    # (N, C_in, H, W), (C_out, KH, KW), stride, pad
    ((2, 3, 4, 3), (2, 4, 4), 2, 1),
    ((1, 2, 3, 5), (3, 3, 3), 1, 1),
    ((2, 2, 3, 3), (2, 3, 3), 2, 0),
    ((2, 1, 2, 3), (2, 2, 3), 3, 0),  # non-square kernel, stride > kernel height
    ((1, 2, 4, 4), (1, 5, 5), 1, 3),  # pad > K - 1: the col2im path at stride 1
]


@pytest.mark.parametrize("x_shape, w_shape, stride, pad", DECONV_CASES)
def test_deconvolution_matches_loops(xp, rng, bias_path, x_shape, w_shape, stride, pad):
    c_out, kh, kw = w_shape
    x = rng.standard_normal(x_shape)
    W = rng.standard_normal((x_shape[1], c_out, kh, kw))
    b = rng.standard_normal(c_out)
    layer = Deconvolution(xp.asarray(W), xp.asarray(b), stride, pad)
    y = to_numpy(layer.forward(xp.asarray(x)))
    oh, ow = ((x_shape[2] - 1) * stride - 2 * pad + kh, (x_shape[3] - 1) * stride - 2 * pad + kw)
    assert y.shape == (x_shape[0], c_out, oh, ow)
    np.testing.assert_allclose(y, naive_deconv(x, W, b, stride, pad), rtol=1e-12, atol=1e-12)
    # The transpose of the convolution with the same W: <conv(u), x> = <u, deconv(x) - b>.
    u = rng.standard_normal(y.shape)
    conv_u = naive_conv(u, W, None, stride, pad)
    np.testing.assert_allclose((conv_u * x).sum(), (u * (y - b.reshape(1, -1, 1, 1))).sum(),
                               rtol=1e-10)
    dout = rng.standard_normal(y.shape)
    dx = to_numpy(layer.backward(xp.asarray(dout)))
    np.testing.assert_allclose(dx, naive_conv(dout, W, None, stride, pad), rtol=1e-12,
                               atol=1e-12)
    np.testing.assert_allclose(to_numpy(layer.grads["b"]), dout.sum(axis=(0, 2, 3)),
                               rtol=1e-12)
    # dW[ci, co] = sum x[ci] * (dout[co] over ci's window): the weight gradient of the
    # convolution of dout whose upstream gradient is x.
    np.testing.assert_allclose(to_numpy(layer.grads["W"]),
                               naive_conv_grads(dout, W, x, stride, pad)[1], rtol=1e-12,
                               atol=1e-12)


def test_deconvolution_checks(xp):
    W, b = xp.zeros((3, 2, 3, 3)), xp.zeros(2)
    with pytest.raises(ValueError, match=r"Deconvolution: b.shape: expected \(2,\)"):
        Deconvolution(W, xp.zeros(3))
    with pytest.raises(ValueError, match=r"Deconvolution: input channels: expected 3"):
        Deconvolution(W, b).forward(xp.zeros((1, 2, 4, 4)))
    with pytest.raises(ValueError, match=r"Deconvolution: input ndim"):
        Deconvolution(W, b).forward(xp.zeros((1, 3, 4)))
    with pytest.raises(ValueError, match=r"Deconvolution: output size .* received \(-1, 1\)"):
        Deconvolution(W, b, 1, 2).forward(xp.zeros((1, 3, 1, 3)))
    with pytest.raises(TypeError, match=r"Deconvolution: input dtype"):
        Deconvolution(W, b).forward(xp.zeros((1, 3, 4, 4), dtype=xp.float32))
    layer = Deconvolution(W, b, 2, 1)
    with pytest.raises(RuntimeError, match="Deconvolution.backward called before forward"):
        layer.backward(xp.zeros((1, 2, 5, 5)))
    assert layer.forward(xp.zeros((1, 3, 3, 3))).shape == (1, 2, 5, 5)
    with pytest.raises(ValueError, match=r"Deconvolution: dout.shape: expected \(1, 2, 5, 5\)"):
        layer.backward(xp.zeros((1, 2, 5, 4)))


# ------------------------------------------------------------------ bilinear up-sampling
def test_bilinear_kernel_values(xp):
    W = to_numpy(bilinear_kernel(3, 4, np.float64))
    assert W.shape == (3, 3, 4, 4)
    tent = np.array([0.25, 0.75, 0.75, 0.25])
    for c in range(3):
        for d in range(3):
            np.testing.assert_array_equal(W[c, d], np.outer(tent, tent) if c == d else 0)
    odd = to_numpy(bilinear_kernel(1, 3, np.float32))
    assert odd.dtype == np.float32
    np.testing.assert_allclose(odd[0, 0], np.outer([0.5, 1, 0.5], [0.5, 1, 0.5]))
    with pytest.raises(ValueError, match="bilinear_kernel: channels"):
        bilinear_kernel(0, 4)


def bilinear_resize(x, factor):
    """Bilinear interpolation between pixel centres (half-pixel, PyTorch's
    align_corners=False), and where both neighbours of each output pixel are inside x."""
    def axis_weights(size):
        coord = (np.arange(size * factor) + 0.5) / factor - 0.5
        lo = np.floor(coord).astype(int)
        frac = coord - lo
        inside = (lo >= 0) & (lo + 1 <= size - 1)
        M = np.zeros((size * factor, size))
        for o in np.flatnonzero(inside):
            M[o, lo[o]], M[o, lo[o] + 1] = 1 - frac[o], frac[o]
        return M, inside

    (Mh, ih), (Mw, iw) = axis_weights(x.shape[2]), axis_weights(x.shape[3])
    return np.einsum("ph,nchw,qw->ncpq", Mh, x, Mw), np.outer(ih, iw)


@pytest.mark.parametrize("factor", [2, 3, 4])
def test_bilinear_deconvolution_interpolates_the_interior(xp, rng, factor):
    x = rng.standard_normal((2, 3, 5, 4))
    layer = Deconvolution.upsampling(3, factor, np.float64)
    assert (layer.stride, layer.pad) == (factor, factor // 2)
    y = to_numpy(layer.forward(xp.asarray(x)))
    assert y.shape == (2, 3, 5 * factor, 4 * factor)
    expected, interior = bilinear_resize(x, factor)
    assert interior.sum() >= 0.5 * interior.size
    np.testing.assert_allclose(y[:, :, interior], expected[:, :, interior], rtol=1e-12,
                               atol=1e-12)
    # No mixing across channels: a zero channel stays zero.
    x[:, 1] = 0
    assert not to_numpy(layer.forward(xp.asarray(x)))[:, 1].any()


# ------------------------------------------------------------------ GlobalAveragePooling
def test_global_average_pooling(xp, rng):
    x = rng.standard_normal((2, 3, 4, 5))
    layer = GlobalAveragePooling()
    y = to_numpy(layer.forward(xp.asarray(x)))
    np.testing.assert_allclose(y, x.mean(axis=(2, 3)), rtol=1e-12)
    dout = rng.standard_normal((2, 3))
    dx = to_numpy(layer.backward(xp.asarray(dout)))
    np.testing.assert_allclose(dx, np.broadcast_to(dout[:, :, None, None] / 20, x.shape),
                               rtol=1e-12)
    with pytest.raises(ValueError, match=r"GlobalAveragePooling: dout.shape: expected \(2, 3\)"):
        layer.backward(xp.zeros((2, 3, 1, 1)))
    with pytest.raises(ValueError, match="GlobalAveragePooling: input ndim"):
        layer.forward(xp.zeros((2, 3, 4)))
    with pytest.raises(RuntimeError, match="before forward"):
        GlobalAveragePooling().backward(xp.zeros((2, 3)))


# ------------------------------------------------------------------ construction errors
@pytest.mark.parametrize("cls", [Convolution, ConvReLU, Deconvolution])
@pytest.mark.parametrize("what, value, low", [
    ("stride", None, 1), ("stride", 0, 1), ("stride", 1.5, 1), ("stride", "2", 1),
    ("stride", True, 1), ("pad", -1, 0), ("pad", None, 0),
])
def test_bad_stride_or_pad_is_a_clear_error(xp, cls, what, value, low):
    args = {"stride": 1, "pad": 0, what: value}
    with pytest.raises(ValueError) as info:
        cls(xp.zeros((2, 2, 3, 3)), xp.zeros(2), **args)
    assert str(info.value) == (f"{cls.__name__}: {what}: expected an integer >= {low}, "
                               f"received {value!r}")


def test_whole_float_stride_still_accepted(xp):
    layer = Convolution(xp.zeros((2, 1, 3, 3)), xp.zeros(2), stride=2.0, pad=np.int64(1))
    assert (layer.stride, layer.pad) == (2, 1)
    assert type(layer.stride) is int and type(layer.pad) is int


@pytest.mark.parametrize("cls", [Convolution, ConvReLU])
def test_bad_geometry_names_the_layer(xp, cls):
    layer = cls(xp.zeros((2, 1, 3, 3)), xp.zeros(2), stride=2)
    with pytest.raises(ValueError, match=rf"^{cls.__name__}: \(padded width - kernel\)"):
        layer.forward(xp.zeros((1, 1, 5, 6)))
    with pytest.raises(ValueError, match=rf"^{cls.__name__}: padded input size"):
        layer.forward(xp.zeros((1, 1, 2, 2)))
    with pytest.raises(ValueError, match=rf"^{cls.__name__}: W.ndim: expected 4"):
        cls(xp.zeros((2, 3, 3)), xp.zeros(2))


# ------------------------------------------------------------------ the networks
def test_conv_nets_use_convrelu_with_the_books_keys(xp, rng):
    from xpnet.models import DeepConvNet, Sequential, SimpleConvNet

    simple = SimpleConvNet(input_dim=(1, 10, 10), conv_param={"filter_num": 3,
                           "filter_size": 3, "pad": 0, "stride": 1}, hidden_size=5,
                           dtype=np.float64)
    assert [type(la).__name__ for la in simple.layers] == [
        "ConvReLU", "Pooling", "Affine", "ReLU", "Affine"]
    assert list(simple.params) == ["W1", "b1", "W2", "b2", "W3", "b3"]
    backend.seed(1)
    deep = DeepConvNet(input_dim=(1, 12, 12), hidden_size=6, dtype=np.float64)
    names = [type(la).__name__ for la in deep.layers]
    assert names.count("ConvReLU") == 6 and "Convolution" not in names
    assert "ReLU" not in names[: names.index("Affine")]
    assert list(deep.params) == [f"{p}{i}" for i in range(1, 9) for p in "Wb"]

    # The same network with Convolution then ReLU gives the same gradient, bit for bit.
    unfused = []
    for la in deep.layers:
        if isinstance(la, ConvReLU):
            unfused += [Convolution(la.params["W"], la.params["b"], la.stride, la.pad), ReLU()]
        else:
            unfused.append(la)
    reference = Sequential(unfused, input_shape=(1, 12, 12))
    assert list(reference.params) == list(deep.params)
    x = xp.asarray(rng.standard_normal((3, 1, 12, 12)))
    t = xp.asarray(np.array([1, 0, 9]))
    drops = [la for la in deep.layers if hasattr(la, "get_rng_state")]  # shared by both
    assert len(drops) == 2
    deep.predict(x, train_flg=True)  # the Dropout generators exist from here on
    states = [d.get_rng_state() for d in drops]
    grads = deep.gradient(x, t)
    for d, state in zip(drops, states, strict=True):
        d.set_rng_state(state)  # the same masks again
    ref = reference.gradient(x, t)
    for k in deep.params:
        np.testing.assert_array_equal(to_numpy(grads[k]), to_numpy(ref[k]), err_msg=k)
