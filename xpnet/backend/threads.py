"""xpnet's own CPU threads: batch-parallel loops with single-threaded BLAS inside.

A convolution's GEMMs are thin (16 filters x 144 patch rows at the book's second
conv), and OpenBLAS gains nothing from a second thread on them, while the
im2col copies, pooling and col2im around them run on one thread in NumPy.  So on
the CPU xpnet splits the *batch* of its heavy layers into one contiguous slice
per thread and runs each slice (copies and GEMM alike) on its own thread, with
BLAS held at one thread inside the region so the two kinds of threads do not
fight over the cores.  NumPy releases the GIL in its copy loops and GEMMs.

The split is static (slice ``k`` always goes to the same position in the
result), so results are the same from run to run for a given thread count,
whichever thread calls.

The thread count comes from ``XPNET_NUM_THREADS``, else the usual
``OMP_NUM_THREADS`` / ``OPENBLAS_NUM_THREADS`` / ``MKL_NUM_THREADS``, else the
CPUs this process may run on; :func:`set_num_threads` changes it at run time.
GPU arrays are never split (one slice is the whole batch).

BLAS: inside a region every loaded BLAS is held at one thread, whatever the count.
A count of one (from the environment at import, or ``set_num_threads(1)``) also
holds BLAS at one thread outside the regions, as ``OMP_NUM_THREADS=1`` would, and
a later count above one gives BLAS back the thread count it had.  OpenBLAS built
with pthreads (NumPy's wheels) has one thread count for the whole process, which
xpnet sets directly: threadpoolctl ignores such a change from any thread but the
first one that used it, so a region entered from a worker thread (a notebook, a
server) ran with multi-threaded BLAS, slower and with other low bits.  Each
change is read back; a library that does not take it gets one RuntimeWarning.
BLAS libraries whose count is per calling thread (OpenBLAS on OpenMP) are set
on each thread that runs a slice.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
import warnings
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
_blas: list[_Blas] | None = None  # the loaded BLAS libraries, found on first use
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
    """Use ``n`` threads (>= 1) in xpnet's batch-parallel CPU loops; 1 runs them serially.

    1 also holds BLAS at one thread for the whole process (see the module notes);
    going back above 1 gives BLAS the thread count it had before.
    """
    global _num_threads
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"set_num_threads: expected an integer >= 1, received {n!r}")
    _num_threads = n
    _pin_blas(n == 1)


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
    CPU, BLAS is held at one thread inside, even for a single slice: a
    multi-threaded GEMM leaves its BLAS workers spinning for a while afterwards,
    and they would steal the cores from the next parallel region.  Every slice
    runs to its end; then the exception of the first slice (in slice order) that
    failed, if any, is raised.
    """
    if xp.__name__ != "numpy" or getattr(_inside, "active", False):
        return [fn(s) for s in slices]
    with _single_threaded_blas():
        if len(slices) == 1 or get_num_threads() == 1:
            return [fn(s) for s in slices]
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
        with _single_threaded_blas_here():  # a no-op on the caller, already held
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


class _Blas:
    """One loaded BLAS library: read and set its thread count from any thread."""

    def __init__(self, controller: Any) -> None:
        self.name = f"{controller.internal_api} ({controller.filepath})"
        # OpenBLAS on OpenMP keeps one count per calling thread (threadpoolctl sets it
        # with omp_set_num_threads); the others (OpenBLAS on pthreads, MKL, BLIS) one
        # per process.
        openblas = controller.internal_api == "openblas"
        self.per_thread = openblas and getattr(controller, "threading_layer", None) == "openmp"
        self._get, self._set = controller.get_num_threads, controller.set_num_threads
        if openblas and not self.per_thread:
            # threadpoolctl changes OpenBLAS's process-wide count only from the first
            # thread that set it and silently ignores the others: call OpenBLAS itself.
            direct = _openblas_functions(controller)
            if direct is not None:
                self._get, self._set = direct
        self.warned = False

    def get(self) -> int | None:
        return self._get()

    def set(self, n: int) -> None:
        self._set(n)


def _openblas_functions(controller: Any) -> tuple[Callable[[], int], Callable[[int], Any]] | None:
    """OpenBLAS's own get/set of its thread count, under any of its symbol affixes."""
    dll = getattr(controller, "dynlib", None)
    try:
        dll = dll if dll is not None else ctypes.CDLL(controller.filepath)
    except OSError:
        return None
    for prefix in ("", "scipy_"):
        for suffix in ("", "64_", "_64"):
            try:  # item access: fresh function objects, threadpoolctl's stay untouched
                get = dll[f"{prefix}openblas_get_num_threads{suffix}"]
                set_ = dll[f"{prefix}openblas_set_num_threads{suffix}"]
            except AttributeError:
                continue
            get.argtypes, get.restype = [], ctypes.c_int
            set_.argtypes, set_.restype = [ctypes.c_int], None
            return get, set_
    return None


