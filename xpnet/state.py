"""One state format: parameters, buffers, optimizer state, RNG and progress in one file.

A state file is a plain (uncompressed) NumPy ``.npz`` archive, never a pickle:

* ``__manifest__``: UTF-8 JSON as a uint8 array: the format name and version, one
  entry per stored array (member, group, key, shape, dtype, sha256 of the bytes),
  and every non-array piece of state (optimizer type, hyper-parameters and step,
  schedule, random-generator states, progress, history, configuration);
* ``__manifest_sha256__``: the sha256 of the manifest's bytes, so an edited
  manifest (a learning rate, a step) is refused like an edited array;
* ``a00000``, ``a00001``, ...: the arrays, always host (NumPy) arrays, so a file
  written from CuPy loads on NumPy and the other way round.

:func:`save_state` writes one atomically (:func:`xpnet._atomic.atomic_write`);
:func:`load_state` reads and verifies one (``allow_pickle=False``, every array
against its sha256, shape and dtype, every manifest section against its expected
type) and raises :class:`StateError` naming the file and every problem.  Networks'
``save_params`` / ``load_params``, checkpoints and the Trainer's resume all use
these two functions.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xpnet._atomic import atomic_write
from xpnet.backend import to_cpu

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "State", "StateError", "save_state",
           "load_state", "sha256_of"]

FORMAT_NAME = "xpnet-checkpoint"
FORMAT_VERSION = 2
MANIFEST = "__manifest__"
MANIFEST_DIGEST = "__manifest_sha256__"
_ZIP_MAGIC = b"PK\x03\x04"


class StateError(ValueError):
    """A state file is missing, truncated, tampered with or malformed.

    The message names the file and lists every problem found.
    """


def sha256_of(a: Any) -> str:
    """The sha256 of an array's bytes (C order) or of a bytes object."""
    if isinstance(a, (bytes, bytearray)):
        return hashlib.sha256(a).hexdigest()
    return hashlib.sha256(np.ascontiguousarray(a).reshape(-1).view(np.uint8)).hexdigest()


def _host(a: Any, what: str) -> np.ndarray:
    """A host copy of array ``a`` (refusing object arrays, which would need pickle)."""
    h = np.array(to_cpu(a), copy=True)
    if h.dtype.hasobject:
        raise TypeError(f"save_state: {what} has dtype {h.dtype}; object arrays cannot be "
                        "stored without pickle")
    return h


