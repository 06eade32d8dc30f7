"""Checkpoints: exact round trips, atomic writes under SIGKILL, bitwise resume, and
refusal of truncated, tampered, mismatched and pickled files."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import struct
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest

from xpnet import backend
from xpnet.backend import to_cpu
from xpnet.datasets import load_mnist
from xpnet.models import MultiLayerNet, MultiLayerNetExtend
from xpnet.optim import Adam, CosineLR, Momentum
from xpnet.train import (
    CheckpointError,
    CheckpointManager,
    CheckpointMismatchError,
    Trainer,
    load_checkpoint,
    save_checkpoint,
)
from xpnet.train.checkpoint import MANIFEST_MEMBER

ROOT = pathlib.Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------- helpers
_DATA: dict[str, tuple] = {}


def mnist_subset(n_train: int = 1200, n_test: int = 300):
    """Host arrays: the first n_train training and n_test test images (flat)."""
    if "flat" not in _DATA:
        _DATA["flat"] = load_mnist(flatten=True)
    (x, t), (xt, tt) = _DATA["flat"]
    return x[:n_train], t[:n_train], xt[:n_test], tt[:n_test]


def make_trainer(checkpoint_dir=None, callbacks=(), checkpoint_every_steps=None,
                 epochs: int = 2, seed: int = 0) -> Trainer:
    """The resume scenario: BatchNorm + Dropout MLP, Adam with a cosine schedule.

    Seeds xpnet's random source first, so the same call gives the same network, and the
    same trainer, in any process (the SIGKILL test runs it in a child).
    """
    backend.seed(seed)
    net = MultiLayerNetExtend(784, [40, 30], 10, use_batchnorm=True, use_dropout=True,
                              dropout_ratio=0.2)
    x, t, xt, tt = mnist_subset()
    return Trainer(net, x, t, xt, tt, epochs=epochs, mini_batch_size=100,
                   optimizer="adam", optimizer_param={"lr": 0.003},
                   evaluate_sample_num_per_epoch=200, verbose=False,
                   checkpoint_dir=checkpoint_dir, checkpoint_every_steps=checkpoint_every_steps,
                   seed=seed, lr_schedule="cosine", callbacks=callbacks)


def host_state(net) -> dict[str, np.ndarray]:
    out = {f"p/{k}": to_cpu(v).copy() for k, v in net.params.items()}
    out.update({f"b/{k}": to_cpu(v).copy() for k, v in net.buffers.items()})
    return out


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert np.array_equal(a[k], b[k]), f"{k} differs"


def trained_net_and_optimizer(xp, hidden=(20,), steps: int = 3, bn: bool = True):
    """A small network and an Adam that has taken ``steps`` updates on random data."""
    net = MultiLayerNetExtend(12, list(hidden), 4, use_batchnorm=bn)
    opt = Adam(lr=0.01)
    sched = CosineLR(opt, total_steps=10)
    rng = np.random.default_rng(1)
    for _ in range(steps):
        x = xp.asarray(rng.standard_normal((8, 12)).astype(np.float32))
        t = xp.asarray(rng.integers(0, 4, 8))
        grads = net.gradient(x, t)
        opt.update(net.params, grads)
        sched.step()
    return net, opt, sched


# -------------------------------------------------------------- round trip
def test_round_trip_is_exact(xp, tmp_path):
    net, opt, sched = trained_net_and_optimizer(xp)
    path = save_checkpoint(tmp_path / "c.npz", net, opt, lr_schedule=sched,
                           progress={"epoch": 1, "step": 3, "position": 2},
                           history={"loss": [1.5, 1.25]}, config={"note": "x"},
                           arrays={"extra": np.arange(5)})
    assert sorted(os.listdir(tmp_path)) == ["c.npz"]  # no temp file left

    ck = load_checkpoint(path)
    assert ck.step == 3 and ck.epoch == 1
    assert ck.progress["position"] == 2 and ck.history == {"loss": [1.5, 1.25]}
    assert ck.config["note"] == "x" and ck.config["model"]["class"] == "MultiLayerNetExtend"
    assert ck.optimizer["type"] == "Adam" and ck.optimizer["step"] == 3
    assert ck.rng["backend"] is not None or xp.__name__ == "cupy"
    assert np.array_equal(ck.arrays["extra"], np.arange(5))
    for k, v in net.params.items():
        assert isinstance(ck.params[k], np.ndarray) and np.array_equal(ck.params[k], to_cpu(v))

    # restore into a fresh network, optimizer and schedule: everything bitwise equal
    backend.seed(123)
    net2, opt2, sched2 = trained_net_and_optimizer(xp, steps=0)
    ck.restore(net2, opt2, sched2)
    assert_bitwise_equal(host_state(net), host_state(net2))
    assert type(next(iter(net2.params.values()))) is xp.ndarray
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["step"] == s2["step"] and s1["hyper"] == s2["hyper"]
    for slot in s1["slots"]:
        for k in s1["slots"][slot]:
            assert np.array_equal(to_cpu(s1["slots"][slot][k]), to_cpu(s2["slots"][slot][k]))
    assert sched2.state_dict() == sched.state_dict() and opt2.lr == opt.lr


def test_checkpoint_moves_between_backends(xp, tmp_path):
    """Saved from the backend under test, loaded on NumPy, and back."""
    net, opt, _ = trained_net_and_optimizer(xp)
    save_checkpoint(tmp_path / "a.npz", net, opt)
    with backend.use_backend("numpy"):
        host_net, host_opt, _ = trained_net_and_optimizer(np, steps=0)
        load_checkpoint(tmp_path / "a.npz").restore(host_net, host_opt)
        assert_bitwise_equal(host_state(net), host_state(host_net))
        assert isinstance(host_net.params["W1"], np.ndarray)
        save_checkpoint(tmp_path / "b.npz", host_net, host_opt)
    net3, opt3, _ = trained_net_and_optimizer(xp, steps=0)
    load_checkpoint(tmp_path / "b.npz").restore(net3, opt3)
    assert_bitwise_equal(host_state(net), host_state(net3))
    assert type(net3.params["W1"]) is xp.ndarray


def test_manifest_is_json_inside_the_npz(xp, tmp_path):
    net, opt, _ = trained_net_and_optimizer(xp, steps=1)
    path = save_checkpoint(tmp_path / "c.npz", net, opt)
    with np.load(path, allow_pickle=False) as z:
        manifest = json.loads(z[MANIFEST_MEMBER].tobytes())
    assert manifest["format"] == "xpnet-checkpoint" and manifest["version"] == 2
    entry = next(e for e in manifest["arrays"] if e["key"] == "W1" and e["group"] == "params")
    assert entry["shape"] == [12, 20] and entry["dtype"] == "<f4" and len(entry["sha256"]) == 64


# ---------------------------------------------------------- bad files
def _saved(xp, tmp_path, name="c.npz"):
    net, opt, sched = trained_net_and_optimizer(xp)
    return save_checkpoint(tmp_path / name, net, opt, lr_schedule=sched), net, opt


def test_truncated_and_empty_files_are_refused(xp, tmp_path):
    path, _, _ = _saved(xp, tmp_path)
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 10, 100):
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="truncated") as info:
            load_checkpoint(path)
        assert str(path) in str(info.value)
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "missing.npz")


def test_flipped_bytes_are_detected(xp, tmp_path):
    path, _, _ = _saved(xp, tmp_path)
    data = bytearray(path.read_bytes())
    # flip one byte in the data of every array member, one at a time
    with zipfile.ZipFile(path) as z:
        infos = [i for i in z.infolist() if i.filename != MANIFEST_MEMBER + ".npy"]
    assert len(infos) > 4
    for info in infos:
        off = info.header_offset
        name_len, extra_len = struct.unpack("<HH", bytes(data[off + 26:off + 30]))
        last_data_byte = off + 30 + name_len + extra_len + info.compress_size - 1
        bad = bytearray(data)
        bad[last_data_byte] ^= 0xFF
        path.write_bytes(bytes(bad))
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(path)
        assert str(path) in str(err.value)


def test_changed_array_with_original_manifest_fails_the_checksum(xp, tmp_path):
    """Rewrite the archive (valid zip CRCs) with one array changed: sha256 catches it."""
    path, _, _ = _saved(xp, tmp_path)
    with np.load(path, allow_pickle=False) as z:
        members = {k: z[k] for k in z.files}
        manifest = json.loads(z[MANIFEST_MEMBER].tobytes())
    entry = next(e for e in manifest["arrays"] if e["key"] == "W1" and e["group"] == "params")
    members[entry["member"]] = members[entry["member"]] + np.float32(1e-3)
    np.savez(path, **members)
    with pytest.raises(CheckpointError, match=r"params\['W1'\]: sha256 checksum mismatch"):
        load_checkpoint(path)


def test_wrong_shapes_are_all_listed_and_nothing_changes(xp, tmp_path):
    path, _, _ = _saved(xp, tmp_path)  # hidden (20,), 12 -> 20 -> 4
    backend.seed(5)
    other = MultiLayerNetExtend(12, [21], 4, use_batchnorm=True)
    other_opt = Adam(lr=0.01)
    before = host_state(other)
    with pytest.raises(CheckpointMismatchError) as info:
        load_checkpoint(path).restore(other, other_opt)
    msg = str(info.value)
    assert isinstance(info.value, ValueError)
    for key in ("'W1'", "'b1'", "'W2'", "'gamma1'", "'beta1'", "'running_mean1'",
                "'running_var1'"):
        assert key in msg, key
    assert "(20,)" in msg and "(21,)" in msg and "optimizer['m']['W1']" in msg
    assert len(info.value.problems) >= 7
    assert_bitwise_equal(before, host_state(other))
    assert other_opt.step_count == 0


def test_wrong_optimizer_type_and_dtype_are_reported(xp, tmp_path):
    path, net, _ = _saved(xp, tmp_path)
    net64 = MultiLayerNetExtend(12, [20], 4, use_batchnorm=True, dtype="float64")
    with pytest.raises(CheckpointMismatchError) as info:
        load_checkpoint(path).restore(net64, Momentum())
    msg = str(info.value)
    assert "dtype float32 in the checkpoint, float64 in the network" in msg
    assert "checkpoint has Adam, the optimizer is Momentum" in msg


class _Evil:
    """Unpickling this creates the marker file: proof that the payload ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


