"""Numerical gradients by central differences, on either backend."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from xpnet.backend import get_array_module

Array = Any


def _objective(f: Callable[..., Any], x: Array) -> Callable[[], Any]:
    """``f`` as a function of no argument: ``f`` itself when it can be called without
    one, else ``lambda: f(x)`` (the book's ``f(W)``)."""
    if not callable(f):
        raise TypeError(f"numerical_gradient: f must be callable, got {type(f).__name__}")
    try:
        signature = inspect.signature(f)
    except (TypeError, ValueError):  # no signature to read (some builtins): the book's form
        return lambda: f(x)
    try:
        signature.bind()
        return f
    except TypeError:
        pass
    try:
        signature.bind(x)
    except TypeError:
        raise TypeError(f"numerical_gradient: f must take no argument or one (the array "
                        f"being differentiated), but its signature is {signature}") from None
    return lambda: f(x)


def numerical_gradient(f: Callable[..., Any], x: Array, h: float = 1e-4) -> Array:
    """d f / d x by central differences, (f(x + h) - f(x - h)) / 2h per element.

    ``x`` is perturbed in place one element at a time and restored afterwards (as in
    the book, this is what lets it differentiate a network's loss with respect to one
    of its parameters).  ``f`` may take no argument and read ``x`` (xpnet's form,
    ``lambda: net.loss(x, t)``) or take ``x`` as its one argument (the book's form,
    ``lambda W: net.loss(x, t)`` or ``f(x)`` of a function): it is called with no
    argument when its signature allows that, else with ``x``.  Either way ``x`` is
    the array itself, perturbed, so a function of its argument sees each step.

    ``x`` must be contiguous.  Works on NumPy and CuPy arrays; use float64 for
    checks, since float32 leaves only about 3 significant digits at h = 1e-4.
    """
    xp = get_array_module(x)
    flat, f = _flat_and_objective("numerical_gradient", f, x)
    grad = xp.zeros_like(x)
    gflat = grad.reshape(-1)
    for i in range(flat.size):
        gflat[i] = _central_difference(f, flat, i, h)
    return grad


def numerical_gradient_at(f: Callable[..., Any], x: Array, indices: Iterable[int],
                          h: float = 1e-4) -> np.ndarray:
    """:func:`numerical_gradient` at the flat ``indices`` of ``x`` only, as a host float64
    array in their order: the spot check of a parameter too large to difference whole."""
    flat, f = _flat_and_objective("numerical_gradient_at", f, x)
    return np.array([_central_difference(f, flat, int(i), h) for i in indices],
                    dtype=np.float64)


def _flat_and_objective(caller: str, f: Callable[..., Any],
                        x: Array) -> tuple[Array, Callable[[], Any]]:
    if not x.flags.c_contiguous:
        raise ValueError(f"{caller}: x must be C-contiguous (it is modified in place)")
    return x.reshape(-1), _objective(f, x)


def _central_difference(f: Callable[[], Any], flat: Array, i: int, h: float) -> float:
    """(f(x + h e_i) - f(x - h e_i)) / 2h, ``flat`` (a view of x) restored afterwards."""
    old = flat[i].item()
    flat[i] = old + h
    f_plus = float(f())
    flat[i] = old - h
    f_minus = float(f())
    flat[i] = old
    return (f_plus - f_minus) / (2 * h)


def relative_error(a: Array, b: Array) -> float:
    """max |a - b| / max(max |a|, max |b|): the worst error relative to the gradient's scale."""
    xp = get_array_module(a, b)
    scale = max(float(xp.abs(a).max()), float(xp.abs(b).max()), 1e-300) if a.size else 1.0
    return float(xp.abs(a - b).max()) / scale if a.size else 0.0


def check_layer(layer: Any, x: Array, dout: Array | None = None, h: float = 1e-5,
                train: bool = True) -> dict[str, float]:
    """Compare a layer's backward with numerical gradients of sum(forward(x) * dout).

    Returns the relative error (see :func:`relative_error`) for 'x' and each
    parameter.  Forward must be deterministic for given inputs (reseed before
    calling for Dropout).
    """
    xp = get_array_module(x)
    y = layer.forward(x, train)
    if dout is None:
        dout = xp.ones_like(y)
    x = x.copy()

    def objective() -> float:
        return float((layer.forward(x, train) * dout).sum())

    layer.forward(x, train)
    dx = layer.backward(dout)
    analytic = {"x": dx, **{k: g.copy() for k, g in layer.grads.items()}}
    numeric = {"x": numerical_gradient(objective, x, h)}
    for key, p in layer.params.items():
        numeric[key] = numerical_gradient(objective, p, h)
    return {k: relative_error(analytic[k], numeric[k]) for k in analytic}
