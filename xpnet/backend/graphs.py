"""CUDA graphs: record the kernels of one step once, then replay them with one launch.

A training step of the book's networks is a few hundred small kernels, and on CuPy
each costs about ten microseconds of Python and driver work to launch, far more
than most of them take to run.  A CUDA graph records the launches of one step
(stream capture) and replays the whole step with a single call.  This module holds
the backend side of that; :class:`xpnet.train.TrainStep` builds on it.

What a recorded step must respect, and how xpnet does it:

* **No host synchronisation inside.**  Nothing in a step may read a GPU value back
  (the loss layer's label check is skipped while capturing; the Trainer checks the
  labels once, up front).
* **Every per-step number lives on the GPU.**  A Python scalar passed to a kernel is
  frozen into the graph, so the optimizers read their step-dependent scalars
  (Adam's bias-corrected step size, a scheduled learning rate) from a small device
  array that is rewritten before each replay; dropout draws from CuPy's
  ``Generator``, whose state is on the device.  An operation that would freeze a
  changing scalar raises :class:`GraphUnsafeError` while capturing.
* **Memory that the graph uses belongs to it.**  Arrays made during the capture,
  and the layers' scratch buffers, come from a memory pool and a workspace private
  to the graph (:class:`CudaGraph`), so nothing else can be handed the same memory
  between replays.
* **GEMMs through cuBLAS directly.**  CuPy refuses to call cuBLAS while a stream is
  captured, although cuBLAS (CUDA >= 12.2) supports it; :func:`matmul` calls
  cuBLAS's ``gemm`` through ctypes on xpnet's own handle while capturing, and is
  ``xp.matmul`` otherwise.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

__all__ = ["CudaGraph", "GraphFallbackWarning", "GraphUnsafeError", "capturing",
           "capture_workspace", "matmul"]

T = TypeVar("T")

_state = threading.local()  # .capturing (bool), .workspace (dict or None)


class GraphFallbackWarning(UserWarning):
    """A step asked to run as a CUDA graph runs eagerly instead (the message says why)."""


class GraphUnsafeError(RuntimeError):
    """An operation that a CUDA graph cannot replay correctly was reached while capturing."""


def capturing() -> bool:
    """Whether this thread is recording a CUDA graph (see :class:`CudaGraph`)."""
    return getattr(_state, "capturing", False)


def capture_workspace() -> dict | None:
    """The scratch-buffer table of the graph being prepared or recorded, else None.

    The layers keep their scratch buffers here instead of the thread's shared table
    while a graph is prepared, so a later call at another batch size cannot free or
    move memory that the graph writes to.
    """
    return getattr(_state, "workspace", None)


class CudaGraph:
    """One recorded CUDA graph with the memory it uses (CuPy only).

    ``with graph.private(): ...`` runs code eagerly with the graph's own memory pool
    and scratch buffers (a warm-up step, so that the capture finds the kernels
    compiled and the buffers allocated); ``graph.capture(fn)`` records ``fn()``
    (nothing runs) and returns what it returned; ``graph.launch()`` replays the
    recording on the current stream.
    """

    def __init__(self) -> None:
        import cupy  # noqa: PLC0415 - graphs exist on CuPy only

        self._cupy = cupy
        self.pool = cupy.cuda.MemoryPool()
        self.workspace: dict = {}
        self.graph: Any = None
        self._stream = cupy.cuda.Stream(non_blocking=True)  # capture needs a real stream

    @contextlib.contextmanager
    def private(self) -> Iterator[None]:
        """Run the block on this graph's stream, memory pool and scratch table.

        The stream is the one the capture records on, so that the capture is served
        from the blocks a warm-up step left in the pool (CuPy keeps them per
        stream); events order the block after the caller's earlier work, and the
        caller's later work after the block.
        """
        cuda = self._cupy.cuda
        outer = cuda.get_current_stream()
        self._stream.wait_event(outer.record())
        before = getattr(_state, "workspace", None)
        _state.workspace = self.workspace
        try:
            with cuda.using_allocator(self.pool.malloc), self._stream:
                yield
        finally:
            _state.workspace = before
            outer.wait_event(self._stream.record())

    def capture(self, fn: Callable[[], T]) -> T:
        """Record ``fn()`` as this graph; raises what ``fn`` raised (nothing recorded)."""
        if capturing():
            raise GraphUnsafeError("a CUDA graph capture is already in progress")
        _cublas_handle()  # created outside the capture
        stream = self._stream
        with self.private():
            stream.begin_capture()
            _state.capturing = True
            try:
                out = fn()
            except BaseException:
                _state.capturing = False
                with contextlib.suppress(Exception):  # an invalidated capture also raises
                    stream.end_capture()
                raise
            _state.capturing = False
            self.graph = stream.end_capture()
        return out

    def launch(self) -> None:
        """Replay the recording on the current stream (asynchronously)."""
        if self.graph is None:
            raise RuntimeError("CudaGraph.launch: nothing has been captured")
        self.graph.launch(self._cupy.cuda.get_current_stream())

    def memory_bytes(self) -> int:
        """Bytes held by this graph's private memory pool."""
        return int(self.pool.total_bytes())


