"""Dropout's own seeded generator: repeatable masks per layer, whatever else runs."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from tests.conftest import to_numpy
from xpnet import backend
from xpnet.layers import Dropout
from xpnet.models import MultiLayerNetExtend
from xpnet.optim import SGD


def build_pair(xp):
    """Two dropout MLPs built one after the other from one seed, on the backend under test."""
    backend.seed(11)
    return [MultiLayerNetExtend(10, [16, 16], 3, use_dropout=True, dropout_ratio=0.3,
                                dtype="float64") for _ in range(2)]


def batches(xp, which: int, steps: int = 6):
    rng = np.random.default_rng(100 + which)
    return [(xp.asarray(rng.standard_normal((8, 10))), xp.asarray(rng.integers(0, 3, 8)))
            for _ in range(steps)]


def train(net, data, before_step=lambda: None):
    opt = SGD(lr=0.1)
    for x, t in data:
        before_step()
        opt.update(net.params, net.gradient(x, t))
    return {k: to_numpy(v).copy() for k, v in net.params.items()}


def test_two_networks_trained_at_once_in_two_threads_repeat_their_runs_alone(xp):
    """Each step waits at a barrier, so the two threads draw masks in every step: with
    one generator shared by the process, their draws would interleave."""
    data = [batches(xp, 0), batches(xp, 1)]
    alone = [train(net, d) for net, d in zip(build_pair(xp), data, strict=True)]

    nets = build_pair(xp)
    barrier = threading.Barrier(2, timeout=60)
    together: list = [None, None]
    errors = []

    def worker(i):
        try:
            with backend.use_backend(xp.__name__):
                together[i] = train(nets[i], data[i], barrier.wait)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)
            barrier.abort()

    runs = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for r in runs:
        r.start()
    for r in runs:
        r.join()
    assert errors == []
    for a, b in zip(alone, together, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(b[k], a[k], err_msg=k)


def masks(layer, x, n=3):
    return [to_numpy(layer.forward(x)).copy() for _ in range(n)]


def test_backend_seed_then_building_repeats_the_masks(xp):
    x = xp.ones((20, 30))
    backend.seed(5)
    first = [masks(Dropout(0.5), x) for _ in range(2)]
    backend.seed(5)
    again = [masks(Dropout(0.5), x) for _ in range(2)]
    np.testing.assert_array_equal(np.array(again), np.array(first))
    # the two layers built after one seed differ, and so does another seed
    assert not np.array_equal(first[0][0], first[1][0])
    backend.seed(6)
    assert not np.array_equal(masks(Dropout(0.5), x)[0], first[0][0])


def test_seeding_after_building_leaves_a_layer_alone(xp):
    x = xp.ones((20, 30))
    backend.seed(5)
    layer = Dropout(0.5)
    backend.seed(5)
    twin = Dropout(0.5)
    backend.seed(99)  # neither layer follows: each keeps the generator it was built with
    np.testing.assert_array_equal(np.array(masks(twin, x)), np.array(masks(layer, x)))


def test_explicit_seed(xp):
    x = xp.ones((20, 30))
    backend.seed(1)
    a = masks(Dropout(0.4, seed=3), x)
    backend.seed(2)
    b = masks(Dropout(0.4, seed=3), x)
    np.testing.assert_array_equal(np.array(b), np.array(a))
    assert Dropout(0.4, seed=3).seed == 3
    assert not np.array_equal(masks(Dropout(0.4, seed=4), x)[0], a[0])


@pytest.mark.parametrize("seed, exc", [(-1, ValueError), (1.5, TypeError), ("3", TypeError),
                                       (True, TypeError)])
def test_bad_seed_is_a_clear_error(seed, exc):
    with pytest.raises(exc, match="Dropout: seed"):
        Dropout(0.5, seed=seed)


def test_dropout_layers_do_not_shift_the_initial_weights():
    """Their seeds come from a stream of their own, not from the initialisers' one."""
    def weights(use_dropout):
        backend.seed(0)
        net = MultiLayerNetExtend(10, [16, 16], 3, use_dropout=use_dropout)
        return {k: to_numpy(v) for k, v in net.params.items()}

    plain, dropped = weights(False), weights(True)
    assert plain.keys() == dropped.keys()
    for k in plain:
        np.testing.assert_array_equal(dropped[k], plain[k], err_msg=k)


def test_rng_state_round_trip_through_json():
    x = np.ones((20, 30), dtype=np.float32)
    layer = Dropout(0.5, seed=8)
    layer.forward(x)
    state = layer.get_rng_state()
    assert isinstance(state, dict) and state["bit_generator"] == "PCG64"
    expected = masks(layer, x)
    other = Dropout(0.5, seed=123)  # another seed: only the restored state can match
    other.set_rng_state(json.loads(json.dumps(state)))
    np.testing.assert_array_equal(np.array(masks(other, x)), np.array(expected))
    # a state read before any forward is the seed's starting point
    fresh = Dropout(0.5, seed=8)
    start = fresh.get_rng_state()
    first = masks(fresh, x, 1)
    fresh.set_rng_state(start)
    np.testing.assert_array_equal(masks(fresh, x, 1)[0], first[0])
    fresh.set_rng_state(None)  # what a layer on CuPy gives: nothing to restore
    assert not np.array_equal(masks(fresh, x, 1)[0], first[0])


@pytest.mark.parametrize("state", ["x", 5, {"bit_generator": "MT19937"}, {"state": {}}])
def test_set_rng_state_rejects_what_get_rng_state_cannot_give(state):
    with pytest.raises(ValueError, match="Dropout: random state"):
        Dropout(0.5).set_rng_state(state)


def test_generator_follows_the_device(xp):
    """Masks on the device of x; after the layer's device changes, the layer still draws
    from its own seed there (the CuPy case: a network moved to the GPU)."""
    layer = Dropout(0.5, seed=21)
    host = np.ones((10, 12))
    layer.forward(host)
    y = layer.forward(xp.ones((10, 12)))
    assert type(y) is xp.ndarray
    assert type(layer.backward(xp.ones((10, 12)))) is xp.ndarray
    if xp.__name__ == "cupy":
        assert layer.get_rng_state() is None
        again = Dropout(0.5, seed=21)
        np.testing.assert_array_equal(to_numpy(again.forward(xp.ones((10, 12)))), to_numpy(y))
    else:
        assert isinstance(layer.get_rng_state(), dict)
    layer.forward(host)  # back on the host: the NumPy generator goes on where it was
    assert isinstance(layer.get_rng_state(), dict)
