"""The one training step: gradient -> gradient transforms -> update.

Run eagerly, or replayed as a recorded CUDA graph.  Every step of the Trainer goes
through :class:`TrainStep`; gradient transforms (clipping, a gradient all-reduce)
are callables ``transform(grads, params)`` that change the gradient arrays in place,
run in order between ``network.gradient`` and ``optimizer.update``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from xpnet.backend import get_array_module, get_rng
from xpnet.backend.graphs import CudaGraph, GraphFallbackWarning, GraphUnsafeError, capturing
from xpnet.backend.kernels import cuda_kernels_enabled
from xpnet.optim import clip_grad_norm

Array = Any

__all__ = ["TrainStep", "ClipGradNorm", "NonFiniteError"]


class NonFiniteError(FloatingPointError):
    """A step's loss or gradient norm was inf or nan; nothing was updated.

    ``what`` is 'loss' or 'gradient norm', ``value`` the number.
    """

    def __init__(self, what: str, value: float) -> None:
        super().__init__(f"non-finite {what} ({value})")
        self.what, self.value = what, value


class ClipGradNorm:
    """Gradient transform: scale the gradients so that their global L2 norm is at most
    ``max_norm`` (:func:`xpnet.optim.clip_grad_norm`); a non-finite norm raises
    :class:`NonFiniteError`.  It reads the norm back, so it cannot run in a CUDA graph.
    """

    def __init__(self, max_norm: float) -> None:
        if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) \
                or not math.isfinite(max_norm) or max_norm <= 0:
            raise ValueError(f"clip_norm must be a finite number > 0, got {max_norm!r}")
        self.max_norm = float(max_norm)
        self.last_norm: float | None = None

    def __call__(self, grads: dict[str, Array], params: Mapping[str, Array]) -> None:
        if capturing():
            raise GraphUnsafeError("gradient clipping reads the norm back from the GPU")
        self.last_norm = norm = clip_grad_norm(list(grads.values()), self.max_norm)
        if not math.isfinite(norm):
            raise NonFiniteError("gradient norm", norm)


@dataclass
class _Recorded:
    graph: CudaGraph
    x: Array  # the inputs the recording reads: each call copies its batch in
    t: Array
    loss: Array  # the loss each replay writes
    owned: tuple  # arrays of the network and optimizer that the recording uses
    rng: Any
    key: tuple  # the optimizer's recording_key()


class TrainStep:
    """``loss = step(x, t)``: ``network.gradient(x, t)``, each of ``transforms`` in
    order, then ``optimizer.update``.

    With ``check_finite`` (NumPy only, where reading the loss back is free) a
    non-finite loss or gradient norm raises :class:`NonFiniteError` before anything
    is updated, and the network's buffers (batch-norm running statistics, which the
    forward pass already moved) are restored: all state is as before the step.

    The loss comes back as a device array (0-d on CuPy), not read back, so a loop
    of steps never waits for the GPU.

    With ``cuda_graph=True`` and CuPy arrays, the first call for an input shape is
    an ordinary step followed by a recording of the step as a CUDA graph
    (:mod:`xpnet.backend.graphs`); later calls with that shape copy the batch into
    the recording's inputs and replay it with one launch, which removes the
    per-kernel launch cost that bounds a step of small layers.  The results are
    those of the eager step (the GEMMs may round differently: cuBLAS is called
    directly).  On NumPy, ``cuda_graph`` changes nothing.

    A recording holds on to the arrays it uses.  Replacing them is noticed and the
    step is recorded again: loading a checkpoint into the optimizer, ``reset()``,
    moving the network, ``xpnet.backend.seed``.  Fixed at recording time: the
    network's layers and their settings (dropout ratio, weight decay), and the
    optimizer's kind.  The loss layer's label check cannot run inside a graph:
    check the labels beforehand (the Trainer checks all of them once).

    A step that cannot be recorded (gradient clipping in the optimizer, which
    reads the norm back; a network without ``last_loss``) runs eagerly from then
    on, with one :class:`~xpnet.backend.graphs.GraphFallbackWarning`.  While the
    CuPy kernels are turned off (``XPNET_CUDA_KERNELS=0``, ``use_cuda_kernels``)
    steps run eagerly too, with one warning, and recording resumes when they are
    back on.
    """

    def __init__(self, network: Any, optimizer: Any, cuda_graph: bool = False,
                 max_graphs: int = 4, transforms: Sequence[Any] = (),
                 check_finite: bool = False) -> None:
        self.network = network
        self.optimizer = optimizer
        self.transforms = list(transforms)
        self.check_finite = bool(check_finite)
        self.cuda_graph = bool(cuda_graph)
        self.max_graphs = int(max_graphs)
        self.graphed = False  # whether the last call recorded or replayed a graph
        self._graphs: dict[tuple, _Recorded] = {}
        self._unrecordable: str | None = None
        self._warned_kernels_off = False
        # Pools of dropped recordings.  Arrays from them can outlive the recording (a
        # layer's cached input, the warm-up's gradients), and some CuPy versions free
        # a pool's memory with the pool, in use or not: they are kept, emptied of
        # their unused blocks.
        self._retired: list[Any] = []

    def __call__(self, x: Array, t: Array) -> Array:
        if not self._graph_wanted(x, t):
            self.graphed = False
            return self._eager(x, t)
        key = (x.shape, x.dtype.str, t.shape, t.dtype.str, x.device.id)
        rec = self._graphs.get(key)
        if rec is not None and not self._still_valid(rec):
            self._retire(self._graphs.pop(key).graph)
            rec = None
        if rec is None:
            return self._record(key, x, t)
        rec.x[...] = x
        rec.t[...] = t
        self.optimizer.advance_step(self.network.params)  # this step's scalars, on the GPU
        rec.graph.launch()
        self.graphed = True
        return rec.loss.copy()  # the next replay overwrites rec.loss

    def reset(self) -> None:
        """Drop the recordings (and their unused memory); the next call records again."""
        for rec in self._graphs.values():
            self._retire(rec.graph)
        self._graphs.clear()

    def memory_bytes(self) -> int:
        """GPU memory held by the recordings' private pools."""
        return (sum(rec.graph.memory_bytes() for rec in self._graphs.values())
                + sum(int(pool.total_bytes()) for pool in self._retired))

    # ---------------------------------------------------------------- internals
    def _eager(self, x: Array, t: Array) -> Array:
        net = self.network
        on_host = get_array_module(x) is np
        check = self.check_finite and on_host and not capturing()
        buffers = getattr(net, "buffers", None) or {}
        saved = {k: v.copy() for k, v in buffers.items()} if check else None
        if hasattr(net, "last_loss"):
            net.last_loss = None
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            try:
                grads = net.gradient(x, t)
                loss = getattr(net, "last_loss", None)
                if loss is None:  # a network without last_loss: the book's second forward
                    loss = net.loss(x, t)
                if check and not math.isfinite(float(loss)):
                    raise NonFiniteError("loss", float(loss))
                for transform in self.transforms:
                    transform(grads, net.params)
            except NonFiniteError:
                if saved:
                    for k, v in saved.items():
                        buffers[k][...] = v
                raise
            self.optimizer.update(net.params, grads)
        return loss

    def _graph_wanted(self, x: Array, t: Array) -> bool:
        if not self.cuda_graph or self._unrecordable is not None:
            return False
        xp = get_array_module(x)
        if xp.__name__ != "cupy" or get_array_module(t) is not xp:
            return False
        if not cuda_kernels_enabled(xp):  # the optimizers' scalars would not be on the GPU
            if not self._warned_kernels_off:
                self._warned_kernels_off = True
                warnings.warn("TrainStep: the CuPy kernels are turned off (XPNET_CUDA_KERNELS=0 "
                              "or use_cuda_kernels(False)), so steps run eagerly, not as a "
                              "CUDA graph", GraphFallbackWarning, stacklevel=3)
            return False
        return True

    def _owned(self) -> tuple:
        """The arrays of the network and optimizer that a recording reads or writes."""
        arrays = list(self.network.params.values())
        arrays += list((getattr(self.network, "buffers", None) or {}).values())
        arrays += list(self.optimizer.state_arrays())
        return tuple(arrays)

    def _still_valid(self, rec: _Recorded) -> bool:
        owned = self._owned()
        return (len(owned) == len(rec.owned) and get_rng("cupy") is rec.rng
                and self.optimizer.recording_key() == rec.key
                and all(a is b for a, b in zip(owned, rec.owned, strict=True)))

    def _retire(self, graph: CudaGraph) -> None:
        self._retired.append(graph.pool)
        # Arrays that outlived an earlier recording may have been freed since: their
        # blocks went back to that retired pool, so every retired pool is emptied again.
        for pool in self._retired:
            pool.free_all_blocks()

    def _give_up(self, why: str) -> None:
        self._unrecordable = why
        warnings.warn(f"TrainStep: the step cannot be recorded as a CUDA graph ({why}); "
                      "it runs eagerly", GraphFallbackWarning, stacklevel=3)

    def _record(self, shape_key: tuple, x: Array, t: Array) -> Array:
        net, opt = self.network, self.optimizer
        if not all(hasattr(opt, a) for a in ("advance_step", "prepare", "recording_key",
                                             "state_arrays")):
            self._give_up("the optimizer is not an xpnet optimizer")
            return self._eager(x, t)
        if getattr(opt, "clip_norm", None) is not None:
            self._give_up("the optimizer clips the gradient norm, which reads it back")
            return self._eager(x, t)
        if len(self._graphs) >= self.max_graphs:
            self._retire(self._graphs.pop(next(iter(self._graphs))).graph)
        # long-lived state (optimizer slots, the random source) not from the recording's
        # memory
        opt.prepare(net.params)
        rng = get_rng("cupy")
        graph = CudaGraph()
        with graph.private():
            xs, ts = x.copy(), t.copy()
            loss = self._eager(xs, ts)  # a real step, which also compiles and allocates
        loss = loss.copy()  # the caller's copy, outside the recording's memory
        if getattr(net, "last_loss", None) is None:
            self._retire(graph)
            self._give_up("the network does not keep last_loss")
            return loss
        owned, key = self._owned(), opt.recording_key()

        def step() -> Array:
            grads = net.gradient(xs, ts)
            for transform in self.transforms:
                transform(grads, net.params)
            opt.update(net.params, grads)
            return net.last_loss

        try:
            rec_loss = graph.capture(step)
        except Exception as exc:  # noqa: BLE001 - reported, then the step runs eagerly
            self._retire(graph)
            self._give_up(f"{type(exc).__name__}: {exc}")
            return loss
        self._graphs[shape_key] = _Recorded(graph, xs, ts, rec_loss, owned, rng, key)
        self.graphed = True
        return loss