# ------------------------------------------------------------------ GEMM
def matmul(xp: Any, a: Any, b: Any, out: Any = None) -> Any:
    """``a @ b`` for 2-D arrays, into ``out`` if given; works while capturing a graph."""
    if not capturing():
        return a @ b if out is None else xp.matmul(a, b, out=out)
    return _cublas_matmul(xp, a, b, out)


def gemm_operand(shape: tuple[int, int], strides: tuple[int, int],
                 itemsize: int) -> tuple[str, int] | None:
    """How cuBLAS (column-major) can read a row-major 2-D operand in place.

    Returns ``('N', ld)`` when rows are contiguous (the column-major view is the
    transpose, which is what the swapped product below needs), ``('T', ld)`` when
    columns are, and None when neither (the caller copies it first).  The stride of
    an axis of length 1 is never used, so it does not matter; an empty operand is
    never read.
    """
    r, c = shape
    if r == 0 or c == 0:
        return "N", max(c, 1)
    if any(s % itemsize for s, n in zip(strides, shape, strict=True) if n > 1):
        return None
    s0, s1 = (s // itemsize for s in strides)
    if c == 1:
        s1 = 1
    if r == 1:
        return ("N", c) if s1 == 1 else (("T", s1) if s1 > 0 else None)
    if s1 == 1 and s0 >= c:
        return "N", s0
    if s0 == 1 and s1 >= r:
        return "T", s1
    return None


def gemm_plan(a: Any, b: Any, out: Any) -> tuple:
    """cuBLAS ``gemm`` arguments for row-major ``out (m, n) = a (m, k) @ b (k, n)``.

    Column-major cuBLAS computes ``out^T = b^T a^T``: returns
    ``(op_b, op_a, n, m, k, ld_b, ld_a, ld_out)``.  Every array must be readable in
    place (:func:`gemm_operand` not None) and ``out`` row-contiguous.
    """
    (m, k), (_, n) = a.shape, b.shape
    op_a, ld_a = gemm_operand(a.shape, a.strides, a.itemsize)
    op_b, ld_b = gemm_operand(b.shape, b.strides, b.itemsize)
    op_out, ld_out = gemm_operand(out.shape, out.strides, out.itemsize)
    if op_out != "N":
        raise ValueError("gemm_plan: out must have contiguous rows")
    return op_b, op_a, n, m, k, ld_b, ld_a, ld_out


_OPS = {"N": 0, "T": 1}  # cublasOperation_t


def prepare_gemm(xp: Any, a: Any, b: Any, out: Any) -> tuple:
    """``(a, b, target, plan)`` for ``target = a @ b`` by one cuBLAS ``gemm``.

    Operands that cuBLAS cannot read in place are copied; ``target`` is ``out`` when
    cuBLAS can write it in place, else a new array (the caller copies it to
    ``out``); ``plan`` is :func:`gemm_plan`'s arguments.
    """
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise GraphUnsafeError(f"matmul while capturing supports 2-D operands, got "
                               f"{a.shape} @ {b.shape}")
    if a.dtype != b.dtype or a.dtype.char not in "fd":
        raise GraphUnsafeError(f"matmul while capturing needs two float32 or two float64 "
                               f"operands, got {a.dtype} and {b.dtype}")
    m, n = a.shape[0], b.shape[1]
    if gemm_operand(a.shape, a.strides, a.itemsize) is None:
        a = xp.ascontiguousarray(a)
    if gemm_operand(b.shape, b.strides, b.itemsize) is None:
        b = xp.ascontiguousarray(b)
    target = out
    layout = None if out is None else gemm_operand(out.shape, out.strides, out.itemsize)
    if (out is None or out.dtype != a.dtype or out.shape != (m, n)
            or layout is None or layout[0] != "N"):
        target = xp.empty((m, n), dtype=a.dtype)
    return a, b, target, gemm_plan(a, b, target)


def _cublas_matmul(xp: Any, a: Any, b: Any, out: Any) -> Any:
    a, b, target, plan = prepare_gemm(xp, a, b, out)
    op_b, op_a, n, m, k, ld_b, ld_a, ld_out = plan
    if m and n:
        if k == 0:
            target.fill(0)
        else:
            handle, fn, one, zero = _cublas_routine(xp, a.dtype, "gemm_v2")
            _check(fn(handle, _OPS[op_b], _OPS[op_a], n, m, k, one,
                      ctypes.c_void_p(b.data.ptr), ld_b, ctypes.c_void_p(a.data.ptr), ld_a,
                      zero, ctypes.c_void_p(target.data.ptr), ld_out), "cublas gemm")
    if out is not None and target is not out:
        xp.copyto(out, target)
        return out
    return target


def _cublas_routine(xp: Any, dtype: Any, name: str) -> tuple:
    """(xpnet's handle, set to the current stream; cuBLAS's S or D ``name`` for
    ``dtype``; the scalars 1 and 0 by reference) for one call."""
    lib = _cublas()
    handle = _cublas_handle()
    _check(lib.cublasSetStream_v2(handle, ctypes.c_void_p(xp.cuda.get_current_stream().ptr)),
           "cublasSetStream")
    scalar = ctypes.c_float if dtype.char == "f" else ctypes.c_double
    fn = getattr(lib, f"cublas{'S' if dtype.char == 'f' else 'D'}{name}")
    return handle, fn, ctypes.byref(scalar(1.0)), ctypes.byref(scalar(0.0))


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"{what} failed with cuBLAS status {status}")


