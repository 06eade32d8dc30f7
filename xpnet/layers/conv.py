"""Convolution layers, thin on top of :mod:`xpnet.layers.conv_functions`."""

from __future__ import annotations

import numbers
from typing import Any

import numpy

from xpnet.backend import get_default_dtype
from xpnet.backend import xp as _active
from xpnet.layers.base import Array, Layer, expect, expect_float_input
from xpnet.layers.conv_functions import (
    bias_gradient,
    conv2d,
    conv2d_grad_input,
    conv2d_grad_weight,
)

__all__ = ["Convolution", "ConvReLU", "Deconvolution", "bilinear_kernel"]


def _int_arg(layer: str, what: str, value: Any, low: int) -> int:
    """``value`` as an int; it must be a whole number (not a bool) >= ``low``."""
    ok = (isinstance(value, numbers.Real) and not isinstance(value, bool)
          and float(value).is_integer() and value >= low)
    expect(ok, layer, what, f"an integer >= {low}", repr(value))
    return int(value)


class _ConvBase(Layer):
    """Parameters W (4-D) and b, stride and pad, checked once at construction."""

    def __init__(self, W: Array, b: Array, stride: int, pad: int, out_axis: int) -> None:
        super().__init__()
        expect(getattr(W, "ndim", None) == 4, self.name, "W.ndim", 4, getattr(W, "ndim", None))
        fn = W.shape[out_axis]
        expect(b.shape == (fn,), self.name, "b.shape", (fn,), tuple(b.shape))
        self.stride = _int_arg(self.name, "stride", stride, 1)
        self.pad = _int_arg(self.name, "pad", pad, 0)
        self.params = {"W": W, "b": b}
        self.x: Array | None = None


class Convolution(_ConvBase):
    """2-D convolution (cross-correlation, as in the book).

    W: (FN, C, KH, KW), b: (FN,).  x: (N, C, H, W) -> y: (N, FN, OH, OW) with
    OH = (H + 2*pad - KH) / stride + 1, which must be a whole number.

    Unlike the book, the patch matrix is not kept between forward and backward:
    backward rebuilds it (see :mod:`xpnet.layers.conv_functions` for that and the
    CPU/GPU fast paths).
    """

    def __init__(self, W: Array, b: Array, stride: int = 1, pad: int = 0) -> None:
        super().__init__(W, b, stride, pad, out_axis=0)

    def _convolve(self, x: Array, relu: bool) -> Array:
        out = conv2d(x, self.params["W"], self.params["b"], self.stride, self.pad, relu,
                     name=self.name)
        self.x = x
        return out

    def forward(self, x: Array, train: bool = True) -> Array:
        return self._convolve(x, relu=False)

    def backward(self, dout: Array, need_input_grad: bool = True) -> Array | None:
        self._need_forward("x")
        x, W = self.x, self.params["W"]
        dW, db = conv2d_grad_weight(x, dout, W.shape, self.stride, self.pad, name=self.name)
        self.grads = {"W": dW, "b": db}
        if not need_input_grad:
            return None
        return conv2d_grad_input(dout, W, x.shape, self.stride, self.pad, name=self.name)


class ConvReLU(Convolution):
    """A Convolution followed by a ReLU, as one layer: y = max(conv(x), 0).

    Forward applies the ReLU in the convolution's output pass (one pass over y
    instead of two); backward masks dout by y > 0, then runs the convolution's
    backward.  Outputs and gradients equal Convolution then ReLU exactly; the
    parameters are the convolution's W and b.
    """

    def forward(self, x: Array, train: bool = True) -> Array:
        self.out = self._convolve(x, relu=True)
        return self.out

    def backward(self, dout: Array, need_input_grad: bool = True) -> Array | None:
        self._need_forward("out")
        xp = self._xp(dout=dout)
        out = self.out
        expect(getattr(dout, "shape", None) == out.shape, self.name, "dout.shape",
               tuple(out.shape), tuple(getattr(dout, "shape", ())))
        # The same operation as ReLU.backward, so the gradients agree bit for bit.
        return super().backward(xp.multiply(dout, out > 0, dtype=dout.dtype),
                                need_input_grad)