@pytest.mark.parametrize("listed", [True, False], ids=["in-manifest", "unlisted"])
def test_pickled_object_array_is_refused_unexecuted(xp, tmp_path, listed):
    path, _, _ = _saved(xp, tmp_path)
    marker = tmp_path / "PWNED"
    with np.load(path, allow_pickle=False) as z:
        members = {k: z[k] for k in z.files}
        manifest = json.loads(z[MANIFEST_MEMBER].tobytes())
    payload = np.empty(1, dtype=object)
    payload[0] = _Evil(str(marker))
    if listed:  # replace a real array by the payload, manifest pointing at it
        entry = manifest["arrays"][0]
        members[entry["member"]] = payload
    else:
        members["zz_evil"] = payload
    np.savez(path, allow_pickle=True, **members)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    assert ("refused" if listed else "unexpected member 'zz_evil'") in str(info.value)
    assert not marker.exists()


def test_plain_pickle_file_is_refused_unexecuted(tmp_path):
    import pickle  # noqa: PLC0415 - only to build the hostile file

    marker = tmp_path / "PWNED"
    path = tmp_path / "c.npz"
    path.write_bytes(pickle.dumps(_Evil(str(marker))))
    with pytest.raises(CheckpointError, match="not an xpnet state file.*pickle"):
        load_checkpoint(path)
    assert not marker.exists()


