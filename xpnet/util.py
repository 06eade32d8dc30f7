"""The book's ``common.util``, so that its scripts port with an import change.

``from common.util import smooth_curve`` becomes ``from xpnet.util import smooth_curve``;
the same goes for ``shuffle_dataset``, ``conv_output_size``, ``im2col`` and ``col2im``.

``im2col``/``col2im`` here use the book's layout, ``col`` of shape
(N*OH*OW, C*FH*FW), one row per output pixel.  xpnet's layers use the transpose,
(C*FH*FW, N*OH*OW), which makes a convolution one wide GEMM; that one is
:func:`xpnet.layers.im2col.im2col`, and the functions below wrap it.

Where these differ from the book (see docs/differences.md): ``im2col`` keeps the
input's dtype and device (the book's returns float64 on the host); ``conv_output_size``
returns an int and raises ValueError where the book returns a fraction;
``smooth_curve`` returns short curves (fewer than 11 points) unchanged instead of a
truncated array; ``shuffle_dataset`` accepts a ``seed``.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

from xpnet.backend import get_array_module, to_cpu
from xpnet.datasets import shuffle_dataset
from xpnet.layers import im2col as _im2col

__all__ = ["col2im", "conv_output_size", "im2col", "shuffle_dataset", "smooth_curve"]

Array = Any

#: the book's smoothing window: 11 points of a Kaiser window with beta 2
_WINDOW = 11
_BETA = 2.0


def smooth_curve(x: Any) -> np.ndarray:
    """The book's loss-curve smoother: a moving average weighted by an 11-point Kaiser
    window (beta 2), the ends padded with the curve reflected (as the book does).
    Returns a float64 host array as long as ``x``.

    ``x`` may be a list of losses (Python or NumPy numbers, 0-d arrays of either
    backend, as ``network.loss`` returns them) or a 1-D array.  A curve of fewer than 11
    points is returned unchanged (the book's returns a shorter, shifted array there).
    """
    if isinstance(x, (list, tuple)):
        values = np.array([float(to_cpu(v)) for v in x], dtype=np.float64)
    else:
        values = np.asarray(to_cpu(x), dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"smooth_curve: expected a 1-D curve, got shape {values.shape}")
    n = values.size
    if n < _WINDOW:
        return values.copy()
    half = _WINDOW - 1
    # as the book: reflected about the first point, and the last point repeated then reflected
    padded = np.concatenate([values[half:0:-1], values, values[-1:-_WINDOW:-1]])
    w = np.kaiser(_WINDOW, _BETA)
    smoothed = np.convolve(w / w.sum(), padded, mode="valid")
    return smoothed[half // 2: half // 2 + n]


def _int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def conv_output_size(input_size: int, filter_size: int, stride: int = 1, pad: int = 0) -> int:
    """Output length along one axis of a convolution or pooling window:
    ``(input_size + 2*pad - filter_size) / stride + 1``.

    The book returns this quotient as a float, fractional when the windows do not fit
    a whole number of times; here it is an int, and such sizes raise ValueError (xpnet's
    layers refuse them too).
    """
    size, k = _int("input_size", input_size, 1), _int("filter_size", filter_size, 1)
    s, p = _int("stride", stride, 1), _int("pad", pad, 0)
    span = size + 2 * p - k
    if span < 0:
        raise ValueError(f"conv_output_size: filter_size {k} is larger than the padded "
                         f"input ({size} + 2*{p})")
    if span % s:
        raise ValueError(f"conv_output_size: (input_size + 2*pad - filter_size) = {span} is "
                         f"not a multiple of stride {s}: the windows do not fit a whole "
                         "number of times")
    return span // s + 1


def _geometry_args(name: str, shape: Any, filter_h: Any, filter_w: Any, stride: Any,
                   pad: Any) -> tuple[int, int, int, int]:
    if len(shape) != 4:
        raise ValueError(f"{name}: expected (N, C, H, W) data, got shape {tuple(shape)}")
    fh, fw = _int("filter_h", filter_h, 1), _int("filter_w", filter_w, 1)
    s, p = _int("stride", stride, 1), _int("pad", pad, 0)
    h, w = shape[2] + 2 * p, shape[3] + 2 * p
    if h < fh or w < fw:
        raise ValueError(f"{name}: the filter ({fh}, {fw}) is larger than the padded input "
                         f"({h}, {w})")
    return fh, fw, s, p


def im2col(input_data: Array, filter_h: int, filter_w: int, stride: int = 1,
           pad: int = 0) -> Array:
    """The book's im2col: the patches of ``input_data`` (N, C, H, W) as the rows of a
    (N*OH*OW, C*FH*FW) array, row ``(n, oh, ow)`` holding the window under output
    pixel (oh, ow) of image n, channel-major as ``W.reshape(FN, -1)``.

    The transpose of :func:`xpnet.layers.im2col.im2col` (made contiguous), on the
    input's backend and in its dtype.  Windows that do not fit a whole number of
    times are cut off at the bottom/right, as in the book.
    """
    fh, fw, s, p = _geometry_args("im2col", input_data.shape, filter_h, filter_w, stride, pad)
    xp = get_array_module(input_data)
    return xp.ascontiguousarray(_im2col.im2col(input_data, fh, fw, s, p).T)


def col2im(col: Array, input_shape: tuple[int, int, int, int], filter_h: int, filter_w: int,
           stride: int = 1, pad: int = 0) -> Array:
    """The book's col2im: sums the rows of ``col`` (N*OH*OW, C*FH*FW), laid out as
    :func:`im2col` makes them, back into an array of ``input_shape`` (N, C, H, W); the
    adjoint of :func:`im2col` (overlapping windows add up)."""
    shape = tuple(int(d) for d in input_shape)
    fh, fw, s, p = _geometry_args("col2im", shape, filter_h, filter_w, stride, pad)
    n, c, h, w = shape
    oh, ow = (h + 2 * p - fh) // s + 1, (w + 2 * p - fw) // s + 1
    expected = (n * oh * ow, c * fh * fw)
    if tuple(col.shape) != expected:
        raise ValueError(f"col2im: col must have shape (N*OH*OW, C*FH*FW) = {expected} for "
                         f"input_shape {shape}, got {tuple(col.shape)}")
    return _im2col.col2im(col.T, shape, fh, fw, s, p)
