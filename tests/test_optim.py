"""Tests of xpnet.optim: update rules, in-place float32, checkpoints, schedules, clipping.

The reference values are computed here in plain NumPy float64, written out step by
step from the update rules (never by calling the optimizer classes).
"""

from __future__ import annotations

import copy
import json
import math
import tracemalloc

import numpy as np
import pytest

from xpnet.backend import BackendMismatchError, to_cpu
from xpnet.optim import (
    OPTIMIZERS,
    SGD,
    AdaGrad,
    Adam,
    AdamW,
    CosineLR,
    GradientMismatchError,
    Momentum,
    Nesterov,
    Optimizer,
    RMSprop,
    StepLR,
    clip_grad_norm,
    default_decay_filter,
    get_optimizer,
    global_grad_norm,
)

NAMES = ["sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamw"]
EPS = 1e-7
N_STEPS = 3


# --------------------------------------------------------------------- helpers
def ptr(a) -> int:
    """Address of an array's data on either backend."""
    if isinstance(a, np.ndarray):
        return a.__array_interface__["data"][0]
    return a.data.ptr


def make_problem(rng, n_steps=N_STEPS):
    """Float64 host params {'W', 'b'} and a list of grads dicts, one per step."""
    params = {"W": rng.standard_normal((3, 4)), "b": rng.standard_normal(4)}
    grads = [{k: rng.standard_normal(v.shape) for k, v in params.items()}
             for _ in range(n_steps)]
    return params, grads


def to_backend(xp, arrays, dtype):
    """Copies of host arrays on the backend (never the host arrays themselves)."""
    return {k: xp.array(v, dtype=dtype, copy=True) for k, v in arrays.items()}


# ------------------------------------------------ float64 references, by hand
def ref_sgd(p, gs, key, lr=0.01):
    out = []
    for g in gs:
        p = p - lr * g
        out.append(p)
    return out


def ref_momentum(p, gs, key, lr=0.01, momentum=0.9):
    v = np.zeros_like(p)
    out = []
    for g in gs:
        v = momentum * v - lr * g
        p = p + v
        out.append(p)
    return out


def ref_nesterov(p, gs, key, lr=0.01, momentum=0.9):
    v = np.zeros_like(p)
    out = []
    for g in gs:
        v = momentum * v - lr * g
        p = p + momentum * momentum * v - (1 + momentum) * lr * g
        out.append(p)
    return out


def ref_adagrad(p, gs, key, lr=0.01):
    h = np.zeros_like(p)
    out = []
    for g in gs:
        h = h + g * g
        p = p - lr * g / (np.sqrt(h) + EPS)
        out.append(p)
    return out


def ref_rmsprop(p, gs, key, lr=0.01, decay_rate=0.99):
    h = np.zeros_like(p)
    out = []
    for g in gs:
        h = decay_rate * h + (1 - decay_rate) * g * g
        p = p - lr * g / (np.sqrt(h) + EPS)
        out.append(p)
    return out


def ref_adam(p, gs, key, lr=0.001, beta1=0.9, beta2=0.999, weight_decay=0.0):
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    out = []
    for t, g in enumerate(gs, start=1):
        if weight_decay and key.startswith("W"):
            p = p - lr * weight_decay * p  # AdamW's decoupled decay, before the step
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        # bias correction: 1 - beta**t, folded into the step size as in the book
        lr_t = lr * math.sqrt(1 - beta2**t) / (1 - beta1**t)
        p = p - lr_t * m / (np.sqrt(v) + EPS)
        out.append(p)
    return out


def ref_adamw(p, gs, key, lr=0.001, beta1=0.9, beta2=0.999, weight_decay=0.01):
    return ref_adam(p, gs, key, lr, beta1, beta2, weight_decay)


REFERENCES = {
    "sgd": ref_sgd, "momentum": ref_momentum, "nesterov": ref_nesterov,
    "adagrad": ref_adagrad, "rmsprop": ref_rmsprop, "adam": ref_adam, "adamw": ref_adamw,
}


