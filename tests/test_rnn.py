"""Recurrent layers (xpnet.layers.rnn) on every backend: gradients, reference loops, state."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import to_numpy
from xpnet.gradcheck import check_layer, numerical_gradient, relative_error
from xpnet.layers.rnn import LSTM, Embedding, TimeAffine, TimeSoftmaxWithLoss

TOL = 1e-6
N, T, D, H, V = 2, 4, 3, 3, 5


def make_lstm(xp, rng, d=D, h=H, dtype=np.float64, stateful=False):
    Wx = xp.asarray(rng.standard_normal((d, 4 * h)) * 0.6, dtype=dtype)
    Wh = xp.asarray(rng.standard_normal((h, 4 * h)) * 0.6, dtype=dtype)
    b = xp.asarray(rng.standard_normal(4 * h) * 0.3, dtype=dtype)
    return LSTM(Wx, Wh, b, stateful=stateful)


def naive_lstm(xs, Wx, Wh, b, h, c):
    """Step by step, straight from the equations, in float64 NumPy."""
    sig = lambda a: 1 / (1 + np.exp(-a))  # noqa: E731
    hdim = Wh.shape[0]
    out = []
    for t in range(xs.shape[1]):
        a = xs[:, t] @ Wx + h @ Wh + b
        f, g = sig(a[:, :hdim]), np.tanh(a[:, hdim:2 * hdim])
        i, o = sig(a[:, 2 * hdim:3 * hdim]), sig(a[:, 3 * hdim:])
        c = f * c + i * g
        h = o * np.tanh(c)
        out.append(h)
    return np.stack(out, axis=1), h, c


def params_np(layer):
    return {k: to_numpy(v) for k, v in layer.params.items()}


# ------------------------------------------------------------------ LSTM forward


@pytest.mark.parametrize("with_state", [False, True])
def test_lstm_forward_matches_naive_loop(xp, rng, with_state):
    layer = make_lstm(xp, rng)
    xs = rng.standard_normal((N, T, D))
    h0 = rng.standard_normal((N, H)) if with_state else np.zeros((N, H))
    c0 = rng.standard_normal((N, H)) if with_state else np.zeros((N, H))
    if with_state:
        layer.set_state(xp.asarray(h0), xp.asarray(c0))
    hs = layer.forward(xp.asarray(xs))
    p = params_np(layer)
    ref, _, _ = naive_lstm(xs, p["Wx"], p["Wh"], p["b"], h0, c0)
    assert hs.shape == (N, T, H) and hs.flags.c_contiguous
    np.testing.assert_allclose(to_numpy(hs), ref, rtol=1e-12, atol=1e-12)


def test_lstm_keeps_float32_and_does_not_touch_inputs(xp, rng):
    layer = make_lstm(xp, rng, dtype=np.float32)
    xs = xp.asarray(rng.standard_normal((N, T, D)), dtype=np.float32)
    h0 = xp.asarray(rng.standard_normal((N, H)), dtype=np.float32)
    layer.set_state(h0)
    keep_x, keep_h = to_numpy(xs).copy(), to_numpy(h0).copy()
    hs = layer.forward(xs)
    dout = xp.ones_like(hs)
    dx = layer.backward(dout)
    assert hs.dtype == dx.dtype == layer.dh0.dtype == np.float32
    assert all(g.dtype == np.float32 for g in layer.grads.values())
    np.testing.assert_array_equal(to_numpy(xs), keep_x)
    np.testing.assert_array_equal(to_numpy(h0), keep_h)
    np.testing.assert_array_equal(to_numpy(dout), 1)


def test_lstm_saturated_inputs_stay_finite(xp, rng):
    layer = make_lstm(xp, rng)
    xs = xp.asarray(rng.choice([-1e4, 1e4], size=(N, T, D)))
    hs = layer.forward(xs)
    layer.backward(xp.ones_like(hs))
    assert bool(xp.isfinite(hs).all()) and bool(xp.isfinite(layer.grads["Wx"]).all())


# ------------------------------------------------------------------ LSTM gradients


def test_lstm_gradients_x_and_params(xp, rng):
    layer = make_lstm(xp, rng)
    layer.set_state(xp.asarray(rng.standard_normal((N, H))),
                    xp.asarray(rng.standard_normal((N, H))))
    x = xp.asarray(rng.standard_normal((N, T, D)))
    dout = xp.asarray(rng.standard_normal((N, T, H)))
    errors = check_layer(layer, x, dout)
    assert set(errors) == {"x", "Wx", "Wh", "b"}
    assert max(errors.values()) <= TOL, errors


def test_lstm_gradient_of_initial_state(xp, rng):
    layer = make_lstm(xp, rng)
    h0 = xp.asarray(rng.standard_normal((N, H)))
    c0 = xp.asarray(rng.standard_normal((N, H)))
    x = xp.asarray(rng.standard_normal((N, T, D)))
    dout = xp.asarray(rng.standard_normal((N, T, H)))
    layer.set_state(h0, c0)  # kept by reference: perturbing h0 / c0 changes the forward

    def objective():
        return float((layer.forward(x) * dout).sum())

    layer.forward(x)
    layer.backward(dout)
    dh0, dc0 = layer.dh0.copy(), layer.dc0.copy()
    assert relative_error(dh0, numerical_gradient(objective, h0, 1e-5)) <= TOL
    assert relative_error(dc0, numerical_gradient(objective, c0, 1e-5)) <= TOL
    assert float(xp.abs(dh0).max()) > 1e-3  # the check compares something


def test_lstm_without_input_grad_gives_same_param_grads(xp, rng):
    layer = make_lstm(xp, rng)
    x = xp.asarray(rng.standard_normal((N, T, D)))
    dout = xp.asarray(rng.standard_normal((N, T, H)))
    layer.forward(x)
    layer.backward(dout)
    full = {k: to_numpy(g) for k, g in layer.grads.items()}
    layer.forward(x)
    assert layer.backward(dout, need_input_grad=False) is None
    for k, g in layer.grads.items():
        np.testing.assert_allclose(to_numpy(g), full[k], rtol=1e-12, atol=0)


def test_lstm_single_step_sequence(xp, rng):
    layer = make_lstm(xp, rng)
    x = xp.asarray(rng.standard_normal((N, 1, D)))
    assert max(check_layer(layer, x).values()) <= TOL


# ------------------------------------------------------------------ LSTM state


def test_lstm_step_decoding_equals_forward(xp, rng):
    layer = make_lstm(xp, rng)
    xs = xp.asarray(rng.standard_normal((N, T, D)))
    h0 = xp.asarray(rng.standard_normal((N, H)))
    layer.set_state(h0)
    hs = to_numpy(layer.forward(xs))
    assert layer.h0 is h0  # not stateful: forward leaves the initial state alone
    steps = [to_numpy(layer.step(xs[:, t])) for t in range(T)]
    np.testing.assert_allclose(np.stack(steps, axis=1), hs, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(to_numpy(layer.h0), hs[:, -1], rtol=1e-12, atol=1e-14)


def test_lstm_step_starts_from_zeros_after_reset(xp, rng):
    layer = make_lstm(xp, rng)
    xs = xp.asarray(rng.standard_normal((N, 2, D)))
    hs = to_numpy(layer.forward(xs))
    layer.set_state(xp.asarray(rng.standard_normal((N, H))))
    layer.reset_state()
    assert layer.h0 is None
    np.testing.assert_allclose(to_numpy(layer.step(xs[:, 0])), hs[:, 0], rtol=1e-12)


def test_stateful_lstm_carries_state_across_forwards(xp, rng):
    whole = make_lstm(xp, np.random.default_rng(1))
    halves = make_lstm(xp, np.random.default_rng(1), stateful=True)
    xs = xp.asarray(rng.standard_normal((N, 6, D)))
    ref = to_numpy(whole.forward(xs))
    first, second = to_numpy(halves.forward(xs[:, :3])), to_numpy(halves.forward(xs[:, 3:]))
    np.testing.assert_allclose(np.concatenate([first, second], axis=1), ref, rtol=1e-12)
    halves.reset_state()
    np.testing.assert_allclose(to_numpy(halves.forward(xs[:, :3])), ref[:, :3], rtol=1e-12)


def test_lstm_rejects_bad_shapes_and_state(xp, rng):
    layer = make_lstm(xp, rng)
    with pytest.raises(ValueError, match="input features"):
        layer.forward(xp.zeros((N, T, D + 1)))
    with pytest.raises(ValueError, match="ndim"):
        layer.forward(xp.zeros((N, D)))
    with pytest.raises(ValueError, match="h.shape"):
        layer.set_state(xp.zeros((N, H + 1)))
    with pytest.raises(TypeError, match="dtype"):
        layer.set_state(xp.zeros((N, H), dtype=np.float32))
    layer.set_state(xp.zeros((N + 1, H)))
    with pytest.raises(ValueError, match="batch size"):
        layer.forward(xp.zeros((N, T, D)))
    layer.reset_state()
    layer.forward(xp.zeros((N, T, D)))
    with pytest.raises(ValueError, match="dout.shape"):
        layer.backward(xp.zeros((N, T, H + 1)))
    with pytest.raises(ValueError, match="Wx.shape"):
        LSTM(xp.zeros((D, 4 * H + 1)), xp.zeros((H, 4 * H)), xp.zeros(4 * H))


# ------------------------------------------------------------------ Embedding


def test_embedding_forward_and_gradient_with_repeated_ids(xp, rng):
    W = xp.asarray(rng.standard_normal((V, D)))
    layer = Embedding(W)
    ids = xp.asarray(np.array([[0, 3, 3, 1], [3, 4, 0, 0]]))  # repeats must add up
    out = layer.forward(ids)
    assert out.shape == (2, 4, D)
    np.testing.assert_array_equal(to_numpy(out), to_numpy(W)[to_numpy(ids)])
    dout = xp.asarray(rng.standard_normal((2, 4, D)))
    assert layer.backward(dout) is None

    def objective():
        return float((layer.forward(ids) * dout).sum())

    numeric = numerical_gradient(objective, W, 1e-5)
    assert relative_error(layer.grads["W"], numeric) <= TOL
    assert float(xp.abs(layer.grads["W"][2]).max()) == 0.0  # id 2 never read


def test_embedding_rejects_bad_ids(xp, rng):
    layer = Embedding(xp.asarray(rng.standard_normal((V, D))))
    with pytest.raises(ValueError, match="id range"):
        layer.forward(xp.asarray(np.array([[0, V]])))
    with pytest.raises(ValueError, match="id range"):
        layer.forward(xp.asarray(np.array([[-1, 0]])))
    with pytest.raises(TypeError, match="dtype"):
        layer.forward(xp.zeros((1, 2)))


def test_embedding_keeps_dtype(xp, rng):
    layer = Embedding(xp.asarray(rng.standard_normal((V, D)), dtype=np.float32))
    out = layer.forward(xp.asarray(np.array([[1, 2]], dtype=np.int32)))
    layer.backward(xp.ones_like(out))
    assert out.dtype == layer.grads["W"].dtype == np.float32


# ------------------------------------------------------------------ TimeAffine


def test_time_affine_gradients_and_values(xp, rng):
    W = xp.asarray(rng.standard_normal((D, V)))
    b = xp.asarray(rng.standard_normal(V))
    layer = TimeAffine(W, b)
    x = xp.asarray(rng.standard_normal((N, T, D)))
    y = to_numpy(layer.forward(x))
    np.testing.assert_allclose(y, to_numpy(x) @ to_numpy(W) + to_numpy(b), rtol=1e-12)
    dout = xp.asarray(rng.standard_normal((N, T, V)))
    errors = check_layer(layer, x, dout)
    assert max(errors.values()) <= TOL, errors
    layer.forward(x)
    assert layer.backward(dout, need_input_grad=False) is None


def test_time_affine_rejects_wrong_width(xp, rng):
    layer = TimeAffine(xp.zeros((D, V)), xp.zeros(V))
    with pytest.raises(ValueError, match="input shape"):
        layer.forward(xp.zeros((N, T, D + 1)))


# ------------------------------------------------------------------ TimeSoftmaxWithLoss


def labels_with_padding(rng, ignore):
    t = rng.integers(0, V, size=(N, T))
    t[0, 2:] = ignore
    t[1, 3:] = ignore
    return t


@pytest.mark.parametrize("ignore", [-1, 0])
def test_time_softmax_loss_value_and_gradient(xp, rng, ignore):
    x = rng.standard_normal((N, T, V))
    t = labels_with_padding(rng, ignore)
    layer = TimeSoftmaxWithLoss(ignore_label=ignore)
    xd, td = xp.asarray(x), xp.asarray(t)
    loss = float(layer.forward(xd, td))
    log_p = x - np.log(np.exp(x).sum(axis=2, keepdims=True))
    keep = t != ignore
    expected = -np.mean(np.take_along_axis(log_p, np.where(keep, t, 0)[..., None], 2)[..., 0][keep])
    assert abs(loss - expected) <= 1e-12
    dx = layer.backward()
    numeric = numerical_gradient(lambda: layer.forward(xd, td), xd, 1e-5)
    assert relative_error(dx, numeric) <= TOL
    assert float(xp.abs(dx[0, 2:]).max()) == 0.0  # ignored positions get no gradient


def test_time_softmax_loss_ignored_logits_do_not_matter(xp, rng):
    x = rng.standard_normal((N, T, V))
    t = labels_with_padding(rng, -1)
    layer = TimeSoftmaxWithLoss()
    base = float(layer.forward(xp.asarray(x), xp.asarray(t)))
    x[0, 3] += 100.0
    assert float(layer.forward(xp.asarray(x), xp.asarray(t))) == pytest.approx(base, abs=1e-12)


def test_time_softmax_loss_all_ignored_is_zero(xp, rng):
    layer = TimeSoftmaxWithLoss()
    x = xp.asarray(rng.standard_normal((N, T, V)))
    assert float(layer.forward(x, xp.full((N, T), -1))) == 0.0
    assert float(xp.abs(layer.backward()).max()) == 0.0


def test_time_softmax_loss_rejects_bad_labels(xp, rng):
    layer = TimeSoftmaxWithLoss()
    x = xp.asarray(rng.standard_normal((N, T, V)))
    with pytest.raises(ValueError, match="labels"):
        layer.forward(x, xp.full((N, T), V))
    with pytest.raises(ValueError, match="labels shape"):
        layer.forward(x, xp.zeros((N, T + 1), dtype=np.int64))
    with pytest.raises(TypeError, match="dtype"):
        layer.forward(x, xp.zeros((N, T)))


# ------------------------------------------------------------------ a decoder end to end


def test_decoder_chain_gradient_reaches_initial_state(xp, rng):
    """Embedding -> LSTM (h0 from outside, as a captioner's image feature) -> TimeAffine
    -> TimeSoftmaxWithLoss: the chained backward gives d loss / d h0 and d loss / d W."""
    embed = Embedding(xp.asarray(rng.standard_normal((V, D))))
    lstm = make_lstm(xp, rng)
    head = TimeAffine(xp.asarray(rng.standard_normal((H, V))), xp.asarray(rng.standard_normal(V)))
    loss_layer = TimeSoftmaxWithLoss(ignore_label=0)
    ids = xp.asarray(rng.integers(0, V, size=(N, T)))
    targets = xp.asarray(labels_with_padding(rng, 0))
    h0 = xp.asarray(rng.standard_normal((N, H)))
    lstm.set_state(h0)

    def loss():
        return float(loss_layer.forward(head.forward(lstm.forward(embed.forward(ids))), targets))

    loss()
    embed.backward(lstm.backward(head.backward(loss_layer.backward())))
    dh0, dWe = lstm.dh0.copy(), embed.grads["W"].copy()
    assert relative_error(dh0, numerical_gradient(loss, h0, 1e-5)) <= TOL
    assert relative_error(dWe, numerical_gradient(loss, embed.params["W"], 1e-5)) <= TOL
