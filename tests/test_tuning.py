"""xpnet.tuning: random search and narrowing on cheap synthetic objectives."""

import math

import numpy as np
import pytest

from xpnet.tuning import Choice, LogUniform, Trial, Uniform, narrow, random_search, sample


def bowl(params):
    """Best at lr = 1e-3, momentum = 0.9; the kind 'sgd' adds a penalty."""
    score = -(math.log10(params["lr"]) + 3) ** 2 - (params["momentum"] - 0.9) ** 2
    return score - (0.5 if params["kind"] == "sgd" else 0.0)


SPACE = {"lr": LogUniform(1e-6, 1e-1), "momentum": Uniform(0.0, 1.0),
         "kind": Choice(("sgd", "adam"))}


def test_same_seed_same_trials_different_seed_different():
    a = random_search(bowl, SPACE, 30, seed=7)
    b = random_search(bowl, SPACE, 30, seed=7)
    c = random_search(bowl, SPACE, 30, seed=8)
    assert [(t.number, t.params, t.score) for t in a] == [(t.number, t.params, t.score) for t in b]
    assert [t.params for t in a] != [t.params for t in c]


def test_draws_do_not_depend_on_the_objective():
    def noisy(params):
        np.random.default_rng().random(100)  # the objective's own randomness
        return 0.0

    a = sorted(random_search(noisy, SPACE, 10, seed=3), key=lambda t: t.number)
    b = sorted(random_search(bowl, SPACE, 10, seed=3), key=lambda t: t.number)
    assert [t.params for t in a] == [t.params for t in b]


def test_sorted_best_first_and_values_in_range():
    trials = random_search(bowl, SPACE, 50, seed=0)
    scores = [t.score for t in trials]
    assert scores == sorted(scores, reverse=True)
    assert sorted(t.number for t in trials) == list(range(50))
    for t in trials:
        assert 1e-6 <= t.params["lr"] <= 1e-1
        assert 0.0 <= t.params["momentum"] <= 1.0
        assert t.params["kind"] in ("sgd", "adam")
        assert t.seconds >= 0


def test_minimize_sorts_ascending():
    trials = random_search(lambda p: p["x"], {"x": Uniform(-1, 1)}, 20, seed=1, maximize=False)
    xs = [t.score for t in trials]
    assert xs == sorted(xs)


def test_log_uniform_is_uniform_in_the_exponent():
    rng = np.random.default_rng(0)
    spec = LogUniform(1e-6, 1e-2)
    exps = np.log10([spec.draw(rng) for _ in range(4000)])
    assert exps.min() >= -6 and exps.max() <= -2
    counts, _ = np.histogram(exps, bins=4, range=(-6, -2))
    assert counts.min() > 850  # about 1000 per decade, not piled at the top


def test_non_finite_scores_rank_last_and_mapping_results_keep_info():
    def objective(params):
        if params["x"] > 0.5:
            return {"score": float("nan"), "curve": [1, 2]}
        return {"score": params["x"], "curve": [params["x"]]}

    trials = random_search(objective, {"x": Uniform(0, 1)}, 30, seed=2)
    finite = [t for t in trials if math.isfinite(t.score)]
    assert 0 < len(finite) < 30
    assert trials[: len(finite)] == finite
    assert all("curve" in t.info for t in trials)
    assert trials[0].as_dict()["score"] == trials[0].score
    assert trials[-1].as_dict()["score"] is None


def test_callback_sees_every_trial_in_draw_order():
    seen = []
    random_search(bowl, SPACE, 5, seed=0, callback=lambda t: seen.append(t.number))
    assert seen == [0, 1, 2, 3, 4]


def test_narrow_to_the_span_of_the_best_trials():
    trials = random_search(bowl, SPACE, 200, seed=0)
    best = trials[:20]
    space2 = narrow(SPACE, best)
    lrs = [t.params["lr"] for t in best]
    assert space2["lr"] == LogUniform(min(lrs), max(lrs))
    moms = [t.params["momentum"] for t in best]
    assert space2["momentum"] == Uniform(min(moms), max(moms))
    assert set(space2["kind"].options) == {t.params["kind"] for t in best}
    # the narrowed range holds the optimum and is much narrower than the first
    assert space2["lr"].low <= 1e-3 <= space2["lr"].high
    assert math.log10(space2["lr"].high / space2["lr"].low) < 0.5 * 5
    # a second round in it does better on average than the first
    trials2 = random_search(bowl, space2, 50, seed=1)
    assert np.median([t.score for t in trials2]) > np.median([t.score for t in trials])
    assert all(space2["lr"].contains(t.params["lr"]) for t in trials2)


def test_narrow_margin_widens_but_stays_inside_the_original_range():
    space = {"lr": LogUniform(1e-4, 1e-2), "m": Uniform(0, 1)}
    rows = [{"lr": 1e-3, "m": 0.5}, {"lr": 1e-2, "m": 0.9}]
    out = narrow(space, rows, margin=0.5)
    assert out["lr"].low == pytest.approx(10 ** -3.5)
    assert out["lr"].high == pytest.approx(1e-2)  # clipped
    assert (out["m"].low, out["m"].high) == (pytest.approx(0.3), 1.0)
    single = narrow(space, rows[:1])  # one trial: a fixed value
    assert single["lr"].low == single["lr"].high == pytest.approx(1e-3)
    assert sample(single, np.random.default_rng(0))["lr"] == pytest.approx(1e-3)


def test_narrow_accepts_trial_objects_and_dicts_alike():
    t = Trial(0, {"x": 0.25}, 1.0)
    space = {"x": Uniform(0, 1)}
    assert narrow(space, [t]) == narrow(space, [{"x": 0.25}])


@pytest.mark.parametrize("make", [
    lambda: LogUniform(0, 1),
    lambda: LogUniform(1e-2, 1e-3),
    lambda: Uniform(1, 0),
    lambda: Uniform(0, float("inf")),
    lambda: Choice(()),
])
def test_bad_specs_are_refused(make):
    with pytest.raises(ValueError):
        make()


def test_bad_search_arguments_are_refused():
    with pytest.raises(ValueError):
        random_search(bowl, SPACE, 0)
    with pytest.raises(ValueError):
        random_search(bowl, {}, 3)
    with pytest.raises(TypeError):
        random_search(bowl, {"lr": (1e-6, 1e-2)}, 3)
    with pytest.raises(TypeError):
        random_search(lambda p: "good", {"x": Uniform(0, 1)}, 1)
    with pytest.raises(ValueError):
        random_search(lambda p: {"acc": 1.0}, {"x": Uniform(0, 1)}, 1)
    with pytest.raises(KeyError):
        narrow({"x": Uniform(0, 1)}, [{"y": 0.5}])
    with pytest.raises(ValueError):
        narrow({"x": Uniform(0, 1)}, [])
