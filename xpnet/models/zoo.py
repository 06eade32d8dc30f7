"""Chapter 8's deeper networks: VGG, GoogLeNet and ResNet, built from composable layers.

Each builder tracks the shape of one sample (C, H, W) while it creates the layers,
so the classifier's fan-in follows from the input size, and a geometry that does not
fit fails at construction with an error naming the layer.  xpnet's convolutions and
poolings need whole output sizes ((H + 2*pad - kernel) divisible by the stride; no
rounding down as in PyTorch), which shapes two choices below: VGG's 2x2 poolings need
even sizes, and ResNet's stride-2 layers (3x3 pad 1, and the 1x1 projection) need odd
ones, which its 4x4 stem provides (28 -> 25 -> 13 -> 7).

Weights: He initialisation (std sqrt(2 / fan_in), fan-in from the weight's shape) for
every convolution and Affine; batch normalisation starts at gamma 1, beta 0.  A
convolution followed by batch normalisation keeps its bias, whose gradient is then
zero (the normalisation subtracts it again).

Parameter names follow :func:`xpnet.layers.compose.named_slots`: ``W1, b1, gamma1, ...``
in order; GoogLeNet's Inception blocks are named ``inception1`` ... and ResNet's
stages ``stage1`` ... (``stage2.W3``), so ``freeze('stage1')`` or a learning-rate group
can select them.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

from xpnet.layers import (
    Chain,
    Dropout,
    GlobalAveragePooling,
    Layer,
    Parallel,
    ReLU,
    residual,
)
from xpnet.models._util import float_dtype, positive_int
from xpnet.models.convnet import _Builder, _input_dim
from xpnet.models.network import Network, check_lambda

__all__ = ["VGG", "GoogLeNet", "ResNet", "VGG_CONFIGS", "GOOGLENET_CONFIGS"]

Shape = tuple[int, int, int]

#: VGG's feature extractors: output channels of each 3x3 convolution, "M" a 2x2 max
#: pooling.  "vgg11" ... "vgg19" are the paper's configurations A, B, D and E
#: (Simonyan & Zisserman, 2015); with their two hidden fully connected layers they
#: have 11, 13, 16 and 19 weight layers.  "mnist" is a narrower net for 28x28 digits
#: (two poolings: 28 -> 14 -> 7, as a third would need an even size).
VGG_CONFIGS: dict[str, tuple[int | str, ...]] = {
    "mnist": (32, 32, "M", 64, 64, "M", 128, 128),
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg13": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"),
    "vgg19": (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"),
}
# The hidden fully connected layers by default: the paper's two of 4096 for its
# configurations; one of 256 for "mnist" and for a configuration given as a list.
_VGG_HIDDEN = {"mnist": (256,), "vgg11": (4096, 4096), "vgg13": (4096, 4096),
               "vgg16": (4096, 4096), "vgg19": (4096, 4096)}
_VGG_HIDDEN_LIST = (256,)

#: GoogLeNet's layers: an int is a 3x3 convolution with that many channels (the
#: stem), "M" a 2x2 max pooling, and a 6-list an Inception block with the columns of
#: the paper's table 1 (Szegedy et al., 2015): #1x1, #3x3 reduce, #3x3, #5x5 reduce,
#: #5x5, pool proj; its output has #1x1 + #3x3 + #5x5 + pool proj channels.  "mnist"
#: is the paper's inception (3a)-(4b) at a quarter of the widths, after a one-layer
#: stem, for 28x28 digits (28 -> 14 -> 7).
GOOGLENET_CONFIGS: dict[str, tuple[Any, ...]] = {
    "mnist": (32, "M",
              (16, 24, 32, 4, 8, 8), (32, 32, 48, 8, 24, 16), "M",
              (48, 24, 52, 4, 12, 16), (40, 28, 56, 6, 16, 16)),
}


# ----------------------------------------------------------------- building
def _plain(b: _Builder, shape: Shape, v: int | str) -> tuple[list[Layer], Shape]:
    """A VGG-notation entry: "M" a 2x2 max pooling, an int a 3x3 convolution block."""
    if v == "M":
        layer, shape = b.pool(shape)
        return [layer], shape
    return b.conv(shape, v, 3)


def _chain(layers: list[Layer]) -> Layer:
    return layers[0] if len(layers) == 1 else Chain(*layers)


def _flag(model: str, what: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{model}: {what}: expected True or False, got {value!r}")
    return value


def _ratio(model: str, what: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) \
            or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{model}: {what}: expected a number in [0, 1), got {value!r}")
    return float(value)


def _preset(model: str, config: Any, presets: dict[str, Any]) -> tuple[str | None, list]:
    """(preset name or None, the layer list) for ``config``: a preset name or a list."""
    if isinstance(config, str):
        key = config.strip().lower()
        if key not in presets:
            raise ValueError(f"{model}: config: unknown preset {config!r}; presets: "
                             f"{', '.join(presets)}, or a list of layers")
        return key, list(presets[key])
    if isinstance(config, (bytes, bytearray)) or not isinstance(config, Sequence) \
            or not config:
        raise TypeError(f"{model}: config: expected a preset name ({', '.join(presets)}) "
                        f"or a non-empty list of layers, got {config!r}")
    return None, list(config)


# ----------------------------------------------------------------- VGG
class VGG(Network):
    """A VGG net (Simonyan & Zisserman, 2015): stacked 3x3 convolutions (pad 1), each
    followed by a ReLU (batch normalisation before it with ``batchnorm``), 2x2 max
    poolings, then fully connected layers, each hidden one followed by ReLU and
    Dropout(``dropout``).

    Args:
        config: a preset of :data:`VGG_CONFIGS` (``"mnist"``, ``"vgg11"``, ``"vgg13"``,
            ``"vgg16"``, ``"vgg19"``) or a list like ``[64, 64, "M", 128, ...]``
            (channels of each 3x3 convolution; "M" a 2x2 max pooling, which needs an
            even size).  The presets build for any input size their poolings allow
            (e.g. 3x32x32 for "vgg16": 32 -> 1 after five poolings); the first Affine's
            fan-in is computed from the shape reached.
        hidden_size: the widths of the hidden fully connected layers: a list (``[]``:
            none), or one int for each of the default ones; None: the default, two of
            4096 for the paper's presets (as in the paper), one of 256 for "mnist" and
            for a list.
        batchnorm: batch normalisation after each convolution (not in the paper; it
            lets these depths train with Adam from He initialisation).
        dropout: the dropout ratio after each hidden fully connected layer (0.5 in the
            paper); 0 adds no Dropout layers.

    params: ``W1, b1, gamma1, beta1, ...`` for the convolutions (and their batch
    normalisation), then the fully connected layers' ``W, b``.
    """

    model_name = "vgg"

    def __init__(self, config: str | Sequence[int | str] = "mnist",
                 input_dim: Sequence[int] = (1, 28, 28), output_size: int = 10,
                 hidden_size: int | Sequence[int] | None = None, batchnorm: bool = True,
                 dropout: float = 0.5, weight_decay_lambda: float = 0.0,
                 dtype: Any = None) -> None:
        name = type(self).__name__
        preset, spec = _preset(name, config, VGG_CONFIGS)
        for i, v in enumerate(spec):
            if v != "M":
                spec[i] = positive_int(name, f"config[{i}] (channels, or 'M')", v)
        if not any(v != "M" for v in spec):
            raise ValueError(f"{name}: config has no convolution: {spec!r}")
        default = _VGG_HIDDEN[preset] if preset else _VGG_HIDDEN_LIST
        if hidden_size is None:
            hidden = list(default)
        elif isinstance(hidden_size, numbers.Integral) and not isinstance(hidden_size, bool):
            hidden = [positive_int(name, "hidden_size", hidden_size)] * len(default)
        elif isinstance(hidden_size, Sequence) and not isinstance(hidden_size, str):
            hidden = [positive_int(name, f"hidden_size[{i}]", v)
                      for i, v in enumerate(hidden_size)]
        else:
            raise TypeError(f"{name}: hidden_size: expected an int, a list of ints or "
                            f"None, got {hidden_size!r}")
        dim = _input_dim(name, input_dim)
        out = positive_int(name, "output_size", output_size)
        bn = _flag(name, "batchnorm", batchnorm)
        ratio = _ratio(name, "dropout", dropout)
        lam = check_lambda(weight_decay_lambda)
        dt = float_dtype(name, dtype)

        b = _Builder(name, dt, "he", bn)
        layers: list[Layer] = []
        shape = dim
        for v in spec:
            block, shape = _plain(b, shape, v)
            layers += block
        n_in = math.prod(shape)
        for width in hidden:
            layers += [b.affine(n_in, width), ReLU()]
            if ratio:
                layers.append(Dropout(ratio))
            n_in = width
        layers.append(b.affine(n_in, out))
        cfg = {"config": preset if preset else spec, "input_dim": list(dim),
               "output_size": out, "hidden_size": hidden, "batchnorm": bn,
               "dropout": ratio, "weight_decay_lambda": lam, "dtype": dt.name}
        super().__init__(layers, weight_decay_lambda=lam, config=cfg, input_shape=dim)


# ----------------------------------------------------------------- GoogLeNet
def _inception_spec(model: str, i: int, v: Any) -> list[int]:
    if isinstance(v, (str, bytes)) or not isinstance(v, Sequence) or len(v) != 6:
        raise ValueError(f"{model}: config[{i}]: expected channels (int), 'M' or an "
                         f"Inception block [#1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, "
                         f"pool proj], got {v!r}")
    return [positive_int(model, f"config[{i}][{j}]", c) for j, c in enumerate(v)]


class GoogLeNet(Network):
    """A small GoogLeNet (Szegedy et al., 2015): a convolutional stem, Inception blocks,
    global average pooling, Dropout(``dropout``) and one Affine.

    An Inception block runs four paths on its input and concatenates their channels
    (``Parallel(merge="concat")``): a 1x1 convolution; 1x1 -> 3x3; 1x1 -> 5x5 (two 3x3
    with ``factorize_5x5``, as in Inception v2: the same receptive field for 18 weights
    per channel pair instead of 25); 3x3 max pooling (stride 1, pad 1) -> 1x1.  Every
    convolution is followed by a ReLU, with batch normalisation before it when
    ``batchnorm`` (the paper has none; Inception v2 added it).

    Args:
        config: a preset of :data:`GOOGLENET_CONFIGS` (``"mnist"``) or a list whose
            entries are an int (a 3x3 convolution with that many channels), "M" (2x2
            max pooling) or a 6-list ``[#1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5,
            pool proj]`` (an Inception block, the columns of the paper's table 1).
        dropout: before the classifier (0.4 in the paper); 0 adds no Dropout layer.

    params: the stem's ``W1, b1, gamma1, beta1, ...``; each block's under its name,
    ``inception1.W1`` ... (paths in the order above); the classifier's ``W, b`` last.
    """

    model_name = "googlenet"

    def __init__(self, config: str | Sequence[Any] = "mnist",
                 input_dim: Sequence[int] = (1, 28, 28), output_size: int = 10,
                 batchnorm: bool = True, factorize_5x5: bool = False, dropout: float = 0.4,
                 weight_decay_lambda: float = 0.0, dtype: Any = None) -> None:
        name = type(self).__name__
        preset, spec = _preset(name, config, GOOGLENET_CONFIGS)
        for i, v in enumerate(spec):
            if v == "M":
                continue
            if isinstance(v, numbers.Integral):
                spec[i] = positive_int(name, f"config[{i}] (channels)", v)
            else:
                spec[i] = _inception_spec(name, i, v)
        if not any(v != "M" for v in spec):
            raise ValueError(f"{name}: config has no convolution: {spec!r}")
        dim = _input_dim(name, input_dim)
        out = positive_int(name, "output_size", output_size)
        bn = _flag(name, "batchnorm", batchnorm)
        factorize = _flag(name, "factorize_5x5", factorize_5x5)
        ratio = _ratio(name, "dropout", dropout)
        lam = check_lambda(weight_decay_lambda)
        dt = float_dtype(name, dtype)

        b = _Builder(name, dt, "he", bn)
        layers: list[Layer] = []
        shape = dim
        n_block = 0
        for v in spec:
            if v == "M" or isinstance(v, int):
                block, shape = _plain(b, shape, v)
                layers += block
            else:
                n_block += 1
                layer, shape = self._inception(b, shape, v, factorize, f"inception{n_block}")
                layers.append(layer)
        layers.append(GlobalAveragePooling())
        if ratio:
            layers.append(Dropout(ratio))
        layers.append(b.affine(shape[0], out))
        cfg = {"config": preset if preset else spec, "input_dim": list(dim),
               "output_size": out, "batchnorm": bn, "factorize_5x5": factorize,
               "dropout": ratio, "weight_decay_lambda": lam, "dtype": dt.name}
        super().__init__(layers, weight_decay_lambda=lam, config=cfg, input_shape=dim)

    @staticmethod
    def _inception(b: _Builder, shape: Shape, spec: list[int], factorize: bool,
                   name: str) -> tuple[Parallel, Shape]:
        c1, r3, c3, r5, c5, pp = spec
        p1, s1 = b.conv(shape, c1, 1)
        reduce3, s = b.conv(shape, r3, 1)
        conv3, s3 = b.conv(s, c3, 3)
        reduce5, s = b.conv(shape, r5, 1)
        if factorize:
            first, s = b.conv(s, c5, 3)
            second, s5 = b.conv(s, c5, 3)
            conv5 = first + second
        else:
            conv5, s5 = b.conv(s, c5, 5)
        pool, s = b.pool(shape, 3, 1, 1)
        proj, s4 = b.conv(s, pp, 1)
        paths = [_chain(p1), Chain(*reduce3, *conv3), Chain(*reduce5, *conv5),
                 Chain(pool, *proj)]
        channels = s1[0] + s3[0] + s5[0] + s4[0]
        return Parallel(*paths, merge="concat", name=name), (channels, *shape[1:])


# ----------------------------------------------------------------- ResNet
class ResNet(Network):
    """A ResNet of basic blocks (He et al., 2016, section 4.2's CIFAR design).

    stem: a ``stem_kernel`` x ``stem_kernel`` convolution (pad ``stem_pad``) to
    ``width`` channels, batch normalisation, ReLU; then three stages (named Chains
    ``stage1``, ``stage2``, ``stage3``) of (depth - 2) / 6 residual blocks each, with
    ``width``, 2*``width`` and 4*``width`` channels; global average pooling; one Affine.
    A block is ``ReLU(BN(conv3x3(ReLU(BN(conv3x3(x))))) + shortcut(x))``
    (:func:`xpnet.layers.compose.residual`).  The first block of stages 2 and 3 halves
    the size (its first convolution has stride 2) and doubles the channels; its
    shortcut is then a 1x1 convolution of stride 2 with batch normalisation (the
    paper's projection, option B); every other shortcut is the identity.  ``depth``
    counts the weight layers on the main path: the stem, 6n convolutions, the Affine.

    Stride-2 layers need an odd size here (xpnet's convolutions do not round down),
    so the 4x4 stem without padding maps 28x28 to 25x25 (25 -> 13 -> 7 in the stages;
    the blank border of MNIST loses nothing) and 32x32 to 29x29 (-> 15 -> 8).

    Defaults (depth 14, width 16, 0.18 M parameters) are sized for MNIST on a 2-core
    CPU; depth 20 is the paper's smallest CIFAR net.
    """

    model_name = "resnet"

    def __init__(self, depth: int = 14, width: int = 16,
                 input_dim: Sequence[int] = (1, 28, 28), output_size: int = 10,
                 stem_kernel: int = 4, stem_pad: int = 0, weight_decay_lambda: float = 0.0,
                 dtype: Any = None) -> None:
        name = type(self).__name__
        d = positive_int(name, "depth", depth, 8)
        if (d - 2) % 6:
            raise ValueError(f"{name}: depth: expected 6n + 2 (8, 14, 20, 26, 32, ...: the "
                             f"stem, 3 stages of n blocks of two convolutions, the Affine), "
                             f"got {depth!r}")
        n = (d - 2) // 6
        w = positive_int(name, "width", width)
        dim = _input_dim(name, input_dim)
        out = positive_int(name, "output_size", output_size)
        k = positive_int(name, "stem_kernel", stem_kernel)
        p = positive_int(name, "stem_pad", stem_pad, 0)
        lam = check_lambda(weight_decay_lambda)
        dt = float_dtype(name, dtype)

        b = _Builder(name, dt, "he", batchnorm=True)
        layers, shape = b.conv(dim, w, k, pad=p)
        if (shape[1] % 4, shape[2] % 4) != (1, 1):
            raise ValueError(
                f"{name}: the stem maps {dim[1]}x{dim[2]} to {shape[1]}x{shape[2]}; the two "
                "stride-2 stages need a size of 4m + 1 (25, 29, ...): choose stem_kernel "
                "and stem_pad so that size + 2*stem_pad - stem_kernel + 1 is one")
        for stage in range(3):
            channels = w * 2 ** stage
            blocks = []
            for j in range(n):
                stride = 2 if stage > 0 and j == 0 else 1
                first, s = b.conv(shape, channels, 3, stride)
                second, s = b.conv(s, channels, 3, relu=False)
                shortcut = None
                if stride != 1 or shape[0] != channels:
                    # 1x1 pad 0 and 3x3 pad 1 give the same size at stride 2 (odd sizes)
                    proj, _ = b.conv(shape, channels, 1, stride, relu=False)
                    shortcut = Chain(*proj)
                blocks.append(residual(Chain(*first, *second), shortcut))
                shape = s
            layers.append(Chain(*blocks, name=f"stage{stage + 1}"))
        layers += [GlobalAveragePooling(), b.affine(shape[0], out)]
        cfg = {"depth": d, "width": w, "input_dim": list(dim), "output_size": out,
               "stem_kernel": k, "stem_pad": p, "weight_decay_lambda": lam,
               "dtype": dt.name}
        super().__init__(layers, weight_decay_lambda=lam, config=cfg, input_shape=dim)
