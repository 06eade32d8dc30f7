"""The optimizers of the book (chapter 6, ``common/optimizer.py``) plus AdamW.

Every class updates a dict of arrays in place with ``update(params, grads)``; the
update rules below are the book's, written with in-place ufuncs (``out=``) and one
scratch buffer ``s`` per key so that a step allocates no temporary arrays.

On CuPy each class also has its update as one kernel (``_kernel``): the generic
path's operations in its order, compiled without FMA contraction so that each is
rounded as there (the tests require the two to agree bit for bit), with this
step's scalars read from a device array ``h`` (``_kernel_scalars``), cast to the
parameter's dtype as NumPy casts a Python float.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from types import ModuleType
from typing import Any

from xpnet.backend.kernels import elementwise_kernel
from xpnet.optim.base import _NONNEG, _UNIT, Array, Optimizer

#: parameter groups: see :class:`~xpnet.optim.base.Optimizer`
Groups = Sequence[Mapping[str, Any]] | None

__all__ = [
    "SGD",
    "Momentum",
    "Nesterov",
    "AdaGrad",
    "RMSprop",
    "Adam",
    "AdamW",
    "default_decay_filter",
    "OPTIMIZERS",
    "get_optimizer",
]

EPS = 1e-7  # the book's epsilon in AdaGrad, RMSprop and Adam


def _update_kernel(name: str, body: str, *slots: str) -> tuple:
    """``elementwise_kernel`` arguments of an update: in ``T g, raw float64 h`` (the
    gradient and this step's scalars), out ``T p`` and one ``T <slot>`` per state
    array; compiled without FMA contraction, so that it rounds as the generic path."""
    out = ", ".join(["T p", *(f"T {slot}" for slot in slots)])
    return "T g, raw float64 h", out, body, f"xpnet_{name}", ("--fmad=false",)


class SGD(Optimizer):
    """Stochastic gradient descent: ``p -= lr * g``."""

    def __init__(self, lr: float = 0.01, clip_norm: float | None = None,
                 groups: Groups = None) -> None:
        super().__init__(lr=lr, clip_norm=clip_norm, groups=groups)

    _kernel = _update_kernel("sgd", "p -= g * (T)h[0];")

    def _update_one(self, xp: ModuleType, key: str, p: Array, g: Array,
                    slots: dict[str, Array], s: Array) -> None:
        xp.multiply(g, self.lr, out=s)
        p -= s


class Momentum(Optimizer):
    """Momentum SGD: ``v = momentum*v - lr*g; p += v`` (``v`` starts at zero)."""

    slot_names = ("v",)
    momentum: float
    hyper_names = ("lr", "momentum")
    hyper_rules = {**Optimizer.hyper_rules, "momentum": _UNIT}

    def __init__(self, lr: float = 0.01, momentum: float = 0.9,
                 clip_norm: float | None = None,
                 groups: Groups = None) -> None:
        super().__init__(lr=lr, momentum=momentum, clip_norm=clip_norm, groups=groups)

    _kernel = _update_kernel("momentum", "v = v * (T)h[0]; v -= g * (T)h[1]; p += v;", "v")

    def _kernel_scalars(self) -> tuple[float, ...]:
        return (self.momentum, self.lr)

    def _update_one(self, xp: ModuleType, key: str, p: Array, g: Array,
                    slots: dict[str, Array], s: Array) -> None:
        v = slots["v"]
        v *= self.momentum
        xp.multiply(g, self.lr, out=s)
        v -= s
        p += v


class Nesterov(Optimizer):
    """Nesterov's accelerated gradient, in the book's form.

    ``v *= momentum; v -= lr*g; p += momentum*momentum*v; p -= (1+momentum)*lr*g``.
    """

    slot_names = ("v",)
    momentum: float
    hyper_names = ("lr", "momentum")
    hyper_rules = {**Optimizer.hyper_rules, "momentum": _UNIT}

    def __init__(self, lr: float = 0.01, momentum: float = 0.9,
                 clip_norm: float | None = None,
                 groups: Groups = None) -> None:
        super().__init__(lr=lr, momentum=momentum, clip_norm=clip_norm, groups=groups)

    _kernel = _update_kernel(
        "nesterov", "v = v * (T)h[0]; v -= g * (T)h[1]; p += v * (T)h[2]; p -= g * (T)h[3];", "v")

    def _kernel_scalars(self) -> tuple[float, ...]:
        mu, lr = self.momentum, self.lr
        return (mu, lr, mu * mu, (1.0 + mu) * lr)

    def _update_one(self, xp: ModuleType, key: str, p: Array, g: Array,
                    slots: dict[str, Array], s: Array) -> None:
        v, mu, lr = slots["v"], self.momentum, self.lr
        v *= mu
        xp.multiply(g, lr, out=s)
        v -= s
        xp.multiply(v, mu * mu, out=s)
        p += s
        xp.multiply(g, (1.0 + mu) * lr, out=s)
        p -= s


class AdaGrad(Optimizer):
    """AdaGrad: ``h += g*g; p -= lr*g / (sqrt(h) + 1e-7)`` (``h`` starts at zero)."""

    slot_names = ("h",)

    def __init__(self, lr: float = 0.01, clip_norm: float | None = None,
                 groups: Groups = None) -> None:
        super().__init__(lr=lr, clip_norm=clip_norm, groups=groups)

    _kernel = _update_kernel(
        "adagrad", "hh += g * g; p -= g / (sqrt(hh) + (T)h[1]) * (T)h[0];", "hh")

    def _kernel_scalars(self) -> tuple[float, ...]:
        return (self.lr, EPS)

    def _update_one(self, xp: ModuleType, key: str, p: Array, g: Array,
                    slots: dict[str, Array], s: Array) -> None:
        h = slots["h"]
        xp.multiply(g, g, out=s)
        h += s
        _scaled_step(xp, p, g, h, s, self.lr)


class RMSprop(Optimizer):
    """RMSprop: ``h *= decay; h += (1-decay)*g*g; p -= lr*g / (sqrt(h) + 1e-7)``."""

    slot_names = ("h",)
    decay_rate: float
    hyper_names = ("lr", "decay_rate")
    hyper_rules = {**Optimizer.hyper_rules, "decay_rate": _UNIT}

    def __init__(self, lr: float = 0.01, decay_rate: float = 0.99,
                 clip_norm: float | None = None,
                 groups: Groups = None) -> None:
        super().__init__(lr=lr, decay_rate=decay_rate, clip_norm=clip_norm, groups=groups)

    _kernel = _update_kernel(
        "rmsprop",
        "hh = hh * (T)h[0]; hh += g * (T)h[1] * g; p -= g / (sqrt(hh) + (T)h[3]) * (T)h[2];",
        "hh")

    def _kernel_scalars(self) -> tuple[float, ...]:
        return (self.decay_rate, 1.0 - self.decay_rate, self.lr, EPS)

    def _update_one(self, xp: ModuleType, key: str, p: Array, g: Array,
                    slots: dict[str, Array], s: Array) -> None:
        h = slots["h"]
        h *= self.decay_rate
        xp.multiply(g, 1.0 - self.decay_rate, out=s)
        s *= g
        h += s
        _scaled_step(xp, p, g, h, s, self.lr)


def _scaled_step(xp: ModuleType, p: Array, g: Array, h: Array, s: Array, lr: float) -> None:
    """``p -= lr * g / (sqrt(h) + 1e-7)``, computed as ``(g / (sqrt(h) + eps)) * lr``."""
    xp.sqrt(h, out=s)
    s += EPS
    xp.divide(g, s, out=s)
    s *= lr
    p -= s


class Adam(Optimizer):
    """Adam in the book's form, the bias correction folded into the step size.

    Per update ``t += 1; lr_t = lr * sqrt(1 - beta2**t) / (1 - beta1**t)``, then per key
    ``m += (1-beta1)*(g - m); v += (1-beta2)*(g*g - v); p -= lr_t * m / (sqrt(v) + 1e-7)``.
    ``t`` is :attr:`step_count`.
    """

    slot_names = ("m", "v")
    beta1: float
    beta2: float
    hyper_names = ("lr", "beta1", "beta2")
    _lr_t = 0.0  # this step's bias-corrected step size
    hyper_rules = {**Optimizer.hyper_rules, "beta1": _UNIT, "beta2": _UNIT}

    def __init__(self, lr: float = 0.001, beta1: float = 0.9, beta2: float = 0.999,
                 clip_norm: float | None = None,
                 groups: Groups = None) -> None:
        super().__init__(lr=lr, beta1=beta1, beta2=beta2, clip_norm=clip_norm, groups=groups)

    def _begin_step(self) -> None:
        t = self.step_count
        # math.sqrt keeps a Python float: a NumPy float64 would promote float32 params
        self._lr_t = self.lr * math.sqrt(1.0 - self.beta2 ** t) / (1.0 - self.beta1 ** t)

    _kernel = _update_kernel(
        "adam",
        "m += (g - m) * (T)h[0]; v += (g * g - v) * (T)h[1];"
        " p -= m / (sqrt(v) + (T)h[3]) * (T)h[2];",
        "m", "v")

    def _kernel_scalars(self) -> tuple[float, ...]:
        return (1.0 - self.beta1, 1.0 - self.beta2, self._lr_t, EPS)

    def _update_one(self, xp: ModuleType, key: str, p: Array, g: Array,
                    slots: dict[str, Array], s: Array) -> None:
        m, v = slots["m"], slots["v"]
        xp.subtract(g, m, out=s)
        s *= 1.0 - self.beta1
        m += s
        xp.multiply(g, g, out=s)
        s -= v
        s *= 1.0 - self.beta2
        v += s
        xp.sqrt(v, out=s)
        s += EPS
        xp.divide(m, s, out=s)
        s *= self._lr_t
        p -= s


def default_decay_filter(key: str) -> bool:
    """AdamW's default: decay weight matrices only.

    True when the last part of ``key`` (after any '.' or '/') starts with 'W', as in
    the book's 'W1', 'W2' ...; biases, BatchNorm's 'gamma'/'beta' are not decayed.
    """
    name = str(key).replace("/", ".").rsplit(".", 1)[-1]
    return name.startswith("W")


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter); not in the book.

    Before the Adam step of a key selected by ``decay_filter``:
    ``p -= lr * weight_decay * p`` (``lr``, not Adam's ``lr_t``; the decay uses the
    parameter before this step's update). ``decay_filter(key) -> bool`` picks the
    keys: by default :func:`default_decay_filter` (keys whose name starts with 'W');
    ``None`` decays every parameter.
    """

    weight_decay: float
    hyper_names = ("lr", "beta1", "beta2", "weight_decay")
    hyper_rules = {**Adam.hyper_rules, "weight_decay": _NONNEG}

    def __init__(self, lr: float = 0.001, beta1: float = 0.9, beta2: float = 0.999,
                 weight_decay: float = 0.01,
                 decay_filter: Callable[[str], bool] | None = default_decay_filter,
                 clip_norm: float | None = None,
                 groups: Groups = None) -> None:
        if decay_filter is not None and not callable(decay_filter):
            raise TypeError(f"AdamW: decay_filter must be a callable key -> bool or None, "
                            f"got {decay_filter!r}")
        self.decay_filter = decay_filter
        Optimizer.__init__(self, lr=lr, beta1=beta1, beta2=beta2,
                           weight_decay=weight_decay, clip_norm=clip_norm, groups=groups)

    _kernel = Adam._kernel  # plus _DECAY_KERNEL, in _fused_one

    def recording_key(self) -> tuple:
        return (*super().recording_key(), bool(self.weight_decay), self.decay_filter)

    def _decays(self, key: str) -> bool:
        return bool(self.weight_decay) and (self.decay_filter is None or self.decay_filter(key))

    def _kernel_scalars(self) -> tuple[float, ...]:
        return (*super()._kernel_scalars(), self.lr * self.weight_decay)

    def _fused_one(self, key: str, p: Array, g: Array, slots: dict[str, Array],
                   h: Array) -> None:
        if self._decays(key):
            elementwise_kernel(*_DECAY_KERNEL)(h, p)
        super()._fused_one(key, p, g, slots, h)

    def _update_one(self, xp: ModuleType, key: str, p: Array, g: Array,
                    slots: dict[str, Array], s: Array) -> None:
        if self._decays(key):
            xp.multiply(p, self.lr * self.weight_decay, out=s)
            p -= s
        super()._update_one(xp, key, p, g, slots, s)


# AdamW's decoupled decay, p -= p * (lr * weight_decay), before its Adam kernel.
_DECAY_KERNEL = ("raw float64 h", "T p", "p -= p * (T)h[4];", "xpnet_decay", ("--fmad=false",))


OPTIMIZERS: dict[str, type[Optimizer]] = {
    "sgd": SGD,
    "momentum": Momentum,
    "nesterov": Nesterov,
    "adagrad": AdaGrad,
    "rmsprop": RMSprop,
    "adam": Adam,
    "adamw": AdamW,
}


def get_optimizer(name: str, **kwargs: Any) -> Optimizer:
    """An optimizer by case-insensitive name ('sgd', 'momentum', 'nesterov', 'adagrad',
    'rmsprop', 'adam', 'adamw'), constructed with ``kwargs``.

    Raises ValueError listing the valid names for an unknown one.
    """
    cls = OPTIMIZERS.get(str(name).strip().lower())
    if cls is None:
        raise ValueError(f"unknown optimizer {name!r}; valid names are: "
                         f"{', '.join(OPTIMIZERS)}")
    return cls(**kwargs)
