"""Argument checks shared by the network builders."""

from __future__ import annotations

import numbers
from typing import Any

import numpy

from xpnet.backend import get_default_dtype, xp
from xpnet.init import SPECS, weight_std


def positive_int(model: str, what: str, value: Any, low: int = 1) -> int:
    """``value`` as an int, which must be an integer (not bool) >= ``low``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{model}: {what}: expected an integer >= {low}, got {value!r}")
    return int(value)


def float_dtype(model: str, dtype: Any) -> numpy.dtype:
    """The parameters' dtype: ``dtype`` or xpnet's default, which must be a float type."""
    dt = numpy.dtype(get_default_dtype() if dtype is None else dtype)
    if dt.kind != "f":
        raise ValueError(f"{model}: dtype must be a float type, got {dt}")
    return dt


def zeros(n: int, dtype: numpy.dtype) -> Any:
    return xp.zeros(n, dtype=dtype)


def ones(n: int, dtype: numpy.dtype) -> Any:
    return xp.ones(n, dtype=dtype)


def init_spec(spec: Any) -> Any:
    """``weight_init_std``, validated, as stored in a JSON config: a float or a name."""
    weight_std(spec, 1)  # raises ValueError listing the valid values
    if isinstance(spec, str) and spec.strip().lower() in SPECS:
        return spec.strip().lower()
    return float(spec)