def reference(name, params, grads, **hyper):
    """{key: [params after step 1, 2, 3]} from the float64 reference."""
    return {k: REFERENCES[name](p, [g[k] for g in grads], k, **hyper)
            for k, p in params.items()}


# ------------------------------------------------------------- update rules
@pytest.mark.parametrize("name", NAMES)
def test_first_steps_match_reference_float64(xp, rng, name):
    params0, grads = make_problem(rng)
    expected = reference(name, params0, grads)
    opt = get_optimizer(name)
    params = to_backend(xp, params0, xp.float64)
    for step, g in enumerate(grads):
        opt.update(params, to_backend(xp, g, xp.float64))
        for k in params:
            got_delta = to_cpu(params[k]) - params0[k]
            want_delta = expected[k][step] - params0[k]
            np.testing.assert_allclose(got_delta, want_delta, rtol=1e-9, atol=1e-15,
                                       err_msg=f"{name} step {step + 1} key {k}")
    assert opt.step_count == N_STEPS


@pytest.mark.parametrize("name, hyper", [
    ("sgd", {"lr": 0.5}),
    ("momentum", {"lr": 0.1, "momentum": 0.5}),
    ("nesterov", {"lr": 0.1, "momentum": 0.5}),
    ("adagrad", {"lr": 0.3}),
    ("rmsprop", {"lr": 0.05, "decay_rate": 0.5}),
    ("adam", {"lr": 0.1, "beta1": 0.5, "beta2": 0.75}),
    ("adamw", {"lr": 0.1, "beta1": 0.5, "beta2": 0.75, "weight_decay": 0.3}),
])
def test_first_steps_match_reference_custom_hyper(xp, rng, name, hyper):
    params0, grads = make_problem(rng)
    expected = reference(name, params0, grads, **hyper)
    opt = get_optimizer(name, **hyper)
    params = to_backend(xp, params0, xp.float64)
    for step, g in enumerate(grads):
        opt.update(params, to_backend(xp, g, xp.float64))
        for k in params:
            np.testing.assert_allclose(to_cpu(params[k]) - params0[k],
                                       expected[k][step] - params0[k], rtol=1e-9, atol=1e-15)


def test_adam_bias_correction_first_steps_by_hand(xp):
    # one parameter p = 1 with gradient 0.5, then 0.5 again; defaults lr=1e-3,
    # beta1=0.9, beta2=0.999.
    p = xp.asarray([1.0])
    opt = Adam()
    opt.update({"w": p}, {"w": xp.asarray([0.5])})
    # step 1: m = 0.1*0.5 = 0.05, v = 0.001*0.25 = 0.00025; bias-corrected
    # m_hat = 0.05/0.1 = 0.5, v_hat = 0.00025/0.001 = 0.25, so the step is
    # lr*0.5/(0.5 + eps/sqrt(1-0.999)) with the book's epsilon placement: ~lr
    step1 = 0.001 * 0.5 / (0.5 + 1e-7 / math.sqrt(0.001))
    assert float(to_cpu(p)[0]) == pytest.approx(1.0 - step1, rel=1e-14, abs=0)
    assert step1 == pytest.approx(0.001, rel=1e-5)  # the bias correction makes it ~lr
    opt.update({"w": p}, {"w": xp.asarray([0.5])})
    # step 2: m = 0.9*0.05 + 0.05 = 0.095, v = 0.999*0.00025 + 0.00025 = 0.00049975
    # lr_t = 0.001*sqrt(1-0.999**2)/(1-0.9**2) = 0.001*sqrt(0.001999)/0.19
    lr_t = 0.001 * math.sqrt(0.001999) / 0.19
    step2 = lr_t * 0.095 / (math.sqrt(0.00049975) + 1e-7)
    assert float(to_cpu(p)[0]) == pytest.approx(1.0 - step1 - step2, rel=1e-14, abs=0)


