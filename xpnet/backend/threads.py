"""xpnet's own CPU threads: batch-parallel loops with single-threaded BLAS inside.

A convolution's GEMMs are thin (16 filters x 144 patch rows at the book's second
conv), and OpenBLAS gains nothing from a second thread on them, while the
im2col copies, pooling and col2im around them run on one thread in NumPy.  So on
the CPU xpnet splits the *batch* of its heavy layers into one contiguous slice
per thread and runs each slice (copies and GEMM alike) on its own thread, with
BLAS held at one thread inside the region so the two kinds of threads do not
fight over the cores.  NumPy releases the GIL in its copy loops and GEMMs.

The split is static (slice ``k`` always goes to the same position in the
result), so results are the same from run to run for a given thread count.
Outside these regions BLAS keeps whatever thread count it had.

The thread count comes from ``XPNET_NUM_THREADS``, else the usual
``OMP_NUM_THREADS`` / ``OPENBLAS_NUM_THREADS`` / ``MKL_NUM_THREADS``, else the
CPUs this process may run on; :func:`set_num_threads` changes it at run time.
GPU arrays are never split (one slice is the whole batch).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

__all__ = ["get_num_threads", "set_num_threads", "batch_slices", "parallel_map",
           "sum_in_order"]

T = TypeVar("T")

_ENV_VARS = ("XPNET_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")

_lock = threading.Lock()
_num_threads: int | None = None
_pool: ThreadPoolExecutor | None = None
_blas: list[Any] | None = None  # threadpoolctl controllers of the loaded BLAS libraries
_inside = threading.local()  # set while a thread runs part of a parallel region


def _default_num_threads() -> int:
    for var in _ENV_VARS:
        value = os.environ.get(var, "").strip()
        if value:
            try:
                return max(1, int(value))
            except ValueError:
                if var == "XPNET_NUM_THREADS":
                    raise ValueError(
                        f"XPNET_NUM_THREADS: expected a positive integer, received {value!r}"
                    ) from None
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def get_num_threads() -> int:
    """How many threads xpnet's batch-parallel CPU loops use."""
    global _num_threads
    if _num_threads is None:
        _num_threads = _default_num_threads()
    return _num_threads


def set_num_threads(n: int) -> None:
    """Use ``n`` threads (>= 1) in xpnet's batch-parallel CPU loops; 1 runs them serially."""
    global _num_threads
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"set_num_threads: expected an integer >= 1, received {n!r}")
    _num_threads = n


def batch_slices(xp: Any, n: int, min_per_thread: int = 1) -> list[slice]:
    """Split a batch of ``n`` into contiguous slices, one per thread.

    One slice where parallelism does not apply: GPU arrays, one thread, a batch
    too small to give every thread ``min_per_thread`` items, or a call from inside
    another parallel region.
    """
    threads = get_num_threads()
    if xp.__name__ != "numpy" or threads == 1 or getattr(_inside, "active", False):
        return [slice(0, n)]
    parts = max(1, min(threads, n // max(1, min_per_thread)))
    bounds = [n * k // parts for k in range(parts + 1)]
    return [slice(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]


def parallel_map(xp: Any, fn: Callable[[slice], T], slices: Sequence[slice]) -> list[T]:
    """``[fn(s) for s in slices]``, one slice per thread; the first runs on the caller.

    ``xp`` is the module of the arrays ``fn`` works on: GPU work just runs.  On the
    CPU, whenever xpnet runs more than one thread, BLAS is held at one thread
    inside, even for a single slice: a multi-threaded GEMM leaves its BLAS workers
    spinning for a while afterwards, and they would steal the cores from the next
    parallel region.  Every slice runs to its end; then the exception of the first
    slice (in slice order) that failed, if any, is raised.
    """
    if xp.__name__ != "numpy" or getattr(_inside, "active", False) or get_num_threads() == 1:
        return [fn(s) for s in slices]
    with _single_threaded_blas():
        if len(slices) == 1:
            return [fn(slices[0])]
        futures = [_get_pool(len(slices) - 1).submit(_run_inside, fn, s) for s in slices[1:]]
        try:
            outcomes = [(True, _run_inside(fn, slices[0]))]
        except BaseException as exc:  # noqa: BLE001 - re-raised below, in slice order
            outcomes = [(False, exc)]
        for f in futures:  # wait for every slice before anything is raised
            exc = f.exception()
            outcomes.append((False, exc) if exc is not None else (True, f.result()))
    for ok, value in outcomes:
        if not ok:
            raise value
    return [value for _, value in outcomes]


def sum_in_order(parts: Sequence[tuple[Any, ...]]) -> tuple[Any, ...]:
    """Add per-slice tuples of arrays element by element, in slice order, into the first.

    The fixed order makes a sum of partial gradients the same on every run.
    """
    total = parts[0]
    for part in parts[1:]:
        for acc, value in zip(total, part, strict=True):
            acc += value
    return total


def _run_inside(fn: Callable[[slice], T], s: slice) -> T:
    _inside.active = True
    try:
        return fn(s)
    finally:
        _inside.active = False


def _get_pool(workers: int) -> ThreadPoolExecutor:
    """A pool of at least ``workers`` threads.  A smaller one is replaced, not shut
    down: a caller on another thread may still be submitting to it, and its idle
    threads exit once it is no longer referenced."""
    global _pool
    with _lock:
        if _pool is None or _pool._max_workers < workers:  # noqa: SLF001
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="xpnet")
        return _pool


def _blas_controllers() -> list[Any]:
    global _blas
    if _blas is None:
        try:
            from threadpoolctl import ThreadpoolController  # noqa: PLC0415
        except ImportError:  # declared as a dependency; tolerate its absence
            _blas = []
        else:
            _blas = list(ThreadpoolController().select(user_api="blas").lib_controllers)
    return _blas


_blas_users = 0  # threads inside _single_threaded_blas now
_blas_saved: list[tuple[Any, int]] = []


@contextlib.contextmanager
def _single_threaded_blas() -> Iterator[None]:
    """Hold every loaded BLAS at one thread while any caller is inside; the last one
    out restores the counts the first one in found."""
    global _blas_users, _blas_saved
    with _lock:
        if _blas_users == 0:
            _blas_saved = []
            for lib in _blas_controllers():
                count = lib.get_num_threads()
                if count != 1:
                    lib.set_num_threads(1)
                    _blas_saved.append((lib, count))
        _blas_users += 1
    try:
        yield
    finally:
        with _lock:
            _blas_users -= 1
            if _blas_users == 0:
                for lib, count in _blas_saved:
                    lib.set_num_threads(count)
                _blas_saved = []


def _forget_after_fork() -> None:
    # A forked child has none of the parent's worker threads, and no thread of its
    # own inside a region: give BLAS back the counts a region in flight had saved.
    global _pool, _lock, _blas_users, _blas_saved
    _pool = None
    _lock = threading.Lock()
    for lib, count in _blas_saved:
        lib.set_num_threads(count)
    _blas_users, _blas_saved = 0, []


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)
