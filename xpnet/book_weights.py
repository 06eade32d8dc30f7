"""Safe import of the book's trained weights (pickled dicts of NumPy arrays).

The book's code saves parameters with ``pickle.dump(params, f)``
(``ch08/deep_convnet_params.pkl``, ``ch07/params.pkl``).  Unpickling can call any
importable function, so xpnet never hands such a file to :func:`pickle.load`.
:func:`read_book_pickle` uses an unpickler that resolves only the few globals a dict
of NumPy arrays needs, and refuses every other one *before* anything is called,
naming it (``module.name``) - the same idea as ``torch.load(weights_only=True)``:

* ``numpy.core.multiarray._reconstruct`` / ``numpy._core.multiarray._reconstruct``:
  an empty ndarray, whose data follow as its state;
* ``numpy.ndarray``: a token valid only as ``_reconstruct``'s first argument;
* ``numpy.dtype``: a dtype from a type string, object dtypes refused;
* ``numpy.core.numeric._frombuffer`` / ``numpy._core.numeric._frombuffer``: an array
  over in-band bytes (protocol 5);
* ``collections.OrderedDict``;
* ``_codecs.encode``, only as ``(str, 'latin1')``, and ``builtins.bytes`` (protocol 2's
  ``__builtin__.bytes``), only as ``bytes()``: how protocols 0-2 store bytes.

dict, list, tuple, str, bytes, int, float, bool and None need no global.  Arrays of
dtype object are refused (their items are arbitrary objects), and the result must be a
flat ``dict`` of ``str`` -> numeric ndarray (bool, integer, float or complex).

:func:`import_book_params` writes the arrays in xpnet's own format
(:func:`xpnet.state.save_state`), which networks load without pickle.  The book's
DeepConvNet scales by ``1 - ratio`` at inference where xpnet's inverted dropout does
nothing, so its last Affine is rescaled on import (see :func:`to_xpnet`).
``xpnet-import-weights SRC.pkl DST.npz`` (or ``python -m xpnet.book_weights``) runs it.
"""

from __future__ import annotations

import argparse
import io
import os
import pickle
import re
import sys
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from xpnet.backend import get_default_dtype
from xpnet.state import save_state

__all__ = ["ALLOWED_GLOBALS", "BOOK_MODELS", "BookPickleError", "detect_model",
           "import_book_params", "main", "read_book_pickle", "to_xpnet"]

_np_core = getattr(np, "_core", None) or np.core  # numpy >= 2 / 1.x


class BookPickleError(ValueError):
    """A pickle was refused (a global outside the allow-list, an object array) or is
    damaged, truncated or not a flat dict of numeric arrays.  The message names the file."""


class _Refused(Exception):
    """Raised inside the unpickler; turned into BookPickleError naming the file."""


class _NdarrayToken:
    """Stands for ``numpy.ndarray`` in a pickle: usable only as ``_reconstruct``'s subtype.

    Handing out the real class would let a pickle call ``ndarray(shape)`` with any shape.
    No ``__dict__`` and no slots, so a pickle's BUILD cannot change it.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return "<numpy.ndarray (restricted)>"


_NDARRAY = _NdarrayToken()


def _shape(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value):
        raise _Refused(f"{what}: expected a shape (tuple of ints >= 0), got {value!r}")
    return value


def _reconstruct(subtype: Any, shape: Any, typecode: Any) -> np.ndarray:
    """``numpy.core.multiarray._reconstruct`` for plain ndarrays (its state follows by BUILD)."""
    if subtype is not _NDARRAY:
        raise _Refused(f"_reconstruct of {subtype!r}: only numpy.ndarray is admitted")
    if not isinstance(typecode, (bytes, str)) or len(typecode) != 1:
        raise _Refused(f"_reconstruct: unexpected type code {typecode!r}")
    # numpy writes shape (0,): the data come with __setstate__, never from here
    if _shape(shape, "_reconstruct") != (0,):
        raise _Refused(f"_reconstruct: unexpected shape {shape!r}, numpy writes (0,)")
    return _np_core.multiarray._reconstruct(np.ndarray, (0,), b"b")


def _dtype(obj: Any, align: Any = False, copy: Any = False) -> np.dtype:
    """``numpy.dtype(obj, align, copy)`` for a type string, refusing object dtypes."""
    if not isinstance(obj, str):
        raise _Refused(f"numpy.dtype({obj!r}): only a type string is admitted")
    # numpy 1.x wrote the flags as 0 / 1
    if align not in (0, 1) or copy not in (0, 1) or type(align) not in (bool, int) \
            or type(copy) not in (bool, int):
        raise _Refused(f"numpy.dtype({obj!r}, {align!r}, {copy!r}): flags must be 0 or 1")
    try:
        dt = np.dtype(obj, align=bool(align), copy=bool(copy))
    except TypeError as exc:
        raise _Refused(f"numpy.dtype({obj!r}): {exc}") from None
    if dt.hasobject:
        raise _Refused(f"numpy.dtype({obj!r}) is an object dtype: an object array holds "
                       "arbitrary Python objects, refused")
    return dt


def _frombuffer(buf: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    """``numpy.core.numeric._frombuffer``: protocol 5's array over in-band bytes."""
    if not isinstance(buf, (bytes, bytearray)):
        raise _Refused(f"_frombuffer: expected in-band bytes, got {type(buf).__name__}")
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise _Refused(f"_frombuffer: dtype {dtype!r} refused")
    if order not in ("C", "F"):
        raise _Refused(f"_frombuffer: order {order!r} refused")
    return np.frombuffer(buf, dtype=dtype).reshape(_shape(shape, "_frombuffer"), order=order)


