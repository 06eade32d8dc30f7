"""Tests of xpnet.models: the Sequential container and the book's four networks.

Gradients are checked against central differences in float64.  Every array test
runs on each backend through the ``xp`` fixture.
"""

from __future__ import annotations

import json
import math
import os
import pickle

import numpy as np
import pytest

from tests.conftest import assert_gradients_match, gradients_with_fixed_masks
from xpnet import backend
from xpnet.backend import BackendError, BackendMismatchError, to_cpu
from xpnet.gradcheck import numerical_gradient, numerical_gradient_at, relative_error
from xpnet.layers import (
    Affine,
    BatchNormalization,
    Convolution,
    Dropout,
    Pooling,
    ReLU,
    Sigmoid,
    SoftmaxWithLoss,
    Tanh,
)
from xpnet.layers.conv import ConvReLU
from xpnet.models import (
    MODELS,
    DeepConvNet,
    MultiLayerNet,
    MultiLayerNetExtend,
    ParamMap,
    Sequential,
    SimpleConvNet,
    build_model,
)
from xpnet.state import load_state

TOL = 1e-6
F64 = np.float64


# ----------------------------------------------------------------- helpers
def data(xp, rng, n, shape, classes, dtype=F64):
    x = xp.asarray(rng.standard_normal((n, *shape)).astype(dtype))
    t = xp.asarray(rng.integers(0, classes, n))
    return x, t


def host_state(net):
    return {section: {k: to_cpu(v).copy() for k, v in d.items()}
            for section, d in net.state_dict().items()}


def assert_state_equal(a, b):
    assert a.keys() == b.keys()
    for section in a:
        assert a[section].keys() == b[section].keys()
        for k in a[section]:
            x, y = a[section][k], b[section][k]
            assert x.dtype == y.dtype and x.shape == y.shape
            assert x.tobytes() == y.tobytes(), f"{section}[{k}] differs"


def layer_types(net):
    return [type(layer) for layer in net.layers]


def small_extend(**kw):
    args = dict(activation="relu", weight_init_std="relu", use_batchnorm=True, dtype=F64)
    args.update(kw)
    return MultiLayerNetExtend(6, [5, 4], 3, **args)


@pytest.fixture
def float64_default():
    """Make float64 the default dtype for one test, restoring float32 after."""
    backend.set_default_dtype(F64)
    try:
        yield
    finally:
        backend.set_default_dtype(np.float32)
    assert backend.get_default_dtype() == np.float32


# ----------------------------------------------------------------- gradients
@pytest.mark.parametrize("activation", ["relu", "sigmoid", "tanh"])
@pytest.mark.parametrize("lam", [0.0, 0.1])
def test_multilayernet_gradient(xp, rng, activation, lam):
    net = MultiLayerNet(6, [5, 4], 3, activation=activation, weight_init_std=activation
                        if activation != "tanh" else "xavier", weight_decay_lambda=lam,
                        dtype=F64)
    assert list(net.params) == ["W1", "b1", "W2", "b2", "W3", "b3"]
    x, t = data(xp, rng, 4, (6,), 3)
    assert_gradients_match(net, x, t)


def test_multilayernet_gradient_one_hot_labels(xp, rng):
    net = MultiLayerNet(6, [5], 3, dtype=F64, weight_decay_lambda=0.05)
    x, t = data(xp, rng, 5, (6,), 3)
    onehot = xp.eye(3, dtype=F64)[t]
    assert float(net.loss(x, onehot)) == pytest.approx(float(net.loss(x, t)), rel=1e-12)
    assert_gradients_match(net, x, onehot)


@pytest.mark.parametrize("lam", [0.0, 0.05])
@pytest.mark.parametrize("activation", ["relu", "sigmoid"])
def test_multilayernet_extend_batchnorm_gradient(xp, rng, activation, lam):
    net = small_extend(activation=activation, weight_decay_lambda=lam)
    assert list(net.params) == ["W1", "b1", "gamma1", "beta1", "W2", "b2", "gamma2", "beta2",
                                "W3", "b3"]
    assert list(net.buffers) == ["running_mean1", "running_var1", "running_mean2",
                                 "running_var2"]
    x, t = data(xp, rng, 8, (6,), 3)
    # BatchNorm subtracts the batch mean, so the biases before it have no effect
    assert_gradients_match(net, x, t, zero=("b1", "b2"))


