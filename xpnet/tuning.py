"""Random hyper-parameter search, the book's section 6.5 as a small library.

The book's recipe: (1) set a range for each hyper-parameter, (2) draw values at
random from it, train briefly and score on *validation* data (never the test
set), (3) repeat, then narrow the ranges around the best results and search again.

Typical use::

    from xpnet.tuning import LogUniform, narrow, random_search

    space = {"lr": LogUniform(1e-6, 1e-2), "weight_decay": LogUniform(1e-8, 1e-4)}

    def objective(params):          # params -> validation score
        ...                         # train with params["lr"], params["weight_decay"]
        return val_acc

    trials = random_search(objective, space, n_trials=100, seed=0)  # best first
    space2 = narrow(space, trials[:20])    # step 3: search again in here
    trials2 = random_search(objective, space2, n_trials=100, seed=1)

A *space* is a dict ``name -> spec`` with the specs :class:`LogUniform` (scale
parameters such as learning rates: ``10 ** U(log10 low, log10 high)``),
:class:`Uniform` and :class:`Choice`.  All values are drawn up front from one
``numpy.random.Generator(seed)``, in trial order and then in the order of the
space's keys, so the same seed gives the same parameters whatever the objective
does with its own randomness.

The objective returns a score (higher is better by default; ``maximize=False`` for
losses), or a mapping with a ``'score'`` entry whose other entries are kept in
:attr:`Trial.info` (learning curves, for instance).  A non-finite score (a run that
diverged) ranks below every finite one.

This module may import :mod:`xpnet.models`, :mod:`xpnet.optim`,
:mod:`xpnet.datasets` and :mod:`xpnet.backend`; nothing in xpnet imports it.
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "Spec",
    "LogUniform",
    "Uniform",
    "Choice",
    "Trial",
    "sample",
    "random_search",
    "narrow",
]


def _finite_number(owner: str, what: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) \
            or not math.isfinite(value):
        raise ValueError(f"{owner}: {what} must be a finite number, got {value!r}")
    return float(value)


class Spec:
    """Base class of the parameter specs: ``draw(rng)`` one value, ``narrowed(values)``."""

    def draw(self, rng: np.random.Generator) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def narrowed(self, values: Sequence[Any], margin: float = 0.0) -> Spec:  # pragma: no cover
        raise NotImplementedError

    def contains(self, value: Any) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass(frozen=True)
class Uniform(Spec):
    """A value drawn uniformly from ``[low, high]`` (``low == high`` fixes it)."""

    low: float
    high: float

    def __post_init__(self) -> None:
        name = type(self).__name__
        low = _finite_number(name, "low", self.low)
        high = _finite_number(name, "high", self.high)
        if low > high:
            raise ValueError(f"{name}: low ({low!r}) must not exceed high ({high!r})")
        object.__setattr__(self, "low", low)
        object.__setattr__(self, "high", high)

    def draw(self, rng: np.random.Generator) -> float:
        return float(rng.uniform(self.low, self.high))

    def contains(self, value: Any) -> bool:
        return self.low <= float(value) <= self.high

    def narrowed(self, values: Sequence[Any], margin: float = 0.0) -> Uniform:
        """The range spanned by ``values``, widened on each side by ``margin`` times its
        width, and clipped to this range."""
        lo, hi = _span(type(self).__name__, [float(v) for v in values], margin)
        return Uniform(max(self.low, lo), min(self.high, hi))


@dataclass(frozen=True)
class LogUniform(Spec):
    """``10 ** U(log10 low, log10 high)``: uniform in the exponent, the book's choice
    for learning rates and weight decay (``0 < low <= high``)."""

    low: float
    high: float

    def __post_init__(self) -> None:
        name = type(self).__name__
        low = _finite_number(name, "low", self.low)
        high = _finite_number(name, "high", self.high)
        if low <= 0:
            raise ValueError(f"{name}: low must be > 0 (a log scale), got {low!r}")
        if low > high:
            raise ValueError(f"{name}: low ({low!r}) must not exceed high ({high!r})")
        object.__setattr__(self, "low", low)
        object.__setattr__(self, "high", high)

    def draw(self, rng: np.random.Generator) -> float:
        return float(10.0 ** rng.uniform(math.log10(self.low), math.log10(self.high)))

    def contains(self, value: Any) -> bool:
        # a relative tolerance: 10 ** log10(x) need not give x back exactly
        v = float(value)
        return self.low * (1 - 1e-12) <= v <= self.high * (1 + 1e-12)

    def narrowed(self, values: Sequence[Any], margin: float = 0.0) -> LogUniform:
        """The range spanned by ``values`` on the log scale, widened on each side by
        ``margin`` times its width in decades, and clipped to this range."""
        logs = []
        for v in values:
            v = float(v)
            if not v > 0:
                raise ValueError(f"LogUniform.narrowed: values must be > 0, got {v!r}")
            logs.append(math.log10(v))
        lo, hi = _span("LogUniform", logs, margin)
        return LogUniform(max(self.low, 10.0 ** lo), min(self.high, 10.0 ** hi))


@dataclass(frozen=True)
class Choice(Spec):
    """One of ``options``, each equally likely."""

    options: tuple

    def __post_init__(self) -> None:
        options = tuple(self.options)
        if not options:
            raise ValueError("Choice: expected at least one option")
        object.__setattr__(self, "options", options)

    def draw(self, rng: np.random.Generator) -> Any:
        return self.options[int(rng.integers(len(self.options)))]

    def contains(self, value: Any) -> bool:
        return value in self.options

    def narrowed(self, values: Sequence[Any], margin: float = 0.0) -> Choice:
        """The options that occur in ``values``, in their original order."""
        seen = [o for o in self.options if o in list(values)]
        if not seen:
            raise ValueError("Choice.narrowed: none of the values is one of the options")
        return Choice(tuple(seen))


def _span(owner: str, values: list[float], margin: float) -> tuple[float, float]:
    if not values:
        raise ValueError(f"{owner}.narrowed: expected at least one value")
    margin = _finite_number(owner, "margin", margin)
    if margin < 0:
        raise ValueError(f"{owner}.narrowed: margin must be >= 0, got {margin!r}")
    lo, hi = min(values), max(values)
    pad = (hi - lo) * margin
    return lo - pad, hi + pad


Space = Mapping[str, Spec]


def _check_space(space: Any) -> dict[str, Spec]:
    if not isinstance(space, Mapping) or not space:
        raise ValueError("space: expected a non-empty dict name -> LogUniform / Uniform / "
                         f"Choice, got {space!r}")
    bad = [k for k, v in space.items() if not isinstance(v, Spec)]
    if bad:
        raise TypeError(f"space: entries {bad} are not LogUniform / Uniform / Choice specs")
    return dict(space)


def sample(space: Space, rng: np.random.Generator) -> dict[str, Any]:
    """One set of parameters: a value from each spec, in the order of ``space``."""
    return {name: spec.draw(rng) for name, spec in _check_space(space).items()}


@dataclass
class Trial:
    """One evaluation of the objective.

    ``number`` is the order in which it was drawn (0-based), ``score`` what the
    objective returned (NaN when it returned a non-finite value or no number),
    ``info`` the other entries of a mapping result, ``seconds`` its wall time.
    """

    number: int
    params: dict[str, Any]
    score: float
    info: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"number": self.number, "params": dict(self.params),
                "score": self.score if math.isfinite(self.score) else None,
                "seconds": self.seconds}


def _score_of(result: Any) -> tuple[float, dict[str, Any]]:
    info: dict[str, Any] = {}
    if isinstance(result, Mapping):
        if "score" not in result:
            raise ValueError("random_search: an objective returning a mapping must put "
                             "the score under 'score'")
        info = {k: v for k, v in result.items() if k != "score"}
        result = result["score"]
    try:
        score = float(result)
    except (TypeError, ValueError):
        raise TypeError(f"random_search: the objective must return a number or a mapping "
                        f"with 'score', got {type(result).__name__}") from None
    return (score if math.isfinite(score) else math.nan), info


def _rank_key(maximize: bool) -> Callable[[Trial], tuple]:
    def key(t: Trial) -> tuple:
        finite = math.isfinite(t.score)
        value = (-t.score if maximize else t.score) if finite else 0.0
        return (not finite, value, t.number)  # finite first, best first, then draw order
    return key


def random_search(objective: Callable[[dict[str, Any]], Any], space: Space, n_trials: int,
                  seed: int | np.random.Generator | None = None, *, maximize: bool = True,
                  callback: Callable[[Trial], None] | None = None,
                  progress: Iterable | Callable[[Iterable], Iterable] | None = None
                  ) -> list[Trial]:
    """Evaluate ``objective`` at ``n_trials`` random points of ``space``.

    Args:
        objective: ``f(params) -> score`` or ``-> {'score': s, ...}``.
        space: ``name -> LogUniform / Uniform / Choice``.
        n_trials: number of evaluations (>= 1).
        seed: seed (or Generator) of the parameter draws; all parameters are drawn
            before the first evaluation.
        maximize: True when higher scores are better (accuracy), False for losses.
        callback: called with each finished :class:`Trial`.
        progress: an optional wrapper for the trial loop, such as ``tqdm.tqdm``.

    Returns:
        the trials, best first; ties keep the draw order; non-finite scores last.
    """
    if isinstance(n_trials, bool) or not isinstance(n_trials, numbers.Integral) \
            or n_trials < 1:
        raise ValueError(f"random_search: n_trials must be an integer >= 1, got {n_trials!r}")
    space = _check_space(space)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    drawn = [sample(space, rng) for _ in range(int(n_trials))]
    loop: Iterable = range(len(drawn))
    if progress is not None:
        loop = progress(loop)
    trials: list[Trial] = []
    for i in loop:
        params = drawn[i]
        start = time.perf_counter()
        score, info = _score_of(objective(dict(params)))
        trial = Trial(i, params, score, info, time.perf_counter() - start)
        trials.append(trial)
        if callback is not None:
            callback(trial)
    return sorted(trials, key=_rank_key(bool(maximize)))


def narrow(space: Space, best_trials: Sequence[Trial] | Sequence[Mapping[str, Any]],
           margin: float = 0.0) -> dict[str, Spec]:
    """The space around ``best_trials`` for a second round (the book's step 3).

    Each spec shrinks to the values the best trials used: LogUniform to their span
    in decades, Uniform to their span, Choice to the options they used;
    ``margin`` widens each numeric range on both sides by that fraction of its
    width, without leaving the original range.  ``best_trials`` are
    :class:`Trial` objects or plain ``params`` dicts.
    """
    space = _check_space(space)
    rows = [t.params if isinstance(t, Trial) else t for t in best_trials]
    if not rows:
        raise ValueError("narrow: expected at least one trial")
    out: dict[str, Spec] = {}
    for name, spec in space.items():
        missing = [i for i, r in enumerate(rows) if name not in r]
        if missing:
            raise KeyError(f"narrow: trials {missing} have no value for {name!r}")
        out[name] = spec.narrowed([r[name] for r in rows], margin)
    return out
