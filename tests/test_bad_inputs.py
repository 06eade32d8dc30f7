"""Bad input gets a specific exception naming the layer and expected vs received."""

from __future__ import annotations

import numpy as np
import pytest

from xpnet import backend
from xpnet.backend import BackendMismatchError
from xpnet.layers import (
    Affine,
    AvgPooling,
    BatchNormalization,
    Convolution,
    Dropout,
    Flatten,
    Pooling,
    ReLU,
    SoftmaxWithLoss,
)


def conv(xp, c=3, k=3, stride=1, pad=0):
    return Convolution(xp.zeros((4, c, k, k), dtype=xp.float32), xp.zeros(4, dtype=xp.float32),
                       stride, pad)


def f32(xp, *shape):
    return xp.zeros(shape, dtype=xp.float32)


# (id, callable(xp) that must raise, exception type, substrings the message must contain)
CASES = [
    ("conv wrong channels", lambda xp: conv(xp).forward(f32(xp, 2, 1, 8, 8)),
     ValueError, ["Convolution", "channels", "expected 3", "received 1"]),
    ("conv wrong ndim", lambda xp: conv(xp).forward(f32(xp, 2, 3, 8)),
     ValueError, ["Convolution", "ndim", "expected 4", "received 3"]),
    ("conv kernel larger than padded input", lambda xp: conv(xp, k=5).forward(f32(xp, 1, 3, 3, 3)),
     ValueError, ["Convolution", "padded input size", "(3, 3)"]),
    ("conv non-integral output", lambda xp: conv(xp, stride=2).forward(f32(xp, 1, 3, 8, 8)),
     ValueError, ["Convolution", "divisible by stride 2", "8 - 3 = 5"]),
    ("conv empty batch", lambda xp: conv(xp).forward(f32(xp, 0, 3, 8, 8)),
     ValueError, ["Convolution", "batch size", "received 0"]),
    ("conv float64 input into float32 layer", lambda xp: conv(xp).forward(xp.zeros((1, 3, 8, 8))),
     TypeError, ["Convolution", "dtype", "float32", "float64"]),
    ("conv integer input", lambda xp: conv(xp).forward(xp.zeros((1, 3, 8, 8), dtype=xp.int32)),
     TypeError, ["Convolution", "dtype", "int32"]),
    ("conv negative pad", lambda xp: conv(xp, pad=-1),
     ValueError, ["Convolution", "pad", "received -1"]),
    ("conv fractional stride", lambda xp: conv(xp, stride=1.5),
     ValueError, ["Convolution", "stride", "an integer >= 1", "received 1.5"]),
    ("conv bias shape", lambda xp: Convolution(f32(xp, 4, 3, 3, 3), f32(xp, 3)),
     ValueError, ["Convolution", "b.shape", "(4,)", "(3,)"]),
    ("conv wrong dout shape", lambda xp: (lambda c: (c.forward(f32(xp, 1, 3, 5, 5)),
                                                      c.backward(f32(xp, 1, 4, 2, 2))))(conv(xp)),
     ValueError, ["Convolution", "dout.shape", "(1, 4, 3, 3)", "(1, 4, 2, 2)"]),
    ("backward before forward", lambda xp: conv(xp).backward(f32(xp, 1, 4, 3, 3)),
     RuntimeError, ["Convolution", "before forward"]),
    ("affine wrong features", lambda xp: Affine(f32(xp, 6, 2), f32(xp, 2)).forward(f32(xp, 3, 5)),
     ValueError, ["Affine", "features", "expected 6", "received 5"]),
    ("affine 1-d input", lambda xp: Affine(f32(xp, 6, 2), f32(xp, 2)).forward(f32(xp, 6)),
     ValueError, ["Affine", "ndim", "received 1"]),
    ("pool wrong ndim", lambda xp: Pooling(2, 2, 2).forward(f32(xp, 4, 4)),
     ValueError, ["Pooling", "ndim", "expected 4", "received 2"]),
    ("pool non-integral output", lambda xp: Pooling(2, 2, 2).forward(f32(xp, 1, 1, 5, 5)),
     ValueError, ["Pooling", "divisible by stride 2", "5 - 2 = 3"]),
    ("pool window larger than input", lambda xp: AvgPooling(4, 4, 1).forward(f32(xp, 1, 1, 3, 3)),
     ValueError, ["AvgPooling", "padded input size", "(3, 3)"]),
    ("pool pad over half window", lambda xp: Pooling(2, 2, 1, 2),
     ValueError, ["Pooling", "pad", "received 2"]),
    ("batchnorm wrong channels", lambda xp: BatchNormalization(
        xp.ones(3, dtype=xp.float32), f32(xp, 3)).forward(f32(xp, 2, 4, 2, 2)),
     ValueError, ["BatchNormalization", "channels", "expected 3", "received 4"]),
    ("batchnorm 3-d input", lambda xp: BatchNormalization(
        xp.ones(3, dtype=xp.float32), f32(xp, 3)).forward(f32(xp, 2, 3, 2)),
     ValueError, ["BatchNormalization", "ndim", "received 3"]),
    ("dropout ratio 1", lambda xp: Dropout(1.0),
     ValueError, ["Dropout", "dropout_ratio", "received 1.0"]),
    ("relu on a list", lambda xp: ReLU().forward([1.0, -1.0]),
     TypeError, ["ReLU", "input type", "received list"]),
    ("flatten empty batch", lambda xp: Flatten().forward(f32(xp, 0, 3)),
     ValueError, ["Flatten", "batch size", "received 0"]),
    ("label 10 of 10 classes", lambda xp: SoftmaxWithLoss().forward(
        f32(xp, 2, 10), xp.asarray(np.array([3, 10]))),
     ValueError, ["SoftmaxWithLoss", "label range", "0..9", "3..10"]),
    ("label -1", lambda xp: SoftmaxWithLoss().forward(
        f32(xp, 2, 10), xp.asarray(np.array([-1, 0]))),
     ValueError, ["SoftmaxWithLoss", "label range", "0..9", "-1..0"]),
    ("float labels", lambda xp: SoftmaxWithLoss().forward(f32(xp, 2, 10), xp.asarray([1.0, 2.0])),
     TypeError, ["SoftmaxWithLoss", "label dtype", "integer", "float64"]),
    ("one-hot of the wrong width", lambda xp: SoftmaxWithLoss().forward(
        f32(xp, 2, 10), xp.asarray(np.eye(9)[[0, 1]])),
     ValueError, ["SoftmaxWithLoss", "labels shape", "(2, 10) one-hot", "received (2, 9)"]),
    ("one-hot with two ones", lambda xp: SoftmaxWithLoss().forward(
        f32(xp, 1, 3), xp.asarray(np.array([[1, 1, 0]]))),
     ValueError, ["SoftmaxWithLoss", "one-hot", "exactly one 1"]),
    ("label count differs", lambda xp: SoftmaxWithLoss().forward(
        f32(xp, 3, 10), xp.asarray(np.array([1, 2]))),
     ValueError, ["SoftmaxWithLoss", "labels shape", "expected (3,)", "received (2,)"]),
    ("scores of ndim 1", lambda xp: SoftmaxWithLoss().forward(
        f32(xp, 3), xp.asarray(np.array([1, 2, 3]))),
     ValueError, ["SoftmaxWithLoss", "ndim", "received 1"]),
    ("empty batch into loss", lambda xp: SoftmaxWithLoss().forward(
        f32(xp, 0, 10), xp.asarray(np.array([], dtype=np.int64))),
     ValueError, ["SoftmaxWithLoss", "batch size", "received 0"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_clear_error(xp, case):
    _, call, exc_type, fragments = case
    with pytest.raises(exc_type) as info:
        call(xp)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_at_least_twenty_cases():
    assert len(CASES) >= 20


@pytest.mark.gpu
@pytest.mark.skipif(not backend.is_gpu_available(),
                    reason="mixing backends needs CuPy and a GPU")
def test_mixed_backends_named():
    import cupy

    layer = Affine(cupy.zeros((4, 2), dtype=cupy.float32), cupy.zeros(2, dtype=cupy.float32))
    with pytest.raises(BackendMismatchError, match=r"Affine: NumPy and CuPy arrays mixed"):
        layer.forward(np.zeros((3, 4), dtype=np.float32))
    loss = SoftmaxWithLoss()
    with pytest.raises(BackendMismatchError, match="SoftmaxWithLoss"):
        loss.forward(cupy.zeros((2, 3), dtype=cupy.float32), np.array([0, 1]))
