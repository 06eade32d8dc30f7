"""Softmax with cross-entropy loss."""

from __future__ import annotations

from xpnet.backend.graphs import capturing
from xpnet.layers.base import Array, Layer, expect, expect_float_input


class SoftmaxWithLoss(Layer):
    """Mean cross-entropy of softmax(x) against labels t.

    x: (N, K) logits.  t: (N,) integer labels in [0, K), or (N, K) one-hot.
    forward returns the loss on x's device without a host sync (a NumPy scalar
    on the CPU, a 0-d CuPy array on the GPU);
    backward(dout=1) returns dx (N, K).

    The softmax is computed in log-sum-exp form, stable for logits of +-1e4.
    Labels are checked (CuPy would silently wrap an out-of-range index); the
    check reads two numbers back from the GPU, so a caller that has validated
    its labels once can set ``validate_labels = False``.  It is skipped while a
    CUDA graph is recorded, where nothing can be read back (the Trainer checks
    every label before training).
    """

    validate_labels = True

    def forward(self, x: Array, t: Array, train: bool = True) -> Array:
        xp = self._xp(x=x, t=t)
        expect_float_input(self.name, x)
        expect(x.ndim == 2, self.name, "logits ndim (N, K)", 2, x.ndim)
        n, k = x.shape
        expect(hasattr(t, "shape"), self.name, "labels type", "an ndarray", type(t).__name__,
               TypeError)
        if t.ndim == 2:
            expect(t.shape == (n, k), self.name, "one-hot labels shape", (n, k), tuple(t.shape))
            labels = t.argmax(axis=1)
            if self.validate_labels and not capturing():
                rows = t.sum(axis=1)
                ok = bool(((t == 0) | (t == 1)).all()) and bool((rows == 1).all())
                expect(ok, self.name, "one-hot labels", "rows of 0/1 with exactly one 1",
                       "other values")
        else:
            expect(t.ndim == 1, self.name, "labels ndim", "1 (N,) or 2 (N, K) one-hot", t.ndim)
            expect(t.shape[0] == n, self.name, "number of labels", n, t.shape[0])
            expect(t.dtype.kind in "iu", self.name, "label dtype", "an integer dtype",
                   t.dtype, TypeError)
            labels = t
            if self.validate_labels and not capturing():
                lo, hi = int(t.min()), int(t.max())
                expect(lo >= 0 and hi < k, self.name, "label range", f"0..{k - 1}",
                       f"{lo}..{hi}")
        shifted = x - x.max(axis=1, keepdims=True)
        lse = xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))
        log_p = shifted - lse
        rows = xp.arange(n)
        self.y = xp.exp(log_p)
        self.labels = labels
        return -log_p[rows, labels].mean()

    def backward(self, dout: Array | float = 1) -> Array:
        self._need_forward("y")
        xp = self._xp(y=self.y)
        n = self.y.shape[0]
        dx = self.y.copy()
        dx[xp.arange(n), self.labels] -= 1
        dx *= self.y.dtype.type(1.0 / n)
        if not (isinstance(dout, (int, float)) and dout == 1):
            dx *= dout
        return dx
