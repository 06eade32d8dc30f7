"""Sequential: the one container every network in xpnet is built on.

A network is a list of layers followed by a loss layer.  Sequential does the
bookkeeping the book repeats in each network class:

* numbering: layers with parameters are numbered in order, one count per kind
  of layer (the tuple of its parameter names), so Affine and Convolution layers
  give ``W1, b1, W2, b2, ...`` and BatchNormalization layers give ``gamma1,
  beta1, ...`` and the buffers ``running_mean1, running_var1, ...``, the book's keys;
* ``params`` / ``buffers``: *live* mappings over the layers' own arrays.  An
  optimizer that updates ``net.params[k]`` in place changes the layer, and
  ``net.params['W1'] = array`` puts the array into the layer (same shape, dtype
  and device required);
* the book's methods ``predict``, ``loss``, ``accuracy``, ``gradient`` and
  ``numerical_gradient``, with weight decay (0.5 * lambda * sum W^2 over every
  ``W`` parameter);
* checkpoints: ``state_dict`` / ``load_state_dict`` and ``save_params`` /
  ``load_params`` (an ``.npz`` file, read without pickle);
* devices and dtype: ``to_gpu`` / ``to_cpu`` and ``dtype``;
* one fusion: a Convolution followed by a ReLU runs as one pass over the output
  (``Convolution.forward(x, relu=True)``; the ReLU layer takes that output with
  ``take_output`` and its backward is unchanged).  Outputs and gradients are the
  same.  A ``forward`` replaced on either instance (a hook), or overridden by a
  subclass that does not declare ``fuses_relu``, runs unfused.
"""

from __future__ import annotations

import copy
import json
import math
import numbers
import os
import zipfile
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from typing import Any

import numpy

from xpnet._atomic import atomic_write
from xpnet.backend import (
    BackendMismatchError,
    check_same_backend,
    get_array_module,
    get_default_dtype,
    to_cpu,
    to_gpu,
)
from xpnet.gradcheck import numerical_gradient as _numerical_gradient
from xpnet.layers import Layer, ReLU, SoftmaxWithLoss

Array = Any  # numpy.ndarray or cupy.ndarray

__all__ = ["Sequential", "ParamMap"]

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
        self._slots = slots
        self._section = section

    def __getitem__(self, name: str) -> Array:
        layer, key = self._slots[name]
        return getattr(layer, self._section)[key]

    def __setitem__(self, name: str, value: Array) -> None:
        slot = self._slots.get(name)
        if slot is None:
            raise KeyError(
                f"{self._section}: no entry {name!r} (a network's {self._section} are "
                f"fixed by its layers; valid names: {', '.join(self._slots) or 'none'})"
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
        return iter(self._slots)

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, name: object) -> bool:
        return name in self._slots

    def slot(self, name: str) -> tuple[Layer, str]:
        """The (layer, key) pair behind ``name``."""
        return self._slots[name]

    def __repr__(self) -> str:
        items = ", ".join(f"{k}: {tuple(v.shape)} {v.dtype}" for k, v in self.items())
        return f"ParamMap({self._section}; {items})"


def _number_layers(layers: Sequence[Layer]) -> tuple[dict, dict]:
    """Name every parameter and buffer of ``layers`` with the book's numbered keys."""
    counters: dict[tuple[str, ...], int] = {}
    slots: dict[str, dict[str, tuple[Layer, str]]] = {s: {} for s in _SECTIONS}
    for layer in layers:
        kind = tuple(layer.params) or tuple(layer.buffers)
        if not kind:
            continue
        n = counters[kind] = counters.get(kind, 0) + 1
        for section in _SECTIONS:
            for key in getattr(layer, section):
                name = f"{key}{n}"
                if name in slots["params"] or name in slots["buffers"]:
                    raise ValueError(
                        f"Sequential: two entries would be named {name!r}; rename the "
                        f"parameters of {layer!r}"
                    )
                slots[section][name] = (layer, key)
    return slots["params"], slots["buffers"]


