"""Weight initialisation with the book's ``weight_init_std`` convention.

``weight_init_std`` is either a number, the standard deviation itself, or the
name of a scheme whose standard deviation follows from the layer's fan-in
(the number of inputs feeding one output unit):

* ``'sigmoid'`` / ``'xavier'``: sqrt(1 / fan_in)  (Xavier / Glorot);
* ``'relu'`` / ``'he'``: sqrt(2 / fan_in)  (He).

Names are case-insensitive.  Weights are drawn from xpnet's seeded random source
(:func:`xpnet.backend.get_rng`), so ``xpnet.backend.seed(n)`` makes networks
reproducible.  Unlike the book's DeepConvNet, which hard-codes its fan-ins, the
fan-in is always computed from the weight's shape (:func:`fan_in`).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy

from xpnet.backend import get_default_dtype, get_rng

__all__ = ["SPECS", "weight_std", "fan_in", "init_weight"]

#: the scheme names accepted by :func:`weight_std`, with the gain under the square root
SPECS: dict[str, float] = {"relu": 2.0, "he": 2.0, "sigmoid": 1.0, "xavier": 1.0}


def _spec_error(spec: Any) -> ValueError:
    names = ", ".join(repr(s) for s in SPECS)
    return ValueError(
        f"weight_init_std: expected a finite number >= 0 or one of {names} "
        f"(case-insensitive), got {spec!r}"
    )


def _check_fan_in(n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or int(n) < 1:
        raise ValueError(f"fan_in: expected an integer >= 1, got {n!r}")
    return int(n)


def weight_std(spec: float | str, fan_in: int) -> float:
    """The standard deviation that ``spec`` means for a layer with ``fan_in`` inputs.

    A number (or a numeric string such as ``'0.01'``, as a command line gives it)
    is returned as is; 'relu'/'he' give sqrt(2 / fan_in) and 'sigmoid'/'xavier'
    sqrt(1 / fan_in).  Anything else raises ValueError listing the valid values.
    """
    n = _check_fan_in(fan_in)
    if isinstance(spec, str):
        key = spec.strip().lower()
        if key in SPECS:
            return math.sqrt(SPECS[key] / n)
        try:
            value = float(key)
        except ValueError:
            raise _spec_error(spec) from None
    elif isinstance(spec, numbers.Real) and not isinstance(spec, bool):
        value = float(spec)
    else:
        raise _spec_error(spec)
    if not math.isfinite(value) or value < 0:
        raise _spec_error(spec)
    return value


def fan_in(shape: Any) -> int:
    """Inputs per output unit of a weight of ``shape``.

    Affine weights (in, out) -> in; convolution filters (FN, C, KH, KW) -> C*KH*KW
    (in general, for 3 or more axes, the product of all but the first).
    """
    try:
        dims = tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        raise ValueError(f"fan_in: expected a weight shape (a tuple of ints), got {shape!r}") \
            from None
    if len(dims) < 2 or min(dims) < 1:
        raise ValueError(
            "fan_in: expected a weight shape (in, out) or (FN, C, KH, KW) with every "
            f"dimension >= 1, got {dims}"
        )
    if len(dims) == 2:
        return dims[0]
    return math.prod(dims[1:])


def init_weight(shape: Any, spec: float | str, dtype: Any = None) -> Any:
    """A weight of ``shape`` drawn from N(0, std^2), std = weight_std(spec, fan_in(shape)).

    The array is created on the active backend in ``dtype`` (default: xpnet's
    default dtype, float32), from the seeded source :func:`xpnet.backend.get_rng`.
    """
    std = weight_std(spec, fan_in(shape))
    dtype = numpy.dtype(get_default_dtype() if dtype is None else dtype)
    if dtype.kind != "f":
        raise ValueError(f"init_weight: dtype must be a float type, got {dtype}")
    return get_rng().normal(tuple(int(d) for d in shape), std, dtype)