def test_multilayernet_extend_dropout_gradient_with_reseeded_masks(xp, rng):
    net = small_extend(use_dropout=True, dropout_ratio=0.3, weight_decay_lambda=0.02)
    assert layer_types(net) == [Affine, BatchNormalization, ReLU, Dropout,
                                Affine, BatchNormalization, ReLU, Dropout, Affine]
    x, t = data(xp, rng, 8, (6,), 3)

    masks = net.rng_states()  # each Dropout's own generator, restored before every pass

    def loss():
        net.set_rng_states(masks)  # the same dropout masks in every forward pass
        return net.loss(x, t, train_flg=True)

    net.set_rng_states(masks)
    analytic = net.gradient(x, t)
    mask = net.layers[3].mask
    assert bool((mask == 0).any()) and bool((mask != 0).any())  # dropout did drop
    for k, p in net.params.items():
        numeric = numerical_gradient(loss, p, h=1e-5)
        if k in ("b1", "b2"):  # before BatchNorm: no effect on the loss
            assert float(abs(numeric).max()) < 1e-8 and float(abs(analytic[k]).max()) < 1e-12
        else:
            assert relative_error(analytic[k], numeric) <= TOL, k


def test_simple_convnet_gradient(xp, rng):
    net = SimpleConvNet(input_dim=(1, 6, 6),
                        conv_param={"filter_num": 3, "filter_size": 3, "pad": 0, "stride": 1},
                        hidden_size=4, output_size=3, weight_init_std="he", dtype=F64)
    assert {k: v.shape for k, v in net.params.items()} == {
        "W1": (3, 1, 3, 3), "b1": (3,), "W2": (12, 4), "b2": (4,), "W3": (4, 3), "b3": (3,)}
    x, t = data(xp, rng, 3, (1, 6, 6), 3)
    assert_gradients_match(net, x, t)


def test_simple_convnet_gradient_padded_two_channels(xp, rng):
    net = SimpleConvNet(input_dim=(2, 5, 5),
                        conv_param={"filter_num": 2, "filter_size": 2, "pad": 1, "stride": 1},
                        hidden_size=3, output_size=2, weight_init_std=0.3, dtype=F64)
    assert net.params["W2"].shape == (2 * 3 * 3, 3)
    x, t = data(xp, rng, 2, (2, 5, 5), 2)
    assert_gradients_match(net, x, t)


@pytest.mark.parametrize("input_dim", [
    pytest.param((1, 12, 12), id="12x12"),  # the same layers: 12 -> 6 -> 8 -> 4 -> 2
    pytest.param((1, 28, 28), id="28x28", marks=pytest.mark.slow),
])
def test_deep_convnet_sampled_gradient(xp, rng, input_dim):
    """Central differences on the two largest entries and one random entry of each W
    (the two largest of each b): 40 entries, 80 forward passes."""
    net = DeepConvNet(input_dim=input_dim, dtype=F64)
    x, t = data(xp, rng, 2, input_dim, 10)
    h = 1e-6

    grads, loss = gradients_with_fixed_masks(net, x, t)
    pick = np.random.default_rng(0)
    for k, p in net.params.items():
        g = grads[k].reshape(-1)
        idx = list(np.argsort(-np.abs(g))[:2])
        if k.startswith("W"):
            idx.append(int(pick.integers(0, g.size)))
        numeric = numerical_gradient_at(loss, p, idx, h)
        assert np.abs(g[idx]).max() > 0, k
        assert relative_error(g[idx], numeric) <= TOL, k


# ----------------------------------------------------------------- architectures
def test_multilayernet_architecture_and_init(xp):
    backend.seed(3)
    net = MultiLayerNet(6, [5, 4], 3)
    assert layer_types(net) == [Affine, ReLU, Affine, ReLU, Affine]
    assert isinstance(net.loss_layer, SoftmaxWithLoss) and net.last_layer is net.loss_layer
    assert net.dtype == np.float32 and net.num_params == 6 * 5 + 5 + 5 * 4 + 4 + 4 * 3 + 3
    backend.seed(3)
    for k, n_in in (("W1", 6), ("W2", 5), ("W3", 4)):  # std sqrt(2 / previous size)
        expected = backend.get_rng().normal(net.params[k].shape, math.sqrt(2 / n_in), np.float32)
        np.testing.assert_array_equal(to_cpu(net.params[k]), to_cpu(expected))
    for k in ("b1", "b2", "b3"):
        assert not net.params[k].any()
    assert layer_types(MultiLayerNet(4, [3, 3], 2, activation="sigmoid")) == [
        Affine, Sigmoid, Affine, Sigmoid, Affine]
    assert layer_types(MultiLayerNet(4, [3], 2, activation="Tanh")) == [Affine, Tanh, Affine]
    assert layer_types(MultiLayerNet(4, [], 2)) == [Affine]