def _fuses_relu(layer: Layer, after: Layer | None) -> bool:
    """Whether ``layer`` can apply the ReLU layer ``after`` it in its own output pass.

    Only as their classes define them: a ``forward`` replaced on either instance (a
    hook), or overridden by a subclass that does not declare ``fuses_relu`` itself,
    runs as written.
    """
    if type(after) is not ReLU or "forward" in vars(after) or "forward" in vars(layer):
        return False
    owner = next(c for c in type(layer).__mro__ if "forward" in vars(c))
    return bool(vars(owner).get("fuses_relu", False))


def _check_lambda(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) \
            or not math.isfinite(value) or value < 0:
        raise ValueError(f"weight_decay_lambda: expected a finite number >= 0, got {value!r}")
    return float(value)


class Sequential:
    """Layers applied in order, then a loss layer (SoftmaxWithLoss by default).

    Args:
        layers: the layers, each following :mod:`xpnet.layers.base`'s protocol.
        loss_layer: a layer with ``forward(y, t)`` -> 0-d loss and ``backward(dout=1)``.
        weight_decay_lambda: L2 weight decay; adds 0.5*lambda*sum(W**2) over every
            parameter named ``W`` (Affine and Convolution weights) to the loss.
        config: the constructor arguments of the network (JSON-able), kept so a
            checkpoint can rebuild it: ``build_model(net.model_name, **net.config)``.
        input_shape: the shape of one sample, e.g. (784,) or (1, 28, 28).  When it
            has 3 axes, flat input (N, C*H*W) is reshaped to (N, C, H, W).
    """

    #: the name under which :func:`xpnet.models.build_model` builds this class
    model_name: str | None = None

    def __init__(self, layers: Sequence[Layer], loss_layer: Layer | None = None,
                 weight_decay_lambda: float = 0.0, config: dict | None = None,
                 input_shape: Sequence[int] | None = None) -> None:
        self.layers: list[Layer] = list(layers)
        if not self.layers:
            raise ValueError("Sequential: expected at least one layer")
        for i, layer in enumerate(self.layers):
            missing = [a for a in ("forward", "backward", "params", "grads", "buffers")
                       if not hasattr(layer, a)]
            if missing:
                raise TypeError(f"Sequential: layer {i} ({layer!r}) lacks {', '.join(missing)}")
        self.loss_layer = SoftmaxWithLoss() if loss_layer is None else loss_layer
        self.weight_decay_lambda = _check_lambda(weight_decay_lambda)
        self.input_shape = None if input_shape is None else tuple(int(d) for d in input_shape)
        config = {} if config is None else dict(config)
        try:
            json.dumps(config)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"Sequential: config must be JSON-serialisable: {exc}") from None
        self._config = config
        param_slots, buffer_slots = _number_layers(self.layers)
        self._params = ParamMap(param_slots, "params")
        self._buffers = ParamMap(buffer_slots, "buffers")
        self._decay_names = [name for name, (_, key) in param_slots.items() if key == "W"]
        self.last_loss: Array | None = None
        arrays = {**self._params, **self._buffers}
        dtypes = {str(a.dtype) for a in arrays.values()}
        if len(dtypes) > 1:
            raise ValueError(f"Sequential: parameters of mixed dtypes {sorted(dtypes)}")
        check_same_backend("Sequential", **arrays)

    # ------------------------------------------------------------- properties
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
        for a in self._params.values():
            return numpy.dtype(a.dtype)
        for a in self._buffers.values():
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
        inner = ",\n  ".join(repr(layer) for layer in self.layers)
        return (f"{type(self).__name__}(\n  {inner},\n  loss={self.loss_layer!r}\n)"
                f"  # {self.num_params} params, {self.dtype}, {self.backend_name}")

    # ------------------------------------------------------------- forward
    def _prepare(self, x: Array) -> Array:
        """Cast float input to the model's dtype; reshape flat input for 3-D inputs."""
        if not (hasattr(x, "dtype") and hasattr(x, "shape")):
            raise TypeError(f"{type(self).__name__}: input must be an ndarray, "
                            f"got {type(x).__name__}")
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

    def _forward(self, x: Array, train_flg: bool) -> Array:
        for layer in self.layers:
            x = layer.forward(x, train_flg)
        return x

    def predict(self, x: Array, train_flg: bool = False) -> Array:
        """The network's output (logits) for ``x``; inference mode unless train_flg."""
        return self._forward(self._prepare(x), train_flg)

    def _loss(self, x: Array, t: Array, train_flg: bool) -> Array:
        y = self._forward(x, train_flg)
        loss = self.loss_layer.forward(y, t)
        xp = get_array_module(y)
        if self.weight_decay_lambda:
            params = self._params
            total = sum((params[k] * params[k]).sum() for k in self._decay_names)
            loss = loss + (0.5 * self.weight_decay_lambda) * total
        return xp.asarray(loss)

    def loss(self, x: Array, t: Array, train_flg: bool = True) -> Array:
        """The loss (a 0-d array on the network's device) of ``x`` against labels ``t``.

        ``t`` holds integer labels (N,) or one-hot rows (N, K).  Includes the weight
        decay term 0.5 * lambda * sum(W**2).
        """
        return self._loss(self._prepare(x), t, train_flg)

    def accuracy(self, x: Array, t: Array, batch_size: int = 100) -> float:
        """The fraction of samples classified correctly, over *every* sample.

        Runs in inference mode in batches of ``batch_size``; the correct counts are
        summed on the device and read back once.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) \
                or batch_size < 1:
            raise ValueError(f"accuracy: batch_size must be an integer >= 1, got {batch_size!r}")
        check_same_backend("accuracy", x=x, t=t)
        n = int(x.shape[0])
        if n == 0:
            raise ValueError("accuracy: no samples")
        if t.ndim != 1:
            t = t.argmax(axis=1)
        if t.shape[0] != n:
            raise ValueError(f"accuracy: {n} samples but {t.shape[0]} labels")
        correct = None
        for start in range(0, n, int(batch_size)):
            y = self.predict(x[start:start + batch_size], train_flg=False)
            hits = (y.argmax(axis=1) == t[start:start + batch_size]).sum()
            correct = hits if correct is None else correct + hits
        return int(correct) / n

    # ------------------------------------------------------------- gradients
    def gradient(self, x: Array, t: Array) -> dict[str, Array]:
        """Gradients of :meth:`loss` (training mode) by backpropagation.

        Returns a dict with the keys of ``params``; weight decay adds lambda * W to
        each W's gradient.  The loss computed on the way is kept, unsynced, as
        ``self.last_loss``.
        """
        loss = self.loss(x, t, train_flg=True)
        dout = self.loss_layer.backward(1)
        for i in range(len(self.layers) - 1, -1, -1):
            # nothing reads the gradient with respect to the network's input
            dout = self.layers[i].backward(dout, need_input_grad=i > 0)
        lam = self.weight_decay_lambda
        grads: dict[str, Array] = {}
        for name in self._params:
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

        return {name: _numerical_gradient(f, p, h) for name, p in self._params.items()}

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

    def _state_problems(self, state: Any) -> list[str]:
        if not isinstance(state, Mapping):
            return [f"expected a mapping {{'params': ..., 'buffers': ...}}, "
                    f"got {type(state).__name__}"]
        problems = [f"unexpected section {k!r} (expected 'params' and 'buffers')"
                    for k in state if k not in _SECTIONS]
        for section in _SECTIONS:
            mine: ParamMap = getattr(self, section)
            given = state.get(section, {})
            if not isinstance(given, Mapping):
                problems.append(f"{section}: expected a mapping, got {type(given).__name__}")
                continue
            missing = [k for k in mine if k not in given]
            unexpected = [k for k in given if k not in mine]
            if missing:
                problems.append(f"{section}: missing keys {missing}")
            if unexpected:
                problems.append(f"{section}: unexpected keys {unexpected}")
            for k in mine:
                if k in given:
                    why = _describe_mismatch(mine[k], given[k])
                    if why is not None:
                        problems.append(f"{section}[{k!r}]: {why}")
        return problems

    def load_state_dict(self, state: Mapping[str, Mapping[str, Array]]) -> None:
        """Copy a :meth:`state_dict` into the network's arrays, in place.

        Keys, shapes and dtypes must match exactly; every mismatch is reported at
        once in one ValueError and nothing is changed.  Values may live on either
        device: they are copied onto the network's (an explicit transfer).
        """
        problems = self._state_problems(state)
        if problems:
            raise ValueError(self._problem_message("load_state_dict", problems))
        for section in _SECTIONS:
            mine: ParamMap = getattr(self, section)
            for k, value in state.get(section, {}).items():
                dst = mine[k]
                if _device(dst) == "numpy":
                    dst[...] = to_cpu(value)
                else:
                    dst[...] = get_array_module(dst).asarray(value)

    @staticmethod
    def _problem_message(where: str, problems: list[str]) -> str:
        lines = "\n".join(f"  - {p}" for p in problems)
        return f"{where}: {len(problems)} mismatch(es), nothing was loaded:\n{lines}"

    def save_params(self, path: str | os.PathLike) -> None:
        """Write params and buffers to ``path`` as an .npz archive, atomically.

        Entries are named 'params/W1', 'buffers/running_mean1' ..., host arrays.
        The file is written to a temporary name in the same directory, flushed to
        disk and renamed over ``path``, so a crash leaves the old file or the new
        one, never half of one.  ``path`` is used as given (no suffix is added).
        """
        path = os.fspath(path)
        arrays = {f"{section}/{k}": to_cpu(v)
                  for section in _SECTIONS for k, v in getattr(self, section).items()}
        atomic_write(path, lambda f: numpy.savez(f, **arrays))

    def load_params(self, path: str | os.PathLike) -> None:
        """Load what :meth:`save_params` wrote; never unpickles anything.

        The archive is read with ``numpy.load(..., allow_pickle=False)``, so a file
        holding object arrays or pickles is rejected with ValueError.  Then as
        :meth:`load_state_dict`: every mismatch reported at once, nothing changed
        on failure.
        """
        path = os.fspath(path)
        where = f"load_params({path!r})"
        try:
            archive = numpy.load(path, allow_pickle=False)
        except (ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise ValueError(f"{where}: not a params archive: {exc}") from exc
        if not isinstance(archive, Mapping) and not hasattr(archive, "files"):
            raise ValueError(f"{where}: expected an .npz archive, found a single array")
        state: dict[str, dict[str, Array]] = {s: {} for s in _SECTIONS}
        problems = []
        with archive:
            for entry in archive.files:
                section, _, key = entry.partition("/")
                if section not in state or not key:
                    problems.append(f"unexpected archive entry {entry!r}")
                    continue
                try:
                    state[section][key] = archive[entry]
                except (ValueError, EOFError, zipfile.BadZipFile) as exc:
                    # object arrays need pickle: refused; or a damaged archive
                    raise ValueError(f"{where}: entry {entry!r} cannot be read safely: "
                                     f"{exc}") from exc
        problems += self._state_problems(state)
        if problems:
            raise ValueError(self._problem_message(where, problems))
        self.load_state_dict(state)

    # ------------------------------------------------------------- devices
    def _move(self, fn: Any) -> Sequential:
        owners = [*self.layers, self.loss_layer]
        moved = [(d, k, a, fn(a)) for layer in owners
                 for d in (layer.params, layer.buffers) for k, a in d.items()]
        if all(new is old for _, _, old, new in moved):
            return self  # already there
        for d, k, _, new in moved:  # only once every transfer has succeeded
            d[k] = new
        for layer in owners:  # gradients and the last loss stay on the old device
            layer.grads = {}
        self.last_loss = None
        return self

    def to_gpu(self) -> Sequential:
        """Move params and buffers to the GPU (in the layers); returns self."""
        return self._move(to_gpu)

    def to_cpu(self) -> Sequential:
        """Move params and buffers to the host (in the layers); returns self."""
        return self._move(to_cpu)