def test_save_failure_leaves_old_file_and_no_temp(xp, tmp_path, monkeypatch):
    path, net, opt = _saved(xp, tmp_path)
    old = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, net, opt)
    assert path.read_bytes() == old
    assert sorted(os.listdir(tmp_path)) == ["c.npz"]


def test_manager_keeps_k_files_and_a_latest_pointer(xp, tmp_path):
    net, opt, _ = trained_net_and_optimizer(xp, steps=1)
    mgr = CheckpointManager(tmp_path / "ck", keep=2)
    assert mgr.latest() is None
    for step in (5, 10, 15, 20):
        mgr.save(step, net, opt, progress={"step": step})
    names = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert names == ["ckpt-000000015.npz", "ckpt-000000020.npz", "latest.json"]
    assert mgr.latest().name == "ckpt-000000020.npz"
    # a leftover temp file of a killed writer is never taken for a checkpoint
    (tmp_path / "ck" / ".ckpt-000000025.npz.abc.tmp").write_bytes(b"PK\x03\x04junk")
    (tmp_path / "ck" / "latest.json").unlink()
    assert mgr.latest().name == "ckpt-000000020.npz"
    assert [p.name for p in mgr.remove_stale_temp_files()] == [".ckpt-000000025.npz.abc.tmp"]


