"""Convolutional networks: the book's SimpleConvNet (ch. 7) and DeepConvNet (ch. 8).

One builder, shared with the chapter 8 networks (``xpnet.models.zoo``), tracks the
shape of one sample (C, H, W) through the layers while creating them, so the first
Affine's fan-in is computed rather than hard-coded, and a configuration whose
convolution or pooling output is not a whole number fails at construction with an
error naming the layer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

from xpnet.init import init_weight
from xpnet.layers import (
    Affine,
    BatchNormalization,
    Convolution,
    ConvReLU,
    Dropout,
    Layer,
    Pooling,
    ReLU,
)
from xpnet.models._util import float_dtype, init_spec, ones, positive_int, zeros
from xpnet.models.network import Sequential

__all__ = ["SimpleConvNet", "DeepConvNet"]

Shape = tuple[int, int, int]
_CONV_KEYS = ("filter_num", "filter_size", "pad", "stride")


def _conv_param(model: str, what: str, value: Any, default: Mapping[str, int]) -> dict:
    """A complete conv_param dict: ``value`` over ``default``, every entry checked."""
    if not isinstance(value, Mapping):
        raise TypeError(f"{model}: {what}: expected a dict with keys {_CONV_KEYS}, got {value!r}")
    unknown = sorted(set(value) - set(_CONV_KEYS))
    if unknown:
        raise ValueError(f"{model}: {what}: unknown keys {unknown}; valid keys: {_CONV_KEYS}")
    merged = {**default, **value}
    return {k: positive_int(model, f"{what}['{k}']", merged[k], 0 if k == "pad" else 1)
            for k in _CONV_KEYS}


def _input_dim(model: str, input_dim: Any) -> Shape:
    if isinstance(input_dim, (str, bytes)) or not isinstance(input_dim, Sequence) \
            or len(input_dim) != 3:
        raise ValueError(f"{model}: input_dim: expected (C, H, W), got {input_dim!r}")
    return tuple(positive_int(model, f"input_dim[{i}]", d) for i, d in enumerate(input_dim))


def _out_size(model: str, layer: str, axis: str, size: int, k: int, stride: int,
              pad: int) -> int:
    span = size + 2 * pad - k
    if span < 0 or span % stride:
        raise ValueError(
            f"{model}: {layer}: output {axis} ({size} + 2*{pad} - {k}) / {stride} + 1 = "
            f"{span / stride + 1:g} is not a whole number >= 1; change the input size or "
            "the filter size, pad or stride"
        )
    return span // stride + 1


class _Builder:
    """Creates layers while tracking the shape of one sample (C, H, W): each method takes
    the input shape and returns the layers with their output shape.  Convolutions and
    poolings are counted, so a size that is not a whole number names its layer."""

    def __init__(self, model: str, dtype: Any, spec: Any = "he",
                 batchnorm: bool = False) -> None:
        self.model, self.dtype, self.spec, self.batchnorm = model, dtype, spec, batchnorm
        self.n_conv = self.n_pool = 0

    def conv(self, shape: Shape, out: int, k: int, stride: int = 1, pad: int | None = None,
             relu: bool = True, batchnorm: bool | None = None,
             what: str | None = None) -> tuple[list[Layer], Shape]:
        """A k x k convolution (pad (k-1)/2 unless given), then batch normalisation (the
        builder's default unless ``batchnorm`` says) and a ReLU (if ``relu``); without
        batch normalisation the convolution and ReLU are one ConvReLU layer.  ``what``
        names it in errors (default: its size and stride)."""
        self.n_conv += 1
        label = f"Convolution {self.n_conv} ({what or f'{k}x{k}, stride {stride}'})"
        pad = (k - 1) // 2 if pad is None else pad
        c, h, w = shape
        oh = _out_size(self.model, label, "height", h, k, stride, pad)
        ow = _out_size(self.model, label, "width", w, k, stride, pad)
        W = init_weight((out, c, k, k), self.spec, self.dtype)
        b = zeros(out, self.dtype)
        if self.batchnorm if batchnorm is None else batchnorm:
            layers: list[Layer] = [Convolution(W, b, stride, pad),
                                   BatchNormalization(ones(out, self.dtype),
                                                      zeros(out, self.dtype))]
            if relu:
                layers.append(ReLU())
        else:
            layers = [(ConvReLU if relu else Convolution)(W, b, stride, pad)]
        return layers, (out, oh, ow)

    def pool(self, shape: Shape, k: int = 2, stride: int = 2,
             pad: int = 0) -> tuple[Layer, Shape]:
        """Max pooling k x k (the book's: 2x2, stride 2)."""
        self.n_pool += 1
        label = f"Pooling {self.n_pool} ({k}x{k}, stride {stride})"
        c, h, w = shape
        return Pooling(k, k, stride, pad), (
            c, _out_size(self.model, label, "height", h, k, stride, pad),
            _out_size(self.model, label, "width", w, k, stride, pad))

    def affine(self, n_in: int, out: int) -> Affine:
        return Affine(init_weight((n_in, out), self.spec, self.dtype), zeros(out, self.dtype))


_SIMPLE_CONV = MappingProxyType({"filter_num": 30, "filter_size": 5, "pad": 0, "stride": 1})


class SimpleConvNet(Sequential):
    """conv - relu - pool - affine - relu - affine - softmax (the book's chapter 7).

    The pooling is 2x2 max pooling with stride 2.  ``weight_init_std`` is the std
    of every weight (0.01 in the book), or a scheme name ('he', 'xavier', ...)
    applied with each layer's own fan-in.  Flat input (N, C*H*W) is accepted.

    params: W1, b1 (convolution), W2, b2, W3, b3 (affine).
    """

    model_name = "simple-convnet"

    def __init__(self, input_dim: Sequence[int] = (1, 28, 28),
                 conv_param: Mapping[str, int] = _SIMPLE_CONV, hidden_size: int = 100,
                 output_size: int = 10, weight_init_std: float | str = 0.01,
                 dtype: Any = None) -> None:
        name = type(self).__name__
        dim = _input_dim(name, input_dim)
        p = _conv_param(name, "conv_param", conv_param, _SIMPLE_CONV)
        hidden = positive_int(name, "hidden_size", hidden_size)
        out = positive_int(name, "output_size", output_size)
        spec = init_spec(weight_init_std)
        dt = float_dtype(name, dtype)
        b = _Builder(name, dt, spec)
        conv, shape = b.conv(dim, p["filter_num"], p["filter_size"], p["stride"], p["pad"],
                             what="conv_param")
        pool, shape = b.pool(shape)
        layers = [*conv, pool, b.affine(math.prod(shape), hidden), ReLU(),
                  b.affine(hidden, out)]
        config = {"input_dim": list(dim), "conv_param": p, "hidden_size": hidden,
                  "output_size": out, "weight_init_std": spec, "dtype": dt.name}
        super().__init__(layers, config=config, input_shape=dim)


_DEEP_CONV = tuple(
    MappingProxyType({"filter_num": n, "filter_size": 3, "pad": pad, "stride": 1})
    for n, pad in ((16, 1), (16, 1), (32, 1), (32, 2), (64, 1), (64, 1))
)


class DeepConvNet(Sequential):
    """The book's chapter 8 network for about 99% on MNIST.

    conv - relu - conv - relu - pool - conv - relu - conv - relu - pool -
    conv - relu - conv - relu - pool - affine - relu - dropout - affine - dropout -
    softmax, with He initialisation (std sqrt(2 / fan_in), fan-ins from the shapes:
    9, 144, 144, 288, 288, 576, 1024, 50 for the defaults) and dropout ratio 0.5.
    conv_param_4 pads by 2, which makes 28 -> 14 -> 16 -> 8 -> 4.

    params: W1..W6, b1..b6 (convolutions), W7, b7, W8, b8 (affine).
    """

    model_name = "deep-convnet"

    def __init__(self, input_dim: Sequence[int] = (1, 28, 28),
                 conv_param_1: Mapping[str, int] = _DEEP_CONV[0],
                 conv_param_2: Mapping[str, int] = _DEEP_CONV[1],
                 conv_param_3: Mapping[str, int] = _DEEP_CONV[2],
                 conv_param_4: Mapping[str, int] = _DEEP_CONV[3],
                 conv_param_5: Mapping[str, int] = _DEEP_CONV[4],
                 conv_param_6: Mapping[str, int] = _DEEP_CONV[5],
                 hidden_size: int = 50, output_size: int = 10, dtype: Any = None) -> None:
        name = type(self).__name__
        dim = _input_dim(name, input_dim)
        given = (conv_param_1, conv_param_2, conv_param_3, conv_param_4, conv_param_5,
                 conv_param_6)
        ps = [_conv_param(name, f"conv_param_{i + 1}", p, _DEEP_CONV[i])
              for i, p in enumerate(given)]
        hidden = positive_int(name, "hidden_size", hidden_size)
        out = positive_int(name, "output_size", output_size)
        dt = float_dtype(name, dtype)
        b = _Builder(name, dt, "he")
        layers: list[Layer] = []
        shape = dim
        for i, p in enumerate(ps):
            conv, shape = b.conv(shape, p["filter_num"], p["filter_size"], p["stride"],
                                 p["pad"], what=f"conv_param_{i + 1}")
            layers += conv
            if i % 2 == 1:
                pool, shape = b.pool(shape)
                layers.append(pool)
        layers += [b.affine(math.prod(shape), hidden), ReLU(), Dropout(0.5),
                   b.affine(hidden, out), Dropout(0.5)]
        config = {"input_dim": list(dim),
                  **{f"conv_param_{i + 1}": p for i, p in enumerate(ps)},
                  "hidden_size": hidden, "output_size": out, "dtype": dt.name}
        super().__init__(layers, config=config, input_shape=dim)