def bilinear_kernel(channels: int, kernel_size: int, dtype: Any = None) -> Array:
    """FCN's bilinear up-sampling weights for :class:`Deconvolution`: (C, C, K, K).

    Channel c maps to channel c only (no mixing), through the separable tent
    filter 1 - |i - center| / factor, factor = ceil(K / 2).  With K = 2*s - s % 2,
    stride s and pad ceil((s - 1) / 2) the layer up-samples by s, interpolating
    bilinearly between pixel centres (away from the border, which sees zeros).
    On the active backend; ``dtype`` defaults to xpnet's default float dtype.
    """
    c = _int_arg("bilinear_kernel", "channels", channels, 1)
    k = _int_arg("bilinear_kernel", "kernel_size", kernel_size, 1)
    factor = (k + 1) // 2
    center = factor - 1 if k % 2 == 1 else factor - 0.5
    tent = 1 - numpy.abs(numpy.arange(k) - center) / factor
    W = numpy.zeros((c, c, k, k))
    W[numpy.arange(c), numpy.arange(c)] = numpy.outer(tent, tent)
    return _active.asarray(W.astype(get_default_dtype() if dtype is None else dtype))


class Deconvolution(_ConvBase):
    """Transposed convolution (PyTorch's ConvTranspose2d without groups or dilation).

    W: (C_in, C_out, KH, KW), b: (C_out,).  x: (N, C_in, H, W) -> y: (N, C_out, OH, OW)
    with OH = (H - 1) * stride - 2 * pad + KH.  It is the input gradient of the
    Convolution with the same W, stride and pad (from C_out to C_in channels), so
    it runs the same functions with the roles swapped: forward is that input
    gradient, dx is that convolution's forward of dout, and dW its weight gradient
    with dout as the input and x as the upstream gradient.
    """

    def __init__(self, W: Array, b: Array, stride: int = 1, pad: int = 0) -> None:
        super().__init__(W, b, stride, pad, out_axis=1)

    @classmethod
    def upsampling(cls, channels: int, factor: int, dtype: Any = None) -> Deconvolution:
        """A layer that up-samples by ``factor`` by bilinear interpolation (FCN's init)."""
        s = _int_arg(cls.__name__, "factor", factor, 1)
        W = bilinear_kernel(channels, 2 * s - s % 2, dtype)
        b = _active.zeros(W.shape[1], dtype=W.dtype)
        return cls(W, b, stride=s, pad=s // 2)  # pad = ceil((s - 1) / 2)

    def output_shape(self, x_shape: tuple[int, ...]) -> tuple[int, int, int, int]:
        """(N, C_out, OH, OW) for an input of ``x_shape``, checked."""
        c_in, c_out, kh, kw = self.params["W"].shape
        expect(len(x_shape) == 4, self.name, "input ndim (N, C, H, W)", 4, len(x_shape))
        expect(x_shape[1] == c_in, self.name, "input channels", c_in, x_shape[1])
        oh = (x_shape[2] - 1) * self.stride - 2 * self.pad + kh
        ow = (x_shape[3] - 1) * self.stride - 2 * self.pad + kw
        expect(oh >= 1 and ow >= 1, self.name,
               f"output size (H - 1) * {self.stride} - 2 * {self.pad} + kernel",
               ">= 1 on both axes", (oh, ow))
        return (x_shape[0], c_out, oh, ow)

    def forward(self, x: Array, train: bool = True) -> Array:
        W, b = self.params["W"], self.params["b"]
        self._xp(x=x)
        expect_float_input(self.name, x, W.dtype)
        y_shape = self.output_shape(x.shape)
        y = conv2d_grad_input(x, W, y_shape, self.stride, self.pad, b, name=self.name)
        self.x = x
        return y

    def backward(self, dout: Array, need_input_grad: bool = True) -> Array | None:
        self._need_forward("x")
        x, W = self.x, self.params["W"]
        self._xp(x=x, dout=dout)
        y_shape = self.output_shape(x.shape)
        expect(tuple(getattr(dout, "shape", ())) == y_shape, self.name, "dout.shape",
               y_shape, tuple(getattr(dout, "shape", ())))
        dW, _ = conv2d_grad_weight(dout, x, W.shape, self.stride, self.pad, bias=False,
                                   name=self.name)
        self.grads = {"W": dW, "b": bias_gradient(dout)}
        if not need_input_grad:
            return None
        return conv2d(dout, W, None, self.stride, self.pad, name=self.name)