# ------------------------------------------------------- atomic under SIGKILL
_SAVER = r"""
import sys, numpy as np
from xpnet.train import save_checkpoint

class Net:  # any object with params/buffers can be checkpointed
    params = {"W": np.zeros((1 << 20,), np.float32), "v": np.zeros((), np.int64)}
    buffers = {}

path = sys.argv[1]
i = 0
while True:
    i += 1
    Net.params["W"][:] = i
    Net.params["v"][...] = i
    save_checkpoint(path, Net)
    print(i, flush=True)
"""


@pytest.mark.slow
def test_save_is_atomic_under_sigkill(tmp_path):
    """Kill a child in the middle of its save loop: the file is always one whole version."""
    path = tmp_path / "c.npz"
    rng = np.random.default_rng(0)
    for round_ in range(4):
        proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(path)], cwd=ROOT,
                                stdout=subprocess.PIPE, text=True)
        try:
            done = 0
            while done < 2:  # let it complete a couple of saves
                line = proc.stdout.readline()
                assert line, "saver exited early"
                done = int(line)
            time.sleep(float(rng.uniform(0.0, 0.05)))
            os.kill(proc.pid, signal.SIGKILL)  # this child only
        finally:
            proc.wait(timeout=30)
            proc.stdout.close()
        assert proc.returncode == -signal.SIGKILL
        ck = load_checkpoint(path)  # a complete checkpoint, old or new
        w, v = ck.params["W"], int(ck.params["v"])
        assert v >= done and np.all(w == v), f"round {round_}: mixed versions"
        leftovers = [p.name for p in tmp_path.iterdir() if p.name != "c.npz"]
        assert all(n.startswith(".c.npz.") and n.endswith(".tmp") for n in leftovers)
        # a leftover temp file never passes for a checkpoint
        mgr = CheckpointManager(tmp_path)
        assert mgr.latest() is None  # 'c.npz' is not a ckpt-<step>.npz name either
        mgr.remove_stale_temp_files()
        assert sorted(os.listdir(tmp_path)) == ["c.npz"]


# ------------------------------------------------------------- bitwise resume
_RESUMER = r"""
import os, signal, sys, time
from tests.test_checkpoint import make_trainer

def stop_at(trainer, event, info):
    if event == "step_end":
        print(info["step"], flush=True)
        if info["step"] == int(sys.argv[2]):
            print("STOP", flush=True)
            time.sleep(120)  # the parent kills us here

make_trainer(checkpoint_dir=sys.argv[1], checkpoint_every_steps=5, callbacks=[stop_at]).train()
"""


