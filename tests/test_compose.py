"""Tests of the composable layers and what rests on them.

Chain / Parallel / Identity / residual (xpnet.layers.compose), the Network built on one
Chain (parameter names, layer reuse, freezing, partial loading), parameter groups of the
optimizers, the one state format's manifest checksum (xpnet.state), the per-pixel
loss and accuracy, and the non-finite stop of TrainStep and the Trainer.

Gradients are checked in float64 against central differences; every array test runs
on each backend through the ``xp`` fixture, with seeded inputs.
"""

from __future__ import annotations

import hashlib
import json
import math
import zipfile

import numpy as np
import pytest

from tests.conftest import assert_gradients_match
from xpnet import backend
from xpnet.backend import to_cpu
from xpnet.gradcheck import numerical_gradient, relative_error
from xpnet.layers import (
    Affine,
    BatchNormalization,
    Chain,
    Convolution,
    Identity,
    Layer,
    Parallel,
    Pooling,
    ReLU,
    SoftmaxWithLoss,
    residual,
)
from xpnet.models import DeepConvNet, MultiLayerNetExtend, Network, SimpleConvNet
from xpnet.optim import SGD, Adam, CosineLR
from xpnet.state import MANIFEST, MANIFEST_DIGEST, StateError, load_state, save_state
from xpnet.train import NonFiniteLossError, Trainer, TrainStep, save_checkpoint
from xpnet.train.step import ClipGradNorm, NonFiniteError

TOL = 1e-6
F64 = np.float64


# ----------------------------------------------------------------- helpers
def arr(xp, rng, *shape, scale=1.0):
    """A seeded float64 array on ``xp``."""
    return xp.asarray(rng.standard_normal(shape) * scale)


def conv(xp, rng, fn, c, k, stride=1, pad=0):
    return Convolution(arr(xp, rng, fn, c, k, k, scale=0.5), arr(xp, rng, fn, scale=0.1),
                       stride=stride, pad=pad)


def bn(xp, rng, c):
    return BatchNormalization(xp.asarray(1.0 + 0.1 * rng.standard_normal(c)),
                              arr(xp, rng, c, scale=0.1))


def affine(xp, rng, d, m):
    return Affine(arr(xp, rng, d, m, scale=0.3), arr(xp, rng, m, scale=0.1))


def labels(xp, rng, n, classes):
    return xp.asarray(rng.integers(0, classes, n))


def host(table):
    return {k: to_cpu(v).copy() for k, v in table.items()}


# ----------------------------------------------- 1. gradients through blocks
def residual_net(xp, rng, projection):
    """conv-BN-ReLU-conv-BN + shortcut, ReLU, then an Affine head (3 classes).

    With ``projection`` the block halves the resolution (stride 2) and widens 2 -> 4
    channels, and the shortcut is a 1x1 convolution with stride 2.  Inputs: 6x6 for
    the identity block, 5x5 for the stride-2 one (a stride-2 convolution needs an odd
    size here: xpnet refuses geometries that do not fit a whole number of times).
    """
    c_in, c_out = (2, 4) if projection else (3, 3)
    stride = 2 if projection else 1
    block = Chain(conv(xp, rng, c_out, c_in, 3, stride=stride, pad=1), bn(xp, rng, c_out),
                  ReLU(), conv(xp, rng, c_out, c_out, 3, pad=1), bn(xp, rng, c_out))
    shortcut = conv(xp, rng, c_out, c_in, 1, stride=2) if projection else None
    side = 3 if projection else 6
    net = Network([residual(block, shortcut), affine(xp, rng, c_out * side * side, 3)])
    size = 5 if projection else 6
    return net, arr(xp, rng, 3, c_in, size, size), labels(xp, rng, 3, 3)


def test_gradient_residual_identity_shortcut(xp, rng):
    net, x, t = residual_net(xp, rng, projection=False)
    assert list(net.params) == ["W1", "b1", "gamma1", "beta1", "W2", "b2", "gamma2",
                                "beta2", "W3", "b3"]
    assert net.predict(x).shape == (3, 3)
    # b1, b2: conv biases right before batch norm, which removes them
    assert_gradients_match(net, x, t, zero=("b1", "b2"))


def test_gradient_residual_projection_shortcut(xp, rng):
    net, x, t = residual_net(xp, rng, projection=True)
    assert list(net.params) == ["W1", "b1", "gamma1", "beta1", "W2", "b2", "gamma2",
                                "beta2", "W3", "b3", "W4", "b4"]
    assert net.params["W3"].shape == (4, 2, 1, 1)  # the projection
    assert_gradients_match(net, x, t, zero=("b1", "b2"))