@pytest.mark.parametrize("name", NAMES)
def test_float32_updates_in_place(xp, rng, name):
    params0, grads = make_problem(rng)
    expected = reference(name, params0, grads)
    opt = get_optimizer(name)
    params = to_backend(xp, params0, xp.float32)
    originals = dict(params)
    addresses = {k: ptr(v) for k, v in params.items()}
    for step, g in enumerate(grads):
        opt.update(params, to_backend(xp, g, xp.float32))
        for k, p in params.items():
            assert p is originals[k]
            assert ptr(p) == addresses[k]
            assert p.dtype == np.float32
            np.testing.assert_allclose(to_cpu(p), expected[k][step], rtol=1e-5, atol=1e-6)
    for table in opt.state_dict()["slots"].values():
        for a in table.values():
            assert a.dtype == np.float32
            assert type(a) is type(params["W"])  # state lives on the params' backend


@pytest.mark.parametrize("name", NAMES)
def test_float64_grads_keep_float32_params(xp, rng, name):
    params0, grads = make_problem(rng)
    params = to_backend(xp, params0, xp.float32)
    opt = get_optimizer(name)
    opt.update(params, to_backend(xp, grads[0], xp.float64))
    assert all(p.dtype == np.float32 for p in params.values())


@pytest.mark.parametrize("name", NAMES)
def test_steady_state_update_allocates_no_temporaries(xp, name):
    n = 100_000
    params = {"W": xp.ones(n, dtype=xp.float32)}
    grads = {"W": xp.full(n, 0.5, dtype=xp.float32)}
    opt = get_optimizer(name)
    opt.update(params, grads)  # allocates state and the scratch buffer
    if xp is np:
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            opt.update(params, grads)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak - before < n * 4 // 4, f"{name} allocated {peak - before} bytes"
    else:  # count every allocation the update asks CuPy for, freed or not
        sizes = []
        previous = xp.cuda.get_allocator()

        def counting(size):
            sizes.append(size)
            return previous(size)

        xp.cuda.set_allocator(counting)
        try:
            opt.update(params, grads)
        finally:
            xp.cuda.set_allocator(previous)
        assert sizes == [], f"{name} allocated {sizes} bytes"


# ------------------------------------------------------------- errors
def test_a_parameter_without_gradient_is_left_untouched(xp, rng):
    """Frozen parameters: no gradient, no update, no state."""
    params0, grads = make_problem(rng)
    params = to_backend(xp, params0, xp.float32)
    opt = Adam()
    g = to_backend(xp, grads[0], xp.float32)
    del g["b"]
    opt.update(params, g)
    assert opt.step_count == 1
    np.testing.assert_array_equal(to_cpu(params["b"]), params0["b"].astype(np.float32))
    assert not np.array_equal(to_cpu(params["W"]), params0["W"].astype(np.float32))
    assert "b" not in opt.state_dict()["slots"]["m"]


def test_gradient_of_an_unknown_name_is_refused_and_changes_nothing(xp, rng):
    params0, grads = make_problem(rng)
    params = to_backend(xp, params0, xp.float32)
    opt = Adam()
    g = to_backend(xp, grads[0], xp.float32)
    g["W9"] = g["W"]
    with pytest.raises(GradientMismatchError, match=r"gradient for 'W9', which is not a "
                                                    r"parameter") as info:
        opt.update(params, g)
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)
    assert opt.step_count == 0
    for k in params:  # 'W' was not updated either
        np.testing.assert_array_equal(to_cpu(params[k]), params0[k].astype(np.float32))


def test_shape_mismatch_names_key_and_both_shapes(xp, rng):
    params = {"W": xp.zeros((3, 4)), "b": xp.zeros(4)}
    grads = {"W": xp.zeros((4, 3)), "b": xp.zeros(5)}
    with pytest.raises(ValueError) as info:
        SGD().update(params, grads)
    msg = str(info.value)
    assert "'W'" in msg and "(4, 3)" in msg and "(3, 4)" in msg
    assert "'b'" in msg and "(5,)" in msg and "(4,)" in msg
    np.testing.assert_array_equal(to_cpu(params["W"]), np.zeros((3, 4)))


