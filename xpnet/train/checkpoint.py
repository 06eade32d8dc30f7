"""Checkpoints: one ``.npz`` file per checkpoint, no pickle anywhere.

A checkpoint file is a plain (uncompressed) NumPy ``.npz`` archive:

* ``__manifest__``: a uint8 array holding UTF-8 JSON: the format name and version,
  one entry per stored array (member name, group, key, shape, dtype, sha256 of the
  bytes), and every non-array piece of state (optimizer type, hyperparameters and
  step, learning-rate schedule state, random-generator states, epoch/step/position,
  history, model and trainer configuration);
* ``a00000``, ``a00001``, ...: the arrays themselves, always as host (NumPy) arrays,
  so a checkpoint written from CuPy loads on NumPy and the other way round.

Reading uses ``numpy.load(..., allow_pickle=False)`` only: an archive carrying an
object (pickled) array is refused before anything in it is executed.  Every array
is checked against its recorded sha256, shape and dtype.

Writing is atomic: the archive is written to a temporary file in the target
directory, flushed and fsync'ed, moved over the target with ``os.replace`` and the
directory is fsync'ed.  A reader therefore sees either the previous complete file
or the new complete file, even if the writer is killed (SIGKILL) half-way; the
temporary file is removed on any exception (a process killed outright can leave one
behind; its name starts with ``.`` and ends in ``.tmp``, and
:class:`CheckpointManager` removes such leftovers in its directory).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xpnet._atomic import TMP_SUFFIX as _TMP_SUFFIX
from xpnet._atomic import atomic_write
from xpnet.backend import get_array_module, to_backend, to_cpu

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "Checkpoint",
    "CheckpointError",
    "CheckpointMismatchError",
    "CheckpointManager",
    "save_checkpoint",
    "load_checkpoint",
    "atomic_write",
    "network_backend",
]

FORMAT_NAME = "xpnet-checkpoint"
FORMAT_VERSION = 1
MANIFEST_MEMBER = "__manifest__"
_ZIP_MAGIC = b"PK\x03\x04"


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, tampered with, or does not fit its target.

    The message names the file and lists every problem found.
    """


class CheckpointMismatchError(CheckpointError):
    """A valid checkpoint does not fit the network / optimizer / schedule it is loaded into.

    ``problems`` lists every mismatch (keys, shapes, dtypes, types); nothing was changed.
    """

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = list(problems or [])


# --------------------------------------------------------------------- helpers
def _sha256(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).reshape(-1).view(np.uint8)).hexdigest()


def _host(a: Any, what: str) -> np.ndarray:
    """A host copy of array ``a`` (refusing object arrays, which would need pickle)."""
    h = np.array(to_cpu(a), copy=True)
    if h.dtype.hasobject:
        raise TypeError(f"save_checkpoint: {what} has dtype {h.dtype}; object arrays "
                        "cannot be stored without pickle")
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
    raise TypeError(f"save_checkpoint: {where} is a {type(value).__name__}, which is not "
                    "JSON-serialisable")


def network_backend(network: Any) -> str:
    """'numpy' or 'cupy': where the network's parameters live."""
    for p in getattr(network, "params", {}).values():
        return get_array_module(p).__name__
    return "numpy"


