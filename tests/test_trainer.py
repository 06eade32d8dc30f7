"""The Trainer: learning on real MNIST, output, history, early stopping, callbacks,
non-finite losses, label checks and the book-style network API."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from xpnet import backend
from xpnet.backend import get_array_module, to_cpu
from xpnet.datasets import load_mnist
from xpnet.layers import Affine, ReLU, SoftmaxWithLoss
from xpnet.models import MultiLayerNet, MultiLayerNetExtend, SimpleConvNet
from xpnet.optim import SGD, StepLR
from xpnet.train import CheckpointManager, NonFiniteLossError, Trainer

_MNIST: dict[str, tuple] = {}


def mnist(n_train: int, n_test: int):
    if not _MNIST:
        _MNIST["flat"] = load_mnist(flatten=True)
    (x, t), (xt, tt) = _MNIST["flat"]
    return x[:n_train], t[:n_train], xt[:n_test], tt[:n_test]


def small_net(hidden=(30,)):
    return MultiLayerNet(784, list(hidden), 10)


def params_of(net) -> dict[str, np.ndarray]:
    return {k: to_cpu(v).copy() for k, v in net.params.items()}


# ------------------------------------------------------------------ learning
@pytest.mark.slow
def test_mlp_learns_mnist_subset(xp, capsys):
    """MultiLayerNet(784-100-100-10), 10000 images, 2 epochs of Adam: >= 90% on 1000
    test images (measured 92-93% over seeds 0-3)."""
    x, t, xt, tt = mnist(10_000, 1000)
    net = MultiLayerNet(784, [100, 100], 10)
    trainer = Trainer(net, x, t, xt, tt, epochs=2, mini_batch_size=100, optimizer="Adam",
                      optimizer_param={"lr": 0.003}, seed=0)
    history = trainer.train()
    assert trainer.final_test_acc >= 0.90
    assert history is trainer.history
    # book-compatible lists and the history
    assert trainer.iter_per_epoch == 100 and trainer.max_iter == 200
    assert len(trainer.train_loss_list) == 200
    assert all(isinstance(v, float) for v in trainer.train_loss_list)
    assert np.mean(trainer.train_loss_list[-20:]) < np.mean(trainer.train_loss_list[:20])
    assert len(trainer.train_acc_list) == len(trainer.test_acc_list) == 2
    assert history["epoch"] == [1, 2] and history["step"] == [100, 200]
    for key in ("train_loss", "train_acc", "test_acc", "lr", "epoch_time", "images_per_sec"):
        assert len(history[key]) == 2, key
    assert "val_acc" not in history
    # the network stays on its device, with its dtype
    assert get_array_module(net.params["W1"]) is xp and net.params["W1"].dtype == np.float32
    out = capsys.readouterr().out
    assert f"test accuracy: {100 * trainer.final_test_acc:.2f}%" in out


def test_plain_output_when_not_a_terminal(xp, capsys):
    x, t, xt, tt = mnist(600, 200)
    trainer = Trainer(small_net(), x, t, xt, tt, epochs=3, mini_batch_size=100, seed=0)
    trainer.train()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4
    pattern = (r"epoch {}/3: loss \d+\.\d{{4}}, train acc \d\.\d{{4}}, test acc \d\.\d{{4}}, "
               r"\d+\.\d s, \d+ images/s")
    for i, line in enumerate(lines[:3], start=1):
        assert re.fullmatch(pattern.format(i), line), line
    assert re.fullmatch(r"test accuracy: \d+\.\d\d%", lines[3])


def test_quiet_prints_nothing(xp, capsys):
    x, t, xt, tt = mnist(300, 100)
    Trainer(small_net(), x, t, xt, tt, epochs=1, verbose=False).train()
    assert capsys.readouterr().out == ""


def test_progress_bar_when_forced(xp, capsys):
    x, t, xt, tt = mnist(400, 100)
    trainer = Trainer(small_net(), x, t, xt, tt, epochs=1, seed=0, progress=True)
    trainer.train()
    out = capsys.readouterr().out
    assert "%|" in out  # the bar was drawn
    # and the epoch's line stays after it, as in a terminal without a bar
    assert "epoch 1/1: loss" in out and "test acc" in out and "images/s" in out
    assert "test accuracy:" in out


def test_evaluate_sample_num_and_final_accuracy_on_everything(xp):
    x, t, xt, tt = mnist(300, 150)
    seen = []

    class CountingNet(MultiLayerNet):
        def accuracy(self, x, t, batch_size=100):
            seen.append(int(x.shape[0]))
            return super().accuracy(x, t, batch_size)

    net = CountingNet(784, [20], 10)
    Trainer(net, x, t, xt, tt, epochs=2, evaluate_sample_num_per_epoch=50,
            verbose=False).train()
    assert seen == [50, 50, 50, 50, 150]


def test_shuffling_is_without_replacement_and_seeded(xp):
    x, t, xt, tt = mnist(500, 50)
    batches: list[np.ndarray] = []

    class Spy(MultiLayerNet):
        def gradient(self, xb, tb):
            batches.append(to_cpu(tb).copy())
            return super().gradient(xb, tb)

    def run(seed):
        batches.clear()
        backend.seed(0)
        Trainer(Spy(784, [10], 10), x, t, xt, tt, epochs=2, mini_batch_size=100,
                seed=seed, verbose=False).train()
        return [b.copy() for b in batches]

    a, b, c = run(1), run(1), run(2)
    assert len(a) == 10 and all(len(batch) == 100 for batch in a)
    for epoch in (a[:5], a[5:]):  # each epoch is a permutation of the labels
        assert np.array_equal(np.sort(np.concatenate(epoch)), np.sort(t))
    assert all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))
    assert not all(np.array_equal(p, q) for p, q in zip(a, c, strict=True))
    assert not all(np.array_equal(p, q) for p, q in zip(a[:5], a[5:], strict=True))


def test_validation_without_a_test_set(xp, capsys):
    """A search of settings on a validation split never touches a test set."""
    x, t, _, _ = mnist(600, 0)
    seen = []

    class CountingNet(MultiLayerNet):
        def accuracy(self, x, t, batch_size=100):
            seen.append(int(x.shape[0]))
            return super().accuracy(x, t, batch_size)

    trainer = Trainer(CountingNet(784, [20], 10), x[:400], t[:400], None, None, epochs=2,
                      evaluate_sample_num_per_epoch=50, x_val=x[400:], t_val=t[400:], seed=0,
                      optimizer_param={"lr": 0.01})
    trainer.train()
    out = capsys.readouterr().out
    assert seen == [50, 200, 50, 200, 200]  # train (sampled), val (all) per epoch; final val
    assert trainer.final_test_acc is None and trainer.test_acc_list == []
    assert trainer.history["test_acc"] == [None, None]
    assert trainer.final_val_acc == trainer.history["val_acc"][-1] > 0.5
    assert "test acc" not in out
    assert f"validation accuracy: {100 * trainer.final_val_acc:.2f}% (no test set given)" in out
    with pytest.raises(ValueError, match="give both x_test and t_test, or neither"):
        Trainer(small_net(), x, t, x, None)


# ------------------------------------------------------------ early stopping
def test_early_stopping_restores_the_best_epoch(xp, capsys):
    x, t, xt, tt = mnist(1000, 200)
    xv, tv = x[800:], t[800:]
    best = {}

    def sabotage(trainer, event, info):
        if event == "epoch_end" and info["epoch"] == 1:
            best.update(params_of(trainer.network))
            for p in trainer.network.params.values():  # val acc cannot recover from this
                p[...] = 0

    trainer = Trainer(small_net(), x[:800], t[:800], xt, tt, epochs=10, seed=0,
                      optimizer_param={"lr": 0.003}, x_val=xv, t_val=tv,
                      early_stopping_patience=2, callbacks=[sabotage])
    trainer.train()
    out = capsys.readouterr().out
    assert trainer.stopped_early and trainer.best_epoch == 1
    assert trainer.history["epoch"] == [1, 2, 3]
    assert len(trainer.history["val_acc"]) == 3
    first, *later = trainer.history["val_acc"]
    assert first > 0.5 and all(v < first for v in later)
    assert "early stopping after epoch 3" in out
    assert "restored the parameters of epoch 1" in out
    now = params_of(trainer.network)
    assert all(np.array_equal(best[k], now[k]) for k in best)
    assert trainer.final_test_acc > 0.5


def test_early_stopping_needs_validation_data(xp):
    x, t, xt, tt = mnist(200, 50)
    with pytest.raises(ValueError, match="needs validation data"):
        Trainer(small_net(), x, t, xt, tt, early_stopping_patience=2)


# ------------------------------------------------------------------ callbacks
def test_callbacks_are_called(xp):
    x, t, xt, tt = mnist(500, 100)
    events: list[tuple[str, dict]] = []

    class Recorder:
        def __init__(self):
            self.epochs = []

        def on_epoch_end(self, trainer, info):
            self.epochs.append(info["epoch"])

    recorder = Recorder()
    trainer = Trainer(small_net(), x, t, xt, tt, epochs=2, mini_batch_size=100,
                      verbose=False,
                      callbacks=[lambda tr, ev, info: events.append((ev, dict(info))), recorder])
    trainer.train()
    kinds = [e for e, _ in events]
    assert kinds.count("step_end") == 10 and kinds.count("epoch_end") == 2
    assert kinds[-1] == "train_end" and kinds.count("train_end") == 1
    steps = [info for e, info in events if e == "step_end"]
    assert [s["step"] for s in steps] == list(range(1, 11))
    assert [s["iteration"] for s in steps] == [1, 2, 3, 4, 5] * 2
    assert math.isfinite(float(steps[0]["loss"]))  # a device array; float() syncs
    ends = [info for e, info in events if e == "epoch_end"]
    assert [e["epoch"] for e in ends] == [1, 2] and 0 <= ends[0]["test_acc"] <= 1
    assert events[-1][1]["test_acc"] == trainer.final_test_acc
    assert recorder.epochs == [1, 2]


def test_callback_can_stop_training(xp):
    x, t, xt, tt = mnist(500, 100)

    def stop(trainer, event, info):
        if event == "step_end" and info["step"] == 3:
            trainer.stop_training = True

    trainer = Trainer(small_net(), x, t, xt, tt, epochs=5, verbose=False, callbacks=[stop])
    trainer.train()
    assert trainer.current_iter == 3 and len(trainer.train_loss_list) == 3
    assert trainer.history["epoch"] == [] and trainer.final_test_acc is not None


# ----------------------------------------------------------- non-finite loss
def test_non_finite_loss_names_the_step_and_keeps_the_last_checkpoint(xp, tmp_path):
    x, t, xt, tt = mnist(500, 100)
    x = x.copy()
    x[250] = np.nan  # shuffle=False: row 250 is in the 3rd batch of 100
    snapshots: dict[int, dict[str, bytes]] = {}
    params_after: dict[int, dict[str, np.ndarray]] = {}

    def snapshot(trainer, event, info):
        if event == "step_end":
            snapshots[info["step"]] = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
            params_after[info["step"]] = params_of(trainer.network)

    trainer = Trainer(small_net(), x, t, xt, tt, epochs=2, shuffle=False, verbose=False,
                      checkpoint_dir=tmp_path, checkpoint_every_steps=1, callbacks=[snapshot])
    with pytest.raises(NonFiniteLossError) as info:
        trainer.train()
    err = info.value
    assert "non-finite loss" in str(err) and "at step 3 (epoch 1, iteration 3 of 5)" in str(err)
    assert err.step == 3 and err.epoch == 1 and err.iteration == 3
    assert err.checkpoint is not None and err.checkpoint.name == "ckpt-000000002.npz"
    assert str(err.checkpoint) in str(err)
    assert sorted(snapshots) == [1, 2]
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert after == snapshots[2]  # byte for byte: nothing written after the bad loss
    assert CheckpointManager(tmp_path).latest().name == "ckpt-000000002.npz"
    assert len(trainer.train_loss_list) == 2
    if xp.__name__ == "numpy":  # on the host the bad update is never applied
        now = params_of(trainer.network)
        assert all(np.array_equal(now[k], params_after[2][k]) for k in now)
    # validate_labels is put back after the failed run
    assert trainer.network.loss_layer.validate_labels is True


def test_non_finite_from_divergence(xp):
    x, t, xt, tt = mnist(300, 50)
    trainer = Trainer(small_net(), x * 1e30, t, xt, tt, epochs=1, optimizer="sgd",
                      optimizer_param={"lr": 1e30}, verbose=False)
    with pytest.raises(NonFiniteLossError, match=r"at step \d+ \(epoch 1"):
        trainer.train()


# ----------------------------------------------------------------- labels
def test_labels_are_checked_once_up_front(xp):
    x, t, xt, tt = mnist(300, 50)
    bad = t.astype(np.int64)
    bad[7] = 10
    with pytest.raises(ValueError, match=r"t_train: label range: expected 0\.\.9, received "
                                         r"0\.\.10"):
        Trainer(small_net(), x, bad, xt, tt, epochs=1, verbose=False).train()
    flags = []
    net = small_net()
    Trainer(net, x, t, xt, tt, epochs=1, verbose=False,
            callbacks=[lambda tr, ev, info: ev == "step_end"
                       and flags.append(net.loss_layer.validate_labels)]).train()
    # no per-step label check (and so no GPU sync) during training ...
    assert len(flags) == 3 and set(flags) == {False}
    assert net.loss_layer.validate_labels is True  # ... and restored afterwards


def test_one_hot_labels(xp):
    (x, t), (xt, tt) = load_mnist(one_hot_label=True)
    trainer = Trainer(small_net(), x[:600], t[:600], xt[:200], tt[:200], epochs=2,
                      optimizer_param={"lr": 0.005}, verbose=False, seed=0)
    trainer.train()
    assert trainer.final_test_acc > 0.6
    broken = t[:600].copy()
    broken[0, :] = 0
    with pytest.raises(ValueError, match="t_train: one-hot labels: expected rows of 0/1"):
        Trainer(small_net(), x[:600], broken, xt[:200], tt[:200], verbose=False).train()


def test_bad_arguments(xp):
    x, t, xt, tt = mnist(200, 50)
    net = small_net()
    for kwargs, match in (({"epochs": 0}, "epochs"), ({"mini_batch_size": 0}, "mini_batch_size"),
                          ({"optimizer": "adamax"}, "unknown optimizer"),
                          ({"checkpoint_every_steps": 5}, "needs checkpoint_dir"),
                          ({"clip_norm": -1.0}, "clip_norm"),
                          ({"lr_schedule": "linear"}, "unknown lr_schedule")):
        with pytest.raises(ValueError, match=match):
            Trainer(net, x, t, xt, tt, **kwargs)
    with pytest.raises(ValueError, match="x_train has 200 samples but t_train has 199"):
        Trainer(net, x, t[:-1], xt, tt)
    with pytest.raises(ValueError, match="x_test samples have shape"):
        Trainer(net, x, t, xt[:, :100], tt)


def test_existing_checkpoints_are_not_overwritten_without_resume(xp, tmp_path):
    x, t, xt, tt = mnist(200, 50)
    Trainer(small_net(), x, t, xt, tt, epochs=1, verbose=False, checkpoint_dir=tmp_path).train()
    with pytest.raises(FileExistsError, match="resume=True"):
        Trainer(small_net(), x, t, xt, tt, epochs=1, verbose=False,
                checkpoint_dir=tmp_path).train()


# ------------------------------------------------ schedules, clipping, objects
def test_schedule_clipping_and_optimizer_object(xp):
    x, t, xt, tt = mnist(400, 50)
    net = small_net()
    opt = SGD(lr=0.1)
    sched = StepLR(opt, step_size=4, gamma=0.5)
    trainer = Trainer(net, x, t, xt, tt, epochs=2, optimizer=opt, lr_schedule=sched,
                      clip_norm=1.0, verbose=False)
    trainer.train()
    assert trainer.optimizer is opt and sched.last_step == 8
    assert trainer.history["lr"] == [0.1 * 0.5, 0.1 * 0.25]
    cos = Trainer(small_net(), x, t, xt, tt, epochs=2, lr_schedule="cosine", verbose=False)
    cos.train()
    assert cos.history["lr"][0] > cos.history["lr"][1] == 0.0
    with pytest.raises(ValueError, match="another optimizer"):
        Trainer(small_net(), x, t, xt, tt, lr_schedule=StepLR(SGD(), step_size=1))


class BookStyleNet:
    """A two-layer net written the book's way: params dict, no last_loss, no state_dict."""

    def __init__(self, xp):
        rng = np.random.default_rng(0)
        self.params = {"W1": xp.asarray(rng.normal(0, 0.05, (784, 32)).astype(np.float32)),
                       "b1": xp.zeros(32, np.float32),
                       "W2": xp.asarray(rng.normal(0, 0.05, (32, 10)).astype(np.float32)),
                       "b2": xp.zeros(10, np.float32)}
        self.a1, self.r, self.a2 = (Affine(self.params["W1"], self.params["b1"]), ReLU(),
                                    Affine(self.params["W2"], self.params["b2"]))
        self.last_layer = SoftmaxWithLoss()
        self.loss_calls = 0

    def predict(self, x):
        return self.a2.forward(self.r.forward(self.a1.forward(x)))

    def loss(self, x, t):
        self.loss_calls += 1
        return self.last_layer.forward(self.predict(x), t)

    def accuracy(self, x, t):
        y = self.predict(x).argmax(axis=1)
        return float((y == t).sum()) / x.shape[0]

    def gradient(self, x, t):
        self.loss(x, t)
        d = self.a1.backward(self.r.backward(self.a2.backward(self.last_layer.backward(1))))
        del d
        return {"W1": self.a1.grads["W"], "b1": self.a1.grads["b"],
                "W2": self.a2.grads["W"], "b2": self.a2.grads["b"]}


