"""Network: one Chain of layers, a loss layer and the book's network API.

Every network in xpnet is a :class:`Network` (``Sequential`` is the same class under
the name the chapter 6-7 code used).  It does the bookkeeping the book repeats in
each network class:

* names: the parameters and buffers of every layer under the chain, found by one
  walk (:func:`xpnet.layers.compose.named_slots`): ``W1, b1, W2, ...`` for Affine and
  Convolution layers, ``gamma1, beta1`` and ``running_mean1, running_var1`` for batch
  normalisation (the book's keys), ``stage2.W1`` inside a named container;
* ``params`` / ``buffers``: *live* mappings over the layers' own arrays, so an
  optimizer that updates ``net.params[k]`` in place changes the layer;
* the book's ``predict``, ``loss``, ``accuracy``, ``gradient`` and
  ``numerical_gradient``, with weight decay (0.5 * lambda * sum W^2 over every ``W``);
* freezing: ``freeze(*prefixes)`` leaves those parameters out of ``gradient``'s
  result, so an optimizer leaves them untouched;
* state: ``state_dict`` / ``load_state_dict(strict=...)`` and ``save_params`` /
  ``load_params`` in xpnet's one state format (:mod:`xpnet.state`);
* devices: ``to_gpu`` / ``to_cpu`` move every layer found by the walk.
"""

from __future__ import annotations

import copy
import json
import math
import numbers
import os
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from typing import Any, NamedTuple

import numpy

from xpnet.backend import (
    BackendMismatchError,
    check_same_backend,
    get_array_module,
    get_default_dtype,
    to_cpu,
    to_gpu,
)
from xpnet.gradcheck import numerical_gradient as _numerical_gradient
from xpnet.layers import Layer, SoftmaxWithLoss
from xpnet.layers.compose import Chain, backward, named_slots, walk
from xpnet.layers.loss import class_indices
from xpnet.models.summary import summary as _summary
from xpnet.state import load_state, save_state

Array = Any  # numpy.ndarray or cupy.ndarray

__all__ = ["Network", "Sequential", "ParamMap", "LoadReport"]

_SECTIONS = ("params", "buffers")


def _device(a: Array) -> str:
    return get_array_module(a).__name__


def _describe_mismatch(current: Array, value: Any) -> str | None:
    """Why ``value`` cannot replace ``current`` (shape or dtype), or None."""
    if not (hasattr(value, "shape") and hasattr(value, "dtype")):
        return f"expected an array, got {type(value).__name__}"
    problems = []
    if tuple(value.shape) != tuple(current.shape):
        problems.append(f"shape {tuple(value.shape)} != expected {tuple(current.shape)}")
    if value.dtype != current.dtype:
        problems.append(f"dtype {value.dtype} != expected {current.dtype}")
    return "; ".join(problems) or None


class ParamMap(MutableMapping):
    """A live ``name -> array`` view over the ``params`` (or ``buffers``) of layers.

    Reading ``m[name]`` returns the layer's own array (not a copy); assigning
    ``m[name] = a`` stores ``a`` in the layer, after checking that it has the
    same shape, dtype and device as the array it replaces.  The set of names is
    fixed by the layers: adding or deleting entries is an error.
    """

    def __init__(self, slots: dict[str, tuple[Layer, str]], section: str) -> None:
        self._where = slots
        self._section = section

    def __getitem__(self, name: str) -> Array:
        layer, key = self._where[name]
        return getattr(layer, self._section)[key]

    def __setitem__(self, name: str, value: Array) -> None:
        slot = self._where.get(name)
        if slot is None:
            raise KeyError(
                f"{self._section}: no entry {name!r} (a network's {self._section} are "
                f"fixed by its layers; valid names: {', '.join(self._where) or 'none'})"
            )
        layer, key = slot
        current = getattr(layer, self._section)[key]
        problem = _describe_mismatch(current, value)
        if problem is not None:
            raise ValueError(f"{self._section}[{name!r}] = ...: {problem}")
        if _device(value) != _device(current):
            raise BackendMismatchError(
                f"{self._section}[{name!r}] = ...: the array is on {_device(value)} but the "
                f"network is on {_device(current)}; move one of them first (to_gpu / to_cpu)"
            )
        getattr(layer, self._section)[key] = value

    def __delitem__(self, name: str) -> None:
        raise TypeError(f"cannot delete {self._section}[{name!r}]: the names are fixed "
                        "by the layers")

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def slot(self, name: str) -> tuple[Layer, str]:
        """The (layer, key) pair behind ``name``."""
        return self._where[name]

    def __repr__(self) -> str:
        items = ", ".join(f"{k}: {tuple(v.shape)} {v.dtype}" for k, v in self.items())
        return f"ParamMap({self._section}; {items})"