@pytest.mark.slow
def test_resume_after_sigkill_is_bitwise_equal(tmp_path):
    """Uninterrupted run vs. a child killed with SIGKILL at step 18 and resumed here."""
    ref = make_trainer()
    ref.train()
    expected = host_state(ref.network)

    ck_dir = tmp_path / "ck"
    env = {**os.environ, "DL_BACKEND": "numpy", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", _RESUMER, str(ck_dir), "18"], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        for line in proc.stdout:
            if line.strip() == "STOP":
                break
        else:
            pytest.fail("the child finished without reaching step 18")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    latest = CheckpointManager(ck_dir).latest()
    assert latest.name == "ckpt-000000015.npz"  # mid-epoch 2 (12 steps per epoch)
    assert load_checkpoint(latest).progress["position"] == 3

    with backend.use_backend("numpy"):
        resumed = make_trainer(checkpoint_dir=ck_dir, seed=0)
        backend.seed(99)  # the checkpoint must restore the dropout generator itself
        resumed.train(resume=True)
    assert_bitwise_equal(expected, host_state(resumed.network))
    assert resumed.train_loss_list == ref.train_loss_list
    assert resumed.history["test_acc"] == ref.history["test_acc"]
    assert resumed.final_test_acc == ref.final_test_acc


@pytest.mark.parametrize("stop_step", [7, 12, 13])
def test_stop_and_resume_in_process_is_bitwise_equal(xp, tmp_path, stop_step):
    """Stopped by a callback after ``stop_step`` steps, resumed by a new trainer."""
    ref = make_trainer()
    ref.train()
    expected = host_state(ref.network)

    def stop(trainer, event, info):
        if event == "step_end" and info["step"] == stop_step:
            trainer.stop_training = True

    first = make_trainer(checkpoint_dir=tmp_path, callbacks=[stop])
    first.train()
    assert first.current_iter == stop_step
    second = make_trainer(checkpoint_dir=tmp_path)
    backend.seed(99)
    second.train(resume=True)
    if xp.__name__ == "numpy":  # CuPy's dropout generator state cannot be exported
        assert_bitwise_equal(expected, host_state(second.network))
        assert second.train_loss_list == ref.train_loss_list
    assert second.current_iter == ref.current_iter == 24
    assert len(second.history["epoch"]) == 2


def test_resume_refuses_a_checkpoint_of_other_data(xp, tmp_path):
    first = make_trainer(checkpoint_dir=tmp_path, epochs=1)
    first.train()
    backend.seed(0)
    net = MultiLayerNet(784, [40], 10)
    x, t, xt, tt = mnist_subset(n_train=600)
    other = Trainer(net, x, t, xt, tt, epochs=2, mini_batch_size=50, verbose=False,
                    checkpoint_dir=tmp_path)
    before = host_state(net)
    with pytest.raises(CheckpointMismatchError) as info:
        other.train(resume=True)
    msg = str(info.value)
    for what in ("mini_batch_size", "train_size", "the training labels differ",
                 "MultiLayerNetExtend", "'gamma1'", "lr_schedule"):
        assert what in msg, what
    assert_bitwise_equal(before, host_state(net))


def test_resume_from_an_explicit_older_file(xp, tmp_path):
    """``train(resume_from=path)``: an older checkpoint, into a trainer without a directory."""
    ref = make_trainer()
    ref.train()
    first = make_trainer(checkpoint_dir=tmp_path, checkpoint_every_steps=4)
    first.train()
    assert sorted(os.listdir(tmp_path)) == ["ckpt-000000016.npz", "ckpt-000000020.npz",
                                            "ckpt-000000024.npz", "latest.json"]  # keep 3
    resumed = make_trainer()
    resumed.train(resume_from=tmp_path / "ckpt-000000016.npz")
    assert resumed.current_iter == 24 and resumed.history["epoch"] == [1, 2]
    if xp.__name__ == "numpy":
        assert_bitwise_equal(host_state(ref.network), host_state(resumed.network))


def test_resume_refuses_a_plain_checkpoint(xp, tmp_path):
    """A save_checkpoint() file without the trainer's progress cannot be resumed."""
    trainer = make_trainer()
    save_checkpoint(tmp_path / "plain.npz", trainer.network, trainer.optimizer,
                    lr_schedule=trainer.lr_schedule)
    with pytest.raises(CheckpointMismatchError, match="not a Trainer checkpoint"):
        trainer.train(resume_from=tmp_path / "plain.npz")
