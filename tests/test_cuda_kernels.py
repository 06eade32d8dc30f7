"""The hand-written CuPy kernels agree with the generic ``xp`` paths they replace.

They exist only for CuPy, so the numpy cases skip; the cupy cases run wherever a
GPU is present.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import to_numpy
from xpnet.backend import seed
from xpnet.backend.kernels import cuda_kernels_enabled, use_cuda_kernels
from xpnet.layers import Convolution, Pooling, cuda_kernels
from xpnet.layers.im2col import fill_cols, geometry, pad_into
from xpnet.models import SimpleConvNet
from xpnet.optim import SGD, AdaGrad, Adam, AdamW, Momentum, Nesterov, RMSprop


@pytest.fixture
def gpu_xp(xp):
    if xp.__name__ != "cupy":
        pytest.skip("CuPy kernels: there is no NumPy version to compare")
    assert cuda_kernels_enabled(xp), "the kernels should be on by default"
    return xp


def both_paths(fn):
    """fn() with the kernels off, then on; results as host arrays."""
    with use_cuda_kernels(False):
        generic = [to_numpy(a) for a in fn()]
    with use_cuda_kernels(True):
        kernel = [to_numpy(a) for a in fn()]
    return generic, kernel


@pytest.mark.parametrize("x_shape, k, stride, pad", [
    ((2, 3, 7, 6), 3, 1, 1), ((1, 2, 9, 9), 3, 2, 1), ((3, 1, 5, 8), 2, 1, 0),
    ((2, 4, 6, 6), 3, 1, 2), ((1, 2, 4, 4), 4, 2, 2),
])
def test_im2col_kernel_matches_generic(gpu_xp, rng, x_shape, k, stride, pad):
    xp = gpu_xp
    x = xp.asarray(rng.standard_normal(x_shape))
    g = geometry(x.shape, k, k, stride, pad, contiguous_rows=False)
    padded = pad_into(x, g, xp.empty(g.padded_shape(x.shape[0]), dtype=x.dtype))
    generic = fill_cols(padded, g, xp.empty(g.col_shape(x.shape[0]), dtype=x.dtype))
    kernel = cuda_kernels.im2col_into(x, g, xp.full(g.col_shape(x.shape[0]), np.nan))
    np.testing.assert_array_equal(to_numpy(kernel), to_numpy(generic))


@pytest.mark.parametrize("stride, pad", [(1, 1), (2, 1), (1, 2), (1, 0)])
def test_convolution_with_kernels_matches_generic(gpu_xp, rng, stride, pad):
    xp = gpu_xp
    W = xp.asarray(rng.standard_normal((4, 3, 3, 3)))
    b = xp.asarray(rng.standard_normal(4))
    x = xp.asarray(rng.standard_normal((5, 3, 9, 9)))

    def run():
        layer = Convolution(W, b, stride, pad)
        y = layer.forward(x)
        dx = layer.backward(xp.asarray(np.linspace(-1, 1, y.size).reshape(y.shape)))
        return y, dx, layer.grads["W"], layer.grads["b"]

    generic, kernel = both_paths(run)
    for g, k in zip(generic, kernel, strict=True):
        np.testing.assert_allclose(k, g, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("x_shape, k, stride, pad", [
    ((2, 3, 6, 6), 2, 2, 0), ((1, 2, 5, 7), 3, 2, 1), ((2, 2, 7, 7), 3, 1, 1),
    ((2, 1, 4, 4), 4, 1, 2), ((1, 1, 17, 17), 17, 1, 0),
])
def test_max_pool_kernels_match_generic(gpu_xp, rng, x_shape, k, stride, pad):
    xp = gpu_xp
    x = rng.standard_normal(x_shape)
    x[x < 0] = 0.0  # ties, as after a ReLU: the first maximum must win on both paths
    x.flat[3] = np.nan  # a NaN propagates to its windows' maxima
    x = xp.asarray(x)

    def run():
        layer = Pooling(k, k, stride, pad)
        y = layer.forward(x)
        dout = xp.asarray(np.arange(1, y.size + 1, dtype=float).reshape(y.shape))
        return y, layer.backward(dout)

    generic, kernel = both_paths(run)
    for g, k_ in zip(generic, kernel, strict=True):
        np.testing.assert_array_equal(k_, g)


FUSED = {
    "sgd": lambda: SGD(lr=0.1),
    "momentum": lambda: Momentum(lr=0.05, momentum=0.8),
    "nesterov": lambda: Nesterov(lr=0.05, momentum=0.7),
    "adagrad": lambda: AdaGrad(lr=0.1),
    "rmsprop": lambda: RMSprop(lr=0.01, decay_rate=0.95),
    "adam": lambda: Adam(lr=0.01),
    "adamw": lambda: AdamW(lr=0.01, weight_decay=0.1),
}


@pytest.mark.parametrize("name", list(FUSED))
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_fused_optimizer_matches_generic_bit_for_bit(gpu_xp, rng, name, dtype):
    """Each optimizer's one-kernel update equals its generic update, over three steps
    with the learning rate changed in between (the kernels read it from the GPU)."""
    xp = gpu_xp
    p0 = {k: rng.standard_normal((7, 5)).astype(dtype) for k in ("W1", "b1")}
    grads = [{k: rng.standard_normal((7, 5)).astype(dtype) for k in p0} for _ in range(3)]

    def run():
        params = {k: xp.asarray(v) for k, v in p0.items()}
        opt = FUSED[name]()
        for i, g in enumerate(grads):
            opt.lr = opt.lr * (1.0 - 0.3 * i)
            opt.update(params, {k: xp.asarray(v) for k, v in g.items()})
        state = opt.state_dict()
        return (*params.values(), *(a for table in state["slots"].values()
                                    for a in table.values()))

    generic, kernel = both_paths(run)
    for g, k in zip(generic, kernel, strict=True):
        np.testing.assert_array_equal(k, g)


def test_network_gradient_with_kernels_matches_generic(gpu_xp, rng):
    xp = gpu_xp
    x = xp.asarray(rng.standard_normal((4, 1, 12, 12)))
    t = xp.asarray(rng.integers(0, 10, 4))
    conv_param = {"filter_num": 3, "filter_size": 3, "pad": 1, "stride": 1}

    def run():
        seed(0)  # the same weights on both paths
        net = SimpleConvNet(input_dim=(1, 12, 12), conv_param=conv_param, hidden_size=8,
                            weight_init_std=0.1, dtype="float64")
        grads = net.gradient(x, t)
        return [grads[k] for k in sorted(grads)]

    generic, kernel = both_paths(run)
    for g, k in zip(generic, kernel, strict=True):
        np.testing.assert_allclose(k, g, rtol=1e-10, atol=1e-12)