def _jsonable(value: Any, where: str) -> Any:
    """``value`` with NumPy scalars turned into Python ones; TypeError if not JSON-able."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"save_state: {where} is a {type(value).__name__}, which is not "
                    "JSON-serialisable")


@dataclass
class State:
    """The contents of a state file, all arrays on the host.

    ``optimizer`` is an optimizer's ``state_dict()`` (type, hyper, step, slots) or None.
    """

    path: Path
    params: dict[str, np.ndarray]
    buffers: dict[str, np.ndarray]
    optimizer: dict[str, Any] | None = None
    lr_schedule: dict[str, Any] | None = None
    rng: dict[str, Any] = field(default_factory=dict)
    progress: dict[str, Any] = field(default_factory=dict)
    history: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    backend: str = "numpy"

    @property
    def step(self) -> int:
        return int(self.progress.get("step", 0))

    @property
    def epoch(self) -> int:
        return int(self.progress.get("epoch", 0))


# ------------------------------------------------------------------------ save
def save_state(path: str | os.PathLike, *, params: Mapping[str, Any],
               buffers: Mapping[str, Any] | None = None,
               optimizer: Mapping[str, Any] | None = None,
               lr_schedule: Mapping[str, Any] | None = None,
               rng: Mapping[str, Any] | None = None,
               progress: Mapping[str, Any] | None = None,
               history: Mapping[str, Any] | None = None,
               config: Mapping[str, Any] | None = None,
               arrays: Mapping[str, Any] | None = None,
               backend: str = "numpy") -> Path:
    """Write one state file atomically and return its path.

    ``optimizer`` is an optimizer's ``state_dict()``; ``lr_schedule``, ``rng``,
    ``progress``, ``history`` and ``config`` must be JSON-able; ``arrays`` holds
    extra named arrays.  Device arrays are copied to the host.
    """
    entries: list[dict[str, Any]] = []
    members: dict[str, np.ndarray] = {}

    def add(group: str, key: str, a: Any, slot: str | None = None) -> None:
        where = f"{group}[{slot!r}][{key!r}]" if slot else f"{group}[{key!r}]"
        h = _host(a, where)
        name = f"a{len(entries):05d}"
        members[name] = h
        entries.append({"member": name, "group": group, "slot": slot, "key": str(key),
                        "shape": list(h.shape), "dtype": h.dtype.str, "sha256": sha256_of(h)})

    for group, table in (("params", params), ("buffers", buffers or {}),
                         ("extra", arrays or {})):
        for k, a in table.items():
            add(group, k, a)
    opt_meta = None
    if optimizer is not None:
        opt_meta = {k: _jsonable(v, f"optimizer[{k!r}]")
                    for k, v in optimizer.items() if k != "slots"}
        opt_meta["slot_names"] = list(optimizer["slots"])
        for slot, table in optimizer["slots"].items():
            for k, a in table.items():
                add("optimizer", k, a, slot=slot)
    manifest = {
        "format": FORMAT_NAME, "version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "backend": backend,
        "arrays": entries, "optimizer": opt_meta,
        "lr_schedule": _jsonable(lr_schedule, "lr_schedule"),
        "rng": _jsonable(dict(rng or {}), "rng"),
        "progress": _jsonable(dict(progress or {}), "progress"),
        "history": _jsonable(dict(history or {}), "history"),
        "config": _jsonable(dict(config or {}), "config"),
    }
    blob = json.dumps(manifest, sort_keys=True, allow_nan=True).encode("utf-8")
    members[MANIFEST] = np.frombuffer(blob, dtype=np.uint8)
    members[MANIFEST_DIGEST] = np.frombuffer(sha256_of(blob).encode("ascii"), dtype=np.uint8)
    return atomic_write(path, lambda f: np.savez(f, **members))


# ------------------------------------------------------------------------ load
def _fail(path: Path, what: str) -> StateError:
    return StateError(f"{path}: {what}")


# the manifest's sections and the JSON types they must have
_SECTIONS = {"arrays": list, "optimizer": (dict, type(None)), "lr_schedule": (dict, type(None)),
             "rng": dict, "progress": dict, "history": dict, "config": dict}


def load_state(path: str | os.PathLike) -> State:
    """Read and verify a state file; all arrays come back as host NumPy arrays.

    Raises :class:`StateError` naming the path and what is wrong when the file is
    missing, a directory, truncated, not a state file, of another format version,
    holds a pickled (object) array or a member that is not an array, has a manifest
    that was edited or malformed, or an array differs from its recorded sha256,
    shape or dtype (all such problems are listed).  Nothing is ever unpickled.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except FileNotFoundError:
        raise _fail(path, "no such file") from None
    except IsADirectoryError:
        raise _fail(path, "is a directory, not a state file") from None
    except OSError as exc:
        raise _fail(path, f"cannot read the file: {exc.strerror or exc}") from None
    if head != _ZIP_MAGIC:
        if not head:
            what = "the file is empty"
        elif _ZIP_MAGIC.startswith(head):
            what = f"the file is truncated ({len(head)} bytes)"
        elif head[:1] == b"\x80":
            what = ("it is a Python pickle, which xpnet never unpickles; the book's "
                    "weights import with `xpnet-import-weights SRC.pkl DST.npz`")
        else:
            what = f"it starts with {head!r}"
        raise _fail(path, f"not an xpnet state file (expected an .npz archive; {what})")
    try:
        npz = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        raise _fail(path, f"damaged or truncated archive ({exc})") from None
    with npz:
        return _read(path, npz)