def _network_state(network: Any, copy: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """(params, buffers) of ``network``: live arrays, or copies with ``copy=True``."""
    params = dict(network.params)
    buffers = dict(getattr(network, "buffers", None) or {})
    if copy:
        params = {k: v.copy() for k, v in params.items()}
        buffers = {k: v.copy() for k, v in buffers.items()}
    return params, buffers


def _model_info(network: Any) -> dict[str, Any]:
    config = getattr(network, "config", None)
    try:
        config = _jsonable(config, "network.config") if config is not None else None
    except TypeError:
        config = None
    dtype = getattr(network, "dtype", None)
    if dtype is None:
        for p in network.params.values():
            dtype = p.dtype
            break
    return {"class": type(network).__name__, "module": type(network).__module__,
            "name": getattr(network, "model_name", None) or
            (config.get("name") if isinstance(config, dict) else None),
            "config": config, "dtype": None if dtype is None else np.dtype(dtype).str}


# ------------------------------------------------------------------------ save
def save_checkpoint(path: str | os.PathLike, network: Any, optimizer: Any = None, *,
                    lr_schedule: Any = None, rng: Mapping[str, Any] | None = None,
                    progress: Mapping[str, Any] | None = None,
                    history: Mapping[str, Any] | None = None,
                    config: Mapping[str, Any] | None = None,
                    arrays: Mapping[str, Any] | None = None) -> Path:
    """Write one checkpoint file atomically and return its path.

    Args:
        path: the file to write (``.npz`` is conventional; any name is accepted).
        network: an object with ``params`` (and ``buffers``), or ``state_dict()``.
        optimizer: an xpnet optimizer (its ``state_dict()``: type, hyper, step, slots).
        lr_schedule: a schedule with ``state_dict()`` (JSON-able scalars).
        rng: JSON-able random-generator states; when it has no ``'backend'`` entry the
            state of ``xpnet.backend.get_rng()`` of the network's backend is added
            (NumPy only; ``None`` on CuPy, whose generator state cannot be exported).
        progress: JSON-able position (epoch, step, position in the epoch ...).
        history: JSON-able training history.
        config: JSON-able configuration; the model's class and ``config`` are added
            under ``'model'`` unless given.
        arrays: extra named arrays (stored as host arrays).
    """
    path = Path(path)
    entries: list[dict[str, Any]] = []
    members: dict[str, np.ndarray] = {}

    def add(group: str, key: str, a: Any, slot: str | None = None) -> None:
        where = f"{group}[{slot!r}][{key!r}]" if slot else f"{group}[{key!r}]"
        h = _host(a, where)
        name = f"a{len(entries):05d}"
        members[name] = h
        entries.append({"member": name, "group": group, "slot": slot, "key": str(key),
                        "shape": list(h.shape), "dtype": h.dtype.str, "sha256": _sha256(h)})

    params, buffers = _network_state(network)
    for k, a in params.items():
        add("params", k, a)
    for k, a in buffers.items():
        add("buffers", k, a)

    opt_meta = None
    if optimizer is not None:
        ostate = optimizer.state_dict()
        opt_meta = {"type": ostate["type"], "hyper": _jsonable(ostate["hyper"], "hyper"),
                    "step": int(ostate["step"]), "slot_names": list(ostate["slots"])}
        for slot, table in ostate["slots"].items():
            for k, a in table.items():
                add("optimizer", k, a, slot=slot)

    for k, a in (arrays or {}).items():
        add("extra", k, a)

    backend = network_backend(network)
    rng_meta = dict(rng or {})
    if "backend" not in rng_meta:
        rng_meta["backend"] = _backend_rng_state(backend)

    cfg = dict(config or {})
    cfg.setdefault("model", _model_info(network))
    manifest = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "backend": backend,
        "arrays": entries,
        "optimizer": opt_meta,
        "lr_schedule": None if lr_schedule is None else _jsonable(lr_schedule.state_dict(),
                                                                  "lr_schedule"),
        "rng": _jsonable(rng_meta, "rng"),
        "progress": _jsonable(dict(progress or {}), "progress"),
        "history": _jsonable(dict(history or {}), "history"),
        "config": _jsonable(cfg, "config"),
    }
    blob = json.dumps(manifest, sort_keys=True, allow_nan=True).encode("utf-8")
    members[MANIFEST_MEMBER] = np.frombuffer(blob, dtype=np.uint8)
    return atomic_write(path, lambda f: np.savez(f, **members))


def _backend_rng_state(backend: str) -> dict[str, Any] | None:
    from xpnet.backend import get_rng  # noqa: PLC0415 - tiny, keeps the import list short

    try:
        return get_rng(backend).get_state()
    except NotImplementedError:
        return None