class LoadReport(NamedTuple):
    """What a non-strict load left out: network entries not in the file, and the reverse."""

    missing: list[str]
    unexpected: list[str]


def check_lambda(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) \
            or not math.isfinite(value) or value < 0:
        raise ValueError(f"weight_decay_lambda: expected a finite number >= 0, got {value!r}")
    return float(value)


def _prefix_matches(name: str, prefixes: Sequence[str]) -> bool:
    # "W1" selects W1 (not W10); "stage2." or "stage2" selects the whole block
    return any(name == p or name.startswith(p if p.endswith(".") else p + ".")
               for p in prefixes)


class Network:
    """A chain of layers followed by a loss layer (SoftmaxWithLoss by default).

    Args:
        layers: a sequence of layers, or one layer (e.g. a :class:`Chain`), each
            following :mod:`xpnet.layers.base`'s protocol.
        loss_layer: a layer with ``forward(y, t)`` -> 0-d loss and ``backward(dout=1)``.
        weight_decay_lambda: L2 weight decay; adds 0.5*lambda*sum(W**2) over every
            parameter whose key is ``W`` to the loss.
        config: the constructor arguments (JSON-able), kept so a checkpoint can
            rebuild the network: ``build_model(net.model_name, **net.config)``.
        input_shape: the shape of one sample, e.g. (784,) or (1, 28, 28).  When it
            has 3 axes, flat input (N, C*H*W) is reshaped to (N, C, H, W).
    """

    #: the name under which :func:`xpnet.models.build_model` builds this class
    model_name: str | None = None

    def __init__(self, layers: Sequence[Layer] | Layer, loss_layer: Layer | None = None,
                 weight_decay_lambda: float = 0.0, config: dict | None = None,
                 input_shape: Sequence[int] | None = None) -> None:
        chain = layers if isinstance(layers, Chain) else Chain(
            *(layers if isinstance(layers, (list, tuple)) else [layers]))
        if not chain.layers:
            raise ValueError(f"{type(self).__name__}: expected at least one layer")
        self.chain = chain
        self.loss_layer = SoftmaxWithLoss() if loss_layer is None else loss_layer
        self.weight_decay_lambda = check_lambda(weight_decay_lambda)
        self.input_shape = None if input_shape is None else tuple(int(d) for d in input_shape)
        config = {} if config is None else dict(config)
        try:
            json.dumps(config)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{type(self).__name__}: config must be JSON-serialisable: "
                            f"{exc}") from None
        self._config = config
        param_slots, buffer_slots = named_slots(chain)
        self._params = ParamMap(param_slots, "params")
        self._buffers = ParamMap(buffer_slots, "buffers")
        self._decay_names = [name for name, (_, key) in param_slots.items() if key == "W"]
        self._frozen: set[str] = set()
        # the parameter names under each top-level layer, to skip a frozen trunk's backward
        owners: dict[int, set[str]] = {}
        for name, (layer, _) in param_slots.items():
            owners.setdefault(id(layer), set()).add(name)
        self._names_under = [set().union(*(owners.get(id(node), ()) for node in walk(layer)))
                             for layer in chain.layers]
        self.last_loss: Array | None = None
        arrays = {**self._params, **self._buffers}
        dtypes = {str(a.dtype) for a in arrays.values()}
        if len(dtypes) > 1:
            raise ValueError(f"{type(self).__name__}: parameters of mixed dtypes "
                             f"{sorted(dtypes)}")
        check_same_backend(type(self).__name__, **arrays)

    # ------------------------------------------------------------- properties
    @property
    def layers(self) -> list[Layer]:
        """The top-level layers of the chain (containers hold more)."""
        return self.chain.layers

    @property
    def params(self) -> ParamMap:
        """The trainable arrays by name (W1, b1, ..., gamma1, beta1, ...), live."""
        return self._params

    @property
    def buffers(self) -> ParamMap:
        """Non-trainable state by name (running_mean1, running_var1, ...), live."""
        return self._buffers

    @property
    def config(self) -> dict:
        """A copy of the constructor arguments (JSON-serialisable)."""
        return copy.deepcopy(self._config)

    @property
    def last_layer(self) -> Layer:
        """The loss layer (the book's name)."""
        return self.loss_layer

    @property
    def dtype(self) -> numpy.dtype:
        """The dtype of the parameters (the default dtype for a network without any)."""
        for a in (*self._params.values(), *self._buffers.values()):
            return numpy.dtype(a.dtype)
        return get_default_dtype()

    @property
    def backend_name(self) -> str:
        """'numpy' or 'cupy': where the parameters live."""
        for a in (*self._params.values(), *self._buffers.values()):
            return _device(a)
        return "numpy"

    @property
    def num_params(self) -> int:
        """The number of trainable scalars."""
        return sum(int(a.size) for a in self._params.values())

    def __repr__(self) -> str:
        inner = "".join(f"\n  {line}" for layer in self.layers for line in repr(layer).split("\n"))
        return (f"{type(self).__name__}({inner},\n  loss={self.loss_layer!r}\n)"
                f"  # {self.num_params} params, {self.dtype}, {self.backend_name}")

    def summary(self, input_shape: Sequence[int] | None = None) -> str:
        """The layer tree with output shapes, parameter counts and multiply-adds
        (:func:`xpnet.models.summary.summary`)."""
        return _summary(self, input_shape)

    # ------------------------------------------------------------- freezing
    def _select(self, prefixes: Sequence[str], what: str) -> list[str]:
        if not prefixes:
            return list(self._params)
        chosen = [n for n in self._params if _prefix_matches(n, prefixes)]
        unmatched = [p for p in prefixes if not any(_prefix_matches(n, [p]) for n in chosen)]
        if unmatched:
            raise KeyError(f"{what}: no parameter matches {unmatched}; names are "
                           f"{', '.join(self._params)}")
        return chosen

    def freeze(self, *prefixes: str) -> list[str]:
        """Leave the parameters named by ``prefixes`` out of training; returns them.

        A prefix is a full name (``'W1'``) or a block (``'stage1'``, ``'stage1.'``);
        none freezes everything.  Frozen parameters get no entry in :meth:`gradient`'s
        result, so an optimizer leaves them (and their state) untouched.
        """
        names = self._select(prefixes, "freeze")
        self._frozen.update(names)
        return names

    def unfreeze(self, *prefixes: str) -> list[str]:
        """Train the parameters named by ``prefixes`` again (all if none); returns them."""
        names = self._select(prefixes, "unfreeze")
        self._frozen.difference_update(names)
        return names

    @property
    def frozen(self) -> list[str]:
        """The names of the frozen parameters, in network order."""
        return [n for n in self._params if n in self._frozen]

    # ------------------------------------------------------------- forward
    def _prepare(self, x: Array) -> Array:
        """Check the input once; cast float input to the model's dtype; reshape flat input."""
        if not (hasattr(x, "dtype") and hasattr(x, "shape")) or not hasattr(x.dtype, "kind"):
            raise TypeError(f"{type(self).__name__}: input must be a NumPy or CuPy array, "
                            f"got {type(x).__module__}.{type(x).__name__}")
        dtype = self.dtype
        if x.dtype.kind == "f" and x.dtype != dtype:
            x = x.astype(dtype, copy=False)
        shape = self.input_shape
        if shape is not None and len(shape) == 3 and x.ndim == 2:
            if x.shape[1] != math.prod(shape):
                raise ValueError(
                    f"{type(self).__name__}: flat input has {x.shape[1]} features per "
                    f"sample; expected {math.prod(shape)} = prod{shape}"
                )
            x = x.reshape((x.shape[0], *shape))
        return x

    def predict(self, x: Array, train_flg: bool = False) -> Array:
        """The network's output (scores) for ``x``; inference mode unless train_flg."""
        return self.chain.forward(self._prepare(x), train_flg)

    def _loss(self, x: Array, t: Array, train_flg: bool) -> Array:
        loss = self.loss_layer.forward(self.chain.forward(x, train_flg), t)
        if self.weight_decay_lambda:
            params = self._params
            total = sum((params[k] * params[k]).sum() for k in self._decay_names)
            loss = loss + (0.5 * self.weight_decay_lambda) * total
        return get_array_module(loss).asarray(loss)

    def loss(self, x: Array, t: Array, train_flg: bool = True) -> Array:
        """The loss (a 0-d array on the network's device) of ``x`` against labels ``t``.

        ``t`` holds class indices or one-hot rows (see :class:`SoftmaxWithLoss`).
        Includes the weight decay term 0.5 * lambda * sum(W**2).
        """
        return self._loss(self._prepare(x), t, train_flg)

    def accuracy(self, x: Array, t: Array, batch_size: int = 100) -> float:
        """The fraction of samples (or of labelled positions, for per-pixel scores)
        classified correctly, over *every* sample.

        Labels are checked as the loss checks them.  Runs in inference mode in batches
        of ``batch_size``; the counts are summed on the device and read back once.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) \
                or batch_size < 1:
            raise ValueError(f"accuracy: batch_size must be an integer >= 1, got {batch_size!r}")
        check_same_backend("accuracy", x=x, t=t)
        n = int(x.shape[0])
        if n == 0:
            raise ValueError("accuracy: no samples")
        ignore = getattr(self.loss_layer, "ignore_label", None)
        correct = counted = None
        for start in range(0, n, int(batch_size)):
            y = self.predict(x[start:start + batch_size], train_flg=False)
            labels = class_indices("accuracy", y, t[start:start + batch_size],
                                   ignore_label=ignore)
            hits = y.argmax(axis=1) == labels
            if ignore is not None:
                keep = labels != ignore
                hits &= keep
                kept = keep.sum()
                counted = kept if counted is None else counted + kept
            correct = hits.sum() if correct is None else correct + hits.sum()
        total = n * math.prod(labels.shape[1:]) if counted is None else int(counted)
        return int(correct) / total if total else float("nan")

    # ------------------------------------------------------------- gradients
    def gradient(self, x: Array, t: Array) -> dict[str, Array]:
        """Gradients of :meth:`loss` (training mode) by backpropagation.

        Returns a dict with the keys of ``params`` less the frozen ones; weight decay
        adds lambda * W to each W's gradient.  The loss computed on the way is kept,
        unsynced, as ``self.last_loss``.
        """
        loss = self.loss(x, t, train_flg=True)
        # Layers before the first one with a trained parameter need no backward at all
        # (a frozen trunk costs its forward only).
        layers = self.chain.layers
        first = next((i for i, names in enumerate(self._names_under)
                      if names - self._frozen), len(layers))
        dout = self.loss_layer.backward(1)
        for i in range(len(layers) - 1, first - 1, -1):
            dout = backward(layers[i], dout, need_input_grad=i > first)
        lam = self.weight_decay_lambda
        grads: dict[str, Array] = {}
        for name in self._params:
            if name in self._frozen:
                continue
            layer, key = self._params.slot(name)
            g = layer.grads[key]
            if lam and key == "W":
                g = g + lam * layer.params[key]
            grads[name] = g
        self.last_loss = loss
        return grads

    def numerical_gradient(self, x: Array, t: Array, h: float = 1e-4) -> dict[str, Array]:
        """Gradients of :meth:`loss` (training mode) by central differences (slow).

        For checking :meth:`gradient`; use a float64 network.  Dropout draws a new
        mask per forward pass, so reseed (or disable it) to check such networks.
        """
        x = self._prepare(x)

        def f() -> Array:
            return self._loss(x, t, train_flg=True)

        return {name: _numerical_gradient(f, p, h) for name, p in self._params.items()
                if name not in self._frozen}

    # ------------------------------------------------------------- state
    def state_dict(self, copy: bool = True) -> dict[str, dict[str, Array]]:
        """{'params': {name: array}, 'buffers': {name: array}} on the network's device.

        The arrays are copies (a snapshot) unless ``copy=False``, which gives the
        live arrays themselves.
        """
        def take(a: Array) -> Array:
            return a.copy() if copy else a

        return {"params": {k: take(v) for k, v in self._params.items()},
                "buffers": {k: take(v) for k, v in self._buffers.items()}}

    def load_state_dict(self, state: Mapping[str, Mapping[str, Array]],
                        strict: bool = True) -> LoadReport:
        """Copy a :meth:`state_dict` into the network's arrays, in place.

        ``strict=True``: the keys must match exactly.  ``strict=False``: what matches
        is loaded; the returned :class:`LoadReport` lists the network's names the state
        lacks (``missing``) and the state's names the network lacks (``unexpected``).
        Shapes and dtypes must match either way.  Every problem is reported at once in
        one ValueError, and nothing is changed then.  Values may live on either device.
        """
        problems, missing, unexpected = [], [], []
        if not isinstance(state, Mapping):
            problems.append(f"expected a mapping {{'params': ..., 'buffers': ...}}, "
                            f"got {type(state).__name__}")
            state = {}
        problems += [f"unexpected section {k!r} (expected 'params' and 'buffers')"
                     for k in state if k not in _SECTIONS]
        for section in _SECTIONS:
            mine: ParamMap = getattr(self, section)
            given = state.get(section, {})
            if not isinstance(given, Mapping):
                problems.append(f"{section}: expected a mapping, got {type(given).__name__}")
                continue
            missing += [f"{section}/{k}" if section != "params" else k
                        for k in mine if k not in given]
            unexpected += [f"{section}/{k}" if section != "params" else k
                           for k in given if k not in mine]
            for k in mine:
                if k in given:
                    why = _describe_mismatch(mine[k], given[k])
                    if why is not None:
                        problems.append(f"{section}[{k!r}]: {why}")
        if strict and missing:
            problems.append(f"missing keys {missing}")
        if strict and unexpected:
            problems.append(f"unexpected keys {unexpected}")
        if problems:
            lines = "\n".join(f"  - {p}" for p in problems)
            raise ValueError(f"load_state_dict: {len(problems)} mismatch(es), nothing was "
                             f"loaded:\n{lines}")
        for section in _SECTIONS:
            mine = getattr(self, section)
            for k, value in state.get(section, {}).items():
                if k in mine:
                    dst = mine[k]
                    dst[...] = to_cpu(value) if _device(dst) == "numpy" else \
                        get_array_module(dst).asarray(value)
        return LoadReport(missing, unexpected)

    def save_params(self, path: str | os.PathLike) -> None:
        """Write params and buffers to ``path`` in xpnet's state format, atomically.

        A crash leaves the old file or the new one, never half of one.  ``path`` is
        used as given (no suffix is added).
        """
        save_state(path, params=self._params, buffers=self._buffers,
                   config={"model": {"class": type(self).__name__, "name": self.model_name,
                                     "config": self._config}},
                   backend=self.backend_name)

    def load_params(self, path: str | os.PathLike, strict: bool = True) -> LoadReport:
        """Load a file written by :meth:`save_params` (or a checkpoint); never unpickles.

        The file is verified (:func:`xpnet.state.load_state`), then loaded as
        :meth:`load_state_dict` does, with ``strict`` as there; returns its report.
        """
        state = load_state(path)
        try:
            return self.load_state_dict({"params": state.params, "buffers": state.buffers},
                                        strict=strict)
        except ValueError as exc:
            raise ValueError(f"load_params({os.fspath(path)!r}): {exc}") from None

    def rng_states(self) -> dict[str, Any]:
        """The JSON-able states of the layers' own random generators (Dropout's), by
        position in the walk; :meth:`set_rng_states` restores them (checkpoints)."""
        return {str(i): layer.get_rng_state()
                for i, layer in enumerate(walk(self.chain)) if hasattr(layer, "get_rng_state")}

    def set_rng_states(self, states: Mapping[str, Any]) -> None:
        for i, layer in enumerate(walk(self.chain)):
            if hasattr(layer, "set_rng_state") and str(i) in states:
                layer.set_rng_state(states[str(i)])

    # ------------------------------------------------------------- devices
    def _move(self, fn: Any) -> Network:
        owners = [*walk(self.chain), self.loss_layer]
        tables = [d for layer in owners
                  for d in (getattr(layer, "params", {}), getattr(layer, "buffers", {}))]
        moved = [(d, k, a, fn(a)) for d in tables for k, a in d.items()]
        if all(new is old for _, _, old, new in moved):
            return self  # already there
        for d, k, _, new in moved:  # only once every transfer has succeeded
            d[k] = new
        for layer in owners:  # gradients and the last loss stay on the old device
            if hasattr(layer, "grads"):
                layer.grads = {}
        self.last_loss = None
        return self

    def to_gpu(self) -> Network:
        """Move params and buffers to the GPU (in the layers); returns self."""
        return self._move(to_gpu)

    def to_cpu(self) -> Network:
        """Move params and buffers to the host (in the layers); returns self."""
        return self._move(to_cpu)


#: the name the chapter 6-7 code used for the one container
Sequential = Network
