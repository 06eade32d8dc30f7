"""Fully connected layer and Flatten."""

from __future__ import annotations

from typing import Any

from xpnet.backend.graphs import matmul
from xpnet.backend.threads import batch_slices, parallel_map, sum_in_order
from xpnet.layers.base import Array, Layer, expect, expect_float_input

# A GEMM smaller than this many multiply-adds runs on one thread: waking a
# worker thread costs more than the split saves (the MLP's 100x784x100).
SPLIT_MACS = 1 << 24


class Affine(Layer):
    """y = x W + b, for x of any rank (N, d1, d2, ...) flattened to (N, d1*d2*...).

    W: (D, M), b: (M,).  x: (N, ...) with prod(...) == D -> y: (N, M).
    backward returns dx in the input's original shape.
    """

    def __init__(self, W: Array, b: Array) -> None:
        super().__init__()
        expect(W.ndim == 2, self.name, "W.ndim", 2, W.ndim)
        expect(b.shape == (W.shape[1],), self.name, "b.shape", (W.shape[1],), tuple(b.shape))
        self.params = {"W": W, "b": b}
        self.x2d: Array | None = None

    def forward(self, x: Array, train: bool = True) -> Array:
        W, b = self.params["W"], self.params["b"]
        xp = self._xp(x=x)
        expect_float_input(self.name, x, W.dtype)
        expect(x.ndim >= 2, self.name, "input ndim", ">= 2 (batch first)", x.ndim)
        x2d = x.reshape(x.shape[0], -1)
        expect(x2d.shape[1] == W.shape[0], self.name, "input features (product of x.shape[1:])",
               W.shape[0], x2d.shape[1])
        self.x_shape, self.x2d = x.shape, x2d
        out = xp.empty((x2d.shape[0], W.shape[1]), dtype=x.dtype)

        def forward_part(part: slice) -> None:
            matmul(xp, x2d[part], W, out=out[part])
            out[part] += b

        parallel_map(xp, forward_part, self._slices(xp))
        return out

    def _slices(self, xp: Any) -> list[slice]:
        n, d = self.x2d.shape
        macs = n * d * self.params["W"].shape[1]
        return batch_slices(xp, n) if macs >= SPLIT_MACS else [slice(0, n)]

    def backward(self, dout: Array, need_input_grad: bool = True) -> Array | None:
        self._need_forward("x2d")
        W = self.params["W"]
        xp = self._xp(dout=dout)
        x2d = self.x2d
        expect(dout.shape == (x2d.shape[0], W.shape[1]), self.name, "dout.shape",
               (x2d.shape[0], W.shape[1]), tuple(dout.shape))
        dx = xp.empty(x2d.shape, dtype=dout.dtype) if need_input_grad else None

        def backward_part(part: slice) -> tuple[Array, Array]:
            if dx is not None:
                matmul(xp, dout[part], W.T, out=dx[part])
            return matmul(xp, x2d[part].T, dout[part]), dout[part].sum(axis=0)

        dW, db = sum_in_order(parallel_map(xp, backward_part, self._slices(xp)))
        self.grads = {"W": dW, "b": db}
        return None if dx is None else dx.reshape(self.x_shape)


class Flatten(Layer):
    """(N, d1, d2, ...) -> (N, d1*d2*...); backward restores the shape."""

    def forward(self, x: Array, train: bool = True) -> Array:
        expect(x.ndim >= 1 and x.shape[0] > 0, self.name, "batch size", "at least 1",
               x.shape[0] if x.ndim else "a 0-d array")
        self.x_shape = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, dout: Array, need_input_grad: bool = True) -> Array:
        self._need_forward("x_shape")
        return dout.reshape(self.x_shape)