@pytest.mark.parametrize(("spec", "std"), [("sigmoid", lambda n: math.sqrt(1 / n)),
                                           ("xavier", lambda n: math.sqrt(1 / n)),
                                           (0.01, lambda n: 0.01)])
def test_multilayernet_init_specs(xp, spec, std):
    backend.seed(4)
    net = MultiLayerNet(6, [5], 3, weight_init_std=spec, dtype=F64)
    backend.seed(4)
    for k, n_in in (("W1", 6), ("W2", 5)):
        expected = backend.get_rng().normal(net.params[k].shape, std(n_in), F64)
        np.testing.assert_array_equal(to_cpu(net.params[k]), to_cpu(expected))


def test_multilayernet_extend_architecture(xp):
    assert layer_types(small_extend(use_batchnorm=False)) == [Affine, ReLU, Affine, ReLU, Affine]
    net = small_extend(use_batchnorm=True)
    assert layer_types(net) == [Affine, BatchNormalization, ReLU, Affine, BatchNormalization,
                                ReLU, Affine]
    np.testing.assert_array_equal(to_cpu(net.params["gamma1"]), np.ones(5))
    np.testing.assert_array_equal(to_cpu(net.params["beta2"]), np.zeros(4))
    net = small_extend(use_batchnorm=False, use_dropout=True, activation="sigmoid",
                       dropout_ration=0.25)  # the book's spelling
    assert layer_types(net) == [Affine, Sigmoid, Dropout, Affine, Sigmoid, Dropout, Affine]
    assert net.layers[2].dropout_ratio == 0.25 and net.config["dropout_ratio"] == 0.25
    assert not net.buffers


def test_dropout_ration_conflict_is_an_error(xp):
    with pytest.raises(ValueError, match="dropout_ration"):
        small_extend(use_dropout=True, dropout_ratio=0.2, dropout_ration=0.3)
    assert small_extend(dropout_ratio=0.3, dropout_ration=0.3).dropout_ratio == 0.3


def test_simple_convnet_book_defaults(xp):
    net = SimpleConvNet()
    # the convolution and its ReLU are one layer (one pass over the output)
    assert layer_types(net) == [ConvReLU, Pooling, Affine, ReLU, Affine]
    pool = net.layers[1]
    assert (pool.pool_h, pool.pool_w, pool.stride, pool.pad) == (2, 2, 2, 0)
    assert {k: v.shape for k, v in net.params.items()} == {
        "W1": (30, 1, 5, 5), "b1": (30,), "W2": (30 * 12 * 12, 100), "b2": (100,),
        "W3": (100, 10), "b3": (10,)}
    assert net.input_shape == (1, 28, 28)
    # weight_init_std = 0.01 for every weight, as in the book
    for k in ("W1", "W2", "W3"):
        assert float(to_cpu(net.params[k]).std()) == pytest.approx(0.01, rel=0.1)


DEEP_FAN_INS = [9, 144, 144, 288, 288, 576, 1024, 50]  # the book's pre_node_nums


def test_deep_convnet_matches_the_book(xp):
    backend.seed(8)
    net = DeepConvNet()
    C, R, P, A, D = ConvReLU, ReLU, Pooling, Affine, Dropout
    assert layer_types(net) == [C, C, P, C, C, P, C, C, P, A, R, D, A, D]
    assert list(net.params) == [f"{p}{i}" for i in range(1, 9) for p in "Wb"]
    assert not net.buffers
    shapes = {k: v.shape for k, v in net.params.items() if k.startswith("W")}
    assert shapes == {"W1": (16, 1, 3, 3), "W2": (16, 16, 3, 3), "W3": (32, 16, 3, 3),
                      "W4": (32, 32, 3, 3), "W5": (64, 32, 3, 3), "W6": (64, 64, 3, 3),
                      "W7": (64 * 4 * 4, 50), "W8": (50, 10)}
    assert net.num_params == 123552
    convs = [layer for layer in net.layers if isinstance(layer, Convolution)]
    assert [(c.stride, c.pad) for c in convs] == [(1, 1), (1, 1), (1, 1), (1, 2), (1, 1), (1, 1)]
    assert [d.dropout_ratio for d in net.layers if isinstance(d, Dropout)] == [0.5, 0.5]
    # He init with the book's fan-ins, drawn in order from the seeded source
    backend.seed(8)
    for i, n in enumerate(DEEP_FAN_INS, start=1):
        W = net.params[f"W{i}"]
        expected = backend.get_rng().normal(W.shape, math.sqrt(2 / n), np.float32)
        np.testing.assert_array_equal(to_cpu(W), to_cpu(expected))
        assert not net.params[f"b{i}"].any()
    x = xp.zeros((2, 1, 28, 28), dtype=np.float32)
    assert net.predict(x).shape == (2, 10)


