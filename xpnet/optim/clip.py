"""Global gradient-norm clipping."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any

import numpy

from xpnet.backend import get_array_module

Array = Any  # numpy.ndarray or cupy.ndarray

__all__ = ["clip_grad_norm", "global_grad_norm"]


def _unique_arrays(grads: Mapping[Any, Array] | Iterable[Array]) -> list[Array]:
    values = grads.values() if isinstance(grads, Mapping) else grads
    seen: set[int] = set()
    arrays = []
    for g in values:
        if g is None or id(g) in seen:  # an array listed twice is counted once
            continue
        seen.add(id(g))
        arrays.append(g)
    return arrays


def _sum_squares(arrays: list[Array], dtype: Any) -> Any:
    """Sum of squares of all ``arrays``, accumulated per array in ``dtype`` (on the device)."""
    total = None
    for g in arrays:
        x = g.ravel()  # a view for contiguous arrays
        if x.dtype.itemsize < numpy.dtype(dtype).itemsize:
            x = x.astype(dtype)
        sq = x.dot(x).astype(numpy.float64)
        total = sq if total is None else total + sq
    return total


def _norm(arrays: list[Array]) -> float:
    """Global L2 norm of ``arrays`` (one device-to-host sync on CuPy).

    The squares are summed in the arrays' own precision (at least float32), which
    is fast; only if that overflows is it redone in float64 (a second sync).
    """
    if not arrays:
        return 0.0
    get_array_module(*arrays)  # raises BackendMismatchError on mixed devices
    with numpy.errstate(over="ignore", invalid="ignore"):
        total = float(_sum_squares(arrays, numpy.float32))  # the one sync
        if math.isinf(total):
            total = float(_sum_squares(arrays, numpy.float64))
    return math.sqrt(total)


def global_grad_norm(grads: Mapping[Any, Array] | Iterable[Array]) -> float:
    """The L2 norm of all gradients taken together, as a Python float.

    ``grads`` is a dict of arrays (its values are used) or an iterable of arrays;
    an array object listed twice counts once. On CuPy the partial sums stay on the
    GPU and one device sync reads the total.
    """
    return _norm(_unique_arrays(grads))


def clip_grad_norm(grads: Mapping[Any, Array] | Iterable[Array], max_norm: float) -> float:
    """Scale all gradients in place so that their global L2 norm is at most ``max_norm``.

    With ``total = sqrt(sum over arrays of sum(g*g))``: if ``total > max_norm``, every
    array is multiplied in place by ``max_norm / total`` (a Python float, so the dtype
    is kept); otherwise nothing is touched. Returns ``total`` measured before
    clipping. A non-finite total (inf or nan gradients) is returned without scaling
    anything, so the caller can detect it and skip the step.

    Reading the norm costs one device-to-host sync on CuPy (a second one only when
    the float32 sum of squares overflows and is redone in float64).
    """
    if (not isinstance(max_norm, numbers.Real) or isinstance(max_norm, bool)
            or not math.isfinite(max_norm) or max_norm <= 0):
        raise ValueError(f"max_norm must be a finite number > 0, got {max_norm!r}")
    arrays = _unique_arrays(grads)
    total = _norm(arrays)
    if math.isfinite(total) and total > max_norm:
        coef = float(max_norm) / total
        for g in arrays:
            g *= coef
    return total