def inception_net(xp, rng, c=3):
    """Three branches concatenated on channels, then an Affine head."""
    block = Parallel(conv(xp, rng, 2, c, 1),
                     conv(xp, rng, 3, c, 3, pad=1),
                     Chain(Pooling(3, 3, stride=1, pad=1), conv(xp, rng, 2, c, 1)),
                     merge="concat")
    return Network([block, affine(xp, rng, 7 * 6 * 6, 4)]), block


def test_gradient_three_branch_concat(xp, rng):
    net, block = inception_net(xp, rng)
    x, t = arr(xp, rng, 3, 3, 6, 6), labels(xp, rng, 3, 4)
    y = block.forward(x)
    assert y.shape == (3, 7, 6, 6)
    # branch order is channel order
    np.testing.assert_array_equal(to_cpu(y[:, :2]), to_cpu(block.branches[0].forward(x)))
    assert list(net.params) == ["W1", "b1", "W2", "b2", "W3", "b3", "W4", "b4"]
    assert_gradients_match(net, x, t)


@pytest.mark.parametrize("merge", ["add", "concat"])
def test_gradient_wrt_parallel_input(xp, rng, merge):
    """dx of a Parallel (the sum of its branches' input gradients) against central
    differences of a custom loss L = sum(Parallel(x) * w)."""
    block = Parallel(Identity(),  # first: an in-place sum would then write into x
                     conv(xp, rng, 3, 3, 3, pad=1),
                     Chain(Pooling(3, 3, stride=1, pad=1), conv(xp, rng, 3, 3, 1)),
                     merge=merge)
    x = arr(xp, rng, 2, 3, 5, 5)
    x_before = to_cpu(x).copy()
    w = arr(xp, rng, *block.forward(x).shape)
    w_before = to_cpu(w).copy()
    np.testing.assert_array_equal(to_cpu(x), x_before)  # nor is the input

    def loss():
        return float((block.forward(x) * w).sum())

    block.forward(x)
    dx = block.backward(w)
    assert dx is not None and dx.shape == x.shape and dx.dtype == x.dtype
    np.testing.assert_array_equal(to_cpu(w), w_before)  # dout is never modified
    assert dx is not w  # the Identity branch's dout is not handed back as dx
    numeric = numerical_gradient(loss, x, h=1e-5)
    assert relative_error(dx, numeric) <= TOL
    # the parameters' gradients too, through the same loss
    for branch in (block.branches[1], block.branches[2].layers[1]):
        block.forward(x)
        block.backward(w)
        for key, p in branch.params.items():
            g = branch.grads[key].copy()
            assert relative_error(g, numerical_gradient(loss, p, h=1e-5)) <= TOL, key
    # a caller that does not read dx gets None and still fills the grads
    block.forward(x)
    assert block.backward(w, need_input_grad=False) is None


# ----------------------------------------------- 2. a layer reused elsewhere
@pytest.mark.parametrize("kind", ["affine", "conv"])
def test_first_layer_reused_in_another_network(xp, rng, kind):
    """The same instance first in net A and second in net B: gradient works in both,
    and B's earlier layer gets a gradient through the shared layer's dx."""
    if kind == "affine":
        shared = affine(xp, rng, 4, 4)
        a = Network([shared, ReLU(), affine(xp, rng, 4, 3)])
        b = Network([affine(xp, rng, 5, 4), ReLU(), shared, ReLU(), affine(xp, rng, 4, 3)])
        xa, xb = arr(xp, rng, 3, 4), arr(xp, rng, 3, 5)
    else:
        shared = conv(xp, rng, 2, 2, 3, pad=1)
        a = Network([shared, ReLU(), affine(xp, rng, 2 * 4 * 4, 3)])
        b = Network([conv(xp, rng, 2, 1, 3, pad=1), ReLU(), shared, ReLU(),
                     affine(xp, rng, 2 * 4 * 4, 3)])
        xa, xb = arr(xp, rng, 3, 2, 4, 4), arr(xp, rng, 3, 1, 4, 4)
    t = labels(xp, rng, 3, 3)
    # A first: its gradient skips the first layer's dx ...
    a.gradient(xa, t)
    # ... which must not stop B from getting it
    gb = b.gradient(xb, t)
    assert float(abs(gb["W1"]).max()) > 0
    assert_gradients_match(b, xb, t)
    assert_gradients_match(a, xa, t)
    # and called directly, the layer still returns dx
    y = shared.forward(xa)
    dx = shared.backward(xp.ones_like(y))
    assert dx is not None
    assert "need_input_grad" not in vars(shared)


# ----------------------------------------------- 3. freezing
def small_bn_net(xp, rng, named=False):
    """Affine-BN-ReLU-Affine; with ``named`` the first three in a Chain named 'trunk'."""
    trunk = [affine(xp, rng, 4, 6), bn(xp, rng, 6), ReLU()]
    head = affine(xp, rng, 6, 3)
    layers = [Chain(*trunk, name="trunk"), head] if named else [*trunk, head]
    return Network(layers)