_discovery_lock = threading.Lock()


def _blas_libs() -> list[_Blas]:
    global _blas
    if _blas is not None:
        return _blas
    with _discovery_lock:
        if _blas is not None:
            return _blas
        try:
            from threadpoolctl import ThreadpoolController  # noqa: PLC0415
        except ImportError:  # declared as a dependency; tolerate its absence
            _blas = []
        else:
            _blas = [_Blas(c) for c in
                     ThreadpoolController().select(user_api="blas").lib_controllers]
        return _blas


def _limit(libs: Sequence[_Blas]) -> list[tuple[_Blas, int]]:
    """Set each library to one thread and check that it took; return the counts changed."""
    changed = []
    for lib in libs:
        count = lib.get()
        if count is None or count == 1:
            continue
        lib.set(1)
        changed.append((lib, count))
        now = lib.get()
        if now != 1 and not lib.warned:
            lib.warned = True
            warnings.warn(f"xpnet could not hold BLAS at one thread: {lib.name} still "
                          f"reports {now} threads; xpnet's threaded layers may run slower "
                          "and give other low bits", RuntimeWarning, stacklevel=4)
    return changed


def _restore(saved: Sequence[tuple[_Blas, int]]) -> None:
    for lib, count in saved:
        lib.set(count)


_blas_users = 0  # threads inside _single_threaded_blas now
_blas_saved: list[tuple[_Blas, int]] = []  # process-wide counts found by the first one in
_pinned: list[tuple[_Blas, int]] | None = None  # counts before a thread count of 1 pinned BLAS
_here = threading.local()  # this thread's hold of per-thread BLAS libraries


@contextlib.contextmanager
def _single_threaded_blas() -> Iterator[None]:
    """Hold every loaded BLAS at one thread while any caller is inside; the last one
    out restores the process-wide counts the first one in found."""
    global _blas_users, _blas_saved
    libs = _blas_libs()
    if not libs:
        yield
        return
    with _lock:
        if _blas_users == 0:
            _blas_saved = _limit([lib for lib in libs if not lib.per_thread])
        _blas_users += 1
    try:
        with _single_threaded_blas_here():
            yield
    finally:
        with _lock:
            _blas_users -= 1
            if _blas_users == 0:
                _restore(_blas_saved)
                _blas_saved = []


@contextlib.contextmanager
def _single_threaded_blas_here() -> Iterator[None]:
    """Hold the per-thread BLAS libraries (OpenMP) at one thread on the calling thread."""
    local = [lib for lib in (_blas if _blas is not None else ()) if lib.per_thread]
    depth = getattr(_here, "depth", 0)
    if not local or depth:
        _here.depth = depth + 1
        try:
            yield
        finally:
            _here.depth = depth
        return
    saved = _limit(local)
    _here.depth = 1
    try:
        yield
    finally:
        _here.depth = 0
        _restore(saved)


def _pin_blas(pin: bool) -> None:
    """Hold the process-wide BLAS counts at one thread outside the regions too (pin), or
    give back the counts they had before the first pin (unpin).  A pin while pinned sets
    one thread again (someone may have raised it since).  A region in flight keeps its
    own hold: a pin takes over the counts it saved, an unpin hands them to it to restore
    on exit."""
    global _pinned, _blas_saved
    with _lock:
        if pin:
            if _blas_users:
                found, _blas_saved = _blas_saved, []
            else:
                found = _limit([lib for lib in _blas_libs() if not lib.per_thread])
            known = {id(lib) for lib, _ in _pinned or ()}
            _pinned = [*(_pinned or ()), *((lib, n) for lib, n in found if id(lib) not in known)]
        elif _pinned is not None:
            if _blas_users:
                _blas_saved = _pinned
            else:
                _restore(_pinned)
            _pinned = None


def _forget_after_fork() -> None:
    # A forked child has none of the parent's worker threads, and no thread of its
    # own inside a region: give BLAS back the counts a region in flight had saved.
    global _pool, _lock, _blas_users, _blas_saved, _here
    _pool = None
    _lock = threading.Lock()
    _restore(_blas_saved)
    _blas_users, _blas_saved, _here = 0, [], threading.local()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)


def _pin_from_environment() -> None:
    # XPNET_NUM_THREADS=1 (or OMP_NUM_THREADS=1 ..., or one usable CPU) means one
    # thread for BLAS too, from import on.  A malformed value is reported by the
    # first get_num_threads(), not at import.
    global _num_threads
    try:
        n = _default_num_threads()
    except ValueError:
        return
    if n == 1:
        _num_threads = 1
        _pin_blas(True)


_pin_from_environment()