def test_deep_convnet_other_input_size(xp, rng):
    net = DeepConvNet(input_dim=(3, 12, 12), hidden_size=7, output_size=4)
    # 12 -> pool 6 -> conv4 (pad 2) 8 -> pool 4 -> pool 2
    assert net.params["W1"].shape == (16, 3, 3, 3)
    assert net.params["W7"].shape == (64 * 2 * 2, 7)
    x, t = data(xp, rng, 2, (3, 12, 12), 4, dtype=np.float32)
    assert net.predict(x).shape == (2, 4)


@pytest.mark.parametrize(("make", "names"), [
    (lambda: DeepConvNet(input_dim=(1, 8, 8)), "Pooling 3"),
    (lambda: DeepConvNet(conv_param_1={"stride": 2}), "Convolution 1 (conv_param_1)"),
    (lambda: SimpleConvNet(input_dim=(1, 7, 7), conv_param={"filter_size": 3}), "Pooling 1"),
    (lambda: SimpleConvNet(input_dim=(1, 6, 6),
                           conv_param={"filter_size": 3, "stride": 2}), "Convolution 1"),
    (lambda: SimpleConvNet(input_dim=(1, 4, 4)), "Convolution 1"),
])
def test_conv_output_size_not_whole_names_the_layer(xp, make, names):
    with pytest.raises(ValueError, match="not a whole number") as info:
        make()
    assert names in str(info.value)


def test_bad_arguments(xp):
    with pytest.raises(ValueError, match="activation"):
        MultiLayerNet(4, [3], 2, activation="softplus")
    with pytest.raises(ValueError, match="'relu'.*'he'.*'sigmoid'.*'xavier'"):
        MultiLayerNet(4, [3], 2, weight_init_std="gauss")
    with pytest.raises(ValueError, match="hidden_size_list"):
        MultiLayerNet(4, [3, 0], 2)
    with pytest.raises(TypeError, match="hidden_size_list"):
        MultiLayerNet(4, 3, 2)
    with pytest.raises(ValueError, match="weight_decay_lambda"):
        MultiLayerNet(4, [3], 2, weight_decay_lambda=-1)
    with pytest.raises(ValueError, match="unknown keys"):
        SimpleConvNet(conv_param={"filter_num": 3, "kernel": 3})
    with pytest.raises(ValueError, match="input_dim"):
        SimpleConvNet(input_dim=(28, 28))
    with pytest.raises(ValueError, match="float"):
        MultiLayerNet(4, [3], 2, dtype=np.int32)


# ----------------------------------------------------------------- params mapping
def test_params_is_a_live_mapping(xp, rng):
    net = MultiLayerNet(6, [5], 3)
    assert isinstance(net.params, ParamMap)
    assert len(net.params) == 4 and "W1" in net.params and "W9" not in net.params
    affine1 = net.layers[0]
    assert net.params["W1"] is affine1.params["W"]
    x, t = data(xp, rng, 4, (6,), 3, dtype=np.float32)
    before = to_cpu(net.predict(x)).copy()
    # an optimizer step in place, as optimizer.update(net.params, grads) does
    grads = net.gradient(x, t)
    for k, p in net.params.items():
        p -= 0.5 * grads[k]
    assert net.params["W1"] is affine1.params["W"]
    np.testing.assert_array_equal(to_cpu(affine1.params["W"]), to_cpu(net.params["W1"]))
    assert not np.array_equal(to_cpu(net.predict(x)), before)
    # the book's SGD: params[key] -= lr * grads[key] goes through __setitem__
    net.params["b2"] -= 0.1 * grads["b2"]
    # assignment routes into the layer
    new = xp.zeros_like(net.params["W2"])
    net.params["W2"] = new
    assert net.layers[2].params["W"] is new and net.params["W2"] is new
    np.testing.assert_array_equal(to_cpu(net.predict(x)), np.tile(to_cpu(net.params["b2"]),
                                                                  (4, 1)))