def data(xp, rng, n=30):
    return arr(xp, rng, n, 4), labels(xp, rng, n, 3)


def test_frozen_bit_identical_after_10_adam_steps(xp, rng):
    net = small_bn_net(xp, rng)
    x, t = data(xp, rng)
    assert net.freeze("W1", "b1") == ["W1", "b1"]
    assert net.frozen == ["W1", "b1"]
    before = host(net.params)
    opt = Adam(lr=0.01)
    step = TrainStep(net, opt)
    for i in range(10):
        step(x[3 * i:3 * i + 3], t[3 * i:3 * i + 3])
    after = host(net.params)
    for k in ("W1", "b1"):
        np.testing.assert_array_equal(after[k], before[k])
    for k in ("gamma1", "beta1", "W2", "b2"):
        assert not np.array_equal(after[k], before[k]), k
    # no state was made for the frozen keys
    slots = opt.state_dict()["slots"]
    assert set(slots["m"]) == set(slots["v"]) == {"gamma1", "beta1", "W2", "b2"}

    assert net.unfreeze("W1") == ["W1"]
    assert net.frozen == ["b1"]
    step(x[:3], t[:3])
    now = host(net.params)
    assert not np.array_equal(now["W1"], before["W1"])
    np.testing.assert_array_equal(now["b1"], before["b1"])
    net.unfreeze()
    assert net.frozen == []


def test_frozen_bit_identical_through_trainer(xp, rng):
    net = small_bn_net(xp, rng, named=True)
    x, t = data(xp, rng)
    assert net.freeze("trunk") == ["trunk.W1", "trunk.b1", "trunk.gamma1", "trunk.beta1"]
    before = host(net.params)
    trainer = Trainer(net, to_cpu(x), to_cpu(t), to_cpu(x), to_cpu(t), epochs=1,
                      mini_batch_size=3, optimizer="adam", optimizer_param={"lr": 0.01},
                      verbose=False, seed=0)
    trainer.train()
    assert trainer.current_iter == 10
    after = host(net.params)
    for k in net.frozen:
        np.testing.assert_array_equal(after[k], before[k])
    for k in ("W1", "b1"):
        assert not np.array_equal(after[k], before[k]), k


def test_freeze_names(xp, rng):
    net = small_bn_net(xp, rng, named=True)
    assert list(net.params) == ["trunk.W1", "trunk.b1", "trunk.gamma1", "trunk.beta1",
                                "W1", "b1"]
    assert list(net.buffers) == ["trunk.running_mean1", "trunk.running_var1"]
    assert net.freeze("trunk.") == ["trunk.W1", "trunk.b1", "trunk.gamma1", "trunk.beta1"]
    x, t = data(xp, rng, 6)
    assert list(net.gradient(x, t)) == ["W1", "b1"]
    assert list(net.numerical_gradient(x[:2], t[:2])) == ["W1", "b1"]
    net.unfreeze("trunk")
    assert net.frozen == []
    # an unknown name, or a prefix that is not a whole name or block, is refused
    for bad in ("W9", "trun", "trunk.W"):
        with pytest.raises(KeyError, match=bad):
            net.freeze(bad)
    with pytest.raises(KeyError, match="W9"):
        net.unfreeze("W9")
    # ... and nothing was frozen by a refused call that also named a valid one
    with pytest.raises(KeyError, match="nope"):
        net.freeze("W1", "nope")
    assert net.frozen == []


# ----------------------------------------------- 4. parameter groups
def test_two_groups_effective_lr_sgd(xp, rng):
    net = small_bn_net(xp, rng, named=True)
    x, t = data(xp, rng, 6)
    opt = SGD(lr=0.1, groups=[{"params": "trunk", "lr": 0.01}])
    assert opt.group_index("trunk.W1") == 1 and opt.group_index("W1") == 0
    assert opt.group_hyper(0) == {"lr": 0.1} and opt.group_hyper(1) == {"lr": 0.01}
    exact = xp.__name__ == "numpy"
    for _ in range(2):
        before = host(net.params)
        grads = host(net.gradient(x, t))
        opt.update(net.params, net.gradient(x, t))
        for k, p in host(net.params).items():
            lr = 0.01 if k.startswith("trunk.") else 0.1
            want = before[k] - lr * grads[k]
            if exact:
                np.testing.assert_array_equal(p, want, err_msg=k)
            else:  # the fused kernel computes the same expression without FMA
                np.testing.assert_allclose(p, want, rtol=1e-15, atol=0, err_msg=k)