# ------------------------------------------------------------------------ load
@dataclass
class Checkpoint:
    """The contents of a checkpoint file, all arrays on the host (NumPy).

    ``restore(network, optimizer, lr_schedule)`` puts them back after checking
    every key, shape, dtype and type (all mismatches reported at once).
    """

    path: Path
    version: int
    backend: str
    params: dict[str, np.ndarray]
    buffers: dict[str, np.ndarray]
    optimizer: dict[str, Any] | None
    lr_schedule: dict[str, Any] | None
    rng: dict[str, Any]
    progress: dict[str, Any]
    history: dict[str, Any]
    config: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def step(self) -> int:
        return int(self.progress.get("step", 0))

    @property
    def epoch(self) -> int:
        return int(self.progress.get("epoch", 0))

    # ---------------------------------------------------------------- checks
    def check(self, network: Any, optimizer: Any = None, lr_schedule: Any = None) -> list[str]:
        """Every way this checkpoint does not fit the targets (empty list: it fits)."""
        problems: list[str] = []
        params, buffers = _network_state(network)
        for group, have, want in (("params", self.params, params),
                                  ("buffers", self.buffers, buffers)):
            problems += _compare(group, have, want)
        if optimizer is not None:
            ostate = self.optimizer
            if ostate is None:
                problems.append("optimizer: the checkpoint holds no optimizer state")
            else:
                own = type(optimizer).__name__
                if ostate["type"] != own:
                    problems.append(f"optimizer: checkpoint has {ostate['type']}, "
                                    f"the optimizer is {own}")
                names = getattr(optimizer, "slot_names", None)
                if names is not None and set(ostate["slots"]) != set(names):
                    problems.append(f"optimizer: checkpoint slots {sorted(ostate['slots'])}, "
                                    f"{own} has {sorted(names)}")
                for slot, table in ostate["slots"].items():
                    for k, a in table.items():
                        p = params.get(k)
                        if p is None:
                            problems.append(f"optimizer[{slot!r}][{k!r}]: no such parameter "
                                            "in the network")
                        elif tuple(a.shape) != tuple(p.shape):
                            problems.append(f"optimizer[{slot!r}][{k!r}]: shape "
                                            f"{tuple(a.shape)} in the checkpoint, parameter "
                                            f"has {tuple(p.shape)}")
        if lr_schedule is not None:
            sstate = self.lr_schedule
            own = type(lr_schedule).__name__
            if sstate is None:
                problems.append(f"lr_schedule: the checkpoint holds no schedule ({own} given)")
            elif sstate.get("type") != own:
                problems.append(f"lr_schedule: checkpoint has {sstate.get('type')}, "
                                f"the schedule is {own}")
        return problems

    def restore(self, network: Any, optimizer: Any = None, lr_schedule: Any = None) -> None:
        """Load parameters, buffers, optimizer and schedule state into the targets.

        Arrays move to the network's device.  Raises :class:`CheckpointMismatchError`
        (a ValueError) listing every mismatch; nothing is changed then.  The RNG
        states and progress are left to the caller (see :class:`~xpnet.train.Trainer`).
        """
        problems = self.check(network, optimizer, lr_schedule)
        if problems:
            listing = "\n".join(f"  - {p}" for p in problems)
            raise CheckpointMismatchError(
                f"{self.path}: checkpoint does not fit ({len(problems)} problem(s)); "
                f"nothing was loaded:\n{listing}", problems)
        backend = network_backend(network)
        saved_net = _network_state(network, copy=True)
        saved_opt = optimizer.state_dict() if optimizer is not None else None
        saved_sched = lr_schedule.state_dict() if lr_schedule is not None else None
        try:
            _load_network(network, self.params, self.buffers, backend)
            if optimizer is not None:
                ostate = dict(self.optimizer or {})
                ostate.pop("slot_names", None)
                optimizer.load_state_dict(ostate, params=network.params)
            if lr_schedule is not None:
                lr_schedule.load_state_dict(self.lr_schedule)
        except BaseException:
            _load_network(network, *saved_net, backend)
            if optimizer is not None:
                optimizer.load_state_dict(saved_opt)
            if lr_schedule is not None:
                lr_schedule.load_state_dict(saved_sched)
            raise


def _compare(group: str, have: Mapping[str, np.ndarray], want: Mapping[str, Any]) -> list[str]:
    problems = []
    for k in sorted(set(want) - set(have), key=str):
        problems.append(f"{group}: {k!r} is missing from the checkpoint")
    for k in sorted(set(have) - set(want), key=str):
        problems.append(f"{group}: {k!r} is in the checkpoint but not in the network")
    for k in sorted(set(have) & set(want), key=str):
        a, b = have[k], want[k]
        if tuple(a.shape) != tuple(b.shape):
            problems.append(f"{group}: {k!r} has shape {tuple(a.shape)} in the checkpoint, "
                            f"{tuple(b.shape)} in the network")
        if np.dtype(a.dtype) != np.dtype(b.dtype):
            problems.append(f"{group}: {k!r} has dtype {np.dtype(a.dtype)} in the checkpoint, "
                            f"{np.dtype(b.dtype)} in the network")
    return problems