def _manifest(path: Path, npz: Any) -> dict[str, Any]:
    files = set(npz.files)
    if MANIFEST not in files:
        raise _fail(path, f"not an xpnet state file: it has no manifest ({MANIFEST!r})")
    try:
        raw, digest = npz[MANIFEST], npz[MANIFEST_DIGEST] if MANIFEST_DIGEST in files else None
        if not isinstance(raw, np.ndarray) or raw.dtype != np.uint8 or raw.ndim != 1:
            raise ValueError("the manifest is not a 1-D uint8 array")
        blob = raw.tobytes()
        manifest = json.loads(blob.decode("utf-8"))
        if not isinstance(manifest, dict):
            raise ValueError("the manifest is not a JSON object")
    except Exception as exc:  # noqa: BLE001 - any failure here means a damaged manifest
        raise _fail(path, f"damaged manifest ({type(exc).__name__}: {exc})") from None
    if manifest.get("format") != FORMAT_NAME:
        raise _fail(path, f"not an xpnet state file (format {manifest.get('format')!r})")
    version = manifest.get("version")
    if version != FORMAT_VERSION:
        raise _fail(path, f"format version {version!r}; this xpnet reads version "
                          f"{FORMAT_VERSION} (files of version 1 have no manifest checksum)")
    if not isinstance(digest, np.ndarray) or digest.dtype != np.uint8 \
            or digest.tobytes() != sha256_of(blob).encode("ascii"):
        raise _fail(path, "the manifest's sha256 does not match (the manifest was changed)")
    problems = [f"manifest section {k!r} is a {type(manifest.get(k)).__name__}, expected "
                f"{t.__name__ if isinstance(t, type) else t[0].__name__}"
                for k, t in _SECTIONS.items() if not isinstance(manifest.get(k), t)]
    opt = manifest.get("optimizer")
    if isinstance(opt, dict):
        for k, t in (("type", str), ("hyper", dict), ("step", int), ("slot_names", list)):
            if not isinstance(opt.get(k), t):
                problems.append(f"optimizer[{k!r}] is missing or not a {t.__name__}")
    if problems:
        raise _fail(path, "malformed manifest:\n" + "\n".join(f"  - {p}" for p in problems))
    return manifest


def _read(path: Path, npz: Any) -> State:
    manifest = _manifest(path, npz)
    files = set(npz.files)
    problems: list[str] = []
    listed = {MANIFEST, MANIFEST_DIGEST}
    state = State(path=path, params={}, buffers={}, backend=str(manifest.get("backend")))
    opt = manifest["optimizer"]
    if opt is not None:
        state.optimizer = {k: v for k, v in opt.items() if k != "slot_names"}
        state.optimizer["slots"] = {s: {} for s in opt["slot_names"]}
    for e in manifest["arrays"]:
        try:
            member, shape, dtype, digest = e["member"], tuple(e["shape"]), e["dtype"], e["sha256"]
            group, key, slot = e["group"], e["key"], e.get("slot")
            label = group + (f"[{slot!r}]" if slot else "") + f"[{key!r}]"
        except (KeyError, TypeError):
            problems.append(f"manifest entry {e!r} is malformed")
            continue
        listed.add(member)
        if member not in files:
            problems.append(f"{label}: array {member!r} is missing from the archive")
            continue
        try:
            a = npz[member]
        except ValueError as exc:
            problems.append(f"{label}: refused to load array {member!r} ({exc})")
            continue
        except Exception as exc:  # noqa: BLE001 - zip CRC errors, truncated members ...
            problems.append(f"{label}: array {member!r} is damaged ({type(exc).__name__}: "
                            f"{exc})")
            continue
        if not isinstance(a, np.ndarray):
            problems.append(f"{label}: member {member!r} is not a .npy array")
            continue
        if a.dtype.str != dtype:
            problems.append(f"{label}: dtype {a.dtype.str} in the archive, {dtype} recorded")
        if tuple(a.shape) != shape:
            problems.append(f"{label}: shape {tuple(a.shape)} in the archive, {shape} recorded")
        if sha256_of(a) != digest:
            problems.append(f"{label}: sha256 checksum mismatch (the data was changed)")
        if group in ("params", "buffers"):
            getattr(state, group)[key] = a
        elif group == "extra":
            state.arrays[key] = a
        elif group == "optimizer" and state.optimizer is not None \
                and slot in state.optimizer["slots"]:
            state.optimizer["slots"][slot][key] = a
        else:
            problems.append(f"{label}: unknown group or optimizer slot")
    for member in sorted(files - listed):
        problems.append(f"unexpected member {member!r} not listed in the manifest")
    if problems:
        raise _fail(path, f"failed verification ({len(problems)} problem(s)):\n"
                          + "\n".join(f"  - {p}" for p in problems))
    for k in ("lr_schedule", "rng", "progress", "history", "config"):
        setattr(state, k, manifest[k])
    return state