def test_params_assignment_is_checked(xp):
    net = MultiLayerNet(6, [5], 3)
    W1 = net.params["W1"]
    with pytest.raises(ValueError, match=r"W1.*shape \(5, 6\) != expected \(6, 5\)"):
        net.params["W1"] = xp.zeros((5, 6), dtype=np.float32)
    with pytest.raises(ValueError, match="dtype float64 != expected float32"):
        net.params["W1"] = xp.zeros((6, 5), dtype=F64)
    with pytest.raises(ValueError, match="expected an array"):
        net.params["W1"] = [[0.0] * 5] * 6
    with pytest.raises(KeyError, match="W7"):
        net.params["W7"] = xp.zeros((6, 5), dtype=np.float32)
    with pytest.raises(TypeError):
        del net.params["W1"]
    with pytest.raises(AttributeError):
        net.params = {}
    assert net.params["W1"] is W1 and list(net.params) == ["W1", "b1", "W2", "b2"]


def test_assigning_an_array_from_the_other_device_is_an_error(xp):
    if not backend.is_gpu_available():
        pytest.skip("needs CuPy and a GPU to have two devices")
    net = MultiLayerNet(6, [5], 3)
    other = to_cpu if xp is not np else backend.to_gpu
    with pytest.raises(BackendMismatchError):
        net.params["W1"] = other(xp.zeros((6, 5), dtype=np.float32))


def test_buffers_are_live(xp, rng):
    net = small_extend()
    bn = net.layers[1]
    assert net.buffers["running_mean1"] is bn.buffers["running_mean"]
    x, t = data(xp, rng, 8, (6,), 3)
    net.loss(x, t, train_flg=True)
    assert bool(net.buffers["running_mean1"].any())
    # inference uses the running statistics, training the batch statistics
    assert not np.allclose(to_cpu(net.predict(x, train_flg=False)),
                           to_cpu(net.predict(x, train_flg=True)))


def test_sequential_numbers_layer_kinds_separately(xp):
    def bn(n):
        return BatchNormalization(xp.ones(n, dtype=np.float32), xp.zeros(n, dtype=np.float32))

    def affine(i, o):
        return Affine(xp.ones((i, o), dtype=np.float32), xp.zeros(o, dtype=np.float32))

    net = Sequential([affine(4, 3), bn(3), ReLU(), affine(3, 3), bn(3), ReLU(), affine(3, 2)],
                     config={"note": "custom"})
    assert list(net.params) == ["W1", "b1", "gamma1", "beta1", "W2", "b2", "gamma2", "beta2",
                                "W3", "b3"]
    assert list(net.buffers) == ["running_mean1", "running_var1", "running_mean2",
                                 "running_var2"]
    assert net.config == {"note": "custom"} and net.model_name is None
    with pytest.raises(ValueError, match="mixed dtypes"):
        Sequential([affine(4, 3), Affine(xp.ones((3, 2)), xp.zeros(2))])
    with pytest.raises(TypeError, match="JSON"):
        Sequential([affine(4, 3)], config={"bad": object()})
    with pytest.raises(ValueError, match="at least one layer"):
        Sequential([])


# ----------------------------------------------------------------- loss, dtype, input
def test_weight_decay_term_in_loss_and_gradient(xp, rng):
    lam = 0.3
    backend.seed(1)
    plain = MultiLayerNet(6, [5, 4], 3, dtype=F64)
    backend.seed(1)
    decayed = MultiLayerNet(6, [5, 4], 3, dtype=F64, weight_decay_lambda=lam)
    x, t = data(xp, rng, 4, (6,), 3)
    penalty = 0.5 * lam * sum(float((to_cpu(decayed.params[k]) ** 2).sum())
                              for k in ("W1", "W2", "W3"))
    assert float(decayed.loss(x, t)) == pytest.approx(float(plain.loss(x, t)) + penalty,
                                                      rel=1e-12)
    g0, g1 = plain.gradient(x, t), decayed.gradient(x, t)
    for k in g0:
        extra = lam * to_cpu(decayed.params[k]) if k.startswith("W") else 0.0
        np.testing.assert_allclose(to_cpu(g1[k]), to_cpu(g0[k]) + extra, rtol=1e-12, atol=1e-15)