def test_group_lr_follows_schedule_in_proportion(xp, rng):
    net = small_bn_net(xp, rng, named=True)
    x, t = data(xp, rng, 6)
    opt = SGD(lr=0.1, groups=[{"params": ["trunk.W1", "trunk.b1"], "lr": 0.02}])
    sched = CosineLR(opt, total_steps=4)
    for step in range(4):
        base = sched.lr_at(step)
        assert opt.lr == pytest.approx(base, rel=1e-15)
        assert opt.group_hyper(1)["lr"] == pytest.approx(0.02 * base / 0.1, rel=1e-15)
        assert opt.group_hyper(0)["lr"] == pytest.approx(base, rel=1e-15)
        before = host(net.params)
        grads = host(net.gradient(x, t))
        opt.update(net.params, net.gradient(x, t))
        after = host(net.params)
        for k in after:
            lr = 0.02 * base / 0.1 if k in ("trunk.W1", "trunk.b1") else base
            np.testing.assert_allclose(after[k], before[k] - lr * grads[k], rtol=1e-14,
                                       atol=1e-17, err_msg=f"step {step} {k}")
        sched.step()
    # the optimizer's own lr is restored after each group's update
    assert opt.lr == pytest.approx(sched.lr_at(4), abs=1e-18)


def test_group_with_unknown_hyperparameter_raises():
    with pytest.raises(ValueError, match="momentum"):
        SGD(lr=0.1, groups=[{"params": "W1", "momentum": 0.9}])
    with pytest.raises(ValueError, match="lr"):
        Adam(lr=0.1, groups=[{"params": "W1", "lr": -1.0}])
    with pytest.raises(TypeError, match="params"):
        SGD(lr=0.1, groups=[{"lr": 0.5}])


def test_adam_groups_match_separate_optimizers(xp, rng):
    """Adam with a group at lr/10 moves the group's keys exactly as an Adam at lr/10."""
    net = small_bn_net(xp, rng, named=True)
    x, t = data(xp, rng, 6)
    grads = net.gradient(x, t)
    grouped = Adam(lr=0.01, groups=[{"params": "trunk", "lr": 0.001}])
    params = {k: v.copy() for k, v in net.params.items()}
    grouped.update(params, grads)
    slow, fast = Adam(lr=0.001), Adam(lr=0.01)
    ref = {k: v.copy() for k, v in net.params.items()}
    slow.update({k: v for k, v in ref.items() if k.startswith("trunk.")},
                {k: g for k, g in grads.items() if k.startswith("trunk.")})
    fast.update({k: v for k, v in ref.items() if not k.startswith("trunk.")},
                {k: g for k, g in grads.items() if not k.startswith("trunk.")})
    for k in params:
        np.testing.assert_array_equal(to_cpu(params[k]), to_cpu(ref[k]), err_msg=k)


# ----------------------------------------------- 5. partial loading, state format
def trunk_head_net(xp, rng, head_name="head", trunk_width=5):
    trunk = Chain(affine(xp, rng, 4, trunk_width), bn(xp, rng, trunk_width), ReLU(),
                  name="trunk")
    head = affine(xp, rng, trunk_width, 3)
    return Network([trunk, Chain(head, name=head_name) if head_name else head])


def test_load_params_non_strict(xp, rng, tmp_path):
    src = trunk_head_net(xp, rng, head_name=None)
    src.gradient(*data(xp, rng, 6))  # moves the running statistics off zero
    path = tmp_path / "src.npz"
    src.save_params(path)
    dst = trunk_head_net(xp, rng)
    dst_before = host(dst.params)
    report = dst.load_params(path, strict=False)
    assert sorted(report.missing) == ["head.W1", "head.b1"]
    assert sorted(report.unexpected) == ["W1", "b1"]
    for k in ("trunk.W1", "trunk.b1", "trunk.gamma1", "trunk.beta1"):
        np.testing.assert_array_equal(to_cpu(dst.params[k]), to_cpu(src.params[k]))
    for k in dst.buffers:
        np.testing.assert_array_equal(to_cpu(dst.buffers[k]), to_cpu(src.buffers[k]))
    for k in ("head.W1", "head.b1"):
        np.testing.assert_array_equal(to_cpu(dst.params[k]), dst_before[k])


def test_load_params_shape_mismatch_raises_and_changes_nothing(xp, rng, tmp_path):
    src = trunk_head_net(xp, rng, head_name=None)
    path = tmp_path / "src.npz"
    src.save_params(path)
    dst = trunk_head_net(xp, rng, trunk_width=6)
    before = host(dst.params), host(dst.buffers)
    for strict in (False, True):
        with pytest.raises(ValueError) as info:
            dst.load_params(path, strict=strict)
        msg = str(info.value)
        assert "trunk.W1" in msg and "(4, 5)" in msg and "(4, 6)" in msg, msg
        assert str(path) in msg
        for table, saved in zip((dst.params, dst.buffers), before, strict=True):
            for k, v in saved.items():
                np.testing.assert_array_equal(to_cpu(table[k]), v, err_msg=k)


