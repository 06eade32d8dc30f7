"""Data augmentation of training batches, on the host, seeded and vectorised.

Chapter 8 names data augmentation as one of the things that take MNIST past 99.4 %.
An augmentation is a function ``f(batch, rng) -> batch`` of a host batch (N, C, H, W)
and a ``numpy.random.Generator``; the Trainer owns the generator (seeded from its
``seed``) and checkpoints its state, so a resumed run draws the same shifts.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = ["AUGMENTATIONS", "random_shift"]


def random_shift(x: np.ndarray, rng: np.random.Generator, max_shift: int = 2) -> np.ndarray:
    """Each image moved by its own random offset of up to ``max_shift`` pixels in each
    direction, the uncovered border filled with zeros.  x: (N, C, H, W)."""
    if x.ndim != 4:
        raise ValueError(f"random_shift: expected images (N, C, H, W), got shape {x.shape}")
    n, _, h, w = x.shape
    m = int(max_shift)
    dy, dx = rng.integers(-m, m + 1, size=(2, n))
    padded = np.pad(x, ((0, 0), (0, 0), (m, m), (m, m)))
    rows = np.arange(h)[None, :] + (m - dy)[:, None]  # (N, H)
    cols = np.arange(w)[None, :] + (m - dx)[:, None]  # (N, W)
    return padded[np.arange(n)[:, None, None, None], np.arange(x.shape[1])[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]


#: the augmentations by the names the Trainer and the command line take
AUGMENTATIONS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "shift": random_shift,
}