def test_state_shape_change_is_reported(xp):
    opt = Momentum()
    opt.update({"W": xp.zeros((2, 2))}, {"W": xp.ones((2, 2))})
    with pytest.raises(ValueError, match=r"state 'v' of param 'W' has shape \(2, 2\)"):
        opt.update({"W": xp.zeros((3, 2))}, {"W": xp.ones((3, 2))})
    opt.reset()
    opt.update({"W": xp.zeros((3, 2))}, {"W": xp.ones((3, 2))})
    assert opt.step_count == 1


def test_mixed_backends_are_rejected(xp):
    if xp is np:
        pytest.skip("needs CuPy arrays to mix with NumPy ones")
    params = {"W": xp.zeros(3)}
    with pytest.raises(BackendMismatchError, match="'W'"):
        SGD().update(params, {"W": np.zeros(3)})


def test_lr_attribute_is_a_python_float(xp):
    opt = Adam()
    opt.lr = np.float64(0.01)  # e.g. set by user code from a NumPy computation
    assert type(opt.lr) is float and opt.lr == 0.01
    params = {"W": xp.ones(3, dtype=xp.float32)}
    opt.update(params, {"W": xp.ones(3, dtype=xp.float32)})
    assert params["W"].dtype == np.float32
    with pytest.raises(ValueError, match="lr must be a finite number >= 0"):
        opt.lr = -1.0
    assert opt.lr == 0.01


def test_integer_params_are_rejected(xp):
    with pytest.raises(ValueError, match="floating-point"):
        SGD().update({"W": xp.zeros(3, dtype=xp.int32)}, {"W": xp.zeros(3, dtype=xp.int32)})


