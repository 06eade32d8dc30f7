"""Checkpoints: a network, its optimizer, schedule, RNG and progress in one state file.

The file format, its atomic writer and its verifying reader are :mod:`xpnet.state`'s
(one format for checkpoints and for ``save_params``); this module adds what a
checkpoint means for training: :func:`save_checkpoint` collects the state of a
network and optimizer, :class:`Checkpoint` checks that a file fits them and restores
it (all mismatches reported at once, nothing changed then), and
:class:`CheckpointManager` keeps a directory of them with a ``latest.json`` pointer.
A writer killed outright can leave a ``.*.tmp`` file; the next save to that path and
the manager remove such leftovers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from xpnet._atomic import TMP_SUFFIX as _TMP_SUFFIX
from xpnet._atomic import atomic_write
from xpnet.backend import get_array_module, get_rng, to_backend, to_cpu
from xpnet.state import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    State,
    StateError,
    load_state,
    save_state,
)

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

MANIFEST_MEMBER = MANIFEST

#: a checkpoint file is missing, truncated, tampered with or malformed
CheckpointError = StateError


class CheckpointMismatchError(CheckpointError):
    """A valid checkpoint does not fit the network / optimizer / schedule it is loaded into.

    ``problems`` lists every mismatch (keys, shapes, dtypes, types); nothing was changed.
    """

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = list(problems or [])


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
        json.dumps(config)
    except (TypeError, ValueError):
        config = None
    dtype = getattr(network, "dtype", None)
    return {"class": type(network).__name__, "module": type(network).__module__,
            "name": getattr(network, "model_name", None), "config": config,
            "dtype": None if dtype is None else np.dtype(dtype).str}


def save_checkpoint(path: str | os.PathLike, network: Any, optimizer: Any = None, *,
                    lr_schedule: Any = None, rng: Mapping[str, Any] | None = None,
                    progress: Mapping[str, Any] | None = None,
                    history: Mapping[str, Any] | None = None,
                    config: Mapping[str, Any] | None = None,
                    arrays: Mapping[str, Any] | None = None) -> Path:
    """Write one checkpoint of ``network`` (``params``, ``buffers``), ``optimizer``
    (its ``state_dict()``) and ``lr_schedule`` atomically; returns its path.

    ``rng``, ``progress``, ``history`` and ``config`` are JSON-able; the model's class
    and ``config`` are added under ``config['model']``, and the state of
    ``xpnet.backend.get_rng()`` under ``rng['backend']`` (None on CuPy, whose generator
    state cannot be exported) unless given.  ``arrays``: extra named arrays.
    """
    params, buffers = _network_state(network)
    backend = network_backend(network)
    rng_meta = dict(rng or {})
    if "backend" not in rng_meta:
        try:
            rng_meta["backend"] = get_rng(backend).get_state()
        except NotImplementedError:
            rng_meta["backend"] = None
    cfg = dict(config or {})
    cfg.setdefault("model", _model_info(network))
    return save_state(path, params=params, buffers=buffers,
                      optimizer=None if optimizer is None else optimizer.state_dict(),
                      lr_schedule=None if lr_schedule is None else lr_schedule.state_dict(),
                      rng=rng_meta, progress=progress, history=history, config=cfg,
                      arrays=arrays, backend=backend)


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read and verify a checkpoint file (:func:`xpnet.state.load_state`)."""
    state = load_state(path)
    return Checkpoint(**{f.name: getattr(state, f.name) for f in dataclasses.fields(State)})


class Checkpoint(State):
    """The contents of a checkpoint file, all arrays on the host (NumPy).

    ``restore(network, optimizer, lr_schedule)`` puts them back after checking
    every key, shape, dtype and type (all mismatches reported at once).
    """

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


def _write_error(path: Path, exc: OSError) -> str:
    why = "the disk is full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
    return f"cannot write checkpoint {path}: {why}"


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
        """The checkpoint ``latest.json`` names, else the highest-step file, else None.

        A ``latest.json`` that names a file outside the directory is refused
        (CheckpointError).
        """
        try:
            info = json.loads(self.pointer.read_text("utf-8"))
            name = str(info["file"])
        except (OSError, ValueError, KeyError, TypeError):
            name = None
        if name is not None:
            if Path(name).name != name or not _CKPT_RE.match(name):
                raise CheckpointError(f"{self.pointer}: names {name!r}, which is not a "
                                      "checkpoint file of this directory; refused")
            if (self.directory / name).is_file():
                return self.directory / name
        files = self.checkpoints()
        return files[-1] if files else None

    def check_writable(self) -> None:
        """Raise CheckpointError (one line naming the directory) unless files can be
        written there: creates it if needed, writes and removes a probe file."""
        probe = self.directory / f".probe{_TMP_SUFFIX}"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise CheckpointError(_write_error(self.directory, exc)) from None

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
        """Write ``ckpt-<step>.npz`` and point ``latest.json`` at it; an OSError (a full
        disk, a read-only directory) becomes one CheckpointError naming the path."""
        path = self.path_for(step)
        try:
            save_checkpoint(path, network, optimizer, **kwargs)
            info = json.dumps({"file": path.name, "step": int(step)}, sort_keys=True)
            atomic_write(self.pointer, lambda f: f.write(info.encode("utf-8")))
        except OSError as exc:
            raise CheckpointError(_write_error(path, exc)) from None
        for old in self.checkpoints()[:-self.keep]:
            if old != path:
                with contextlib.suppress(OSError):
                    old.unlink()
        return path