def test_book_style_network_and_checkpoint(xp, tmp_path):
    x, t, xt, tt = mnist(600, 200)
    net = BookStyleNet(xp)
    trainer = Trainer(net, x, t, xt, tt, epochs=2, verbose=False, seed=0,
                      optimizer_param={"lr": 0.005}, checkpoint_dir=tmp_path)
    trainer.train()
    assert trainer.final_test_acc > 0.6
    assert net.loss_calls == 2 * 12  # the book's second forward for the reported loss
    resumed = Trainer(BookStyleNet(xp), x, t, xt, tt, epochs=2, verbose=False,
                      checkpoint_dir=tmp_path)
    resumed.train(resume=True)
    for k, v in net.params.items():
        assert np.array_equal(to_cpu(v), to_cpu(resumed.network.params[k]))
    assert resumed.final_test_acc == trainer.final_test_acc


def test_bn_network_runs_on_the_backend(xp):
    x, t, xt, tt = mnist(400, 100)
    net = MultiLayerNetExtend(784, [30], 10, use_batchnorm=True, use_dropout=True)
    trainer = Trainer(net, x, t, xt, tt, epochs=1, verbose=False)
    trainer.train()
    assert get_array_module(net.buffers["running_mean1"]) is xp
    assert not np.all(to_cpu(net.buffers["running_mean1"]) == 0)