def test_float32_model_stays_float32(xp, rng):
    net = SimpleConvNet(input_dim=(1, 6, 6), conv_param={"filter_num": 2, "filter_size": 3},
                        hidden_size=4, output_size=3)
    x64, t = data(xp, rng, 3, (1, 6, 6), 3)  # float64 input is cast
    assert net.dtype == np.float32
    assert net.predict(x64).dtype == np.float32
    loss = net.loss(x64, t)
    assert loss.dtype == np.float32 and loss.ndim == 0
    assert net.last_loss is None
    grads = net.gradient(x64, t)
    assert all(g.dtype == np.float32 for g in grads.values())
    assert all(p.dtype == np.float32 for p in net.params.values())
    assert isinstance(net.last_loss, xp.ndarray) and net.last_loss.ndim == 0
    assert net.last_loss.dtype == np.float32
    assert float(net.last_loss) == float(loss)


def test_integer_input_is_not_silently_cast(xp):
    net = MultiLayerNet(4, [3], 2)
    with pytest.raises(TypeError, match="dtype"):
        net.predict(xp.zeros((2, 4), dtype=np.uint8))


def test_default_dtype_is_followed(xp, float64_default):
    net = MultiLayerNetExtend(4, [3], 2, use_batchnorm=True)
    assert net.dtype == F64 and net.config["dtype"] == "float64"
    assert all(a.dtype == F64 for a in [*net.params.values(), *net.buffers.values()])


def test_flat_input_to_conv_nets(xp, rng):
    net = SimpleConvNet(input_dim=(1, 6, 6), conv_param={"filter_num": 3, "filter_size": 3},
                        hidden_size=4, output_size=3, dtype=F64)
    x, t = data(xp, rng, 5, (1, 6, 6), 3)
    flat = x.reshape(5, 36)
    np.testing.assert_array_equal(to_cpu(net.predict(flat)), to_cpu(net.predict(x)))
    assert float(net.loss(flat, t)) == float(net.loss(x, t))
    g_flat, g = net.gradient(flat, t), net.gradient(x, t)
    for k in g:
        np.testing.assert_array_equal(to_cpu(g_flat[k]), to_cpu(g[k]))
    assert net.accuracy(flat, t, batch_size=2) == net.accuracy(x, t)
    with pytest.raises(ValueError, match="36"):
        net.predict(xp.zeros((5, 35), dtype=F64))
    deep = DeepConvNet()
    y = deep.predict(xp.zeros((2, 784), dtype=np.float32))
    assert y.shape == (2, 10)


def test_accuracy_counts_every_sample(xp, rng):
    net = MultiLayerNet(6, [5], 4, dtype=F64)
    x, _ = data(xp, rng, 7, (6,), 4)
    pred = to_cpu(net.predict(x).argmax(axis=1))
    labels = pred.copy()
    labels[0] = (pred[0] + 1) % 4  # one wrong, in the first batch
    t = xp.asarray(labels)
    acc = net.accuracy(x, t, batch_size=3)  # batches of 3, 3 and the remainder 1
    assert isinstance(acc, float)
    assert acc == 6 / 7
    assert net.accuracy(x, t, batch_size=100) == 6 / 7
    assert net.accuracy(x, t, batch_size=1) == 6 / 7
    onehot = xp.eye(4, dtype=F64)[t]
    assert net.accuracy(x, onehot, batch_size=3) == 6 / 7
    labels[6] = (pred[6] + 1) % 4  # the remainder matters
    assert net.accuracy(x, xp.asarray(labels), batch_size=3) == 5 / 7
    with pytest.raises(ValueError, match="labels"):
        net.accuracy(x, t[:6])
    with pytest.raises(ValueError, match="batch_size"):
        net.accuracy(x, t, batch_size=0)


# ----------------------------------------------------------------- state
def trained_extend(xp, rng, seed=0):
    backend.seed(seed)
    net = small_extend(use_dropout=True, weight_decay_lambda=0.01)
    x, t = data(xp, rng, 8, (6,), 3)
    grads = net.gradient(x, t)
    for k, p in net.params.items():
        p -= 0.1 * grads[k]
    return net, x