def _load_network(network: Any, params: Mapping[str, Any], buffers: Mapping[str, Any],
                  backend: str) -> None:
    dev_params = {k: to_backend(np.asarray(to_cpu(v)), backend) for k, v in params.items()}
    dev_buffers = {k: to_backend(np.asarray(to_cpu(v)), backend) for k, v in buffers.items()}
    if hasattr(network, "load_state_dict"):
        network.load_state_dict({"params": dev_params, "buffers": dev_buffers})
        return
    for k, v in dev_params.items():
        network.params[k][...] = v
    net_buffers = getattr(network, "buffers", None) or {}
    for k, v in dev_buffers.items():
        net_buffers[k][...] = v


def _fail(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: {what}")


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read and verify a checkpoint file; all arrays come back as host NumPy arrays.

    Raises :class:`CheckpointError` naming the path and what is wrong when the file
    is missing, truncated, not a checkpoint, of an unknown format version, holds a
    pickled (object) array, or any array differs from its recorded sha256, shape or
    dtype (all such problems are listed).  Nothing in the file is ever unpickled.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except FileNotFoundError:
        raise _fail(path, "no such checkpoint file") from None
    except OSError as exc:
        raise _fail(path, f"cannot read the checkpoint: {exc}") from None
    if head != _ZIP_MAGIC:
        what = "the file is empty" if not head else f"it starts with {head!r}"
        raise _fail(path, f"not an xpnet checkpoint (expected an .npz archive; {what}); "
                          "the file may be truncated or of another kind")
    try:
        npz = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        raise _fail(path, f"damaged or truncated checkpoint archive ({exc})") from None
    with npz:
        return _read(path, npz)


def _read(path: Path, npz: Any) -> Checkpoint:
    files = set(npz.files)
    if MANIFEST_MEMBER not in files:
        raise _fail(path, "not an xpnet checkpoint: it has no manifest "
                          f"({MANIFEST_MEMBER!r} member)")
    try:
        raw = npz[MANIFEST_MEMBER]
        if raw.dtype != np.uint8 or raw.ndim != 1:
            raise ValueError(f"manifest is {raw.dtype} {raw.shape}, expected 1-D uint8")
        manifest = json.loads(raw.tobytes().decode("utf-8"))
        if not isinstance(manifest, dict):
            raise ValueError("manifest is not a JSON object")
    except Exception as exc:  # noqa: BLE001 - any failure here means a damaged manifest
        raise _fail(path, f"damaged checkpoint manifest ({type(exc).__name__}: {exc})") from None
    if manifest.get("format") != FORMAT_NAME:
        raise _fail(path, f"not an xpnet checkpoint (format {manifest.get('format')!r})")
    version = manifest.get("version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise _fail(path, f"unsupported checkpoint format version {version!r} (this xpnet "
                          f"reads versions 1..{FORMAT_VERSION})")

    problems: list[str] = []
    entries = manifest.get("arrays")
    if not isinstance(entries, list):
        raise _fail(path, "damaged checkpoint manifest (no array list)")
    listed = {MANIFEST_MEMBER}
    loaded: list[tuple[dict[str, Any], np.ndarray]] = []
    for e in entries:
        try:
            member, shape, dtype, digest = e["member"], tuple(e["shape"]), e["dtype"], e["sha256"]
            label = f"{e['group']}" + (f"[{e['slot']!r}]" if e.get("slot") else "") \
                + f"[{e['key']!r}]"
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
            problems.append(f"{label}: array {member!r} is damaged "
                            f"({type(exc).__name__}: {exc})")
            continue
        if a.dtype.str != dtype:
            problems.append(f"{label}: dtype {a.dtype.str} in the archive, {dtype} recorded")
        if tuple(a.shape) != shape:
            problems.append(f"{label}: shape {tuple(a.shape)} in the archive, {shape} recorded")
        if _sha256(a) != digest:
            problems.append(f"{label}: sha256 checksum mismatch (the data was changed)")
        loaded.append((e, a))
    for member in sorted(files - listed):
        problems.append(f"unexpected member {member!r} not listed in the manifest "
                        "(not loaded)")
    if problems:
        listing = "\n".join(f"  - {p}" for p in problems)
        raise _fail(path, f"checkpoint failed verification ({len(problems)} problem(s)):\n"
                          f"{listing}")

    params: dict[str, np.ndarray] = {}
    buffers: dict[str, np.ndarray] = {}
    extra: dict[str, np.ndarray] = {}
    opt_meta = manifest.get("optimizer")
    optimizer = None
    if opt_meta is not None:
        optimizer = {"type": opt_meta["type"], "hyper": opt_meta["hyper"],
                     "step": opt_meta["step"],
                     "slots": {s: {} for s in opt_meta.get("slot_names", [])}}
    for e, a in loaded:
        group, key = e["group"], e["key"]
        if group == "params":
            params[key] = a
        elif group == "buffers":
            buffers[key] = a
        elif group == "optimizer" and optimizer is not None:
            optimizer["slots"].setdefault(e["slot"], {})[key] = a
        elif group == "extra":
            extra[key] = a
        else:
            raise _fail(path, f"damaged checkpoint manifest (unknown group {group!r})")
    return Checkpoint(
        path=path, version=version, backend=str(manifest.get("backend", "numpy")),
        params=params, buffers=buffers, optimizer=optimizer,
        lr_schedule=manifest.get("lr_schedule"), rng=dict(manifest.get("rng") or {}),
        progress=dict(manifest.get("progress") or {}),
        history=dict(manifest.get("history") or {}),
        config=dict(manifest.get("config") or {}), arrays=extra, manifest=manifest)


# ---------------------------------------------------------------- directories
_CKPT_RE = re.compile(r"^ckpt-(\d+)\.npz$")


class CheckpointManager:
    """A directory of checkpoints ``ckpt-<step>.npz`` with a ``latest.json`` pointer.

    ``save(step, **kwargs)`` writes ``ckpt-<step:09d>.npz`` atomically (see
    :func:`save_checkpoint`), then ``latest.json`` atomically, then deletes the
    oldest files beyond ``keep`` (never the one ``latest.json`` names).  ``latest()``
    returns the path named by ``latest.json`` or, if that is missing or stale, the
    highest-step file; temporary files are never considered.
    """

    def __init__(self, directory: str | os.PathLike, keep: int = 3) -> None:
        if int(keep) < 1:
            raise ValueError(f"keep must be >= 1, got {keep!r}")
        self.directory = Path(directory)
        self.keep = int(keep)

    @property
    def pointer(self) -> Path:
        return self.directory / "latest.json"

    def path_for(self, step: int) -> Path:
        return self.directory / f"ckpt-{int(step):09d}.npz"

    def checkpoints(self) -> list[Path]:
        """Checkpoint files in the directory, oldest (lowest step) first."""
        if not self.directory.is_dir():
            return []
        found = []
        for p in self.directory.iterdir():
            m = _CKPT_RE.match(p.name)
            if m and p.is_file():
                found.append((int(m.group(1)), p))
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        try:
            info = json.loads(self.pointer.read_text("utf-8"))
            candidate = self.directory / str(info["file"])
            if _CKPT_RE.match(candidate.name) and candidate.is_file():
                return candidate
        except (OSError, ValueError, KeyError, TypeError):
            pass
        files = self.checkpoints()
        return files[-1] if files else None

    def remove_stale_temp_files(self) -> list[Path]:
        """Delete ``.*.tmp`` leftovers of writers that were killed; returns them."""
        removed = []
        if self.directory.is_dir():
            for p in self.directory.iterdir():
                if p.name.startswith(".") and p.name.endswith(_TMP_SUFFIX) and p.is_file():
                    with contextlib.suppress(OSError):
                        p.unlink()
                        removed.append(p)
        return removed

    def save(self, step: int, network: Any, optimizer: Any = None, **kwargs: Any) -> Path:
        path = save_checkpoint(self.path_for(step), network, optimizer, **kwargs)
        info = json.dumps({"file": path.name, "step": int(step)}, sort_keys=True)
        atomic_write(self.pointer, lambda f: f.write(info.encode("utf-8")))
        for old in self.checkpoints()[:-self.keep]:
            if old != path:
                with contextlib.suppress(OSError):
                    old.unlink()
        return path
