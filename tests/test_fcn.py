"""An Affine layer is a convolution whose filters cover the whole input (the book's 8.5.2).

FCN replaces the fully connected layers by convolutions: an Affine over a 32x10x10 input
with M outputs is a convolution with M filters of 32x10x10 and the same weights, giving
an (N, M, 1, 1) output; on a larger input the same convolution slides the Affine over
every 10x10 window.  Both directions are checked, forward and backward, in float64.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import to_numpy
from xpnet.layers import Affine, Convolution

C, H, W, M = 32, 10, 10, 10


def pair(xp, rng, dtype=np.float64):
    """An Affine (C*H*W -> M) and the Convolution with the same weights and bias."""
    w = rng.standard_normal((C * H * W, M)) / np.sqrt(C * H * W)
    b = rng.standard_normal(M)
    affine = Affine(xp.asarray(w, dtype=dtype), xp.asarray(b, dtype=dtype))
    # Affine row k is the input feature k of x.reshape(N, -1), i.e. (c, i, j) in C order;
    # filter m of the convolution is column m of W laid out the same way.
    filters = xp.asarray(w.T.reshape(M, C, H, W), dtype=dtype)
    conv = Convolution(filters, xp.asarray(b, dtype=dtype), stride=1, pad=0)
    return affine, conv


@pytest.mark.parametrize("n", [1, 5])
def test_affine_equals_full_size_convolution(xp, rng, n):
    affine, conv = pair(xp, rng)
    x = xp.asarray(rng.standard_normal((n, C, H, W)))
    y_affine = affine.forward(x)
    y_conv = conv.forward(x)
    assert y_affine.shape == (n, M)
    assert y_conv.shape == (n, M, 1, 1)
    np.testing.assert_allclose(to_numpy(y_conv).reshape(n, M), to_numpy(y_affine),
                               rtol=1e-12, atol=1e-12)

    dout = xp.asarray(rng.standard_normal((n, M)))
    dx_affine = affine.backward(dout)
    dx_conv = conv.backward(dout.reshape(n, M, 1, 1))
    assert dx_affine.shape == dx_conv.shape == (n, C, H, W)
    np.testing.assert_allclose(to_numpy(dx_conv), to_numpy(dx_affine), rtol=1e-12,
                               atol=1e-12)
    # the same parameter gradients, in each layer's layout
    np.testing.assert_allclose(to_numpy(conv.grads["W"]).reshape(M, -1).T,
                               to_numpy(affine.grads["W"]), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(to_numpy(conv.grads["b"]), to_numpy(affine.grads["b"]),
                               rtol=1e-12, atol=1e-12)


def test_float32_agrees_too(xp, rng):
    affine, conv = pair(xp, rng, np.float32)
    x = xp.asarray(rng.standard_normal((3, C, H, W)), dtype=np.float32)
    y_conv = conv.forward(x)
    assert y_conv.dtype == np.float32
    np.testing.assert_allclose(to_numpy(y_conv).reshape(3, M), to_numpy(affine.forward(x)),
                               rtol=1e-5, atol=1e-5)


def test_the_convolution_slides_the_affine_over_a_larger_input(xp, rng):
    """On a 14x13 input the convolution scores every 10x10 window: a (N, M, 5, 4) map
    whose entry (i, j) is the Affine applied to the window at (i, j)."""
    affine, conv = pair(xp, rng)
    x = xp.asarray(rng.standard_normal((2, C, 14, 13)))
    y = to_numpy(conv.forward(x))
    assert y.shape == (2, M, 5, 4)
    for i in range(5):
        for j in range(4):
            window = x[:, :, i:i + H, j:j + W]
            np.testing.assert_allclose(y[:, :, i, j], to_numpy(affine.forward(window)),
                                       rtol=1e-12, atol=1e-12)


def test_a_different_layout_is_not_the_same_layer(xp, rng):
    """The filters must follow the Affine's input order: transposing the 10x10 spatial
    axes of each filter gives another function (so the tests above can fail)."""
    affine, conv = pair(xp, rng)
    swapped = Convolution(conv.params["W"].transpose(0, 1, 3, 2).copy(), conv.params["b"])
    x = xp.asarray(rng.standard_normal((2, C, H, W)))
    diff = np.abs(to_numpy(swapped.forward(x)).reshape(2, M) - to_numpy(affine.forward(x)))
    assert diff.max() > 1e-3
