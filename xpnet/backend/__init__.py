"""The array backend: NumPy on the CPU or CuPy on an NVIDIA GPU.

``from xpnet.backend import xp`` gives an object that behaves like the active
array module (``xp.zeros``, ``xp.float32``, ``xp.ndarray`` ...).  It is a thin
proxy, so switching the backend at run time with :func:`set_backend` or
:func:`use_backend` is seen by every module that imported ``xp`` earlier.

The backend is chosen by the ``DL_BACKEND`` environment variable (``numpy``,
the default, or ``cupy``) when first used.  Nothing here imports CuPy until it
is asked for, so xpnet imports and runs where CuPy is not installed.

Code that receives arrays should prefer :func:`get_array_module` on its inputs
(as Chainer does), and use ``xp`` only to create new arrays.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import numpy

from xpnet.backend.threads import get_num_threads, set_num_threads

__all__ = [
    "xp",
    "BackendError",
    "BackendMismatchError",
    "BACKENDS",
    "set_backend",
    "get_backend",
    "get_backend_name",
    "use_backend",
    "get_array_module",
    "check_same_backend",
    "is_gpu_available",
    "to_cpu",
    "to_gpu",
    "to_backend",
    "get_default_dtype",
    "set_default_dtype",
    "seed",
    "get_rng",
    "Random",
    "device_name",
    "get_num_threads",
    "set_num_threads",
]

BACKENDS = ("numpy", "cupy")


class BackendError(RuntimeError):
    """The requested backend cannot be used (unknown name, CuPy missing, no GPU)."""


class BackendMismatchError(TypeError):
    """NumPy and CuPy arrays were mixed in one call."""


# --------------------------------------------------------------------------- cupy
_cupy: ModuleType | None = None
_cupy_checked = False
_cupy_error: str | None = None


def _import_cupy() -> ModuleType:
    """Import CuPy and check that a GPU is usable; raise BackendError if not."""
    global _cupy, _cupy_checked, _cupy_error
    if not _cupy_checked:
        _cupy_checked = True
        try:
            import cupy  # noqa: PLC0415 - optional dependency, imported on demand
        except ImportError as exc:
            _cupy_error = (
                "the 'cupy' backend needs CuPy, which is not installed "
                f"({exc}). Install it with: pip install 'xpnet[cuda12]' "
                "(CUDA 12) or 'xpnet[cuda13]' (CUDA 13)"
            )
        else:
            try:
                count = cupy.cuda.runtime.getDeviceCount()
            except Exception as exc:  # CUDA driver missing or broken
                count, detail = 0, f": {exc}"
            else:
                detail = ""
            if count < 1:
                _cupy_error = (
                    "the 'cupy' backend needs a usable NVIDIA GPU, but CuPy "
                    f"found none{detail}. Use DL_BACKEND=numpy to run on the CPU"
                )
            else:
                _cupy = cupy
    if _cupy is None:
        raise BackendError(_cupy_error)
    return _cupy


def is_gpu_available() -> bool:
    """True when CuPy is installed and sees at least one CUDA device."""
    try:
        _import_cupy()
    except BackendError:
        return False
    return True


def _module_for(name: str) -> ModuleType:
    if name == "numpy":
        return numpy
    if name == "cupy":
        return _import_cupy()
    raise BackendError(
        f"unknown backend {name!r}; valid backends are: {', '.join(BACKENDS)}"
    )


# ----------------------------------------------------------------------- state
_state = threading.local()
_lock = threading.Lock()
_global_name: str | None = None  # resolved lazily from DL_BACKEND


def _current_name() -> str:
    name = getattr(_state, "name", None)
    if name is not None:
        return name
    global _global_name
    if _global_name is None:
        with _lock:
            if _global_name is None:
                env = os.environ.get("DL_BACKEND", "numpy").strip().lower() or "numpy"
                try:
                    _module_for(env)
                except BackendError as exc:
                    raise BackendError(f"DL_BACKEND={env!r}: {exc}") from None
                _global_name = env
    return _global_name


def get_backend_name() -> str:
    """The name of the active backend: 'numpy' or 'cupy'."""
    return _current_name()


def get_backend() -> ModuleType:
    """The active array module itself (numpy or cupy)."""
    return _module_for(_current_name())


def set_backend(name: str) -> None:
    """Make ``name`` ('numpy' or 'cupy') the backend for the whole process."""
    global _global_name
    name = str(name).strip().lower()
    _module_for(name)  # validate before switching
    with _lock:
        _global_name = name
    _state.name = None


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[ModuleType]:
    """Use ``name`` as the backend inside a ``with`` block (this thread only)."""
    name = str(name).strip().lower()
    module = _module_for(name)
    previous = getattr(_state, "name", None)
    _state.name = name
    try:
        yield module
    finally:
        _state.name = previous


class _ArrayModuleProxy:
    """Forwards attribute access to the active array module."""

    __slots__ = ()

    def __getattr__(self, attr: str) -> Any:
        return getattr(get_backend(), attr)

    def __repr__(self) -> str:
        return f"<xpnet.backend.xp -> {get_backend_name()}>"

    def __dir__(self) -> list[str]:
        return dir(get_backend())


xp: Any = _ArrayModuleProxy()


# ---------------------------------------------------------------- arrays
def _loaded_cupy() -> ModuleType | None:
    """CuPy if anyone has imported it (xpnet, or the caller who made CuPy arrays)."""
    return _cupy if _cupy is not None else sys.modules.get("cupy")


def _is_cupy_array(a: Any) -> bool:
    cupy = _loaded_cupy()
    return cupy is not None and isinstance(a, cupy.ndarray)


def get_array_module(*arrays: Any) -> ModuleType:
    """numpy or cupy, whichever the given arrays live on (numpy for plain values).

    Raises BackendMismatchError when both kinds are given.
    """
    cupy = _loaded_cupy()
    if cupy is None:  # CuPy never imported: everything is NumPy (the CPU hot path)
        return numpy
    module: ModuleType | None = None
    for a in arrays:
        if a is None:
            continue
        m = cupy if isinstance(a, cupy.ndarray) else numpy
        if module is not None and m is not module:
            raise BackendMismatchError(
                "NumPy and CuPy arrays were mixed in one call; move them to one "
                "device first (xpnet.backend.to_cpu / to_gpu)"
            )
        module = m
    return module if module is not None else numpy


def check_same_backend(where: str, **arrays: Any) -> ModuleType:
    """Like get_array_module, but the error names ``where`` and each array's device.

    ``arrays`` maps a role ('x', 'W', 't' ...) to an array; returns the module.
    """
    cupy = _loaded_cupy()
    if cupy is None:  # CuPy never imported: everything is NumPy (the CPU hot path)
        return numpy
    kinds = {
        role: ("cupy" if _is_cupy_array(a) else "numpy")
        for role, a in arrays.items()
        if a is not None
    }
    if len(set(kinds.values())) > 1:
        listing = ", ".join(f"{role} on {kind}" for role, kind in kinds.items())
        raise BackendMismatchError(
            f"{where}: NumPy and CuPy arrays mixed ({listing}); expected all on one "
            "device - move the model or the data (to_gpu / to_cpu)"
        )
    if "cupy" in kinds.values():
        return cupy
    return numpy


def to_cpu(a: Any) -> Any:
    """A NumPy array with the contents of ``a`` (no copy when it is NumPy already)."""
    if _is_cupy_array(a):
        return a.get()
    return numpy.asarray(a)


def to_gpu(a: Any) -> Any:
    """A CuPy array with the contents of ``a`` (raises BackendError without a GPU)."""
    cupy = _import_cupy()
    return cupy.asarray(a)


def to_backend(a: Any, name: str | None = None) -> Any:
    """``a`` on the given backend (default: the active one)."""
    name = name or get_backend_name()
    return to_gpu(a) if name == "cupy" else to_cpu(a)


def device_name() -> str:
    """A human description of where the active backend computes."""
    if get_backend_name() == "cupy":
        cupy = _import_cupy()
        dev = cupy.cuda.Device()
        props = cupy.cuda.runtime.getDeviceProperties(dev.id)
        name = props["name"]
        name = name.decode() if isinstance(name, bytes) else name
        return f"GPU {dev.id}: {name}"
    import platform  # noqa: PLC0415

    return (f"CPU ({platform.machine()}, {os.cpu_count()} logical cores, "
            f"{get_num_threads()} xpnet threads)")


# ----------------------------------------------------------------- dtype
_default_dtype = numpy.dtype(numpy.float32)


def get_default_dtype() -> numpy.dtype:
    """The float dtype new parameters and data are created with (float32 unless set)."""
    return _default_dtype


def set_default_dtype(dtype: Any) -> None:
    """Set the default float dtype: float32 (default), float64 or float16."""
    global _default_dtype
    dt = numpy.dtype(dtype)
    if dt.kind != "f":
        raise ValueError(f"default dtype must be a float type, got {dt}")
    _default_dtype = dt


# ----------------------------------------------------------------- random
class Random:
    """A seeded random source on one backend.

    Wraps ``numpy.random.Generator`` or ``cupy.random.Generator`` behind the few
    calls xpnet needs, always returning arrays of the requested dtype.
    """

    def __init__(self, backend: str, seed: int | None) -> None:
        self.backend = backend
        self.seed = seed
        module = _module_for(backend)
        self._gen = module.random.default_rng(seed)

    def random(self, shape: Any, dtype: Any = None) -> Any:
        """Uniform samples in [0, 1)."""
        dtype = numpy.dtype(dtype or _default_dtype)
        native = dtype if dtype in (numpy.float32, numpy.float64) else numpy.float32
        return self._gen.random(shape, dtype=native).astype(dtype, copy=False)

    def normal(self, shape: Any, std: float = 1.0, dtype: Any = None) -> Any:
        """Normal samples with mean 0 and standard deviation ``std``."""
        dtype = numpy.dtype(dtype or _default_dtype)
        out = self._gen.standard_normal(shape, dtype=numpy.float64)
        if std != 1.0:
            out *= std
        return out.astype(dtype, copy=False)

    def permutation(self, n: int) -> Any:
        """A random ordering of range(n)."""
        if hasattr(self._gen, "permutation"):
            return self._gen.permutation(n)
        return self._gen.random(n).argsort()

    def integers(self, low: int, high: int, size: Any = None) -> Any:
        return self._gen.integers(low, high, size=size)

    def get_state(self) -> dict:
        """A JSON-serialisable snapshot (NumPy backend only)."""
        if self.backend != "numpy":
            raise NotImplementedError("random state export is supported on the NumPy backend")
        return {"backend": self.backend, "seed": self.seed,
                "bit_generator": self._gen.bit_generator.state}

    def set_state(self, state: dict) -> None:
        if self.backend != "numpy":
            raise NotImplementedError("random state import is supported on the NumPy backend")
        self._gen.bit_generator.state = state["bit_generator"]


_seed: int | None = None
_rngs: dict[str, Random] = {}


def seed(value: int | None) -> None:
    """Seed xpnet's random sources on every backend (initialisers, dropout, shuffling)."""
    global _seed
    _seed = None if value is None else int(value)
    _rngs.clear()


def get_rng(backend: str | None = None) -> Random:
    """The seeded random source of ``backend`` (default: the active backend)."""
    name = backend or get_backend_name()
    rng = _rngs.get(name)
    if rng is None:
        rng = _rngs[name] = Random(name, _seed)
    return rng