@pytest.mark.parametrize("cls, kwargs, match", [
    (SGD, {"lr": -0.1}, "lr must be >= 0"),
    (SGD, {"lr": float("nan")}, "lr must be a finite number"),
    (Momentum, {"momentum": 1.0}, r"momentum must be in \[0, 1\)"),
    (RMSprop, {"decay_rate": -0.5}, "decay_rate"),
    (Adam, {"beta1": 1.0, "beta2": 2.0}, "beta1.*beta2"),
    (AdamW, {"weight_decay": -1.0}, "weight_decay"),
    (SGD, {"clip_norm": 0.0}, "clip_norm must be > 0"),
])
def test_bad_hyperparameters(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


# ------------------------------------------------------------- AdamW decay
def test_default_decay_filter():
    assert default_decay_filter("W1")
    assert default_decay_filter("layers.0.W")
    assert default_decay_filter("conv/W")
    assert not default_decay_filter("b1")
    assert not default_decay_filter("gamma1")
    assert not default_decay_filter("beta1")


@pytest.mark.parametrize("decay_filter, decayed", [
    (default_decay_filter, {"W1"}),
    (None, {"W1", "b1", "gamma1"}),
    (lambda key: key.startswith("g"), {"gamma1"}),
])
def test_adamw_decay_filter(xp, decay_filter, decayed):
    # zero gradients: Adam's step is 0, so only the decay p -= lr*wd*p acts
    params = {k: xp.full(3, 2.0, dtype=xp.float32) for k in ("W1", "b1", "gamma1")}
    grads = {k: xp.zeros(3, dtype=xp.float32) for k in params}
    opt = AdamW(lr=0.1, weight_decay=0.5, decay_filter=decay_filter)
    opt.update(params, grads)
    for k, p in params.items():
        want = 2.0 - 0.1 * 0.5 * 2.0 if k in decayed else 2.0
        np.testing.assert_allclose(to_cpu(p), np.full(3, want), rtol=1e-6)


def test_adamw_rejects_non_callable_filter():
    with pytest.raises(TypeError, match="decay_filter"):
        AdamW(decay_filter="W")


# ------------------------------------------------------------- checkpoints
def _hyper_for(name):
    """Non-default hyperparameters, so that load_state_dict must restore them."""
    return {"sgd": {"lr": 0.3}, "momentum": {"lr": 0.05, "momentum": 0.7},
            "nesterov": {"lr": 0.05, "momentum": 0.7}, "adagrad": {"lr": 0.2},
            "rmsprop": {"lr": 0.02, "decay_rate": 0.9},
            "adam": {"lr": 0.01, "beta1": 0.8, "beta2": 0.99},
            "adamw": {"lr": 0.01, "beta1": 0.8, "beta2": 0.99, "weight_decay": 0.1}}[name]


def _assert_bitwise_equal(a, b):
    a, b = to_cpu(a), to_cpu(b)
    assert a.dtype == b.dtype and a.shape == b.shape
    assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_continues_bitwise(xp, rng, name):
    params0, grads = make_problem(rng, n_steps=5)
    opt_a = get_optimizer(name, **_hyper_for(name))
    params_a = to_backend(xp, params0, xp.float32)
    for g in grads[:2]:
        opt_a.update(params_a, to_backend(xp, g, xp.float32))

    state = opt_a.state_dict()
    assert state["type"] == type(opt_a).__name__
    assert state["step"] == 2
    assert set(state["slots"]) == set(type(opt_a).slot_names)
    json.dumps({k: state[k] for k in ("type", "hyper", "step")})  # JSON-able
    for table in state["slots"].values():
        assert set(table) == {"W", "b"}
        for k, a in table.items():
            assert type(a) is type(params_a[k]) and a.dtype == np.float32
    snapshot = {s: {k: to_cpu(a).copy() for k, a in t.items()}
                for s, t in state["slots"].items()}

    # b: fresh, different hyperparameters, loaded without params
    opt_b = get_optimizer(name, lr=123.0)
    opt_b.load_state_dict(state)
    assert opt_b.hyper() == opt_a.hyper() and opt_b.step_count == 2
    # c: loaded through the host (a checkpoint file), moved back via params
    host_state = copy.deepcopy({**state, "slots": snapshot})
    params_b = {k: v.copy() for k, v in params_a.items()}
    params_c = {k: v.copy() for k, v in params_a.items()}
    opt_c = get_optimizer(name)
    opt_c.load_state_dict(host_state, params=params_c)
    for table in opt_c.state_dict()["slots"].values():
        assert all(type(a) is type(params_c["W"]) for a in table.values())

    for g in grads[2:]:
        for opt, params in ((opt_a, params_a), (opt_b, params_b), (opt_c, params_c)):
            opt.update(params, to_backend(xp, g, xp.float32))
        for k in params_a:
            _assert_bitwise_equal(params_a[k], params_b[k])
            _assert_bitwise_equal(params_a[k], params_c[k])
    # the exported arrays were copies: the later steps did not change them
    for s, table in state["slots"].items():
        for k, a in table.items():
            _assert_bitwise_equal(a, snapshot[s][k])


def _adam_after_one_step(xp):
    opt = Adam(lr=0.01)
    params = {"W": xp.ones((3, 4), dtype=xp.float32), "b": xp.ones(4, dtype=xp.float32)}
    opt.update(params, {k: xp.full(v.shape, 0.5, dtype=xp.float32) for k, v in params.items()})
    return opt, params


def test_load_state_dict_reports_every_problem_and_changes_nothing(xp):
    opt, params = _adam_after_one_step(xp)
    good = opt.state_dict()
    bad = {
        "type": "Momentum",
        "hyper": {"lr": -1.0, "beta1": 0.9, "clip_norm": None, "momentum": 0.9},
        "step": -3,
        "slots": {
            "m": {"W": xp.zeros((2, 2), dtype=xp.float32), "b": xp.zeros(4, dtype=xp.float32)},
            "v": {"W": xp.zeros((3, 4), dtype=xp.float32)},
            "h": {},
        },
        "extra": 1,
    }
    target = Adam(lr=0.5)
    target.load_state_dict(good)
    before = target.state_dict()
    with pytest.raises(ValueError) as info:
        target.load_state_dict(bad)
    msg = str(info.value)
    for fragment in [
        "type is 'Momentum', this optimizer is 'Adam'",
        "unexpected entry 'extra'",
        "hyper: missing 'beta2'",
        "hyper: unexpected 'momentum'",
        "step must be a non-negative int, got -3",
        "slots: unexpected 'h'",
        "slots['v']: no state for key 'b'",
        "slots['v']['W'] has shape (3, 4), other slots have (2, 2)",
        "nothing was loaded",
    ]:
        assert fragment in msg, f"{fragment!r} missing from:\n{msg}"
    after = target.state_dict()
    assert after["hyper"] == before["hyper"] and after["step"] == before["step"]
    for s, table in before["slots"].items():
        assert set(after["slots"][s]) == set(table)
        for k, a in table.items():
            _assert_bitwise_equal(after["slots"][s][k], a)


def test_load_state_dict_checks_keys_and_shapes_against_params(xp):
    opt, params = _adam_after_one_step(xp)
    state = opt.state_dict()
    other = {"W": xp.ones((4, 3), dtype=xp.float32), "c": xp.ones(2, dtype=xp.float32)}
    fresh = Adam()
    with pytest.raises(ValueError) as info:
        fresh.load_state_dict(state, params=other)
    msg = str(info.value)
    assert "no state for key 'c'" in msg
    assert "key 'b' is not in params" in msg
    assert "key 'W' has shape (3, 4), params has shape (4, 3)" in msg
    assert fresh.step_count == 0 and fresh.lr == 0.001
    assert all(not t for t in fresh.state_dict()["slots"].values())


def test_load_state_dict_checks_against_state_already_held(xp):
    opt, params = _adam_after_one_step(xp)
    state = opt.state_dict()
    used = Adam()
    used.update({"W": xp.ones(2)}, {"W": xp.ones(2)})
    with pytest.raises(ValueError, match="'W' has shape \\(3, 4\\), the state this"):
        used.load_state_dict(state)


def test_load_state_dict_rejects_non_dict():
    with pytest.raises(ValueError, match="expected a dict"):
        SGD().load_state_dict([1, 2])


def test_sgd_state_dict_has_no_slots(xp):
    opt = SGD(lr=0.1)
    opt.update({"W": xp.ones(2)}, {"W": xp.ones(2)})
    state = opt.state_dict()
    assert state == {"type": "SGD", "hyper": {"lr": 0.1, "clip_norm": None},
                     "step": 1, "slots": {}}
    fresh = SGD()
    fresh.load_state_dict(state)
    assert fresh.lr == 0.1 and fresh.step_count == 1


# ------------------------------------------------------------- schedules
def test_step_lr_values():
    opt = SGD(lr=0.1)
    sched = StepLR(opt, step_size=3, gamma=0.5)
    assert opt.lr == 0.1 and sched.base_lr == 0.1
    lrs = [sched.step() for _ in range(7)]
    assert lrs == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.05, 0.025, 0.025], rel=1e-15)
    assert opt.lr == lrs[-1] and type(opt.lr) is float


