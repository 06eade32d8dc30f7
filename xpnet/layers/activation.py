"""Element-wise activations.  Shapes are unchanged: x (any) -> y (same)."""

from __future__ import annotations

from xpnet.layers.base import Array, Layer, expect, expect_float_input


def _check_dout(layer: Layer, dout: Array, out: Array) -> None:
    """dout must have the output's shape (a broadcastable one would pass silently)."""
    expect(getattr(dout, "shape", None) == out.shape, layer.name, "dout.shape",
           tuple(out.shape), tuple(getattr(dout, "shape", ())))


class ReLU(Layer):
    """y = max(x, 0).  Unlike the book, neither x nor dout is modified in place.

    Keeps its output rather than the book's boolean mask: forward is one pass
    over x (all that inference pays), and backward reads the mask off y > 0.
    """

    def forward(self, x: Array, train: bool = True) -> Array:
        expect_float_input(self.name, x)
        xp = self._xp(x=x)
        self.out = xp.maximum(x, x.dtype.type(0))
        return self.out

    def backward(self, dout: Array, need_input_grad: bool = True) -> Array:
        self._need_forward("out")
        xp = self._xp(dout=dout, out=self.out)
        _check_dout(self, dout, self.out)
        return xp.multiply(dout, self.out > 0, dtype=dout.dtype)


class Sigmoid(Layer):
    """y = 1 / (1 + exp(-x)), computed as (1 + tanh(x/2)) / 2: no overflow at +-1000."""

    def forward(self, x: Array, train: bool = True) -> Array:
        expect_float_input(self.name, x)
        xp = self._xp(x=x)
        half = x.dtype.type(0.5)
        out = xp.tanh(x * half)
        out += 1
        out *= half
        self.out = out
        return out

    def backward(self, dout: Array, need_input_grad: bool = True) -> Array:
        self._need_forward("out")
        self._xp(dout=dout, out=self.out)
        _check_dout(self, dout, self.out)
        return dout * (1 - self.out) * self.out


class Tanh(Layer):
    """y = tanh(x)."""

    def forward(self, x: Array, train: bool = True) -> Array:
        expect_float_input(self.name, x)
        xp = self._xp(x=x)
        self.out = xp.tanh(x)
        return self.out

    def backward(self, dout: Array, need_input_grad: bool = True) -> Array:
        self._need_forward("out")
        self._xp(dout=dout, out=self.out)
        _check_dout(self, dout, self.out)
        return dout * (1 - self.out * self.out)
