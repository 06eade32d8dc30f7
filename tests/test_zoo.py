"""Tests of xpnet.models.zoo (VGG, GoogLeNet, ResNet) and xpnet.models.summary.

Tiny instances of each network run on both backends (the ``xp`` fixture): shapes,
gradient keys, float64 central differences on sampled entries, the state round trip,
one Adam step, the summary and the multiply-add count.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests.conftest import gradients_with_fixed_masks
from xpnet import backend
from xpnet.backend import to_cpu
from xpnet.gradcheck import numerical_gradient_at
from xpnet.layers import (
    Affine,
    BatchNormalization,
    Chain,
    Convolution,
    ConvReLU,
    Dropout,
    GlobalAveragePooling,
    Identity,
    Parallel,
    Pooling,
)
from xpnet.layers.compose import walk
from xpnet.models.summary import forward_flops, summary, trace
from xpnet.models.zoo import VGG, VGG_CONFIGS, GoogLeNet, ResNet
from xpnet.optim import Adam

F64 = np.float64
TOL = 1e-6
CLASSES = 3

# Tiny instances: 8x8 input, a few channels, every kind of layer each model has.
TINY = {
    "vgg": lambda **kw: VGG([3, "M", 4], input_dim=(1, 8, 8), output_size=CLASSES,
                            hidden_size=[5], dropout=0.3, **kw),
    "vgg-plain": lambda **kw: VGG([3, 3, "M", 4], input_dim=(2, 8, 8), output_size=CLASSES,
                                  hidden_size=[5, 4], batchnorm=False, dropout=0.0, **kw),
    "googlenet": lambda **kw: GoogLeNet([3, "M", [2, 2, 3, 1, 2, 2], [2, 1, 2, 1, 2, 1]],
                                        input_dim=(1, 8, 8), output_size=CLASSES,
                                        dropout=0.3, **kw),
    "googlenet-factorized": lambda **kw: GoogLeNet(
        [[2, 2, 3, 2, 2, 2], "M", [2, 2, 2, 2, 2, 2]], input_dim=(1, 8, 8),
        output_size=CLASSES, batchnorm=False, factorize_5x5=True, dropout=0.0, **kw),
    "resnet": lambda **kw: ResNet(depth=8, width=2, input_dim=(1, 8, 8), output_size=CLASSES,
                                  **kw),  # 8 -> stem 5 -> 3 -> 2
    "resnet-14": lambda **kw: ResNet(depth=14, width=2, input_dim=(1, 8, 8),
                                     output_size=CLASSES, **kw),
}


def make(name, dtype=None):
    return TINY[name](dtype=dtype)


def batch(xp, n, shape, seed=0, dtype=np.float32):
    r = np.random.default_rng(seed)
    return (xp.asarray(r.standard_normal((n, *shape)).astype(dtype)),
            xp.asarray(r.integers(0, CLASSES, n)))


def leaves(net):
    return [layer for layer in walk(net.chain) if not layer.children()]


def zero_gradient_keys(net):
    """Names of convolution biases followed by batch normalisation: their gradient is 0."""
    owner = {(id(layer), key): name
             for name, (layer, key) in ((n, net.params.slot(n)) for n in net.params)}
    keys = []
    for node in walk(net.chain):
        if isinstance(node, Chain):
            for a, b in zip(node.layers, node.layers[1:], strict=False):
                if isinstance(a, Convolution) and isinstance(b, BatchNormalization):
                    keys.append(owner[id(a), "b"])
    return keys


# ----------------------------------------------------------------- shapes, keys
@pytest.mark.parametrize("name", list(TINY))
def test_forward_shapes_and_dtype(xp, name):
    net = make(name)
    x, t = batch(xp, 4, net.input_shape)
    y = net.predict(x)
    assert y.shape == (4, CLASSES) and y.dtype == np.float32
    assert isinstance(y, xp.ndarray)
    flat = net.predict(x.reshape(4, -1))  # flat input is reshaped to (N, C, H, W)
    assert to_cpu(flat).tobytes() == to_cpu(y).tobytes()
    assert math.isfinite(float(net.loss(x, t)))
    assert net.predict(x, train_flg=True).shape == (4, CLASSES)


@pytest.mark.parametrize("name", list(TINY))
def test_gradient_keys_equal_parameter_keys(xp, name):
    net = make(name)
    x, t = batch(xp, 4, net.input_shape)
    grads = net.gradient(x, t)
    assert list(grads) == list(net.params)
    for k, g in grads.items():
        p = net.params[k]
        assert g.shape == p.shape and g.dtype == p.dtype and isinstance(g, xp.ndarray), k
        assert bool(xp.isfinite(g).all()), k


# ----------------------------------------------------------------- gradient check
@pytest.mark.parametrize("name", list(TINY))
def test_sampled_gradient_check_float64(xp, name):
    """Central differences (h = 1e-5) at the largest entry and up to 4 random entries of
    every parameter, against backpropagation (relative error <= 1e-6); dropout masks
    held fixed.  Biases of
    convolutions followed by batch normalisation have no effect on the loss: both
    gradients must be 0 there."""
    net = make(name, dtype=F64)
    x, t = batch(xp, 4, net.input_shape, dtype=F64)
    # Biases start at 0: a convolution fed by dead ReLUs would sit exactly on the next
    # ReLU's kink, where central differences see half a slope.  Random ones avoid that.
    r = np.random.default_rng(2)
    for k, p in net.params.items():
        if k.split(".")[-1].startswith(("b", "beta")):
            p[...] = xp.asarray(r.normal(0.0, 0.1, p.shape))
    grads, loss = gradients_with_fixed_masks(net, x, t)
    zero = set(zero_gradient_keys(net))
    if "plain" in name or "factorized" in name:
        assert not zero
    else:
        assert zero
    pick = np.random.default_rng(1)
    h = 1e-5
    for k, p in net.params.items():
        g = grads[k].ravel()
        idx = {int(np.argmax(np.abs(g)))} | set(pick.choice(g.size, min(4, g.size),
                                                            replace=False).tolist())
        idx = sorted(idx)
        numeric, analytic = numerical_gradient_at(loss, p, idx, h), g[idx]
        if k in zero:
            assert np.abs(g).max() < 1e-12 and np.abs(numeric).max() < 1e-8, k
            continue
        scale = np.abs(g).max()
        assert scale > 1e-8, f"{k}: no gradient reaches it"
        # Relative to the gradient's scale, or to 1e-3 for a smaller one: the loss's
        # rounding (~1e-15) over 2h leaves about 1e-10 of noise in any difference.
        err = np.abs(numeric - analytic).max() / max(scale, 1e-3)
        assert err <= TOL, (k, err)


# ----------------------------------------------------------------- state, training
@pytest.mark.parametrize("name", list(TINY))
def test_save_load_round_trip_bit_exact(xp, tmp_path, name):
    net = make(name)
    x, t = batch(xp, 6, net.input_shape)
    Adam(lr=0.01).update(net.params, net.gradient(x, t))  # running statistics move too
    path = tmp_path / f"{name}.npz"
    net.save_params(path)
    backend.seed(123)  # different initial weights
    other = type(net)(**net.config)
    assert to_cpu(other.predict(x)).tobytes() != to_cpu(net.predict(x)).tobytes()
    other.load_params(path)
    for section in ("params", "buffers"):
        mine, theirs = getattr(net, section), getattr(other, section)
        assert list(mine) == list(theirs)
        for k in mine:
            assert to_cpu(mine[k]).tobytes() == to_cpu(theirs[k]).tobytes(), (section, k)
    assert to_cpu(other.predict(x)).tobytes() == to_cpu(net.predict(x)).tobytes()


@pytest.mark.parametrize("name", list(TINY))
def test_one_adam_step_lowers_the_loss(xp, name):
    net = make(name)
    x, t = batch(xp, 8, net.input_shape, seed=3)
    masks = net.rng_states()
    net.set_rng_states(masks)
    grads = net.gradient(x, t)
    before = float(net.last_loss)
    Adam(lr=0.01).update(net.params, grads)
    net.set_rng_states(masks)
    after = float(net.loss(x, t))
    assert after < before, (before, after)


# ----------------------------------------------------------------- the defaults
def test_default_models_for_mnist(xp):
    expected = {VGG: (1_895_786, 30_735_360), GoogLeNet: (88_520, 9_342_640),
                ResNet: (175_642, 17_880_960)}
    x, _ = batch(xp, 2, (1, 28, 28))
    for cls, (n_params, macs) in expected.items():
        net = cls()
        assert net.model_name == cls.__name__.lower()
        assert net.input_shape == (1, 28, 28) and net.dtype == np.float32
        assert net.num_params == n_params, cls
        assert forward_flops(net) == macs, cls
        # training mode: before any training the running variances are 0 (as in the
        # book), and inference through a dozen normalisations would overflow
        assert net.predict(x, train_flg=True).shape == (2, 10)
        assert all(k.startswith(("W", "b")) for k in net.params if "gamma" not in k
                   and "beta" not in k and "." not in k)


def test_config_rebuilds_the_same_architecture(xp):
    for net in (VGG(), GoogLeNet(), ResNet(), *(make(n) for n in TINY)):
        other = type(net)(**net.config)
        assert other.config == net.config
        assert {k: v.shape for k, v in other.params.items()} == \
            {k: v.shape for k, v in net.params.items()}
        assert [type(layer) for layer in walk(other.chain)] == \
            [type(layer) for layer in walk(net.chain)]


def test_vgg_layers_and_hidden_sizes(xp):
    net = make("vgg")
    assert [type(layer) for layer in net.layers] == [
        Convolution, BatchNormalization, type(net.layers[2]), Pooling, Convolution,
        BatchNormalization, type(net.layers[2]), Affine, type(net.layers[2]), Dropout, Affine]
    assert net.params["W3"].shape == (4 * 4 * 4, 5)  # the fan-in follows the tracked shape
    plain = make("vgg-plain")
    assert [type(layer) for layer in plain.layers] == [
        ConvReLU, ConvReLU, Pooling, ConvReLU, Affine, type(net.layers[2]), Affine,
        type(net.layers[2]), Affine]
    # an int width applies to each of the configuration's hidden layers
    assert VGG("vgg11", input_dim=(3, 32, 32), hidden_size=8).config["hidden_size"] == [8, 8]
    assert VGG(hidden_size=[]).params["W7"].shape == (128 * 7 * 7, 10)
    assert VGG("MNIST").config["config"] == "mnist"


@pytest.mark.parametrize("preset,weight_layers", [("vgg16", 16), ("vgg19", 19)])
def test_vgg_presets_for_32x32_forward_backward(xp, preset, weight_layers):
    """The paper's configurations D and E on CIFAR-sized input: 32 -> 1 after five
    poolings, so the first fully connected layer has fan-in 512."""
    net = VGG(preset, input_dim=(3, 32, 32), output_size=10)
    weights = [k for k in net.params if k.startswith("W")]
    assert len(weights) == weight_layers
    convs = [k for k in weights if net.params[k].ndim == 4]
    assert len(convs) == weight_layers - 3
    assert net.params["W1"].shape == (64, 3, 3, 3)
    assert net.params[weights[-3]].shape == (512, 4096)
    assert net.params[weights[-1]].shape == (4096, 10)
    convs_macs = sum(h * h * c_in * c_out * 9 for h, c_in, c_out in _vgg_convs(preset, 32, 3))
    fc_macs = 512 * 4096 + 4096 * 4096 + 4096 * 10
    assert forward_flops(net) == convs_macs + fc_macs
    x, t = batch(xp, 2, (3, 32, 32))
    y = net.predict(x, train_flg=True)
    assert y.shape == (2, 10)
    grads = net.gradient(x, t)
    assert list(grads) == list(net.params)
    assert all(bool(xp.isfinite(g).all()) for g in grads.values())


def _vgg_convs(preset, size, channels):
    """(size, in channels, out channels) of each convolution of a VGG preset."""
    out = []
    for v in VGG_CONFIGS[preset]:
        if v == "M":
            size //= 2
        else:
            out.append((size, channels, v))
            channels = v
    return out


def test_googlenet_inception_blocks(xp):
    net = make("googlenet")
    blocks = [layer for layer in net.layers if isinstance(layer, Parallel)]
    assert [b.block_name for b in blocks] == ["inception1", "inception2"]
    assert all(b.merge == "concat" and len(b.branches) == 4 for b in blocks)
    calls = trace(net)
    assert calls[id(blocks[0])][0][1] == (2 + 3 + 2 + 2, 4, 4)
    assert calls[id(blocks[1])][0][1] == (2 + 2 + 2 + 1, 4, 4)
    pool_path = blocks[0].branches[3]
    assert isinstance(pool_path.layers[0], Pooling) and pool_path.layers[0].stride == 1
    assert net.params["inception1.W5"].shape == (2, 1, 5, 5)  # 1x1 -> 5x5
    factorized = make("googlenet-factorized")
    assert factorized.params["inception1.W5"].shape == (2, 2, 3, 3)  # 1x1 -> 3x3 -> 3x3
    assert factorized.params["inception1.W6"].shape == (2, 2, 3, 3)
    assert isinstance(net.layers[-3], GlobalAveragePooling)
    assert isinstance(net.layers[-2], Dropout) and net.layers[-2].dropout_ratio == 0.3
    assert GoogLeNet().layers[-2].dropout_ratio == 0.4  # the paper's


def test_resnet_stages_and_shortcuts(xp):
    net = ResNet()  # depth 14: 2 blocks per stage
    stages = [layer for layer in net.layers if isinstance(layer, Chain)]
    assert [s.block_name for s in stages] == ["stage1", "stage2", "stage3"]
    shortcuts = []
    for stage in stages:
        assert len(stage.layers) == 2
        for block in stage.layers:
            merge = block.layers[0]
            assert isinstance(merge, Parallel) and merge.merge == "add"
            shortcuts.append(type(merge.branches[1]))
    # identity unless the shape changes (the first block of stages 2 and 3)
    assert shortcuts == [Identity, Identity, Chain, Identity, Chain, Identity]
    assert net.params["stage2.W3"].shape == (32, 16, 1, 1)
    assert net.params["stage3.W1"].shape == (64, 32, 3, 3)
    assert net.layers[0].params["W"].shape == (16, 1, 4, 4)
    weights = [v for k, v in net.params.items() if k.split(".")[-1].startswith("W")]
    projections = [w for w in weights if w.ndim == 4 and w.shape[2:] == (1, 1)]
    assert len(projections) == 2
    assert len(weights) - len(projections) == 14  # depth: weight layers on the main path
    assert net.freeze("stage1") == [k for k in net.params if k.startswith("stage1.")]
    assert isinstance(net.layers[-2], GlobalAveragePooling)
    assert isinstance(net.layers[-1], Affine) and net.params["W2"].shape == (64, 10)
    assert ResNet(input_dim=(3, 32, 32)).predict(
        xp.zeros((1, 3, 32, 32), dtype=np.float32)).shape == (1, 10)


def test_construction_errors():
    with pytest.raises(ValueError, match="unknown preset 'vgg17'"):
        VGG("vgg17")
    with pytest.raises(ValueError, match="Pooling 3"):
        VGG([4, "M", 4, "M", 4, "M"])  # 28 -> 14 -> 7: a 2x2 pooling needs an even size
    with pytest.raises(ValueError, match="config\\[1\\]"):
        VGG([4, "X"])
    with pytest.raises(ValueError, match="no convolution"):
        VGG(["M"])
    with pytest.raises(ValueError, match="dropout"):
        VGG(dropout=1.0)
    with pytest.raises(ValueError, match="Inception block"):
        GoogLeNet([4, [1, 2, 3]])
    with pytest.raises(ValueError, match="6n \\+ 2"):
        ResNet(depth=10)
    with pytest.raises(ValueError, match="4m \\+ 1"):
        ResNet(stem_kernel=3, stem_pad=1)  # 28 stays 28: stride 2 would not divide
    with pytest.raises(ValueError, match="4m \\+ 1"):
        ResNet(input_dim=(1, 30, 30))


# ----------------------------------------------------------------- summary
@pytest.mark.parametrize("name", list(TINY))
def test_summary_lists_layers_and_total(xp, name):
    net = make(name)
    before = {k: to_cpu(v).copy() for k, v in net.buffers.items()}
    text = summary(net)
    lines = text.splitlines()
    assert f"total params: {net.num_params:,};" in text
    assert f"forward mult-adds per sample: {forward_flops(net):,}" in text
    # header, column titles, one line per layer under the root (leaves and containers),
    # loss, totals
    assert len(lines) == 2 + (sum(1 for _ in walk(net.chain)) - 1) + 3
    for layer in leaves(net):
        assert any(line.lstrip().startswith(type(layer).__name__) for line in lines)
    assert f"({CLASSES},)" in lines[-4]  # the last layer's output shape
    # inference mode: running statistics untouched, no hook left behind
    for k, v in net.buffers.items():
        assert to_cpu(v).tobytes() == before[k].tobytes(), k
    assert all("forward" not in vars(layer) for layer in walk(net.chain))


def test_summary_rows_and_flops_of_a_tiny_vgg(xp):
    net = make("vgg-plain")  # 2x8x8: conv 3, conv 3, pool, conv 4 -> 4x4x4, 5, 4, 3
    macs = (64 * 3 * 2 * 9) + (64 * 3 * 3 * 9) + (16 * 4 * 3 * 9) + 64 * 5 + 5 * 4 + 4 * 3
    assert forward_flops(net) == macs
    text = summary(net)
    assert "ConvReLU 3x3 s1 p1" in text and "Pooling 2x2 s2" in text
    row = next(line for line in text.splitlines() if "W1, b1" in line)
    assert "(3, 8, 8)" in row and f"{3 * 2 * 9 + 3:,}" in row and f"{64 * 3 * 2 * 9:,}" in row
    named = next(line for line in summary(make("resnet")).splitlines() if "stage2.W3" in line)
    assert "Convolution 1x1 s2" in named and "(4, 3, 3)" in named
    assert forward_flops(net, (2, 8, 8)) == macs


def test_summary_of_a_network_without_input_shape():
    from xpnet.models import MultiLayerNet

    net = MultiLayerNet(6, [5], 3)
    text = summary(net, (6,))
    assert f"total params: {net.num_params:,}" in text
    assert forward_flops(net, (6,)) == 6 * 5 + 5 * 3
