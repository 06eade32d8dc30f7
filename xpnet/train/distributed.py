"""Data-parallel training across processes: one communicator, one flat all-reduce per step.

Every rank holds a full copy of the network, takes its own slice of each global batch,
computes gradients on it, and the ranks average those gradients before the optimizer
runs, so all copies stay identical.  Launch::

    mpiexec -n 4 python -m mpi4py train.py ...

The pieces, used in this order by a training loop:

* :func:`world` detects how the process was launched: a :class:`SingleProcess`
  communicator (size 1, no MPI touched) unless it runs under ``mpiexec``, else
  :class:`MPICommunicator` (mpi4py, CPU arrays) or, on CuPy, :class:`NCCLCommunicator`
  (NCCL through ``cupy.cuda.nccl``, its ranks bootstrapped over MPI, one GPU per rank).
* :func:`check_world` at start: every rank runs the same settings, and either all ranks
  or none have a GPU; a mismatch is refused on every rank with the differences named.
* :func:`broadcast_parameters` copies rank 0's parameters and buffers to all ranks.
* :func:`shard` gives each rank its slice of a global batch drawn from one permutation
  that all ranks share (same seed), so every sample is seen once per epoch.  A global
  batch that the world size does not divide is refused (the slices must be of equal
  size for the average of the slices' mean gradients to be the batch's mean gradient).
* :class:`GradientAllReduce` is a gradient transform, ``transform(grads, params)``,
  run between ``network.gradient`` and ``optimizer.update``: it packs the gradients
  into one persistent flat buffer, all-reduces that buffer with one call and divides
  by the world size.
* :func:`average_buffers` averages Batch Normalization's running statistics (kept per
  rank while training) before an evaluation or a save.

With :class:`SingleProcess` every collective is a no-op and the transform returns at
once, so a script written for many ranks runs unchanged as one process.

Failure: under ``python -m mpi4py`` an uncaught exception on any rank aborts the whole
job with that rank's traceback; :func:`world` installs the same behaviour for scripts
run as ``mpiexec -n N python script.py``.  ``mpiexec`` ends the job when a rank dies.

Networks are anything with ``params`` and ``buffers`` mappings of arrays (xpnet's
:class:`~xpnet.models.Sequential`); this module does not import :mod:`xpnet.models`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import traceback
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

import numpy

from xpnet.backend import BackendError, get_array_module, get_backend_name

Array = Any  # numpy.ndarray or cupy.ndarray

__all__ = [
    "Communicator",
    "SingleProcess",
    "MPICommunicator",
    "NCCLCommunicator",
    "DistributedError",
    "SettingsMismatchError",
    "DeviceMismatchError",
    "world",
    "launched_under_mpi",
    "check_world",
    "check_same_settings",
    "check_devices",
    "settings_digest",
    "FlatBuffer",
    "GradientAllReduce",
    "broadcast_parameters",
    "average_buffers",
    "shard",
]


class DistributedError(RuntimeError):
    """The ranks of a distributed job cannot work together."""


class SettingsMismatchError(DistributedError, ValueError):
    """The ranks were started with different settings."""


class DeviceMismatchError(DistributedError):
    """Some ranks have a GPU and others do not."""


# ----------------------------------------------------------------- communicators
class Communicator:
    """What the training code needs from a group of ranks.

    ``rank`` (0 .. size-1), ``size``, ``kind`` ('single', 'mpi' or 'nccl'), and:

    * ``allreduce_sum(buf)``: every rank's ``buf`` replaced, in place, by the sum of
      all ranks' ``buf`` (a contiguous 1-D array; the same length and dtype everywhere);
    * ``broadcast(buf, root=0)``: ``buf`` replaced in place by ``root``'s;
    * ``allgather(obj)``: a list of every rank's (picklable, small) object, by rank;
    * ``barrier()`` and ``abort(code)`` (ends every rank's process).

    Array operations accept arrays of the backend the communicator is made for
    (NumPy for MPI, CuPy for NCCL); they are collective: every rank must make the
    same calls in the same order.
    """

    kind = "abstract"
    rank: int = 0
    size: int = 1

    @property
    def is_root(self) -> bool:
        """Whether this is rank 0, the rank that prints, evaluates and saves."""
        return self.rank == 0

    def allreduce_sum(self, buf: Array) -> None:
        raise NotImplementedError

    def broadcast(self, buf: Array, root: int = 0) -> None:
        raise NotImplementedError

    def allgather(self, obj: Any) -> list[Any]:
        raise NotImplementedError

    def barrier(self) -> None:
        raise NotImplementedError

    def abort(self, code: int = 1) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, size={self.size})"


class SingleProcess(Communicator):
    """World size 1 without MPI: every collective leaves its input as it is."""

    kind = "single"

    def allreduce_sum(self, buf: Array) -> None:
        pass

    def broadcast(self, buf: Array, root: int = 0) -> None:
        _check_root(root, 1)

    def allgather(self, obj: Any) -> list[Any]:
        return [obj]

    def barrier(self) -> None:
        pass

    def abort(self, code: int = 1) -> None:
        sys.stderr.flush()
        os._exit(code)


def _check_root(root: int, size: int) -> None:
    if not 0 <= root < size:
        raise ValueError(f"broadcast: root {root} is not a rank of a world of size {size}")


def _check_flat(where: str, buf: Array) -> None:
    if buf.ndim != 1 or not buf.flags.c_contiguous:
        raise ValueError(f"{where}: expected a contiguous 1-D array, got shape "
                         f"{tuple(buf.shape)}{'' if buf.flags.c_contiguous else ' (strided)'}")


def _import_mpi() -> Any:
    try:
        from mpi4py import MPI  # noqa: PLC0415 - optional dependency
    except ImportError as exc:
        raise DistributedError(
            f"MPI is not available ({exc}); install it with: pip install 'xpnet[mpi]'"
        ) from None
    return MPI


class MPICommunicator(Communicator):
    """Collectives over MPI (mpi4py), on host (NumPy) arrays.

    CuPy arrays are accepted but staged through host memory (one copy each way); on
    GPUs use :class:`NCCLCommunicator`, which does not copy.
    """

    kind = "mpi"

    def __init__(self, comm: Any = None) -> None:
        self.MPI = _import_mpi()
        self.comm = self.MPI.COMM_WORLD if comm is None else comm
        self.rank = int(self.comm.Get_rank())
        self.size = int(self.comm.Get_size())

    def allreduce_sum(self, buf: Array) -> None:
        _check_flat("allreduce_sum", buf)
        host = _host(buf)
        self.comm.Allreduce(self.MPI.IN_PLACE, host, op=self.MPI.SUM)
        if host is not buf:
            buf[...] = get_array_module(buf).asarray(host)

    def broadcast(self, buf: Array, root: int = 0) -> None:
        _check_root(root, self.size)
        _check_flat("broadcast", buf)
        host = _host(buf)
        self.comm.Bcast(host, root=root)
        if host is not buf:
            buf[...] = get_array_module(buf).asarray(host)

    def allgather(self, obj: Any) -> list[Any]:
        return list(self.comm.allgather(obj))

    def barrier(self) -> None:
        self.comm.Barrier()

    def abort(self, code: int = 1) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        self.comm.Abort(code)


def _host(buf: Array) -> numpy.ndarray:
    """``buf`` itself when it is a NumPy array, else a host copy of it."""
    if isinstance(buf, numpy.ndarray):
        return buf
    return numpy.ascontiguousarray(buf.get())


class NCCLCommunicator(Communicator):
    """Collectives with NCCL on CuPy arrays, on the GPU and on the current stream.

    Each rank uses GPU ``local_rank % device_count`` (made current here), the local
    rank being its rank among the ranks on its machine (``rank % device_count`` when
    ranks fill the machines in order).  The ranks are
    bootstrapped over ``mpi`` (an :class:`MPICommunicator`): rank 0 makes the NCCL
    unique id and broadcasts it with mpi4py; ``allgather``, ``barrier`` and ``abort``
    go over MPI too.  Without ``mpi`` (``size == 1``), a one-rank NCCL communicator
    is made, which exercises the same calls on one GPU.

    The calls are asynchronous on CuPy's current stream, like any kernel, so they can
    be recorded into a CUDA graph where NCCL supports capture (NCCL >= 2.9).
    """

    kind = "nccl"

    _DTYPES = {"float16": "NCCL_FLOAT16", "float32": "NCCL_FLOAT32",
               "float64": "NCCL_FLOAT64", "int32": "NCCL_INT32", "int64": "NCCL_INT64"}

    def __init__(self, mpi: MPICommunicator | None = None) -> None:
        from xpnet.backend import _import_cupy  # noqa: PLC0415

        cupy = _import_cupy()
        try:
            from cupy.cuda import nccl  # noqa: PLC0415
        except ImportError as exc:
            raise DistributedError(
                f"NCCL is not available to CuPy ({exc}); install it with: "
                "pip install 'xpnet[mpi-cuda12]' (or mpi-cuda13)"
            ) from None
        if not getattr(nccl, "available", True):
            raise DistributedError("NCCL is not available to CuPy; install it with: "
                                   "pip install 'xpnet[mpi-cuda12]' (or mpi-cuda13)")
        self.cupy, self.nccl, self.mpi = cupy, nccl, mpi
        self.rank = 0 if mpi is None else mpi.rank
        self.size = 1 if mpi is None else mpi.size
        # the rank among the ranks of its machine (the rank itself where ranks are
        # placed in blocks per machine), modulo the machine's GPUs
        local = 0
        if mpi is not None:
            node = mpi.comm.Split_type(mpi.MPI.COMM_TYPE_SHARED)
            local = node.Get_rank()
            node.Free()
        self.device_id = local % cupy.cuda.runtime.getDeviceCount()
        cupy.cuda.Device(self.device_id).use()
        uid = nccl.get_unique_id() if self.rank == 0 else None
        if mpi is not None:
            uid = mpi.comm.bcast(uid, root=0)
        self.comm = nccl.NcclCommunicator(self.size, uid, self.rank)

    def _dtype(self, buf: Array) -> int:
        name = self._DTYPES.get(numpy.dtype(buf.dtype).name)
        if name is None:
            raise TypeError(f"NCCL: unsupported dtype {buf.dtype}")
        return getattr(self.nccl, name)

    def _check(self, where: str, buf: Array) -> None:
        _check_flat(where, buf)
        if not isinstance(buf, self.cupy.ndarray):
            raise TypeError(f"{where}: NCCL works on CuPy arrays, got {type(buf).__name__}")
        if buf.device.id != self.device_id:
            raise ValueError(f"{where}: the array is on GPU {buf.device.id}, but rank "
                             f"{self.rank} uses GPU {self.device_id}")

    def allreduce_sum(self, buf: Array) -> None:
        self._check("allreduce_sum", buf)
        stream = self.cupy.cuda.get_current_stream().ptr
        self.comm.allReduce(buf.data.ptr, buf.data.ptr, buf.size, self._dtype(buf),
                            self.nccl.NCCL_SUM, stream)

    def broadcast(self, buf: Array, root: int = 0) -> None:
        _check_root(root, self.size)
        self._check("broadcast", buf)
        stream = self.cupy.cuda.get_current_stream().ptr
        self.comm.bcast(buf.data.ptr, buf.size, self._dtype(buf), root, stream)

    def allgather(self, obj: Any) -> list[Any]:
        return [obj] if self.mpi is None else self.mpi.allgather(obj)

    def barrier(self) -> None:
        self.cupy.cuda.get_current_stream().synchronize()
        if self.mpi is not None:
            self.mpi.barrier()

    def abort(self, code: int = 1) -> None:
        with_abort = getattr(self.comm, "abort", None)
        if with_abort is not None:
            with_abort()  # frees ranks blocked in NCCL kernels on this GPU
        if self.mpi is not None:
            self.mpi.abort(code)
        sys.stderr.flush()
        os._exit(code)


# ----------------------------------------------------------------- world
_MPI_ENV = ("PMI_SIZE", "PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE",
            "MPI_LOCALNRANKS")
_worlds: dict[str, Communicator] = {}


def launched_under_mpi() -> bool:
    """Whether this process was started by an MPI launcher (or already uses mpi4py).

    Decided from the launcher's environment variables (MPICH, Open MPI, MVAPICH, PMIx)
    or an mpi4py already imported (``python -m mpi4py``), without initialising MPI.
    """
    return "mpi4py.MPI" in sys.modules or any(v in os.environ for v in _MPI_ENV)


def world(kind: str = "auto") -> Communicator:
    """The communicator of this process's job (made once per kind, then reused).

    ``kind``:

    * ``'auto'`` (default): :class:`SingleProcess` when not launched by ``mpiexec``
      (or when mpi4py is absent, or the job has one rank); otherwise NCCL when
      xpnet's active backend is CuPy and MPI when it is NumPy;
    * ``'single'``, ``'mpi'``, ``'nccl'``: that one (``'nccl'`` without ``mpiexec``
      gives a one-rank NCCL communicator).

    On MPI with more than one rank, an uncaught exception on a rank prints that
    rank's traceback and aborts the whole job (as ``python -m mpi4py`` does), so no
    rank waits forever in a collective for a rank that has died.
    """
    if kind not in ("auto", "single", "mpi", "nccl"):
        raise ValueError(f"world: kind must be 'auto', 'single', 'mpi' or 'nccl', "
                         f"got {kind!r}")
    if kind == "auto":
        kind = _auto_kind()
    if kind not in _worlds:
        _worlds[kind] = _make(kind)
    return _worlds[kind]


def _auto_kind() -> str:
    if not launched_under_mpi():
        return "single"
    try:
        import mpi4py  # noqa: F401, PLC0415
    except ImportError:
        return "single"
    mpi = _mpi_world()
    if mpi.size == 1:
        return "single"
    on_gpu = _on_gpu()
    check_devices(mpi, on_gpu)  # before NCCL is set up on some ranks only
    return "nccl" if on_gpu else "mpi"


def _on_gpu() -> bool:
    """Whether this rank computes on a GPU: xpnet's backend is CuPy and usable.

    A rank asked for CuPy (``DL_BACKEND=cupy``) that cannot have it answers False, so
    that :func:`check_devices` names it instead of the rank failing alone.
    """
    try:
        return get_backend_name() == "cupy"
    except BackendError:
        return False


def _mpi_world() -> MPICommunicator:
    comm = _worlds.get("mpi")
    if comm is None:
        comm = _worlds["mpi"] = MPICommunicator()
        if comm.size > 1:
            _abort_on_uncaught(comm)
    return comm  # type: ignore[return-value]


def _make(kind: str) -> Communicator:
    if kind == "single":
        return SingleProcess()
    if kind == "mpi":
        return _mpi_world()
    mpi = _mpi_world() if launched_under_mpi() else None
    return NCCLCommunicator(mpi)


def _abort_on_uncaught(comm: Communicator) -> None:
    """Make an uncaught exception end every rank, with this rank's traceback."""
    previous = sys.excepthook

    def hook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        if issubclass(kind, KeyboardInterrupt) or sys.excepthook is not hook:
            previous(kind, value, tb)
            return
        sys.stderr.write(f"xpnet: rank {comm.rank} of {comm.size} failed:\n")
        traceback.print_exception(kind, value, tb)
        comm.abort(1)

    sys.excepthook = hook


# ----------------------------------------------------------------- start checks
def settings_digest(settings: Mapping[str, Any]) -> str:
    """A SHA-256 of ``settings`` as canonical JSON (sorted keys; other types by str)."""
    text = json.dumps(settings, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def check_same_settings(comm: Communicator, settings: Mapping[str, Any],
                        what: str = "settings") -> None:
    """Refuse, on every rank, settings that differ between ranks.

    The ranks compare a digest of ``settings`` (:func:`settings_digest`); when they
    differ, every rank raises :class:`SettingsMismatchError` naming each key whose
    value differs and the value on each rank.  Collective.
    """
    digest = settings_digest(settings)
    digests = comm.allgather(digest)
    if len(set(digests)) == 1:
        return
    everyone = comm.allgather(json.loads(json.dumps(settings, default=str)))
    keys = sorted({k for s in everyone for k in s})
    lines = []
    for k in keys:
        values = [s.get(k, "<missing>") for s in everyone]
        if any(v != values[0] for v in values):
            per_rank = ", ".join(f"rank {r}: {v!r}" for r, v in enumerate(values))
            lines.append(f"  {k}: {per_rank}")
    raise SettingsMismatchError(
        f"the {comm.size} ranks were started with different {what}; every rank must "
        "run the same command:\n" + "\n".join(lines or ["  (values differ only in type)"])
    )


def check_devices(comm: Communicator, uses_gpu: bool | None = None) -> None:
    """Refuse, on every rank, a job where some ranks have a GPU and others do not.

    ``uses_gpu`` defaults to "xpnet's backend is CuPy, with a usable GPU" (a rank
    started with ``DL_BACKEND=cupy`` on a machine without one counts as without).
    Collective.
    """
    if uses_gpu is None:
        uses_gpu = _on_gpu()
    flags = comm.allgather(bool(uses_gpu))
    if len(set(flags)) > 1:
        without = [r for r, f in enumerate(flags) if not f]
        with_gpu = [r for r, f in enumerate(flags) if f]
        raise DeviceMismatchError(
            f"ranks {without} have no usable GPU while ranks {with_gpu} have one; run "
            "every rank on a machine with a GPU (one per rank), or every rank on the CPU"
        )


def check_world(comm: Communicator, settings: Mapping[str, Any],
                uses_gpu: bool | None = None) -> None:
    """The start-up checks: same world size, backend and ``settings`` on every rank,
    and a GPU on all ranks or on none.  Collective."""
    check_devices(comm, uses_gpu)
    backend = "cupy" if _on_gpu() else "numpy"
    check_same_settings(comm, {"world_size": comm.size, "backend": backend, **settings})


# ----------------------------------------------------------------- flat buffer
class FlatBuffer:
    """A persistent contiguous buffer that a set of arrays is packed into and read from.

    The layout (names in order, shapes, offsets) is fixed by the first :meth:`pack`
    and kept while later calls pass arrays of the same names, shapes and dtype, so
    the same memory is reused every step (and can be recorded in a CUDA graph).
    Names are taken in sorted order, the same on every rank.  All arrays must share
    one dtype and one backend.
    """

    def __init__(self) -> None:
        self.buffer: Array | None = None
        self.names: tuple[str, ...] = ()
        self.shapes: tuple[tuple[int, ...], ...] = ()
        self.offsets: tuple[int, ...] = ()
        self._key: tuple | None = None

    @staticmethod
    def _key_of(arrays: Mapping[str, Array]) -> tuple:
        names = tuple(sorted(arrays))
        first = arrays[names[0]] if names else None
        return (names, tuple(tuple(arrays[k].shape) for k in names),
                None if first is None else numpy.dtype(first.dtype).str,
                None if first is None else get_array_module(first).__name__,
                _device_id(first))

    def _layout(self, arrays: Mapping[str, Array]) -> None:
        names = tuple(sorted(arrays))
        if not names:
            raise ValueError("FlatBuffer: nothing to pack")
        dtypes = {numpy.dtype(arrays[k].dtype).name for k in names}
        if len(dtypes) > 1:
            raise TypeError(f"FlatBuffer: arrays of mixed dtypes {sorted(dtypes)}; one "
                            "flat buffer holds one dtype")
        xp = get_array_module(*arrays.values())
        self.names = names
        self.shapes = tuple(tuple(arrays[k].shape) for k in names)
        sizes = [math.prod(s) for s in self.shapes]
        self.offsets = tuple(int(o) for o in numpy.cumsum([0, *sizes]))
        self.buffer = xp.empty(self.offsets[-1], dtype=arrays[names[0]].dtype)
        self._key = self._key_of(arrays)

    def pack(self, arrays: Mapping[str, Array]) -> Array:
        """Copy ``arrays`` into the buffer (one concatenation) and return the buffer."""
        if self._key is None or self._key_of(arrays) != self._key:
            self._layout(arrays)
        xp = get_array_module(self.buffer)
        xp.concatenate([arrays[k].reshape(-1) for k in self.names], out=self.buffer)
        return self.buffer

    def views(self) -> dict[str, Array]:
        """The buffer's pieces as arrays of the packed names and shapes (no copy)."""
        if self.buffer is None:
            raise ValueError("FlatBuffer: nothing packed yet")
        b, o = self.buffer, self.offsets
        return {k: b[o[i]:o[i + 1]].reshape(s)
                for i, (k, s) in enumerate(zip(self.names, self.shapes, strict=True))}

    def unpack(self, into: MutableMapping[str, Array]) -> None:
        """Make each packed entry of ``into`` a view of its piece of the buffer."""
        into.update(self.views())

    @property
    def nbytes(self) -> int:
        return 0 if self.buffer is None else int(self.buffer.nbytes)


def _device_id(a: Array) -> int | None:
    dev = getattr(a, "device", None)
    return getattr(dev, "id", None)


# ----------------------------------------------------------------- transforms
class GradientAllReduce:
    """Gradient transform: average the gradients over all ranks, in one all-reduce.

    ``transform(grads, params)`` packs ``grads`` into one persistent flat buffer
    (:class:`FlatBuffer`), all-reduces it with a single collective call, multiplies
    by 1/size, and replaces each entry of ``grads`` by a view of its piece of the
    buffer (valid until the next call).  ``params`` is not used.

    Weight decay added to each rank's gradient (``lambda * W``, the same W on every
    rank) averages to itself, so it needs nothing special.  With a
    :class:`SingleProcess` communicator the transform does nothing.  The first call
    (and any call with new names, shapes or dtype) checks that every rank packs the
    same layout, which is collective too.
    """

    def __init__(self, comm: Communicator) -> None:
        self.comm = comm
        self.flat = FlatBuffer()
        self.calls = 0  # all-reduce calls made (one per step)

    def __call__(self, grads: MutableMapping[str, Array],
                 params: Mapping[str, Array] | None = None) -> None:
        if isinstance(self.comm, SingleProcess):
            return
        relayout = self.flat._key is None or FlatBuffer._key_of(grads) != self.flat._key
        buf = self.flat.pack(grads)
        if relayout:
            _check_same_layout(self.comm, self.flat)
        self.comm.allreduce_sum(buf)
        self.calls += 1
        if self.comm.size > 1:
            buf *= buf.dtype.type(1.0 / self.comm.size)
        self.flat.unpack(grads)


def _check_same_layout(comm: Communicator, flat: FlatBuffer) -> None:
    mine = [(k, s) for k, s in zip(flat.names, flat.shapes, strict=True)]
    layouts = comm.allgather((mine, str(flat.buffer.dtype)))
    if all(lay == layouts[0] for lay in layouts):
        return
    lines = []
    for r, (names_shapes, dtype) in enumerate(layouts):
        shown = ", ".join(f"{k} {tuple(s)}" for k, s in names_shapes)
        lines.append(f"  rank {r}: {dtype}: {shown}")
    raise SettingsMismatchError("the ranks' gradients differ (different networks?):\n"
                                + "\n".join(lines))


# ----------------------------------------------------------------- network state
def _sections(network: Any) -> list[tuple[str, Mapping[str, Array]]]:
    return [("params", network.params),
            ("buffers", getattr(network, "buffers", None) or {})]


def _in_place(comm: Communicator, a: Array, op: str, root: int = 0) -> None:
    """Run ``op`` ('sum' or 'bcast') on ``a`` in place, through a flat contiguous view."""
    flat = a.reshape(-1) if a.flags.c_contiguous else None
    work = flat if flat is not None else a.copy().reshape(-1)
    if op == "sum":
        comm.allreduce_sum(work)
    else:
        comm.broadcast(work, root)
    if flat is None:
        a[...] = work.reshape(a.shape)


def broadcast_parameters(network: Any, comm: Communicator, root: int = 0) -> None:
    """Copy rank ``root``'s parameters and buffers into every rank's network, in place.

    Run at the start (and after a resume) so all ranks begin from the same weights.
    Names are taken in sorted order; the networks must have the same names, shapes
    and dtypes on every rank (checked first).  Collective.
    """
    if isinstance(comm, SingleProcess):
        _check_root(root, 1)
        return
    layout = [(section, k, tuple(m[k].shape), str(m[k].dtype))
              for section, m in _sections(network) for k in sorted(m)]
    layouts = comm.allgather(layout)
    if any(lay != layouts[0] for lay in layouts):
        raise SettingsMismatchError(
            "broadcast_parameters: the ranks' networks differ: " + "; ".join(
                f"rank {r}: {len(lay)} arrays" + ("" if lay == layouts[root] else
                                                   " (differs from the root's)")
                for r, lay in enumerate(layouts)))
    for _, m in _sections(network):
        for k in sorted(m):
            _in_place(comm, m[k], "bcast", root)


def average_buffers(network: Any, comm: Communicator) -> None:
    """Replace every rank's floating-point buffers by their average over the ranks.

    Batch Normalization keeps running statistics per rank while training (each from
    its own slice of the batches); before an evaluation or a save they are averaged so
    that all ranks, and the saved model, hold one set.  The average of the ranks'
    running variances leaves out the spread of the ranks' means, which is small when
    the slices are drawn from one shuffled set.  Non-floating buffers are taken from
    rank 0.  One all-reduce over one flat buffer.  Collective.
    """
    if isinstance(comm, SingleProcess):
        return
    buffers = getattr(network, "buffers", None) or {}
    floating = {k: v for k, v in buffers.items() if numpy.dtype(v.dtype).kind == "f"}
    if floating:
        flat = FlatBuffer()
        buf = flat.pack(floating)
        _check_same_layout(comm, flat)
        comm.allreduce_sum(buf)
        buf *= buf.dtype.type(1.0 / comm.size)
        for k, v in flat.views().items():
            buffers[k][...] = v
    for k in sorted(buffers):
        if k not in floating:
            _in_place(comm, buffers[k], "bcast", 0)


# ----------------------------------------------------------------- data
def shard(batch_indices: Sequence[int] | numpy.ndarray, rank: int, size: int) -> numpy.ndarray:
    """Rank ``rank``'s slice of a global batch: the ``rank``-th of ``size`` equal parts.

    ``batch_indices`` are the sample indices of one global batch, cut from a
    permutation that every rank draws alike (the same seed), so the slices of all
    ranks together are the global batch and every sample is seen once per epoch.
    A batch whose length ``size`` does not divide is refused: with slices of equal
    size, the average of the ranks' mean gradients is the mean gradient of the
    global batch, which unequal slices would not give without weighting.  Choose a
    global batch size that is a multiple of the world size.
    """
    idx = numpy.asarray(batch_indices)
    if idx.ndim != 1:
        raise ValueError(f"shard: expected a 1-D array of indices, got shape {idx.shape}")
    if isinstance(size, bool) or int(size) != size or size < 1:
        raise ValueError(f"shard: size must be an integer >= 1, got {size!r}")
    if isinstance(rank, bool) or int(rank) != rank or not 0 <= rank < size:
        raise ValueError(f"shard: rank must be in 0..{size - 1}, got {rank!r}")
    n = idx.shape[0]
    if n % size:
        raise ValueError(f"shard: a global batch of {n} samples does not split evenly over "
                         f"{size} ranks; use a batch size that is a multiple of {size}")
    per = n // size
    return idx[rank * per:(rank + 1) * per]