def test_load_params_strict_lists_every_key_and_changes_nothing(xp, rng, tmp_path):
    src = trunk_head_net(xp, rng, head_name=None)
    path = tmp_path / "src.npz"
    src.save_params(path)
    dst = trunk_head_net(xp, rng)
    before = host(dst.params)
    with pytest.raises(ValueError) as info:
        dst.load_params(path)  # strict is the default
    msg = str(info.value)
    for k in ("head.W1", "head.b1", "'W1'", "'b1'"):
        assert k in msg, (k, msg)
    assert "missing" in msg and "unexpected" in msg
    for k, v in before.items():  # the trunk matched, yet nothing was loaded
        np.testing.assert_array_equal(to_cpu(dst.params[k]), v, err_msg=k)


def read_members(path):
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def write_state_file(path, manifest, members, raw=None):
    """An npz with ``manifest`` and its correct sha256, the arrays ``members`` and the
    non-.npy zip members ``raw`` (name -> bytes)."""
    blob = json.dumps(manifest, sort_keys=True).encode("utf-8")
    out = {k: v for k, v in members.items() if k not in (MANIFEST, MANIFEST_DIGEST)}
    out[MANIFEST] = np.frombuffer(blob, dtype=np.uint8)
    out[MANIFEST_DIGEST] = np.frombuffer(hashlib.sha256(blob).hexdigest().encode("ascii"),
                                         dtype=np.uint8)
    np.savez(path, **out)
    if raw:
        with zipfile.ZipFile(path, "a") as z:
            for name, data_ in raw.items():
                z.writestr(name, data_)
    return path


@pytest.fixture
def checkpoint(tmp_path, rng):
    """A real checkpoint of a network and an Adam after one step (NumPy)."""
    with backend.use_backend("numpy"):
        net = small_bn_net(np, rng)
        opt = Adam(lr=0.01)
        TrainStep(net, opt)(*data(np, rng, 6))
        path = save_checkpoint(tmp_path / "ck.npz", net, opt, progress={"step": 1})
    return path


def test_edited_manifest_is_refused(checkpoint, tmp_path):
    state = load_state(checkpoint)
    assert state.optimizer["hyper"]["lr"] == 0.01
    members = read_members(checkpoint)
    manifest = json.loads(members[MANIFEST].tobytes())
    manifest["optimizer"]["hyper"]["lr"] = 0.5
    edited = dict(members)
    edited[MANIFEST] = np.frombuffer(json.dumps(manifest, sort_keys=True).encode(), np.uint8)
    path = tmp_path / "edited.npz"
    np.savez(path, **edited)  # the old checksum
    with pytest.raises(StateError, match="manifest.*sha256|sha256.*manifest") as info:
        load_state(path)
    assert str(path) in str(info.value)
    # the same edit with its checksum recomputed loads: the helper writes valid files
    write_state_file(tmp_path / "resigned.npz", manifest, members)
    assert load_state(tmp_path / "resigned.npz").optimizer["hyper"]["lr"] == 0.5


def _without_hyper(m):
    del m["optimizer"]["hyper"]


def _optimizer_5(m):
    m["optimizer"] = 5


def _rng_x(m):
    m["rng"] = "x"


@pytest.mark.parametrize("edit, expected", [
    (_without_hyper, "hyper"),
    (_optimizer_5, "optimizer"),
    (_rng_x, "rng"),
], ids=["optimizer-without-hyper", "optimizer=5", "rng='x'"])
def test_malformed_manifest_with_valid_checksum_raises_state_error(checkpoint, tmp_path,
                                                                   edit, expected):
    members = read_members(checkpoint)
    manifest = json.loads(members[MANIFEST].tobytes())
    edit(manifest)
    path = write_state_file(tmp_path / "crafted.npz", manifest, members)
    with pytest.raises(StateError) as info:
        load_state(path)
    msg = str(info.value)
    assert str(path) in msg and expected in msg and "sha256" not in msg, msg


def test_member_that_is_not_npy_raises_state_error(checkpoint, tmp_path):
    members = read_members(checkpoint)
    manifest = json.loads(members[MANIFEST].tobytes())
    entry = manifest["arrays"][0]
    member = entry["member"]
    members.pop(member)
    raw = b"not an array"
    entry["sha256"] = hashlib.sha256(raw).hexdigest()
    path = write_state_file(tmp_path / "crafted.npz", manifest, members, raw={member: raw})
    with zipfile.ZipFile(path) as z:
        assert member in z.namelist() and f"{member}.npy" not in z.namelist()
    with pytest.raises(StateError) as info:
        load_state(path)
    msg = str(info.value)
    assert str(path) in msg and member in msg and ".npy" in msg, msg


def test_save_state_round_trip_sanity(tmp_path):
    """The crafted files above differ from a valid one only where they say."""
    p = save_state(tmp_path / "s.npz", params={"W1": np.arange(3.0)})
    members = read_members(p)
    manifest = json.loads(members[MANIFEST].tobytes())
    q = write_state_file(tmp_path / "t.npz", manifest, members)
    np.testing.assert_array_equal(load_state(q).params["W1"], np.arange(3.0))