_lib: Any = None
_handles: dict[int, ctypes.c_void_p] = {}


def _cublas() -> Any:
    """The cuBLAS library that CuPy loaded (found in the process's memory map)."""
    global _lib
    if _lib is not None:
        return _lib
    import cupy  # noqa: PLC0415

    cupy.cuda.device.get_cublas_handle()  # makes CuPy load cuBLAS
    names = []
    with contextlib.suppress(OSError), open("/proc/self/maps") as maps:
        for line in maps:
            path = line.split()[-1]
            if "/libcublas.so" in path and path not in names:
                names.append(path)
    names += ["libcublas.so.13", "libcublas.so.12", "libcublas.so"]
    for name in names:
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    else:
        raise GraphUnsafeError("cannot find the cuBLAS library for captured GEMMs")
    vp, i = ctypes.c_void_p, ctypes.c_int
    lib.cublasCreate_v2.argtypes = [ctypes.POINTER(vp)]
    lib.cublasSetStream_v2.argtypes = [vp, vp]
    for fn, scalar in ((lib.cublasSgemm_v2, ctypes.c_float),
                       (lib.cublasDgemm_v2, ctypes.c_double)):
        p = ctypes.POINTER(scalar)
        fn.argtypes = [vp, i, i, i, i, i, p, vp, i, vp, i, p, vp, i]
    _lib = lib
    return lib


def _cublas_handle() -> ctypes.c_void_p:
    """xpnet's own cuBLAS handle for the current device (CuPy's is left alone)."""
    import cupy  # noqa: PLC0415

    device = cupy.cuda.Device().id
    handle = _handles.get(device)
    if handle is None:
        if capturing():
            raise GraphUnsafeError("the cuBLAS handle must be created before capturing")
        handle = ctypes.c_void_p()
        _check(_cublas().cublasCreate_v2(ctypes.byref(handle)), "cublasCreate")
        _handles[device] = handle
        a = cupy.ones((2, 2), dtype=cupy.float32)  # cuBLAS initialises on first use
        _cublas_matmul(cupy, a, a, None)
    return handle
