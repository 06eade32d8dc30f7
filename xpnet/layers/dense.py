"""Fully connected layer and Flatten."""

from __future__ import annotations

from xpnet.layers.base import Array, Layer, expect, expect_float_input


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
        out = xp.matmul(x2d, W)
        out += b
        return out

    def backward(self, dout: Array) -> Array | None:
        self._need_forward("x2d")
        W = self.params["W"]
        self._xp(dout=dout)
        expect(dout.shape == (self.x2d.shape[0], W.shape[1]), self.name, "dout.shape",
               (self.x2d.shape[0], W.shape[1]), tuple(dout.shape))
        self.grads = {"W": self.x2d.T @ dout, "b": dout.sum(axis=0)}
        if not self.need_input_grad:
            return None
        return (dout @ W.T).reshape(self.x_shape)


class Flatten(Layer):
    """(N, d1, d2, ...) -> (N, d1*d2*...); backward restores the shape."""

    def forward(self, x: Array, train: bool = True) -> Array:
        expect(x.ndim >= 1 and x.shape[0] > 0, self.name, "batch size", "at least 1",
               x.shape[0] if x.ndim else "a 0-d array")
        self.x_shape = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, dout: Array) -> Array:
        self._need_forward("x_shape")
        return dout.reshape(self.x_shape)