def test_cosine_lr_values_with_warmup():
    opt = Adam(lr=1.0)
    sched = CosineLR(opt, total_steps=10, min_lr=0.1, warmup_steps=2)
    assert opt.lr == 0.5  # warm-up step 0: 1.0 * 1/2
    lrs = {t: sched.step() for t in range(1, 13)}
    assert lrs[1] == 1.0  # warm-up step 1: 1.0 * 2/2
    assert lrs[2] == pytest.approx(1.0)  # cosine starts at the base lr
    # t=4: progress (4-2)/(10-2) = 1/4 -> 0.1 + 0.9 * (1 + cos(pi/4)) / 2
    assert lrs[4] == pytest.approx(0.1 + 0.45 * (1 + math.sqrt(0.5)))
    assert lrs[6] == pytest.approx(0.55)  # halfway: 0.1 + 0.9/2
    assert lrs[10] == pytest.approx(0.1)
    assert lrs[12] == 0.1
    assert all(type(v) is float for v in lrs.values())


def test_cosine_lr_without_warmup():
    opt = SGD(lr=0.2)
    sched = CosineLR(opt, total_steps=4)
    assert opt.lr == 0.2
    assert [sched.step() for _ in range(5)] == pytest.approx(
        [0.1 + 0.1 * math.sqrt(0.5), 0.1, 0.1 - 0.1 * math.sqrt(0.5), 0.0, 0.0], abs=1e-15)