# ------------------------------------------------------------- augmentation
def test_random_shift_moves_each_image_within_two_pixels():
    from xpnet.train.augment import random_shift

    rng = np.random.default_rng(0)
    x = np.zeros((50, 1, 8, 8), dtype=np.float32)
    x[:, 0, 4, 4] = 1  # one lit pixel per image
    y = random_shift(x, rng)
    assert y.shape == x.shape and y.dtype == x.dtype
    where = np.argwhere(y[:, 0] == 1)
    assert len(where) == 50  # nothing lost: the pixel stays inside
    offsets = where[:, 1:] - 4
    assert np.abs(offsets).max() <= 2 and len({tuple(o) for o in offsets}) > 5
    assert y.sum() == 50
    again = random_shift(x, np.random.default_rng(0))
    np.testing.assert_array_equal(again, y)  # seeded


def test_augmented_training_resumes_bit_for_bit(tmp_path):
    (x, t), (xt, tt) = load_mnist(flatten=False)
    x, t, xt, tt = x[:600], t[:600], xt[:100], tt[:100]

    def run(directory, epochs, resume=False, augment="shift"):
        backend.seed(0)
        net = SimpleConvNet(conv_param={"filter_num": 4, "filter_size": 5, "pad": 0,
                                        "stride": 1}, hidden_size=10)
        trainer = Trainer(net, x, t, xt, tt, epochs=epochs, mini_batch_size=100, seed=3,
                          verbose=False, augment=augment, checkpoint_dir=directory)
        trainer.train(resume=resume)
        return {k: v.copy() for k, v in net.params.items()}, trainer

    whole, trainer = run(tmp_path / "a", 2)
    run(tmp_path / "b", 1)
    resumed, _ = run(tmp_path / "b", 2, resume=True)
    for k in whole:
        np.testing.assert_array_equal(whole[k], resumed[k], err_msg=k)
    plain, _ = run(tmp_path / "c", 2, augment=None)
    assert not np.array_equal(plain["W1"], whole["W1"])  # the shifts did change training
    with pytest.raises(ValueError, match="flatten=False"):
        Trainer(SimpleConvNet(), x.reshape(600, -1), t, xt.reshape(100, -1), tt,
                augment="shift")
    with pytest.raises(ValueError, match="unknown augment"):
        Trainer(SimpleConvNet(), x, t, xt, tt, augment="rotate")
