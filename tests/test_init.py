"""Tests of xpnet.init: the book's weight_init_std meaning, fan-ins, seeded draws."""

from __future__ import annotations

import math

import numpy as np
import pytest

from xpnet import backend
from xpnet.init import SPECS, fan_in, init_weight, weight_std


@pytest.mark.parametrize(
    ("spec", "n", "expected"),
    [
        (0.01, 784, 0.01),
        (1, 5, 1.0),
        (np.float32(0.5), 5, 0.5),
        (0.0, 3, 0.0),
        ("0.01", 100, 0.01),  # as a command line passes it
        ("relu", 50, math.sqrt(2 / 50)),
        ("he", 784, math.sqrt(2 / 784)),
        ("ReLU", 9, math.sqrt(2 / 9)),
        (" HE ", 9, math.sqrt(2 / 9)),
        ("sigmoid", 100, math.sqrt(1 / 100)),
        ("xavier", 576, math.sqrt(1 / 576)),
        ("Xavier", 1024, math.sqrt(1 / 1024)),
        ("relu", np.int64(144), math.sqrt(2 / 144)),
    ],
)
def test_weight_std(spec, n, expected):
    assert weight_std(spec, n) == pytest.approx(expected, rel=1e-15)
    assert isinstance(weight_std(spec, n), float)


@pytest.mark.parametrize("spec", ["gaussian", "", "kaiming", None, True, [0.1], -0.1,
                                  float("nan"), float("inf"), "nan", "-1"])
def test_weight_std_rejects_bad_spec_listing_valid_values(spec):
    with pytest.raises(ValueError) as info:
        weight_std(spec, 10)
    message = str(info.value)
    for name in SPECS:
        assert repr(name) in message
    assert "number" in message


@pytest.mark.parametrize("n", [0, -3, 2.5, True, "10", None])
def test_weight_std_rejects_bad_fan_in(n):
    with pytest.raises(ValueError, match="fan_in"):
        weight_std("he", n)


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        ((784, 100), 784),  # Affine (in, out)
        ((50, 10), 50),
        ((16, 1, 3, 3), 9),  # Convolution (FN, C, KH, KW): C*KH*KW
        ((16, 16, 3, 3), 144),
        ((32, 16, 3, 3), 144),
        ((32, 32, 3, 3), 288),
        ((64, 32, 3, 3), 288),
        ((64, 64, 3, 3), 576),
        ((30, 3, 5, 4), 60),
        ([1024, 50], 1024),
        (np.array([6, 5]), 6),
    ],
)
def test_fan_in(shape, expected):
    assert fan_in(shape) == expected
    assert isinstance(fan_in(shape), int)


@pytest.mark.parametrize("shape", [(10,), (), (0, 5), (3, 0, 3, 3), 7, None, "ab"])
def test_fan_in_rejects_bad_shapes(shape):
    with pytest.raises(ValueError, match="fan_in"):
        fan_in(shape)


def test_init_weight_default_dtype_and_std(xp):
    W = init_weight((400, 300), "he")
    assert isinstance(W, xp.ndarray)
    assert W.shape == (400, 300)
    assert W.dtype == np.float32
    host = backend.to_cpu(W).astype(np.float64)
    assert abs(host.mean()) < 0.01 * math.sqrt(2 / 400) * 10
    assert host.std() == pytest.approx(math.sqrt(2 / 400), rel=0.02)


def test_init_weight_conv_fan_in_and_number(xp):
    W = init_weight((64, 32, 3, 3), "xavier", dtype=np.float64)
    assert W.dtype == np.float64 and W.shape == (64, 32, 3, 3)
    assert float(backend.to_cpu(W).std()) == pytest.approx(math.sqrt(1 / 288), rel=0.03)
    V = init_weight((200, 100), 0.01, dtype="float64")
    assert float(backend.to_cpu(V).std()) == pytest.approx(0.01, rel=0.03)
    assert not init_weight((3, 4), 0.0).any()


def test_init_weight_draws_from_the_seeded_source(xp):
    backend.seed(123)
    a = init_weight((5, 7), "relu", dtype=np.float64)
    backend.seed(123)
    expected = backend.get_rng().normal((5, 7), math.sqrt(2 / 5), np.float64)
    np.testing.assert_array_equal(backend.to_cpu(a), backend.to_cpu(expected))
    b = init_weight((5, 7), "relu", dtype=np.float64)  # the source moves on
    assert not np.array_equal(backend.to_cpu(a), backend.to_cpu(b))


@pytest.fixture
def float64_default():
    backend.set_default_dtype(np.float64)
    try:
        yield
    finally:
        backend.set_default_dtype(np.float32)


def test_init_weight_follows_default_dtype(xp, float64_default):
    assert init_weight((3, 2), "he").dtype == np.float64
    assert init_weight((3, 2), "he", dtype=np.float32).dtype == np.float32


def test_init_weight_rejects_integer_dtype(xp):
    with pytest.raises(ValueError, match="float"):
        init_weight((3, 2), "he", dtype=np.int32)