def test_schedule_keeps_float32_params(xp):
    params = {"W": xp.ones(3, dtype=xp.float32)}
    opt = Momentum(lr=0.1)
    sched = CosineLR(opt, total_steps=5, warmup_steps=1)
    for _ in range(3):
        opt.update(params, {"W": xp.ones(3, dtype=xp.float32)})
        sched.step()
    assert params["W"].dtype == np.float32


def test_schedule_state_round_trip():
    opt = SGD(lr=1.0)
    sched = CosineLR(opt, total_steps=20, min_lr=0.01, warmup_steps=3)
    for _ in range(7):
        sched.step()
    state = sched.state_dict()
    json.dumps(state)
    opt2 = SGD(lr=5.0)
    sched2 = CosineLR(opt2, total_steps=2)
    sched2.load_state_dict(state)
    assert opt2.lr == opt.lr and sched2.last_step == 7
    assert [sched2.step() for _ in range(5)] == [sched.step() for _ in range(5)]


def test_schedule_load_errors_change_nothing():
    opt = SGD(lr=1.0)
    sched = StepLR(opt, step_size=2)
    sched.step()
    with pytest.raises(ValueError) as info:
        sched.load_state_dict({"type": "CosineLR", "base_lr": -1.0, "last_step": 2.5,
                               "step_size": 0, "gamma": 0.1})
    msg = str(info.value)
    for fragment in ["type is 'CosineLR'", "base_lr must be", "last_step must be",
                     "step_size must be an int >= 1"]:
        assert fragment in msg
    assert sched.last_step == 1 and sched.base_lr == 1.0 and opt.lr == 1.0


@pytest.mark.parametrize("make, match", [
    (lambda o: StepLR(o, step_size=0), "step_size"),
    (lambda o: StepLR(o, step_size=2, gamma=0.0), "gamma"),
    (lambda o: CosineLR(o, total_steps=0), "total_steps"),
    (lambda o: CosineLR(o, total_steps=5, warmup_steps=5), "warmup_steps"),
    (lambda o: CosineLR(o, total_steps=5, min_lr=-1.0), "min_lr"),
])
def test_bad_schedule_settings(make, match):
    opt = SGD(lr=0.1)
    with pytest.raises(ValueError, match=match):
        make(opt)
    assert opt.lr == 0.1


# ------------------------------------------------------------- clipping
def test_clip_grad_norm_scales_to_max_norm(xp):
    a = xp.asarray([3.0, 0.0], dtype=xp.float32)
    b = xp.asarray([[0.0], [4.0]], dtype=xp.float32)
    grads = {"a": a, "b": b}
    total = clip_grad_norm(grads, 1.0)
    assert type(total) is float and total == pytest.approx(5.0)
    assert grads["a"] is a and grads["b"] is b
    assert a.dtype == np.float32 and b.dtype == np.float32
    np.testing.assert_allclose(to_cpu(a), [0.6, 0.0], rtol=1e-6)
    np.testing.assert_allclose(to_cpu(b), [[0.0], [0.8]], rtol=1e-6)


def test_clip_grad_norm_random(xp, rng):
    host = [rng.standard_normal((5, 6)), rng.standard_normal(6), rng.standard_normal((2, 3, 4))]
    want = math.sqrt(sum(float(np.sum(h * h)) for h in host))
    grads = [xp.array(h, copy=True) for h in host]
    assert global_grad_norm(grads) == pytest.approx(want, rel=1e-12)
    assert clip_grad_norm(grads, 2.0) == pytest.approx(want, rel=1e-12)
    for g, h in zip(grads, host, strict=True):
        np.testing.assert_allclose(to_cpu(g), h * (2.0 / want), rtol=1e-12)
    assert global_grad_norm(grads) == pytest.approx(2.0, rel=1e-12)


def test_clip_grad_norm_leaves_small_grads_alone(xp, rng):
    host = {"W": rng.standard_normal((3, 3)).astype(np.float32)}
    grads = {"W": xp.array(host["W"], copy=True)}
    norm = float(np.linalg.norm(host["W"].astype(np.float64)))
    assert clip_grad_norm(grads, norm * 1.01) == pytest.approx(norm, rel=1e-6)
    assert to_cpu(grads["W"]).tobytes() == host["W"].tobytes()


