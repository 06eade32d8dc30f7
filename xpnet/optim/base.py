"""The optimizer base class: per-key state, validation, step counter, checkpoints.

Subclasses declare the names of their per-parameter state arrays (``slot_names``),
their hyperparameters (``hyper_names``) and implement :meth:`Optimizer._update_one`,
the update of one parameter array in place.  On CuPy a subclass may also give one
fused kernel (``_kernel``) that does the same update in one launch, reading this
step's scalars (``_kernel_scalars``) from a small device array: a Python scalar
would be frozen into a recorded CUDA graph, a device array is rewritten before
each replay (see :mod:`xpnet.backend.graphs`).
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import ModuleType
from typing import Any, ClassVar

import numpy

from xpnet.backend import BackendMismatchError, get_array_module, to_cpu
from xpnet.backend.graphs import GraphUnsafeError, capturing
from xpnet.backend.kernels import cuda_kernels_enabled, elementwise_kernel
from xpnet.optim.clip import clip_grad_norm

Array = Any  # numpy.ndarray or cupy.ndarray

__all__ = ["Optimizer", "GradientMismatchError", "name_matches"]


def name_matches(name: str, prefixes: Sequence[str]) -> bool:
    """Whether parameter ``name`` is selected by one of ``prefixes``.

    A prefix is a full name (``'W1'`` selects W1, not W10) or a block
    (``'stage2'`` or ``'stage2.'`` selects ``stage2.W1``, ``stage2.gamma1`` ...).
    """
    return any(name == p or name.startswith(p if p.endswith(".") else p + ".")
               for p in prefixes)


class GradientMismatchError(KeyError, ValueError):
    """``grads`` does not match ``params``: a key is missing or a shape differs.

    A subclass of both KeyError and ValueError, so either ``except`` catches it.
    """

    def __str__(self) -> str:  # KeyError would show the message in quotes
        return str(self.args[0]) if self.args else ""


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _copy_to(a: Array, module: ModuleType, dtype: Any) -> Array:
    """A fresh copy of ``a`` on ``module``'s device with ``dtype``."""
    if module is numpy:
        return numpy.array(to_cpu(a), dtype=dtype, copy=True)
    return module.array(a, dtype=dtype, copy=True)


# allowed values of hyperparameters: (description, test)
_NONNEG: tuple[str, Callable[[float], bool]] = (">= 0", lambda v: v >= 0)
_POSITIVE: tuple[str, Callable[[float], bool]] = ("> 0", lambda v: v > 0)
_UNIT: tuple[str, Callable[[float], bool]] = ("in [0, 1)", lambda v: 0 <= v < 1)


# Writes a step's scalars (up to eight) into the device array the fused kernels read.
_SET_SCALARS = (
    ", ".join(f"float64 a{i}" for i in range(8)),
    "raw float64 h",
    " ".join(f"h[{i}] = a{i};" for i in range(8)),
    "xpnet_set_scalars",
)


def _shape(a: Any) -> tuple[int, ...] | None:
    shape = getattr(a, "shape", None)
    return None if shape is None else tuple(shape)