def test_state_dict_round_trip(xp, rng):
    net, x = trained_extend(xp, rng, seed=0)
    state = net.state_dict()
    assert set(state) == {"params", "buffers"}
    assert list(state["params"]) == list(net.params)
    assert list(state["buffers"]) == list(net.buffers)
    assert state["params"]["W1"] is not net.params["W1"]  # a snapshot
    assert net.state_dict(copy=False)["params"]["W1"] is net.params["W1"]
    other, _ = trained_extend(xp, rng, seed=1)
    W1 = other.params["W1"]
    other.load_state_dict(state)
    assert other.params["W1"] is W1  # loaded in place: optimizers keep their arrays
    assert_state_equal(host_state(other), host_state(net))
    np.testing.assert_array_equal(to_cpu(other.predict(x)), to_cpu(net.predict(x)))
    before = host_state(net)
    net.params["W1"] += 1  # the snapshot does not follow
    assert to_cpu(state["params"]["W1"]).tobytes() != to_cpu(net.params["W1"]).tobytes()
    net.load_state_dict({s: {k: to_cpu(v) for k, v in d.items()} for s, d in state.items()})
    assert_state_equal(host_state(net), before)  # host arrays load onto any device


def test_load_state_dict_reports_every_mismatch_and_changes_nothing(xp, rng):
    net, _ = trained_extend(xp, rng)
    before = host_state(net)
    state = net.state_dict()
    del state["params"]["b3"]
    state["params"]["W9"] = xp.zeros(3)
    state["params"]["W1"] = xp.zeros((5, 6), dtype=F64)
    state["params"]["gamma2"] = state["params"]["gamma2"].astype(np.float32)
    state["buffers"]["running_var1"] = "not an array"
    state["extra"] = {}
    with pytest.raises(ValueError) as info:
        net.load_state_dict(state)
    message = str(info.value)
    for expected in ("missing keys ['b3']", "unexpected keys ['W9']", "params['W1']",
                     "(5, 6)", "params['gamma2']: dtype float32", "buffers['running_var1']",
                     "unexpected section 'extra'", "6 mismatch(es)"):
        assert expected in message, expected
    assert_state_equal(host_state(net), before)
    with pytest.raises(ValueError, match="mapping"):
        net.load_state_dict([1, 2])
    assert_state_equal(host_state(net), before)


def test_save_and_load_params_bitwise(xp, rng, tmp_path):
    net, x = trained_extend(xp, rng, seed=0)
    path = tmp_path / "params.ckpt"  # no suffix is added
    net.save_params(path)
    assert sorted(os.listdir(tmp_path)) == ["params.ckpt"]  # no temporary left
    stored = load_state(path)  # xpnet's one state format
    assert list(stored.params) == list(net.params)
    assert list(stored.buffers) == list(net.buffers)
    other, _ = trained_extend(xp, rng, seed=1)
    other.load_params(path)
    assert_state_equal(host_state(other), host_state(net))
    np.testing.assert_array_equal(to_cpu(other.predict(x)), to_cpu(net.predict(x)))
    # overwriting an existing file works, atomically
    other.params["b1"] += 1
    other.save_params(str(path))
    net.load_params(str(path))
    assert_state_equal(host_state(other), host_state(net))
    assert sorted(os.listdir(tmp_path)) == ["params.ckpt"]


def test_load_params_rejects_a_different_network(xp, rng, tmp_path):
    MultiLayerNet(6, [5], 3).save_params(tmp_path / "small.npz")
    net, _ = trained_extend(xp, rng)
    before = host_state(net)
    with pytest.raises(ValueError, match="mismatch") as info:
        net.load_params(tmp_path / "small.npz")
    assert "missing keys" in str(info.value) and "params['W2']" in str(info.value)
    assert_state_equal(host_state(net), before)
    np.savez(tmp_path / "odd.npz", **{"weights": np.zeros(3)})
    with pytest.raises(ValueError, match="no manifest"):
        net.load_params(tmp_path / "odd.npz")
    np.save(tmp_path / "single.npy", np.zeros(3))
    with pytest.raises(ValueError, match="expected an .npz archive"):
        net.load_params(tmp_path / "single.npy")
    net.save_params(tmp_path / "whole.npz")
    damaged = tmp_path / "damaged.npz"
    damaged.write_bytes((tmp_path / "whole.npz").read_bytes()[:200])  # truncated
    with pytest.raises(ValueError, match="damaged.npz"):
        net.load_params(damaged)
    assert_state_equal(host_state(net), before)


def _plant_marker(path):
    """What a malicious pickle would run: leaves a file behind."""
    with open(path, "w") as f:
        f.write("executed")
    return np.zeros((6, 5))


class _Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (_plant_marker, (self.path,))


