"""One training step, run eagerly or replayed as a recorded CUDA graph."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from xpnet.backend import get_array_module, get_rng
from xpnet.backend.graphs import CudaGraph, GraphFallbackWarning
from xpnet.backend.kernels import cuda_kernels_enabled

Array = Any

__all__ = ["TrainStep"]


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
    """``loss = step(x, t)`` does ``network.gradient(x, t)`` then ``optimizer.update``.

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
                 max_graphs: int = 4) -> None:
        self.network = network
        self.optimizer = optimizer
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
        grads = net.gradient(x, t)
        loss = getattr(net, "last_loss", None)
        if loss is None:  # a network without last_loss: the book's second forward
            loss = net.loss(x, t)
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
        for table in getattr(self.optimizer, "_slots", {}).values():
            arrays += list(table.values())
        arrays += [h for h, _ in getattr(self.optimizer, "_device_scalars_at", {}).values()]
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
        if not all(hasattr(opt, a) for a in ("advance_step", "prepare", "recording_key")):
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
            opt.update(net.params, net.gradient(xs, ts))
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