# ----------------------------------------------- 6. per-pixel loss and accuracy
def naive_pixel_loss(x, t, ignore):
    """Mean cross-entropy over the labelled positions of (N, C, H, W) scores, and dx."""
    n, c, h, w = x.shape
    total, count = 0.0, 0
    dx = np.zeros_like(x)
    for i in range(n):
        for r in range(h):
            for s in range(w):
                label = int(t[i, r, s])
                if label == ignore:
                    continue
                z = x[i, :, r, s]
                p = [math.exp(v - max(z)) for v in z]
                p = [v / sum(p) for v in p]
                total -= math.log(p[label])
                count += 1
                for k in range(c):
                    dx[i, k, r, s] = p[k] - (k == label)
    return total / count, dx / count


@pytest.mark.parametrize("ignore", [None, 255])
def test_per_pixel_loss_against_naive_loop(xp, rng, ignore):
    x = rng.standard_normal((2, 4, 3, 5)) * 3
    t = rng.integers(0, 4, (2, 3, 5))
    if ignore is not None:
        t[rng.random(t.shape) < 0.3] = ignore
        assert (t == ignore).any() and (t != ignore).any()
    layer = SoftmaxWithLoss(ignore_label=ignore)
    xd = xp.asarray(x)
    loss = layer.forward(xd, xp.asarray(t))
    dx = layer.backward(1)
    want_loss, want_dx = naive_pixel_loss(x, t, ignore)
    assert float(loss) == pytest.approx(want_loss, rel=1e-12)
    assert dx.shape == x.shape and dx.dtype == x.dtype
    np.testing.assert_allclose(to_cpu(dx), want_dx, rtol=1e-10, atol=1e-15)
    if ignore is not None:  # ignored positions get no gradient at all
        mask = np.broadcast_to((t == ignore)[:, None], x.shape)
        assert not to_cpu(dx)[mask].any()
    np.testing.assert_array_equal(to_cpu(xd), x)  # the scores are not modified
    # and numerically, with the layer's own loss
    numeric = numerical_gradient(lambda: float(layer.forward(xd, xp.asarray(t))), xd)
    assert relative_error(dx, numeric) <= TOL


def test_per_pixel_accuracy(xp, rng):
    # a 1x1 convolution gives (N, 3, H, W) scores: one class per pixel
    net = Network([conv(xp, rng, 3, 2, 1)], loss_layer=SoftmaxWithLoss(ignore_label=-1))
    x = arr(xp, rng, 5, 2, 4, 3)
    t = rng.integers(0, 3, (5, 4, 3))
    t[rng.random(t.shape) < 0.25] = -1
    pred = to_cpu(net.predict(x)).argmax(axis=1)
    keep = t != -1
    want = float((pred == t)[keep].sum()) / keep.sum()
    assert 0 < want < 1
    for batch in (5, 2):
        assert net.accuracy(x, xp.asarray(t), batch_size=batch) == pytest.approx(want,
                                                                                  rel=1e-15)
    # without ignore_label every position counts
    plain = Network([net.layers[0]])
    t_all = rng.integers(0, 3, (5, 4, 3))
    assert plain.accuracy(x, xp.asarray(t_all), batch_size=2) == pytest.approx(
        float((pred == t_all).mean()), rel=1e-15)