def _codecs_encode(obj: Any, encoding: Any = "utf-8", errors: Any = "strict") -> bytes:
    """``_codecs.encode(str, 'latin1')``: how pickle protocols 0-2 store a bytes object."""
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise _Refused(f"_codecs.encode with {type(obj).__name__}, {encoding!r}, {errors!r}: "
                       "only (str, 'latin1') is admitted")
    return obj.encode("latin1")


def _empty_bytes(*args: Any) -> bytes:
    """``bytes()``: how pickle protocols 0-2 store an empty bytes object (empty arrays)."""
    if args:
        raise _Refused("bytes() with arguments refused: pickle writes only bytes()")
    return b""


class _Admitted:
    """A callable standing for one admitted function, with no ``__dict__`` and no slots:
    a plain function's attributes (``__defaults__`` ...) could be set by a pickle's BUILD."""

    __slots__ = ()
    _fn: Any

    def __call__(self, *args: Any) -> Any:
        return type(self)._fn(*args)


def _admit(fn: Any) -> _Admitted:
    return type(fn.__name__, (_Admitted,), {"__slots__": (), "_fn": staticmethod(fn)})()


_RECONSTRUCT, _FROMBUFFER = _admit(_reconstruct), _admit(_frombuffer)
_BYTES = _admit(_empty_bytes)

