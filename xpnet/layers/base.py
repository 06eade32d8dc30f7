"""The layer protocol shared by every layer.

A layer is a small object with

* ``forward(x, train=True)`` -> y, remembering what backward needs;
* ``backward(dout)`` -> dx, filling ``grads`` with the same keys as ``params``;
* ``params``: trainable arrays by name ('W', 'b', 'gamma', 'beta'); an optimizer
  updates these arrays in place;
* ``grads``: their gradients after the last backward;
* ``buffers``: non-trainable state that must survive a checkpoint (BatchNorm's
  running statistics).

Layers never modify their input ``x`` nor the upstream gradient ``dout``, and keep
the dtype they are given (float32 in, float32 out).
"""

from __future__ import annotations

from typing import Any

from xpnet.backend import check_same_backend

Array = Any  # numpy.ndarray or cupy.ndarray


class Layer:
    """Base class: empty params, grads and buffers; subclasses override forward/backward."""

    def __init__(self) -> None:
        self.params: dict[str, Array] = {}
        self.grads: dict[str, Array] = {}
        self.buffers: dict[str, Array] = {}

    @property
    def name(self) -> str:
        return type(self).__name__

    def forward(self, x: Array, train: bool = True) -> Array:
        raise NotImplementedError

    def backward(self, dout: Array) -> Array:
        raise NotImplementedError

    def __call__(self, x: Array, train: bool = True) -> Array:
        return self.forward(x, train)

    def _xp(self, **arrays: Array) -> Any:
        """The array module of the inputs and this layer's parameters, checked to agree."""
        return check_same_backend(self.name, **arrays, **self.params)

    def _need_forward(self, attr: str) -> None:
        if getattr(self, attr, None) is None:
            raise RuntimeError(f"{self.name}.backward called before forward")

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}={tuple(v.shape)}" for k, v in self.params.items())
        return f"{self.name}({shapes})"
