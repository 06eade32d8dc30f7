"""Shuffling a data set and holding out a validation set (host NumPy arrays)."""

from __future__ import annotations

import math
from numbers import Real

import numpy as np
import numpy.typing as npt

__all__ = ["shuffle_dataset", "train_val_split"]

Split = tuple[np.ndarray, np.ndarray]
Seed = int | np.random.Generator | np.random.SeedSequence | None


def _rng(seed: Seed) -> np.random.Generator:
    try:
        return np.random.default_rng(seed)
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"seed must be None, a non-negative int or a numpy Generator, not {seed!r}"
        ) from exc


def _pair(x: npt.ArrayLike, t: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    xa = np.asarray(x)
    ta = np.asarray(t)
    if xa.ndim == 0 or ta.ndim == 0:
        raise ValueError(
            "x and t must be arrays with one sample per row, "
            f"got shapes {xa.shape} and {ta.shape}"
        )
    if len(xa) != len(ta):
        raise ValueError(f"x and t disagree on the number of samples: {len(xa)} and {len(ta)}")
    return xa, ta


def shuffle_dataset(x: npt.ArrayLike, t: npt.ArrayLike, seed: Seed = None) -> Split:
    """Shuffled copies of ``x`` and ``t`` under one permutation of the first axis.

    Like the book's ``common.util.shuffle_dataset``, but the inputs are left as they are,
    any number of dimensions is accepted, and ``seed`` (None, an int or a
    ``numpy.random.Generator``) makes it repeatable instead of using the global NumPy state.
    """
    xa, ta = _pair(x, t)
    perm = _rng(seed).permutation(len(xa))
    return xa[perm], ta[perm]


def train_val_split(
    x: npt.ArrayLike,
    t: npt.ArrayLike,
    val_ratio: float = 0.2,
    seed: Seed = None,
    shuffle: bool = True,
) -> tuple[Split, Split]:
    """Split ``(x, t)`` into ``(x_train, t_train), (x_val, t_val)`` (copies).

    ``round(len(x) * val_ratio)`` samples go to validation; it must leave at least one
    sample on each side.  With ``shuffle`` (the default) the samples are first shuffled
    with ``seed``, as in the book's chapter 6 (which takes the first rows of the shuffled
    set for validation, as done here); without it the first rows are taken as they are.
    """
    if isinstance(val_ratio, bool) or not isinstance(val_ratio, Real):
        raise TypeError(f"val_ratio must be a number, not {type(val_ratio).__name__}")
    if not (math.isfinite(val_ratio) and 0.0 < val_ratio < 1.0):
        raise ValueError(f"val_ratio must lie strictly between 0 and 1, got {val_ratio}")
    xa, ta = _pair(x, t)
    n = len(xa)
    n_val = round(n * float(val_ratio))
    if not 1 <= n_val <= n - 1:
        raise ValueError(
            f"val_ratio={val_ratio} of {n} samples leaves {n_val} for validation and "
            f"{n - n_val} for training; each side needs at least one"
        )
    order = _rng(seed).permutation(n) if shuffle else np.arange(n)
    train, val = order[n_val:], order[:n_val]
    return (xa[train], ta[train]), (xa[val], ta[val])