#: every global a book pickle may name (``module.name``) -> what it resolves to
ALLOWED_GLOBALS: Mapping[str, Any] = MappingProxyType({
    "numpy.core.multiarray._reconstruct": _RECONSTRUCT,
    "numpy._core.multiarray._reconstruct": _RECONSTRUCT,
    "numpy.ndarray": _NDARRAY,
    "numpy.dtype": _admit(_dtype),
    "numpy.core.numeric._frombuffer": _FROMBUFFER,
    "numpy._core.numeric._frombuffer": _FROMBUFFER,
    "collections.OrderedDict": OrderedDict,  # a C type: BUILD cannot change it
    "_codecs.encode": _admit(_codecs_encode),
    "__builtin__.bytes": _BYTES,  # protocol 2 names builtins so
    "builtins.bytes": _BYTES,
})


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only :data:`ALLOWED_GLOBALS`; never imports a module."""

    def find_class(self, module: str, name: str) -> Any:
        # GLOBAL, STACK_GLOBAL, INST, OBJ and EXT all end here, before any call
        target = ALLOWED_GLOBALS.get(f"{module}.{name}")
        if target is None:
            raise _Refused(f"refused global {module}.{name} (a pickle of NumPy arrays may "
                           f"only name: {', '.join(sorted(ALLOWED_GLOBALS))})")
        return target

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused(f"refused persistent id {pid!r}")


_NUMERIC_KINDS = "biufc"


def _check_arrays(path: Path, obj: Any) -> dict[str, np.ndarray]:
    """``obj`` as a plain dict of fresh, owned numeric arrays, or BookPickleError."""
    if not isinstance(obj, dict):
        raise BookPickleError(f"{path}: expected a dict of NumPy arrays, found a "
                              f"{type(obj).__name__}")
    out: dict[str, np.ndarray] = {}
    problems = []
    for k, v in obj.items():
        if not isinstance(k, str):
            problems.append(f"key {k!r} is a {type(k).__name__}, expected str")
        elif type(v) is not np.ndarray:
            problems.append(f"{k!r} is a {type(v).__name__}, expected a NumPy array")
        elif v.dtype.hasobject or v.dtype.kind not in _NUMERIC_KINDS:
            problems.append(f"{k!r} has dtype {v.dtype}, expected a numeric dtype")
        else:
            # a fresh array with a freshly built dtype: nothing of the pickle's objects kept
            out[k] = np.array(v, dtype=np.dtype(v.dtype.str), order="C", copy=True)
    if problems:
        raise BookPickleError(f"{path}: not a flat dict of numeric arrays:\n"
                              + "\n".join(f"  - {p}" for p in problems))
    if not out:
        raise BookPickleError(f"{path}: the dict holds no arrays")
    return out


def read_book_pickle(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The ``name -> array`` dict pickled in ``path``, read without running its code.

    Only :data:`ALLOWED_GLOBALS` are resolved; any other global is refused before it
    is called.  Raises :class:`BookPickleError` naming the file and the refused global
    (or what else is wrong: object dtype, truncated or damaged data, not a flat dict
    of numeric arrays).  The arrays come back as host NumPy arrays, dtypes as stored.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BookPickleError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise BookPickleError(f"{path}: is a directory, not a pickle") from None
    except OSError as exc:
        raise BookPickleError(f"{path}: cannot read the file: {exc.strerror or exc}") from None
    if not data:
        raise BookPickleError(f"{path}: the file is empty")
    if data.startswith(b"PK\x03\x04"):
        raise BookPickleError(f"{path}: this is a zip (.npz) archive, not a pickle; "
                              "xpnet's own files load with load_params / xpnet.state")
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data)).load()
    except _Refused as exc:
        raise BookPickleError(f"{path}: {exc}") from None
    except EOFError:
        raise BookPickleError(f"{path}: truncated pickle (the data end before its STOP "
                              f"opcode; {len(data)} bytes)") from None
    except pickle.UnpicklingError as exc:
        what = "truncated" if "truncated" in str(exc) else "damaged or not a"
        raise BookPickleError(f"{path}: {what} pickle ({exc}; {len(data)} bytes)") from None
    except Exception as exc:  # noqa: BLE001 - anything else means malformed data
        raise BookPickleError(f"{path}: malformed pickle ({type(exc).__name__}: {exc})") \
            from None
    return _check_arrays(path, obj)


#: the book's networks :func:`detect_model` recognises, and ``"none"``
BOOK_MODELS = ("deep-convnet", "simple-convnet", "none")


def _has_layout(arrays: Mapping[str, np.ndarray], ndims: Sequence[int]) -> bool:
    """True when ``arrays`` is exactly W1, b1, ... with the given weight ranks."""
    n = len(ndims)
    names = {f"{p}{i}" for p in "Wb" for i in range(1, n + 1)}
    return set(arrays) == names \
        and all(arrays[f"W{i + 1}"].ndim == d for i, d in enumerate(ndims)) \
        and all(arrays[f"b{i}"].ndim == 1 for i in range(1, n + 1))


def detect_model(arrays: Mapping[str, np.ndarray]) -> str:
    """Which of the book's networks a parameter dict belongs to, by its keys and ranks.

    'deep-convnet': W1..W6 convolutions (4-D), W7, W8 affine (2-D), b1..b8;
    'simple-convnet': W1 4-D, W2, W3 2-D, b1..b3; otherwise 'none'.
    """
    if _has_layout(arrays, (4,) * 6 + (2, 2)):
        return "deep-convnet"
    if _has_layout(arrays, (4, 2, 2)):
        return "simple-convnet"
    return "none"


def to_xpnet(arrays: Mapping[str, np.ndarray], model: str) -> tuple[dict[str, np.ndarray], str]:
    """The book's parameters of ``model`` as xpnet's network computes with them.

    The book's DeepConvNet multiplies by 1 - 0.5 in both of its Dropout layers at
    inference (after the ReLU of Affine 7 and after Affine 8); xpnet's inverted dropout
    is the identity there.  So W8 * 0.25 and b8 * 0.5 make xpnet's scores equal to the
    book's (0.5 * (0.5 h @ W8 + b8)).  SimpleConvNet has no dropout: unchanged.
    Returns the new dict and a one-line note of what changed ('' when nothing did).
    """
    if model not in BOOK_MODELS:
        raise ValueError(f"model must be one of {BOOK_MODELS}, got {model!r}")
    out = dict(arrays)
    if model == "deep-convnet":
        missing = [k for k in ("W8", "b8") if k not in out]
        if missing:
            raise ValueError(f"deep-convnet: the parameters lack {missing}")
        out["W8"] = out["W8"] * out["W8"].dtype.type(0.25)
        out["b8"] = out["b8"] * out["b8"].dtype.type(0.5)
        return out, ("W8 * 0.25, b8 * 0.5: the book's inference-time dropout scaling "
                     "(xpnet's dropout is inverted)")
    return out, ""


def _layer_order(name: str) -> tuple:
    """W1, b1, W2, ... (the pickles' order is the book's dict order, which varies)."""
    m = re.fullmatch(r"(\D*)(\d+)", name)
    return (0, int(m.group(2)), m.group(1)) if m else (1, 0, name)


def _import(src: str | os.PathLike, dst: str | os.PathLike, model: str,
            dtype: Any) -> tuple[dict[str, np.ndarray], str, str]:
    """Read, convert, cast and write; returns (arrays written, model, conversion note)."""
    arrays = read_book_pickle(src)
    if Path(dst).resolve() == Path(src).resolve():
        raise ValueError(f"{dst}: the destination is the source pickle")
    chosen = detect_model(arrays) if model == "auto" else model
    arrays, note = to_xpnet(arrays, chosen)
    arrays = {k: arrays[k] for k in sorted(arrays, key=_layer_order)}
    if not (isinstance(dtype, str) and dtype == "keep"):
        dt = np.dtype(get_default_dtype() if dtype is None else dtype)
        if dt.kind != "f":
            raise ValueError(f"dtype must be a float type or 'keep', got {dt}")
        arrays = {k: a.astype(dt) if a.dtype.kind == "f" else a for k, a in arrays.items()}
    save_state(dst, params=arrays)
    return arrays, chosen, note


def import_book_params(src: str | os.PathLike, dst: str | os.PathLike, *,
                       model: str = "auto", dtype: Any = None) -> dict[str, tuple]:
    """Read the book's pickle ``src`` safely and write xpnet's state file ``dst``.

    ``model``: 'auto' (recognise the book's DeepConvNet / SimpleConvNet by keys and
    ranks, :func:`detect_model`), 'deep-convnet', 'simple-convnet' or 'none' (arrays
    unchanged); see :func:`to_xpnet` for the DeepConvNet rescaling.  ``dtype``: the
    float dtype written, xpnet's default (float32 unless set) when None, so that a
    network built with defaults loads the file; 'keep' writes each array as stored
    (the book's are float64).  Non-float arrays are never cast.  The file holds the
    arrays as ``params`` (``xpnet.state.load_state(dst).params``).  Returns
    ``{name: shape}`` of what was written.  Raises :class:`BookPickleError` for a
    refused or damaged pickle, ValueError for bad arguments.
    """
    arrays, _, _ = _import(src, dst, model, dtype)
    return {k: tuple(a.shape) for k, a in arrays.items()}


# ------------------------------------------------------------------------ CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="xpnet-import-weights",
        description="Import the book's pickled weights (e.g. ch08/deep_convnet_params.pkl) "
                    "into xpnet's safe .npz state format, without running pickled code.")
    p.add_argument("src", metavar="SRC.pkl", help="the book's pickle (dict of NumPy arrays)")
    p.add_argument("dst", metavar="DST.npz", help="xpnet state file to write")
    p.add_argument("--model", choices=("auto", *BOOK_MODELS), default="auto",
                   help="the book's network the weights belong to (default: recognised "
                        "from the keys); deep-convnet rescales W8, b8 for inverted dropout")
    p.add_argument("--dtype", default=None, choices=("float16", "float32", "float64", "keep"),
                   help="float dtype written (default: xpnet's default dtype, float32); "
                        "'keep' writes the arrays as stored")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``xpnet-import-weights SRC.pkl DST.npz``: errors as one line, exit status 2."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        arrays, model, note = _import(args.src, args.dst, args.model, args.dtype)
    except (ValueError, OSError) as exc:  # BookPickleError is a ValueError
        lines = [s.strip(" -") for s in str(exc).splitlines()]
        parser.exit(2, f"{parser.prog}: error: {'; '.join(lines)}\n")
    print(f"read {args.src}: {len(arrays)} arrays, model {model}")
    if note:
        print(f"converted: {note}")
    for k, a in arrays.items():
        print(f"  {k:<6} {str(tuple(a.shape)):<18} {a.dtype}")
    print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
