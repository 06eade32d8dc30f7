"""Inverted dropout."""

from __future__ import annotations

from xpnet.backend import get_array_module, get_rng
from xpnet.layers.base import Array, Layer, expect, expect_float_input


class Dropout(Layer):
    """Zeroes each unit with probability ``dropout_ratio`` while training.

    Unlike the book (which scales by (1 - ratio) at inference), this is *inverted*
    dropout: kept units are scaled by 1/(1 - ratio) during training, so inference
    is the identity.  The mask comes from xpnet's seeded random source
    (``xpnet.backend.seed``), so runs are reproducible.
    """

    def __init__(self, dropout_ratio: float = 0.5) -> None:
        super().__init__()
        expect(0.0 <= dropout_ratio < 1.0, self.name, "dropout_ratio", "in [0, 1)",
               dropout_ratio)
        self.dropout_ratio = float(dropout_ratio)
        self.mask: Array | None = None

    def forward(self, x: Array, train: bool = True) -> Array:
        expect_float_input(self.name, x)
        if not train or self.dropout_ratio == 0.0:
            self.mask = None
            self._identity = True
            return x
        self._identity = False
        scale = x.dtype.type(1.0 / (1.0 - self.dropout_ratio))
        rng = get_rng(get_array_module(x).__name__)  # the source on x's device
        keep = rng.random(x.shape, dtype=x.dtype) >= self.dropout_ratio
        self.mask = keep * scale  # scaled mask, in x's dtype
        return x * self.mask

    def backward(self, dout: Array, need_input_grad: bool = True) -> Array:
        if getattr(self, "_identity", None) is None:
            raise RuntimeError(f"{self.name}.backward called before forward")
        if self._identity:
            return dout
        self._xp(dout=dout, mask=self.mask)
        return dout * self.mask