def test_load_params_never_unpickles(xp, rng, tmp_path):
    net = MultiLayerNet(6, [5], 3, dtype=F64)
    before = host_state(net)
    marker = tmp_path / "marker"
    payload = np.empty(1, dtype=object)
    payload[0] = _Payload(str(marker))
    evil = tmp_path / "evil.npz"
    net.save_params(evil)
    with np.load(evil) as archive:  # the state file with its first array replaced
        arrays = {k: archive[k] for k in archive.files}
    arrays["a00000"] = payload
    np.savez(evil, **arrays)
    # the file is a real exploit: loading it with pickle allowed runs the payload
    with np.load(evil, allow_pickle=True) as archive:
        archive["a00000"]
    assert marker.exists()
    marker.unlink()
    with pytest.raises(ValueError, match="pickle"):
        net.load_params(evil)
    assert not marker.exists()
    assert_state_equal(host_state(net), before)
    # a plain pickle file is refused too
    plain = tmp_path / "params.pkl"
    with open(plain, "wb") as f:
        pickle.dump({"W1": _Payload(str(marker))}, f)
    with pytest.raises(ValueError, match="pickle"):
        net.load_params(plain)
    assert not marker.exists()
    assert_state_equal(host_state(net), before)


# ----------------------------------------------------------------- devices, config
def test_to_cpu_and_to_gpu(xp, rng):
    net = small_extend()
    x, t = data(xp, rng, 4, (6,), 3)
    expected = to_cpu(net.predict(x))
    arrays = [*net.params.values(), *net.buffers.values()]
    if xp is np:
        assert net.to_cpu() is net and net.backend_name == "numpy"
        assert all(a is b for a, b in zip(arrays, [*net.params.values(),
                                                   *net.buffers.values()], strict=True))
        if not backend.is_gpu_available():
            with pytest.raises(BackendError):
                net.to_gpu()
            assert net.backend_name == "numpy"
            return
        assert net.to_gpu() is net
        assert net.backend_name == "cupy"
        net.to_cpu()
    else:
        assert net.to_cpu() is net and net.backend_name == "numpy"
        assert all(isinstance(a, np.ndarray) for a in net.buffers.values())
        with pytest.raises(BackendMismatchError):
            net.predict(x)  # x is still on the GPU: nothing moves silently
        np.testing.assert_allclose(net.predict(to_cpu(x)), expected, rtol=1e-12, atol=1e-12)
        assert net.to_gpu() is net and net.backend_name == "cupy"
        assert all(isinstance(a, xp.ndarray) for a in net.params.values())
        assert net.layers[1].buffers["running_var"] is net.buffers["running_var1"]
    np.testing.assert_allclose(to_cpu(net.predict(x)), expected, rtol=1e-12, atol=1e-12)
    net.gradient(x, t)
    assert net.last_loss is not None


@pytest.mark.parametrize("name", sorted(MODELS))
def test_build_model_and_rebuild_from_config(xp, name):
    small = {"mlp": {"input_size": 6, "hidden_size_list": [5], "output_size": 3},
             "mlp-extend": {"input_size": 6, "hidden_size_list": [5], "output_size": 3,
                            "use_batchnorm": True, "use_dropout": True},
             "simple-convnet": {"input_dim": (1, 6, 6), "hidden_size": 4,
                                "conv_param": {"filter_num": 2, "filter_size": 3}},
             "deep-convnet": {"input_dim": (1, 12, 12), "hidden_size": 5},
             "vgg": {"config": [3, "M", 4], "input_dim": (1, 8, 8), "hidden_size": [5]},
             "googlenet": {"config": [3, "M", [2, 2, 3, 1, 2, 2]], "input_dim": (1, 8, 8)},
             "resnet": {"depth": 8, "width": 2, "input_dim": (1, 8, 8)}}[name]
    net = build_model(name, **small)
    assert net.model_name == name and type(net) is MODELS[name]
    config = json.loads(json.dumps(net.config))  # JSON round trip
    rebuilt = build_model(net.model_name, **config)
    assert rebuilt.config == net.config
    rebuilt.load_state_dict(net.state_dict())
    assert_state_equal(host_state(rebuilt), host_state(net))


def test_build_model_names(xp):
    assert set(MODELS) == {"mlp", "mlp-extend", "simple-convnet", "deep-convnet", "vgg",
                           "googlenet", "resnet"}
    assert isinstance(build_model("Simple_ConvNet", input_dim=(1, 6, 6),
                                  conv_param={"filter_size": 3}), SimpleConvNet)
    with pytest.raises(ValueError, match="valid names: mlp, mlp-extend"):
        build_model("alexnet")