class Optimizer:
    """Base class of the optimizers: ``update(params, grads)`` changes ``params`` in place.

    ``grads`` holds a gradient for each parameter to update, under the parameter's
    key and with its shape; parameters without one (frozen) are left untouched, with
    their state.  A gradient for a key that ``params`` lacks is an error.  The arrays
    in ``params`` are updated in place and never replaced, since layers share them.

    ``groups``: parameter groups with their own hyper-parameters, e.g.
    ``[{"params": "stage1", "lr": 1e-4}, {"params": ["W7", "W8"], "weight_decay": 0}]``
    (``params``: name prefixes as :func:`name_matches` reads them; the first group
    that matches a key is its group, the optimizer's own values serve the rest).  A
    group's ``lr`` follows schedules in proportion: its effective lr is
    ``lr_group * optimizer.lr / lr_at_construction``.

    Per-key state (``slot_names``, e.g. Adam's ``m`` and ``v``) is allocated lazily
    with ``zeros_like`` on the first update of a key, on the parameter's own backend
    and with its dtype; a scratch buffer per key holds intermediate results so a
    step allocates no temporaries.

    Attributes:
        lr: the learning rate, a Python float; schedules change it between steps.
        step_count: number of completed ``update`` calls (Adam's ``iter``).
        clip_norm: if not None, ``clip_grad_norm(grads, clip_norm)`` is applied to
            the gradients of ``params`` (in place) before each update.
        last_grad_norm: the global gradient norm measured by the last clipped
            update (None when ``clip_norm`` is None).
    """

    slot_names: ClassVar[tuple[str, ...]] = ()
    hyper_names: ClassVar[tuple[str, ...]] = ("lr",)
    #: allowed range per hyperparameter; names not listed must be >= 0
    hyper_rules: ClassVar[dict[str, tuple[str, Callable[[float], bool]]]] = {
        "lr": _NONNEG, "clip_norm": _POSITIVE}

    #: the fused CuPy kernel: ``elementwise_kernel`` arguments whose parameters are
    #: "T g, raw float64 h" in and "T p" plus one "T <slot>" per slot name out
    _kernel: ClassVar[tuple | None] = None

    clip_norm: float | None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # A subclass that changes the update rule without giving its own kernel must
        # not inherit its parent's: it would silently run the parent's rule on CuPy.
        super().__init_subclass__(**kwargs)
        changes_rule = any(name in cls.__dict__ for name in
                           ("_update_one", "_begin_step", "_kernel_scalars", "_fused_one"))
        if changes_rule and "_kernel" not in cls.__dict__:
            cls._kernel = None

    def __init__(self, *, clip_norm: float | None = None,
                 groups: Sequence[Mapping[str, Any]] | None = None, **hyper: float) -> None:
        """``hyper`` holds a value for each of ``hyper_names`` (at least ``lr``)."""
        hyper = {**hyper, "clip_norm": clip_norm}
        expected = {*self.hyper_names, "clip_norm"}
        if set(hyper) != expected:
            raise TypeError(f"{type(self).__name__}: expected hyperparameters "
                            f"{sorted(expected)}, got {sorted(hyper)}")
        problems = self._check_hyper(hyper)
        if problems:
            raise ValueError(f"{type(self).__name__}: " + "; ".join(problems))
        self._apply_hyper(hyper)
        self.groups = self._check_groups(groups or [], hyper)
        self._group_of: dict[str, int] = {}
        self.step_count = 0
        self.last_grad_norm: float | None = None
        self._slots: dict[str, dict[str, Array]] = {name: {} for name in self.slot_names}
        self._scratch: dict[str, Array] = {}
        self._scalars_version = 0  # advanced with every step
        # (device, group) -> (device array of the kernel scalars, version written)
        self._device_scalars_at: dict[tuple[int, int], tuple[Array, int]] = {}

    # ------------------------------------------------------------ hyperparameters
    @property
    def lr(self) -> float:
        """The learning rate (a Python float, so float32 updates stay float32)."""
        return self._lr

    @lr.setter
    def lr(self, value: float) -> None:
        if not _is_number(value) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{type(self).__name__}.lr must be a finite number >= 0, "
                             f"got {value!r}")
        self._lr = float(value)

    def _check_hyper(self, hyper: Mapping[str, Any]) -> list[str]:
        """Problems with a full set of hyperparameter values (empty list: all good)."""
        problems = []
        for name in (*self.hyper_names, "clip_norm"):
            value = hyper[name]
            if name == "clip_norm" and value is None:
                continue
            if not _is_number(value) or not math.isfinite(value):
                problems.append(f"{name} must be a finite number, got {value!r}")
                continue
            text, ok = self.hyper_rules.get(name, _NONNEG)
            if not ok(value):
                problems.append(f"{name} must be {text}, got {value!r}")
        return problems

    def _check_groups(self, groups: Sequence[Mapping[str, Any]],
                      hyper: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The groups as ``{'params': (prefixes,), <hyper>: value}``, each value checked."""
        name, out = type(self).__name__, []
        for i, group in enumerate(groups):
            if not isinstance(group, Mapping) or "params" not in group:
                raise TypeError(f"{name}: group {i} must be a dict with 'params' (name "
                                f"prefixes) and hyper-parameters, got {group!r}")
            prefixes = group["params"]
            prefixes = (prefixes,) if isinstance(prefixes, str) else tuple(prefixes)
            if not prefixes or not all(isinstance(p, str) and p for p in prefixes):
                raise ValueError(f"{name}: group {i}: 'params' must be name prefixes, "
                                 f"got {group['params']!r}")
            values = {k: v for k, v in group.items() if k != "params"}
            unknown = sorted(set(values) - set(self.hyper_names))
            if unknown:
                raise ValueError(f"{name}: group {i}: {unknown} are not hyper-parameters of "
                                 f"{name} ({', '.join(self.hyper_names)})")
            problems = self._check_hyper({**hyper, **values})
            if problems:
                raise ValueError(f"{name}: group {i}: " + "; ".join(problems))
            if "lr" in values and values["lr"] != hyper["lr"] and not hyper["lr"]:
                raise ValueError(f"{name}: group {i}: a group lr needs a non-zero base lr")
            out.append({"params": prefixes, **{k: float(v) for k, v in values.items()}})
        self._lr0 = float(hyper["lr"])
        return out

    def group_index(self, key: str) -> int:
        """0 for a key under the optimizer's own hyper-parameters, i + 1 for ``groups[i]``."""
        gi = self._group_of.get(key)
        if gi is None:
            gi = self._group_of[key] = next(
                (i + 1 for i, g in enumerate(self.groups) if name_matches(key, g["params"])), 0)
        return gi

    def group_hyper(self, gi: int) -> dict[str, float]:
        """The hyper-parameters in effect for group ``gi`` (see :meth:`group_index`)."""
        values = {n: float(getattr(self, n)) for n in self.hyper_names}
        if gi:
            group = self.groups[gi - 1]
            values.update({k: v for k, v in group.items() if k != "params"})
            if "lr" in group:
                values["lr"] = group["lr"] * (self.lr / self._lr0)
        return values

    @contextlib.contextmanager
    def _hyper_of(self, gi: int) -> Iterator[None]:
        """The optimizer's hyper-parameters set to group ``gi``'s for the block."""
        if not gi:
            yield
            return
        saved = {n: getattr(self, n) for n in self.hyper_names}
        try:
            for n, v in self.group_hyper(gi).items():
                setattr(self, n, v)
            self._begin_step()
            yield
        finally:
            for n, v in saved.items():
                setattr(self, n, v)
            self._begin_step()

    def _apply_hyper(self, hyper: Mapping[str, Any]) -> None:
        for name in self.hyper_names:
            setattr(self, name, float(hyper[name]))
        clip = hyper["clip_norm"]
        self.clip_norm = None if clip is None else float(clip)

    def hyper(self) -> dict[str, float | None]:
        """The hyperparameters as JSON-able Python scalars."""
        out: dict[str, float | None] = {name: float(getattr(self, name))
                                        for name in self.hyper_names}
        out["clip_norm"] = self.clip_norm
        return out

    # ----------------------------------------------------------------- update
    def update(self, params: Mapping[str, Array], grads: Mapping[str, Array]) -> None:
        """Apply one optimization step to every array of ``params`` that ``grads`` has
        a gradient for, in place; the others (frozen) are left untouched.

        Raises GradientMismatchError (a KeyError and ValueError) naming every
        gradient whose key is not in ``params`` or whose shape differs from its
        parameter's, and BackendMismatchError when a parameter and its gradient live
        on different devices. Nothing is changed when it raises.
        """
        self._check_grads(params, grads)
        if self.clip_norm is not None:
            if capturing():
                raise GraphUnsafeError(f"{type(self).__name__}: clip_norm reads the gradient "
                                       "norm back from the GPU, which a CUDA graph cannot do")
            self.last_grad_norm = clip_grad_norm(list(grads.values()), self.clip_norm)
        if not capturing():  # a recorded step is advanced by its replayer (advance_step)
            self.advance_step()
        by_group: dict[int, list[str]] = {}
        for key in grads:
            by_group.setdefault(self.group_index(key), []).append(key)
        for gi, keys in sorted(by_group.items()):
            with self._hyper_of(gi):
                for key in keys:
                    self._update_key(key, params[key], grads[key], gi)

    def _update_key(self, key: str, p: Array, g: Array, gi: int) -> None:
        module = get_array_module(p)
        slots = {name: self._slot(name, key, p, module) for name in self.slot_names}
        if self._kernel is not None and cuda_kernels_enabled(module) and g.dtype == p.dtype:
            self._fused_one(key, p, g, slots, self._device_scalars(p, gi))
        elif capturing():
            raise GraphUnsafeError(
                f"{type(self).__name__}: without its CuPy kernel (XPNET_CUDA_KERNELS=0, or "
                "a gradient whose dtype differs from its parameter's) the update would "
                "freeze this step's scalars into the CUDA graph")
        else:
            self._update_one(module, key, p, g, slots, self._scratch_for(key, p, module))

    def advance_step(self, params: Mapping[str, Array] | None = None) -> None:
        """Count a new step and compute its scalars; ``update`` calls it.

        A replayer of a recorded step (:class:`xpnet.train.TrainStep`) calls it
        before each replay with the ``params``, which also writes this step's
        scalars into the device array that the recorded kernels read.
        """
        self.step_count += 1
        self._begin_step()
        self._scalars_version += 1
        if params is not None and self._device_scalars_at:
            # whenever the device array exists: a recording reads it, even if the
            # kernels have been turned off since it was made
            p = next(iter(params.values()), None)
            if p is not None and get_array_module(p).__name__ == "cupy":
                for device, gi in list(self._device_scalars_at):
                    if device == p.device.id:
                        with self._hyper_of(gi):
                            self._device_scalars(p, gi)

    def state_arrays(self) -> tuple[Array, ...]:
        """Every array this optimizer holds across steps (state and kernel scalars).

        A recorder of the step (:class:`xpnet.train.TrainStep`) records again when
        one of them is replaced.
        """
        arrays = [a for table in self._slots.values() for a in table.values()]
        return (*arrays, *(h for h, _ in self._device_scalars_at.values()))

    def recording_key(self) -> tuple:
        """What a recorded step's kernels depend on beyond the arrays and the scalars.

        A recorder (:class:`xpnet.train.TrainStep`) records again when this changes.
        """
        return (type(self), self.clip_norm is not None, self._kernel is not None,
                tuple(tuple(sorted(g)) for g in self.groups))

    def _kernel_scalars(self) -> tuple[float, ...]:
        """This step's scalars for ``_kernel`` (``h[0]``, ``h[1]``, ...), at most 8."""
        return (self.lr,)

    def prepare(self, params: Mapping[str, Array]) -> None:
        """Allocate the state of every key of ``params`` now, without taking a step.

        (A CUDA-graph recorder calls it so that this long-lived state does not come
        from the recording's private memory.)
        """
        for key, p in params.items():
            module = get_array_module(p)
            for name in self.slot_names:
                self._slot(name, key, p, module)
            if self._kernel is not None and cuda_kernels_enabled(module):
                self._scalars_array(p, self.group_index(key))

    def _scalars_array(self, p: Array, gi: int) -> Array:
        """The float64 device array of group ``gi``'s kernel scalars on ``p``'s GPU."""
        device = (p.device.id, gi)
        entry = self._device_scalars_at.get(device)
        if entry is None:
            if capturing():
                raise GraphUnsafeError(f"{type(self).__name__}: run one step before "
                                       "capturing it, so the scalars have a device array")
            import cupy  # noqa: PLC0415 - only reached with CuPy arrays

            with cupy.cuda.Device(device[0]):
                entry = self._device_scalars_at[device] = (
                    cupy.zeros(8, dtype=numpy.float64), -1)
        return entry[0]

    def _device_scalars(self, p: Array, gi: int) -> Array:
        """The float64 device array of this step's kernel scalars (group ``gi``'s, whose
        hyper-parameters are in effect), on ``p``'s GPU.

        Written by one tiny kernel once per step; while a graph is captured it is
        only read (the replayer writes it before each replay).
        """
        h = self._scalars_array(p, gi)
        if capturing():
            return h
        device = (p.device.id, gi)
        version = self._device_scalars_at[device][1]
        if version != self._scalars_version:
            values = [float(v) for v in self._kernel_scalars()]
            values += [0.0] * (8 - len(values))
            elementwise_kernel(*_SET_SCALARS)(*values, h, size=1)
            self._device_scalars_at[device] = (h, self._scalars_version)
        return h

    def _fused_one(self, key: str, p: Array, g: Array, slots: dict[str, Array],
                   h: Array) -> None:
        """The update of one parameter by ``_kernel`` (CuPy)."""
        elementwise_kernel(*self._kernel)(g, h, p, *(slots[n] for n in self.slot_names))

    def _check_grads(self, params: Mapping[str, Array], grads: Mapping[str, Array]) -> None:
        problems = []
        name = type(self).__name__
        for key in grads:
            if key not in params:
                problems.append(f"gradient for {key!r}, which is not a parameter (parameters: "
                                f"{', '.join(map(str, params))})")
                continue
            p = params[key]
            pshape = _shape(p)
            if pshape is None or getattr(p, "dtype", None) is None:
                problems.append(f"param {key!r} is not an array ({type(p).__name__})")
                continue
            if p.dtype.kind != "f":
                problems.append(f"param {key!r} has dtype {p.dtype}; only floating-point "
                                "arrays can be optimized")
            g = grads[key]
            gshape = _shape(g)
            if gshape is None:
                problems.append(f"gradient of {key!r} is {type(g).__name__}, not an array")
            elif gshape != pshape:
                problems.append(f"gradient of {key!r} has shape {gshape}, "
                                f"param has shape {pshape}")
            else:
                try:
                    get_array_module(p, g)
                except BackendMismatchError:
                    raise BackendMismatchError(
                        f"{name}.update: param {key!r} and its gradient are on different "
                        "devices (NumPy and CuPy); move them to one device first") from None
            for slot, table in self._slots.items():
                a = table.get(key)
                if a is not None and tuple(a.shape) != pshape:
                    problems.append(f"state {slot!r} of param {key!r} has shape "
                                    f"{tuple(a.shape)}, param has shape {pshape} (call "
                                    "reset() after changing the model)")
        if problems:
            raise GradientMismatchError(f"{name}.update: " + "; ".join(problems))

    def _slot(self, name: str, key: str, p: Array, module: ModuleType) -> Array:
        """State array ``name`` of ``key``, allocated (zeros) or moved to ``p``'s device."""
        table = self._slots[name]
        a = table.get(key)
        if a is None:
            a = table[key] = module.zeros_like(p)
        elif a.dtype != p.dtype or get_array_module(a) is not module:
            # loaded from a checkpoint made on another device or with another dtype
            a = table[key] = _copy_to(a, module, p.dtype)
        return a

    def _scratch_for(self, key: str, p: Array, module: ModuleType) -> Array:
        """The reusable scratch buffer of ``key`` (same shape, dtype, device as ``p``)."""
        s = self._scratch.get(key)
        if (s is None or s.shape != p.shape or s.dtype != p.dtype
                or get_array_module(s) is not module):
            s = self._scratch[key] = module.empty_like(p)
        return s

    def _begin_step(self) -> None:
        """Hook run once per update after ``step_count`` is advanced (e.g. Adam's lr_t)."""

    def _update_one(self, xp: ModuleType, key: str, p: Array, g: Array,
                    slots: dict[str, Array], s: Array) -> None:
        """Update ``p`` in place from gradient ``g``.

        ``xp`` is ``p``'s array module, ``slots`` its state arrays by slot name and
        ``s`` a scratch buffer like ``p`` whose contents may be overwritten.
        """
        raise NotImplementedError

    def reset(self) -> None:
        """Forget all per-key state and the step counter (hyperparameters stay)."""
        self.step_count = 0
        self.last_grad_norm = None
        self._slots = {name: {} for name in self.slot_names}
        self._scratch = {}

    # ------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """A snapshot for checkpoints.

        ``{'type': 'Adam', 'hyper': {...}, 'step': int, 'slots': {'m': {key: array},
        ...}}``; ``hyper`` holds JSON-able Python scalars, the arrays are copies that
        stay on the device they live on.
        """
        return {
            "type": type(self).__name__,
            "hyper": self.hyper(),
            "step": int(self.step_count),
            "slots": {name: {key: a.copy() for key, a in table.items()}
                      for name, table in self._slots.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any],
                        params: Mapping[str, Array] | None = None) -> None:
        """Restore a :meth:`state_dict` snapshot (hyperparameters, step and state).

        Checks the type, the top-level keys, the hyperparameters, the step, the slot
        names and, per key, that all slots agree in shape. If ``params`` is given, the
        slot keys must be exactly its keys with the same shapes, and the arrays are
        copied to the params' device and dtype; otherwise, if this optimizer already
        holds state, the keys and shapes must match that state (arrays are then moved
        to the params' device on the next update if needed).

        Raises ValueError listing every problem found; nothing is changed then.
        """
        name = type(self).__name__
        problems: list[str] = []
        if not isinstance(state, Mapping):
            raise ValueError(f"{name}.load_state_dict: expected a dict from state_dict(), "
                             f"got {type(state).__name__}")
        expected_top = {"type", "hyper", "step", "slots"}
        for k in sorted(expected_top - set(state)):
            problems.append(f"missing entry {k!r}")
        for k in sorted(set(state) - expected_top, key=str):
            problems.append(f"unexpected entry {k!r}")
        if "type" in state and state["type"] != name:
            problems.append(f"type is {state['type']!r}, this optimizer is {name!r}")

        hyper = state.get("hyper")
        if "hyper" in state:
            if not isinstance(hyper, Mapping):
                problems.append(f"hyper must be a dict, got {type(hyper).__name__}")
                hyper = None
            else:
                expected = {*self.hyper_names, "clip_norm"}
                missing = expected - set(hyper)
                extra = set(hyper) - expected
                problems += [f"hyper: missing {k!r}" for k in sorted(missing)]
                problems += [f"hyper: unexpected {k!r}" for k in sorted(extra, key=str)]
                if not missing:
                    problems += [f"hyper: {p}" for p in self._check_hyper(hyper)]

        step = state.get("step")
        if "step" in state and (not isinstance(step, numbers.Integral)
                                or isinstance(step, bool) or step < 0):
            problems.append(f"step must be a non-negative int, got {step!r}")

        slots = state.get("slots")
        shapes: dict[str, tuple[int, ...]] = {}
        if "slots" in state:
            if not isinstance(slots, Mapping):
                problems.append(f"slots must be a dict, got {type(slots).__name__}")
                slots = None
            else:
                problems += self._check_slots(slots, shapes)

        if params is not None:
            reference = {k: _shape(p) for k, p in params.items()}
            where = "params"
        elif any(self._slots.values()):
            reference = {}
            for table in self._slots.values():
                reference.update({k: tuple(a.shape) for k, a in table.items()})
            where = "the state this optimizer already holds"
        else:
            reference, where = None, ""
        if reference is not None and slots is not None and self.slot_names:
            for k in sorted(set(reference) - set(shapes), key=str):
                problems.append(f"slots: no state for key {k!r} of {where}")
            for k in sorted(set(shapes) - set(reference), key=str):
                problems.append(f"slots: key {k!r} is not in {where}")
            for k in sorted(set(shapes) & set(reference), key=str):
                if shapes[k] != reference[k]:
                    problems.append(f"slots: key {k!r} has shape {shapes[k]}, "
                                    f"{where} has shape {reference[k]}")

        if problems:
            listing = "\n".join(f"  - {p}" for p in problems)
            raise ValueError(f"{name}.load_state_dict: {len(problems)} problem(s); "
                             f"nothing was loaded:\n{listing}")

        # build everything first, then assign
        new_slots: dict[str, dict[str, Array]] = {}
        for slot in self.slot_names:
            table = {}
            for key, a in slots[slot].items():
                if params is not None:
                    p = params[key]
                    table[key] = _copy_to(a, get_array_module(p), p.dtype)
                else:
                    table[key] = a.copy()
            new_slots[slot] = table
        self._apply_hyper(hyper)
        self.step_count = int(step)
        self._slots = new_slots
        self._scratch = {}
        self.last_grad_norm = None

    def _check_slots(self, slots: Mapping[str, Any],
                     shapes: dict[str, tuple[int, ...]]) -> list[str]:
        """Problems in the ``slots`` entry; fills ``shapes`` with each key's shape."""
        problems = []
        expected = set(self.slot_names)
        problems += [f"slots: missing {s!r}" for s in sorted(expected - set(slots))]
        problems += [f"slots: unexpected {s!r}"
                     for s in sorted(set(slots) - expected, key=str)]
        tables = {}
        for slot in self.slot_names:
            table = slots.get(slot)
            if table is None:
                continue
            if not isinstance(table, Mapping):
                problems.append(f"slots[{slot!r}] must be a dict, got {type(table).__name__}")
                continue
            tables[slot] = table
        all_keys: set[Any] = set()
        for table in tables.values():
            all_keys |= set(table)
        for key in sorted(all_keys, key=str):
            for slot, table in tables.items():
                if key not in table:
                    problems.append(f"slots[{slot!r}]: no state for key {key!r}")
                    continue
                a = table[key]
                shape = _shape(a)
                if shape is None or getattr(a, "dtype", None) is None:
                    problems.append(f"slots[{slot!r}][{key!r}] is "
                                    f"{type(a).__name__}, not an array")
                    continue
                if a.dtype.kind != "f":
                    problems.append(f"slots[{slot!r}][{key!r}] has dtype {a.dtype}, "
                                    "expected floating point")
                if key not in shapes:
                    shapes[key] = shape
                elif shapes[key] != shape:
                    problems.append(f"slots[{slot!r}][{key!r}] has shape {shape}, other "
                                    f"slots have {shapes[key]}")
        return problems

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hyper().items()
                         if not (k == "clip_norm" and v is None))
        if self.groups:
            args += ", groups=" + repr([{**g, "params": list(g["params"])} for g in self.groups])
        return f"{type(self).__name__}({args})"