def test_clip_grad_norm_float32_overflow_and_non_finite(xp):
    big = xp.asarray([3e30, 4e30], dtype=xp.float32)  # float32 squares overflow
    assert clip_grad_norm([big], 1.0) == pytest.approx(5e30, rel=1e-6)
    np.testing.assert_allclose(to_cpu(big), [0.6, 0.8], rtol=1e-6)
    bad = xp.asarray([np.inf, 1.0], dtype=xp.float32)
    assert clip_grad_norm([bad], 1.0) == math.inf
    np.testing.assert_array_equal(to_cpu(bad), [np.inf, 1.0])  # left for the caller


def test_clip_grad_norm_counts_a_shared_array_once(xp):
    g = xp.asarray([3.0, 4.0])
    assert clip_grad_norm({"a": g, "b": g}, 1.0) == pytest.approx(5.0)
    np.testing.assert_allclose(to_cpu(g), [0.6, 0.8])


def test_clip_grad_norm_empty_and_bad_max_norm(xp):
    assert clip_grad_norm({}, 1.0) == 0.0
    for bad in (0.0, -1.0, float("inf"), float("nan"), True):
        with pytest.raises(ValueError, match="max_norm"):
            clip_grad_norm([xp.ones(2)], bad)


def test_optimizer_clip_norm_option(xp):
    params = {"W": xp.zeros(2, dtype=xp.float32)}
    grads = {"W": xp.asarray([3.0, 4.0], dtype=xp.float32)}
    opt = SGD(lr=1.0, clip_norm=1.0)
    opt.update(params, grads)
    assert opt.last_grad_norm == pytest.approx(5.0)
    np.testing.assert_allclose(to_cpu(params["W"]), [-0.6, -0.8], rtol=1e-6)
    assert opt.state_dict()["hyper"]["clip_norm"] == 1.0


# ------------------------------------------------------------- factory
def test_factory_names_are_case_insensitive():
    assert set(OPTIMIZERS) == set(NAMES)
    assert type(get_optimizer("SGD")) is SGD
    assert type(get_optimizer("AdaGrad")) is AdaGrad
    assert type(get_optimizer(" RMSprop ")) is RMSprop
    assert type(get_optimizer("Nesterov")) is Nesterov
    assert type(get_optimizer("ADAMW")) is AdamW
    opt = get_optimizer("momentum", lr=0.5, momentum=0.8)
    assert (opt.lr, opt.momentum) == (0.5, 0.8)
    assert all(issubclass(cls, Optimizer) for cls in OPTIMIZERS.values())


def test_factory_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError) as info:
        get_optimizer("lion")
    msg = str(info.value)
    assert "'lion'" in msg
    assert all(name in msg for name in NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_book_defaults(name):
    defaults = {"sgd": {"lr": 0.01}, "momentum": {"lr": 0.01, "momentum": 0.9},
                "nesterov": {"lr": 0.01, "momentum": 0.9}, "adagrad": {"lr": 0.01},
                "rmsprop": {"lr": 0.01, "decay_rate": 0.99},
                "adam": {"lr": 0.001, "beta1": 0.9, "beta2": 0.999},
                "adamw": {"lr": 0.001, "beta1": 0.9, "beta2": 0.999, "weight_decay": 0.01}}
    assert get_optimizer(name).hyper() == {**defaults[name], "clip_norm": None}


def test_subclass_with_its_own_rule_is_not_run_by_the_parents_kernel(xp):
    """A subclass changing the update rule without a kernel of its own must not inherit
    the parent's fused CuPy kernel: its own rule runs on every backend."""

    class DoubleStepSGD(SGD):
        def _update_one(self, xp_, key, p, g, slots, s):
            p -= 2 * self.lr * g

    assert SGD._kernel is not None and DoubleStepSGD._kernel is None
    params = {"W": xp.ones(4)}
    DoubleStepSGD(lr=0.5).update(params, {"W": xp.ones(4)})
    np.testing.assert_array_equal(to_cpu(params["W"]), np.zeros(4))
