"""The layer protocol shared by every layer.

A layer is a small object with

* ``forward(x, train=True)`` -> y, remembering what backward needs;
* ``backward(dout, need_input_grad=True)`` -> dx, filling ``grads`` with the same
  keys as ``params``.  A caller that will not read dx (a network's first layer)
  passes ``need_input_grad=False``; a layer for which dx is costly (Convolution,
  Affine) then skips it and returns None.  The flag travels with the call, so one
  layer instance can sit first in one network and inside another;
* ``params``: trainable arrays by name ('W', 'b', 'gamma', 'beta'); an optimizer
  updates these arrays in place;
* ``grads``: their gradients after the last backward;
* ``buffers``: non-trainable state that must survive a checkpoint (BatchNorm's
  running statistics);
* ``children()``: the layers a layer holds (containers: :mod:`xpnet.layers.compose`);
  parameters, buffers and device moves are found by one walk over them.

Layers never modify their input ``x`` nor the upstream gradient ``dout``, and keep
the dtype they are given (float32 in, float32 out).
"""

from __future__ import annotations

import math
import threading
from typing import Any

from xpnet.backend import check_same_backend
from xpnet.backend.graphs import capture_workspace

Array = Any  # numpy.ndarray or cupy.ndarray

_scratch = threading.local()  # per-thread scratch buffers, see Layer._workspace


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

    def backward(self, dout: Array, need_input_grad: bool = True) -> Array | None:
        raise NotImplementedError

    def children(self) -> tuple[Layer, ...]:
        """The layers this layer holds, in order (none for a leaf layer)."""
        return ()

    def __call__(self, x: Array, train: bool = True) -> Array:
        return self.forward(x, train)

    def _xp(self, **arrays: Array) -> Any:
        """The array module of the inputs and this layer's parameters, checked to agree."""
        return check_same_backend(self.name, **arrays, **self.params)

    def _workspace(self, name: str, xp: Any, shape: tuple[int, ...], dtype: Any) -> Array:
        return workspace(name, xp, shape, dtype)

    def _need_forward(self, attr: str) -> None:
        if getattr(self, attr, None) is None:
            raise RuntimeError(f"{self.name}.backward called before forward")

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}={tuple(v.shape)}" for k, v in self.params.items())
        return f"{self.name}({shapes})"


def workspace(name: str, xp: Any, shape: tuple[int, ...], dtype: Any) -> Array:
    """A contiguous scratch array of ``shape``, backed by a buffer kept across calls.

    A training loop then allocates once (no page faults, no allocator churn).
    The buffers are shared by all layers of a thread, since a scratch array
    lives only within one forward or backward call: a deep network needs the
    largest layer's scratch, not the sum.  They outlive the layers (on the GPU,
    the patch matrix of a large batch can take hundreds of MiB):
    :func:`free_workspace` releases them.  Contents are undefined.
    """
    size = math.prod(shape)
    # A CUDA graph being prepared keeps its own buffers (xpnet.backend.graphs).
    pool = capture_workspace()
    if pool is None:
        pool = _scratch.__dict__.setdefault("buffers", {})
    # One set per device: a buffer on GPU 0 must not serve arrays on GPU 1.
    key = (name, xp.__name__, xp.cuda.Device().id if xp.__name__ == "cupy" else -1)
    buf = pool.get(key)
    if buf is None or buf.size < size or buf.dtype != dtype:
        buf = pool[key] = xp.empty(size, dtype=dtype)
    return buf[:size].reshape(shape)


def free_workspace() -> None:
    """Release the calling thread's scratch buffers (see ``Layer._workspace``).

    They are allocated again, once, by the next forward or backward.  On the GPU the
    memory returns to CuPy's pool; ``cupy.get_default_memory_pool().free_all_blocks()``
    hands it back to the device.
    """
    _scratch.__dict__.pop("buffers", None)


def expect(condition: bool, layer: str, what: str, expected: Any, received: Any,
           exc: type[Exception] = ValueError) -> None:
    """Raise ``exc`` naming the layer, the quantity, and the expected vs received value."""
    if not condition:
        raise exc(f"{layer}: {what}: expected {expected}, received {received}")


def expect_float_input(layer: str, x: Array, dtype: Any = None) -> None:
    """``x`` must be a non-empty float array (of ``dtype``, the parameters' dtype, if given)."""
    # Hot path: one cheap test, no message formatting unless something is wrong.
    x_dtype = getattr(x, "dtype", None)
    if (x_dtype == dtype if dtype is not None else getattr(x_dtype, "kind", "") == "f") \
            and x.ndim >= 1 and x.shape[0] > 0:
        return
    expect(hasattr(x, "dtype") and hasattr(x, "shape"), layer, "input type",
           "an ndarray", type(x).__name__, TypeError)
    if dtype is None:
        expect(x.dtype.kind == "f", layer, "input dtype", "a floating dtype", x.dtype,
               TypeError)
    else:
        expect(x.dtype == dtype, layer, "input dtype", f"{dtype} (the parameters' dtype)",
               x.dtype, TypeError)
    expect(False, layer, "batch size", "at least 1", x.shape[0] if x.ndim else "a 0-d array")
