"""The NIC captioning model of examples/ch8_captioning.py: gradients, decoding, naming.

The model lives in ``examples/_captioning_model.py`` (it imports only xpnet) and is loaded
from that file, as the example script loads it as a sibling.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import to_numpy
from xpnet.datasets.canvas import END_ID, PAD_ID, START_ID, VOCAB
from xpnet.gradcheck import numerical_gradient, relative_error

TOL = 1e-6
_PATH = Path(__file__).resolve().parent.parent / "examples" / "_captioning_model.py"


def _load_module():
    spec = importlib.util.spec_from_file_location("_captioning_model", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cap = _load_module()

# <start> words <end> <pad>: three captions of 2, 1 and 0 words (the last is all <end>)
TOKENS = np.array([[START_ID, 6, 4, END_ID, PAD_ID],
                   [START_ID, 12, END_ID, PAD_ID, PAD_ID],
                   [START_ID, END_ID, PAD_ID, PAD_ID, PAD_ID]], dtype=np.int32)


def tiny_model(xp, batch_norm=True, dtype=np.float64, hidden=4, feature_size=5):
    """One conv block on 8x8 images, feature 5, embedding 3, hidden 4, the real vocabulary."""
    encoder, feature = cap.conv_encoder((2,), image_size=8, feature_size=feature_size,
                                        batch_norm=batch_norm, dtype=dtype)
    return cap.CaptionModel(encoder, feature, len(VOCAB), embed_size=3, hidden_size=hidden,
                            dtype=dtype)


def images(xp, rng, n=3, dtype=np.float64):
    return xp.asarray(rng.random((n, 1, 8, 8)), dtype=dtype)


@pytest.mark.parametrize("batch_norm, feature_size", [(True, 5), (False, None)])
def test_whole_model_gradients_match_numerical(xp, rng, batch_norm, feature_size):
    """Every parameter, the encoder's included (reached only through dh0 and dc0)."""
    model = tiny_model(xp, batch_norm, feature_size=feature_size)
    for p in model.params.values():  # away from zero biases and the unit BN scale
        p += xp.asarray(rng.standard_normal(p.shape) * 0.1, dtype=p.dtype)
    x, t = images(xp, rng), xp.asarray(TOKENS)
    analytic = {k: g.copy() for k, g in model.gradient(x, t).items()}
    assert set(analytic) == set(model.params)
    assert {"encoder.W1", "init.W", "embed.W", "lstm.Wx", "lstm.Wh",
            "project.W"} <= set(analytic)
    assert ("encoder.W2" in analytic) == (feature_size is not None)
    errors = {}
    for key, p in model.params.items():
        numeric = numerical_gradient(lambda: model.loss(x, t), p, h=1e-5)
        if batch_norm and key == "encoder.b1":
            # BatchNorm subtracts the channel mean: the convolution's bias has no effect
            assert float(xp.abs(numeric).max()) < 1e-8
            assert float(xp.abs(analytic[key]).max()) < 1e-12
            continue
        errors[key] = relative_error(analytic[key], numeric)
    assert max(errors.values()) <= TOL, errors
    # The image matters: the encoder's gradients are not zero.
    assert float(xp.abs(analytic["encoder.W1"]).max()) > 1e-8


def test_gradient_leaves_padding_and_inputs_alone(xp, rng):
    model = tiny_model(xp)
    x, t = images(xp, rng), xp.asarray(TOKENS)
    x0, t0 = to_numpy(x).copy(), to_numpy(t).copy()
    grads = model.gradient(x, t)
    np.testing.assert_array_equal(to_numpy(x), x0)
    np.testing.assert_array_equal(to_numpy(t), t0)
    # <pad> is an input only where the target is <pad> too (ignored): no gradient reaches it
    assert float(xp.abs(grads["embed.W"][PAD_ID]).max()) == 0.0
    assert float(xp.abs(grads["embed.W"][START_ID]).max()) > 0.0


def test_params_are_the_layers_arrays(xp):
    """The optimizer updates the arrays the layers compute with (not copies)."""
    model = tiny_model(xp)
    params = model.params
    params["lstm.Wh"] += 1.0
    params["encoder.W1"] *= 0.0
    np.testing.assert_array_equal(to_numpy(model.lstm.params["Wh"]),
                                  to_numpy(params["lstm.Wh"]))
    conv = next(layer for layer in model.encoder.layers if "W" in layer.params)
    assert float(xp.abs(conv.params["W"]).max()) == 0.0
    assert model.num_params == sum(int(p.size) for p in params.values())
    assert set(model.buffers) == {"encoder.running_mean1", "encoder.running_var1"}


def test_greedy_generation_agrees_with_the_teacher_forced_scores(xp, rng):
    """Fed its own words, the training-time forward picks the same word at every step."""
    model = tiny_model(xp, hidden=6)
    for p in model.params.values():
        p += xp.asarray(rng.standard_normal(p.shape) * 0.3, dtype=p.dtype)
    n, max_words = 16, 4
    x = xp.asarray(rng.random((n, 1, 8, 8)))
    lengths = set()
    # A growing bias towards <end> gives captions of every length, and unended ones.
    for _ in range(12):
        model.project.params["b"][END_ID] += 0.25
        gen = to_numpy(model.generate(x, max_words))
        assert gen.shape == (n, max_words + 1) and gen.dtype == np.int32
        assert model.lstm.h0 is None  # generation leaves no state behind
        inputs = np.concatenate([np.full((n, 1), START_ID), gen[:, :-1]], axis=1)
        inputs[inputs == PAD_ID] = END_ID  # after <end>: not compared below
        scores = to_numpy(model.scores(x, xp.asarray(inputs.astype(np.int32)), train=False))
        best = scores[..., END_ID:].argmax(axis=2) + END_ID
        for i in range(n):
            ends = np.flatnonzero(gen[i] == END_ID)
            upto = ends[0] + 1 if ends.size else max_words + 1
            lengths.add((int(upto), bool(ends.size)))
            np.testing.assert_array_equal(best[i, :upto], gen[i, :upto])
            assert (gen[i, upto:] == PAD_ID).all()
            assert (gen[i, :upto] >= END_ID).all()  # never <pad> or <start> before the end
    assert len(lengths) >= 4, lengths  # the comparison covers several stopping points


@pytest.mark.parametrize("favoured", [END_ID, 7])
def test_generation_stops_at_end(xp, rng, favoured):
    model = tiny_model(xp)
    model.project.params["b"][favoured] = 100.0
    gen = to_numpy(model.generate(images(xp, rng), 4))
    if favoured == END_ID:  # stops at once: <end>, then padding
        assert (gen[:, 0] == END_ID).all() and (gen[:, 1:] == PAD_ID).all()
    else:  # never ends: max_words + 1 words, no <end>
        assert (gen == favoured).all()


def test_float32_model_trains_on_a_repeated_batch(xp, rng):
    """A few Adam steps on one batch lower the loss (the wiring learns, in float32)."""
    from xpnet.optim import Adam

    model = tiny_model(xp, dtype=np.float32, hidden=8)
    x, t = images(xp, rng, dtype=np.float32), xp.asarray(TOKENS)
    opt = Adam(lr=0.01)
    first = float(model.loss(x, t))
    for _ in range(60):
        grads = model.gradient(x, t)
        assert all(g.dtype == np.float32 for g in grads.values())
        opt.update(model.params, grads)
    assert float(model.loss(x, t)) < 0.5 * first

