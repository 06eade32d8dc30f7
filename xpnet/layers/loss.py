"""Softmax with cross-entropy loss, over the class axis 1 of (N, C) or (N, C, ...) scores.

:func:`class_indices` is the one place where labels are checked: the loss, a
network's ``accuracy`` and the Trainer (once, on the host) all call it.
"""

from __future__ import annotations

import math
from typing import Any

from xpnet.backend import get_array_module
from xpnet.backend.graphs import capturing
from xpnet.layers.base import Array, Layer, expect, expect_float_input


def class_indices(where: str, scores: Any, t: Any, ignore_label: int | None = None,
                  validate: bool = True) -> Array:
    """The class index of every sample (or position) that labels ``t`` give for ``scores``.

    ``scores`` has shape (N, C, ...).  ``t`` is either one-hot, of the scores' shape
    (rows of 0/1 with exactly one 1 along axis 1), or integer class indices of any
    shape with N * prod(...) elements, as the book treats any ``t`` whose size differs
    from the scores' ((N,), (N, 1), (N, H, W) ...); the result has shape (N, ...).
    With ``validate``, indices must lie in 0..C-1 (or equal ``ignore_label``); that
    check reads two numbers back from a GPU.  Raises ValueError/TypeError naming
    ``where`` and what was expected.
    """
    expect(hasattr(t, "shape") and hasattr(t, "dtype"), where, "labels type", "an ndarray",
           type(t).__name__, TypeError)
    n, c, rest = scores.shape[0], scores.shape[1], tuple(scores.shape[2:])
    if t.shape == scores.shape:
        if validate:
            ok = bool(((t == 0) | (t == 1)).all()) and bool((t.sum(axis=1) == 1).all())
            expect(ok, where, "one-hot labels", "rows of 0/1 with exactly one 1 along axis 1",
                   "other values")
        return t.argmax(axis=1)
    expect(t.ndim >= 1 and t.shape[0] == n and t.size == n * math.prod(rest), where,
           "labels shape", f"{(n, *rest)} class indices or {tuple(scores.shape)} one-hot",
           tuple(t.shape))
    expect(t.dtype.kind in "iu", where, "label dtype", "an integer dtype", t.dtype, TypeError)
    labels = t.reshape((n, *rest))
    if validate and labels.size:
        valid = labels if ignore_label is None else labels[labels != ignore_label]
        if valid.size:
            lo, hi = int(valid.min()), int(valid.max())
            expect(lo >= 0 and hi < c, where, "label range", f"0..{c - 1}", f"{lo}..{hi}")
    return labels


class SoftmaxWithLoss(Layer):
    """Mean cross-entropy of softmax(x) over axis 1 against labels t.

    x: (N, C) scores, or (N, C, ...) for a class per position (per-pixel
    segmentation: (N, C, H, W) with (N, H, W) labels).  t: class indices or one-hot
    (see :func:`class_indices`; (N, 1) labels are indices, as in the book).
    ``ignore_label``: positions with this label count neither in the mean nor in the
    gradient.  forward returns the loss on x's device without a host sync;
    backward(dout=1) returns dx of x's shape.

    The softmax is computed in log-sum-exp form, stable for scores of +-1e4.  Labels
    are checked (CuPy would silently wrap an out-of-range index); the check reads two
    numbers back from the GPU, so a caller that has validated its labels once can set
    ``validate_labels = False``.  It is skipped while a CUDA graph is recorded.
    """

    validate_labels = True

    def __init__(self, ignore_label: int | None = None) -> None:
        super().__init__()
        self.ignore_label = None if ignore_label is None else int(ignore_label)

    def forward(self, x: Array, t: Array, train: bool = True) -> Array:
        xp = self._xp(x=x, t=t)
        expect_float_input(self.name, x)
        expect(x.ndim >= 2, self.name, "scores ndim", ">= 2 (N, C, ...)", x.ndim)
        labels = class_indices(self.name, x, t, self.ignore_label,
                               self.validate_labels and not capturing())
        self.x_shape = x.shape
        if x.ndim > 2:  # one row of C scores per position
            x = xp.moveaxis(x, 1, -1).reshape(-1, x.shape[1])
            labels = labels.reshape(-1)
        shifted = x - x.max(axis=1, keepdims=True)
        lse = xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))
        log_p = shifted - lse
        self.y = xp.exp(log_p)
        rows = xp.arange(x.shape[0])
        if self.ignore_label is None:
            self.keep = None
            self.labels = labels
            return -log_p[rows, labels].mean()
        keep = labels != self.ignore_label
        self.labels = xp.where(keep, labels, 0)
        self.keep = keep.astype(x.dtype)
        self.count = xp.maximum(self.keep.sum(), 1)
        return -(log_p[rows, self.labels] * self.keep).sum() / self.count

    def backward(self, dout: Array | float = 1, need_input_grad: bool = True) -> Array:
        self._need_forward("y")
        xp = get_array_module(self.y)
        m = self.y.shape[0]
        dx = self.y.copy()
        dx[xp.arange(m), self.labels] -= 1
        if self.keep is None:
            dx *= self.y.dtype.type(1.0 / m)
        else:
            dx *= (self.keep / self.count)[:, None].astype(dx.dtype)
        if not (isinstance(dout, (int, float)) and dout == 1):
            dx *= dout
        if len(self.x_shape) > 2:
            c = self.x_shape[1]
            dx = xp.moveaxis(dx.reshape(self.x_shape[0], *self.x_shape[2:], c), -1, 1)
            dx = xp.ascontiguousarray(dx)
        return dx
