"""Learning-rate schedules: they set ``optimizer.lr`` once per step.

Usage, one ``step()`` per optimizer update::

    opt = Adam(lr=1e-3)
    sched = CosineLR(opt, total_steps=10_000, warmup_steps=500)
    for x, t in batches:
        ...
        opt.update(params, grads)   # uses lr_at(sched.last_step)
        sched.step()                # lr for the next update

The base learning rate is ``optimizer.lr`` at construction; the constructor sets
``optimizer.lr`` to the schedule's value at step 0.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any, ClassVar

from xpnet.optim.base import Optimizer

__all__ = ["LRSchedule", "StepLR", "CosineLR"]


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_finite(value: Any) -> bool:
    return (isinstance(value, numbers.Real) and not isinstance(value, bool)
            and math.isfinite(value))


class LRSchedule:
    """Base class: ``lr_at(step)`` gives the learning rate after ``step`` calls to step().

    Attributes:
        optimizer: the optimizer whose ``lr`` is set.
        base_lr: ``optimizer.lr`` when the schedule was made.
        last_step: the number of ``step()`` calls so far.
    """

    #: names of the constructor settings saved in state_dict()
    config_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, optimizer: Optimizer) -> None:
        problems = self._check_config({n: getattr(self, n) for n in self.config_names})
        if problems:
            raise ValueError(f"{type(self).__name__}: " + "; ".join(problems))
        self.optimizer = optimizer
        self.base_lr = float(optimizer.lr)
        self.last_step = 0
        optimizer.lr = self.lr_at(0)

    def lr_at(self, step: int) -> float:
        """The learning rate used for the update after ``step`` calls to step()."""
        raise NotImplementedError

    def _check_config(self, config: Mapping[str, Any]) -> list[str]:
        return []

    @property
    def lr(self) -> float:
        """The current learning rate, ``lr_at(last_step)``."""
        return self.lr_at(self.last_step)

    def step(self) -> float:
        """Advance one step, set ``optimizer.lr`` and return it."""
        self.last_step += 1
        lr = self.lr_at(self.last_step)
        self.optimizer.lr = lr
        return lr

    def state_dict(self) -> dict[str, Any]:
        """``{'type', 'base_lr', 'last_step', <settings>}``, all JSON-able scalars."""
        return {"type": type(self).__name__, "base_lr": self.base_lr,
                "last_step": self.last_step,
                **{n: getattr(self, n) for n in self.config_names}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state_dict() snapshot and set ``optimizer.lr`` to match it.

        Raises ValueError listing every problem; nothing is changed then.
        """
        name = type(self).__name__
        if not isinstance(state, Mapping):
            raise ValueError(f"{name}.load_state_dict: expected a dict, "
                             f"got {type(state).__name__}")
        expected = {"type", "base_lr", "last_step", *self.config_names}
        problems = [f"missing entry {k!r}" for k in sorted(expected - set(state))]
        problems += [f"unexpected entry {k!r}"
                     for k in sorted(set(state) - expected, key=str)]
        if "type" in state and state["type"] != name:
            problems.append(f"type is {state['type']!r}, this schedule is {name!r}")
        if "base_lr" in state and not (_is_finite(state["base_lr"]) and state["base_lr"] >= 0):
            problems.append(f"base_lr must be a finite number >= 0, got {state['base_lr']!r}")
        if "last_step" in state and not (_is_int(state["last_step"])
                                         and state["last_step"] >= 0):
            problems.append(f"last_step must be an int >= 0, got {state['last_step']!r}")
        if all(n in state for n in self.config_names):
            problems += self._check_config({n: state[n] for n in self.config_names})
        if problems:
            listing = "\n".join(f"  - {p}" for p in problems)
            raise ValueError(f"{name}.load_state_dict: {len(problems)} problem(s); "
                             f"nothing was loaded:\n{listing}")
        for n in self.config_names:
            value = state[n]
            setattr(self, n, int(value) if _is_int(value) else float(value))
        self.base_lr = float(state["base_lr"])
        self.last_step = int(state["last_step"])
        self.optimizer.lr = self.lr_at(self.last_step)

    def __repr__(self) -> str:
        config = ", ".join(f"{n}={getattr(self, n)!r}" for n in self.config_names)
        return f"{type(self).__name__}({config}, base_lr={self.base_lr!r}, " \
               f"last_step={self.last_step})"


class StepLR(LRSchedule):
    """Multiply the learning rate by ``gamma`` every ``step_size`` steps.

    ``lr_at(t) = base_lr * gamma ** (t // step_size)``.
    """

    config_names = ("step_size", "gamma")

    def __init__(self, optimizer: Optimizer, step_size: int, gamma: float = 0.1) -> None:
        self.step_size = step_size
        self.gamma = gamma
        super().__init__(optimizer)
        self.step_size, self.gamma = int(step_size), float(gamma)

    def _check_config(self, config: Mapping[str, Any]) -> list[str]:
        problems = []
        if not (_is_int(config["step_size"]) and config["step_size"] >= 1):
            problems.append(f"step_size must be an int >= 1, got {config['step_size']!r}")
        if not (_is_finite(config["gamma"]) and config["gamma"] > 0):
            problems.append(f"gamma must be a finite number > 0, got {config['gamma']!r}")
        return problems

    def lr_at(self, step: int) -> float:
        return self.base_lr * self.gamma ** (step // self.step_size)


class CosineLR(LRSchedule):
    """Linear warm-up, then cosine decay from ``base_lr`` to ``min_lr``.

    With ``W = warmup_steps`` and ``T = total_steps`` (warm-up included)::

        lr_at(t) = base_lr * (t + 1) / W                                   t < W
                 = min_lr + (base_lr - min_lr) * (1 + cos(pi * (t - W) / (T - W))) / 2
                                                                          W <= t <= T
                 = min_lr                                                 t > T
    """

    config_names = ("total_steps", "min_lr", "warmup_steps")

    def __init__(self, optimizer: Optimizer, total_steps: int, min_lr: float = 0.0,
                 warmup_steps: int = 0) -> None:
        self.total_steps = total_steps
        self.min_lr = min_lr
        self.warmup_steps = warmup_steps
        super().__init__(optimizer)
        self.total_steps, self.warmup_steps = int(total_steps), int(warmup_steps)
        self.min_lr = float(min_lr)

    def _check_config(self, config: Mapping[str, Any]) -> list[str]:
        problems = []
        total, warmup, min_lr = config["total_steps"], config["warmup_steps"], config["min_lr"]
        if not (_is_int(total) and total >= 1):
            problems.append(f"total_steps must be an int >= 1, got {total!r}")
        if not (_is_int(warmup) and warmup >= 0):
            problems.append(f"warmup_steps must be an int >= 0, got {warmup!r}")
        elif _is_int(total) and warmup >= total:
            problems.append(f"warmup_steps ({warmup}) must be less than total_steps ({total})")
        if not (_is_finite(min_lr) and min_lr >= 0):
            problems.append(f"min_lr must be a finite number >= 0, got {min_lr!r}")
        return problems

    def lr_at(self, step: int) -> float:
        w, total = self.warmup_steps, self.total_steps
        if step < w:
            return self.base_lr * (step + 1) / w
        if step >= total:
            return self.min_lr
        cosine = 0.5 * (1.0 + math.cos(math.pi * (step - w) / (total - w)))
        return self.min_lr + (self.base_lr - self.min_lr) * cosine