def test_nk_scores_unchanged(xp, rng):
    x = rng.standard_normal((6, 4)) * 3
    t = rng.integers(0, 4, 6)
    layer = SoftmaxWithLoss()
    loss = layer.forward(xp.asarray(x), xp.asarray(t))
    dx = to_cpu(layer.backward(1))
    p = np.exp(x - x.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    assert float(loss) == pytest.approx(-np.log(p[np.arange(6), t]).mean(), rel=1e-12)
    onehot = np.eye(4)[t]
    np.testing.assert_allclose(dx, (p - onehot) / 6, rtol=1e-12, atol=1e-16)
    # one-hot labels give the same; (N, 1) labels are indices, as in the book
    for same in (onehot, t.reshape(6, 1)):
        assert float(layer.forward(xp.asarray(x), xp.asarray(same))) == float(loss)
        np.testing.assert_array_equal(to_cpu(layer.backward(1)), dx)


def test_accuracy_book_labels_and_rejections_like_loss(xp, rng):
    net = Network([affine(xp, rng, 4, 3)])
    x = arr(xp, rng, 6, 4)
    t = rng.integers(0, 3, 6)
    acc = net.accuracy(x, xp.asarray(t))
    assert net.accuracy(x, xp.asarray(t.reshape(6, 1))) == acc
    assert net.accuracy(x, xp.asarray(np.eye(3)[t])) == acc
    bad = {
        "float labels": t.astype(np.float64),
        "out of range": np.where(t == 0, 3, t),
        "negative": np.where(t == 0, -1, t),
        "one-hot too wide": np.eye(4)[t],
        "one-hot too narrow": np.eye(2)[t % 2],
        "not one-hot": np.full((6, 3), 1.0 / 3),
    }
    for what, labels_ in bad.items():
        tb = xp.asarray(labels_)
        with pytest.raises((TypeError, ValueError)) as by_loss:
            net.loss(x, tb)
        with pytest.raises((TypeError, ValueError)) as by_accuracy:
            net.accuracy(x, tb)
        assert type(by_loss.value) is type(by_accuracy.value), what
        # the same check: the messages differ only in who is speaking
        loss_msg = str(by_loss.value).split(": ", 1)[1]
        acc_msg = str(by_accuracy.value).split(": ", 1)[1]
        assert loss_msg == acc_msg, (what, loss_msg, acc_msg)


# ----------------------------------------------- 7. branch shapes that do not merge
def test_parallel_add_shape_mismatch_names_block_branch_and_shapes(xp, rng):
    blk = Parallel(affine(xp, rng, 4, 3), affine(xp, rng, 4, 3), affine(xp, rng, 4, 5),
                   merge="add", name="blk")  # constructing it is fine
    net = Network([blk])
    with pytest.raises(ValueError) as info:
        net.predict(arr(xp, rng, 2, 4))
    msg = str(info.value)
    assert "'blk'" in msg and "branch 2" in msg and "(2, 5)" in msg and "(2, 3)" in msg, msg


def test_parallel_concat_shape_mismatch_names_block_branch_and_shapes(xp, rng):
    blk = Parallel(conv(xp, rng, 2, 1, 3, pad=1), conv(xp, rng, 3, 1, 3), merge="concat",
                   name="blk")
    with pytest.raises(ValueError) as info:
        blk.forward(arr(xp, rng, 2, 1, 5, 5))
    msg = str(info.value)
    assert "'blk'" in msg and "branch 1" in msg, msg
    assert "(2, 3, 3, 3)" in msg and "(2, 2, 5, 5)" in msg, msg
    # channels may differ in a concat, but not in a sum
    ok = Parallel(conv(xp, rng, 2, 1, 1), conv(xp, rng, 3, 1, 1), merge="concat")
    assert ok.forward(arr(xp, rng, 2, 1, 5, 5)).shape == (2, 5, 5, 5)
    summed = Parallel(conv(xp, rng, 2, 1, 1), conv(xp, rng, 3, 1, 1), name="blk")
    with pytest.raises(ValueError, match=r"'blk'.*branch 1.*\(2, 3, 5, 5\).*\(2, 2, 5, 5\)"):
        summed.forward(arr(xp, rng, 2, 1, 5, 5))


# ----------------------------------------------- 8. parameter names
class BiasFree(Layer):
    """y = x W: a layer with only a weight."""

    def __init__(self, W):
        super().__init__()
        self.params = {"W": W}
        self.x = None

    def forward(self, x, train=True):
        self.x = x
        return x @ self.params["W"]

    def backward(self, dout, need_input_grad=True):
        self.grads = {"W": self.x.T @ dout}
        return dout @ self.params["W"].T if need_input_grad else None


def test_bias_free_layer_then_affine_names(xp, rng):
    net = Network([BiasFree(arr(xp, rng, 4, 5)), ReLU(), affine(xp, rng, 5, 3)])
    assert list(net.params) == ["W1", "W2", "b2"]
    assert net.params["W1"].shape == (4, 5) and net.params["W2"].shape == (5, 3)
    x, t = data(xp, rng, 4)
    assert_gradients_match(net, x, t)
    back = Network([affine(xp, rng, 4, 5), ReLU(), BiasFree(arr(xp, rng, 5, 3))])
    assert list(back.params) == ["W1", "b1", "W2"]


def test_book_networks_keep_their_keys(xp):
    net = MultiLayerNetExtend(4, [5, 5], 3, use_batchnorm=True, dtype=F64)
    assert list(net.params) == ["W1", "b1", "gamma1", "beta1", "W2", "b2", "gamma2", "beta2",
                                "W3", "b3"]
    assert list(net.buffers) == ["running_mean1", "running_var1", "running_mean2",
                                 "running_var2"]
    assert list(MultiLayerNetExtend(4, [5], 3).params) == ["W1", "b1", "W2", "b2"]
    simple = SimpleConvNet(input_dim=(1, 10, 10), conv_param={"filter_num": 2,
                           "filter_size": 3, "pad": 0, "stride": 1}, hidden_size=4,
                           output_size=3)
    assert list(simple.params) == ["W1", "b1", "W2", "b2", "W3", "b3"]
    deep = DeepConvNet()
    assert sorted(deep.params) == sorted(f"{k}{i}" for i in range(1, 9) for k in "Wb")


def test_named_blocks_scope_names(xp, rng):
    inner = Chain(affine(xp, rng, 4, 4), name="inner")
    net = Network([affine(xp, rng, 4, 4), Chain(inner, affine(xp, rng, 4, 4), name="outer"),
                   affine(xp, rng, 4, 3)])
    assert list(net.params) == ["W1", "b1", "outer.inner.W1", "outer.inner.b1",
                                "outer.W1", "outer.b1", "W2", "b2"]
    x, t = data(xp, rng, 3)
    assert_gradients_match(net, x, t)


# ----------------------------------------------- 9. non-finite steps
def bn_mlp(rng):
    return small_bn_net(np, rng)


def everything(net, opt):
    opt_state = opt.state_dict()
    return (host(net.params), host(net.buffers), opt_state["step"],
            {s: host(t) for s, t in opt_state["slots"].items()})


def assert_same(a, b):
    for x_, y_ in zip(a, b, strict=True):
        if isinstance(x_, dict):
            assert x_.keys() == y_.keys()
            for k in x_:
                if isinstance(x_[k], dict):
                    assert_same((x_[k],), (y_[k],))
                else:
                    np.testing.assert_array_equal(x_[k], y_[k], err_msg=k)
        else:
            assert x_ == y_


@pytest.mark.parametrize("how", ["inf-input", "huge-lr", "inf-gradient-norm"])
def test_trainstep_non_finite_changes_nothing(rng, how):
    with backend.use_backend("numpy"):
        net = bn_mlp(rng)
        x, t = data(np, rng, 6)
        opt = SGD(lr=1e300) if how == "huge-lr" else Adam(lr=0.01)
        poison = []

        def inject(grads, params):  # a finite loss, but an inf gradient once armed
            if poison:
                grads["W2"][0, 0] = np.inf

        transforms = [inject, ClipGradNorm(1.0)] if how == "inf-gradient-norm" else []
        step = TrainStep(net, opt, transforms=transforms, check_finite=True)
        step(x, t)  # a good step: the state now is not the initial one
        if how == "inf-input":
            x = x.copy()
            x[0, 0] = np.inf
        poison.append(how == "inf-gradient-norm")
        if not poison[0]:
            poison.clear()
        before = everything(net, opt)
        assert all(np.isfinite(v).all() for v in before[1].values())
        with pytest.raises(NonFiniteError) as info:
            step(x, t)
        assert info.value.what == ("gradient norm" if how == "inf-gradient-norm" else "loss")
        assert_same(everything(net, opt), before)
        assert opt.step_count == 1


def test_trainer_non_finite_stop_keeps_network_usable(rng):
    with backend.use_backend("numpy"):
        net = bn_mlp(rng)
        x, t = data(np, rng, 30)
        x[13, 1] = np.inf  # in the 5th batch of 3 (no shuffling)
        seen = []
        trainer = Trainer(net, x, t, x[:6], t[:6], epochs=1, mini_batch_size=3,
                          optimizer="adam", verbose=False, shuffle=False,
                          callbacks=[lambda tr, event, info: seen.append(
                              (host(net.params), host(net.buffers)))
                              if event == "step_end" else None])
        with pytest.raises(NonFiniteLossError) as info:
            trainer.train()
        assert info.value.step == 5
        assert len(seen) == 4
        params, buffers = seen[-1]
        for k, v in host(net.params).items():
            np.testing.assert_array_equal(v, params[k], err_msg=k)
        for k, v in host(net.buffers).items():
            np.testing.assert_array_equal(v, buffers[k], err_msg=k)
        y = net.predict(np.delete(x, 13, axis=0))
        assert np.isfinite(y).all()


def test_a_frozen_trunk_costs_no_backward(xp, rng):
    """Layers before the first trained parameter are not back-propagated through; the
    trained head's gradient is the same as without freezing."""
    conv = Convolution(xp.asarray(rng.standard_normal((3, 1, 3, 3))), xp.zeros(3), 1, 1)
    head = Affine(xp.asarray(rng.standard_normal((3 * 36, 4))), xp.zeros(4))
    net = Network([Chain(conv, ReLU(), name="trunk"), head])
    x = xp.asarray(rng.standard_normal((2, 1, 6, 6)))
    t = xp.asarray(np.array([1, 3]))
    full = {k: to_cpu(v).copy() for k, v in net.gradient(x, t).items()}
    calls = []
    plain = conv.backward
    conv.backward = lambda *a, **k: calls.append(1) or plain(*a, **k)
    net.freeze("trunk")
    frozen = net.gradient(x, t)
    assert calls == [] and set(frozen) == {"W1", "b1"}  # the head's own names
    for k in frozen:
        np.testing.assert_array_equal(to_cpu(frozen[k]), full[k], err_msg=k)
    net.unfreeze()
    net.gradient(x, t)
    assert calls == [1]
