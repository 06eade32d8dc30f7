"""Defects a probe of bad inputs, kills and corruptions found (each fails on the code
before its fix): activation dout shapes, which arrays a network accepts, load_params
of a directory or a cut file, latest.json outside its directory, stale temporary files."""

from __future__ import annotations

import json
import os

import pytest

from xpnet.layers import ReLU, Sigmoid, Tanh
from xpnet.models import MultiLayerNet
from xpnet.state import StateError
from xpnet.train import CheckpointError, CheckpointManager


@pytest.mark.parametrize("layer", [ReLU, Sigmoid, Tanh])
def test_activation_backward_refuses_a_broadcastable_dout(xp, layer):
    act = layer()
    act.forward(xp.ones((6, 12)))
    with pytest.raises(ValueError, match=r"dout.shape: expected \(6, 12\), received \(12,\)"):
        act.backward(xp.ones(12))


class _TensorLike:
    """What a torch tensor looks like to xpnet: shape and a dtype without .kind."""

    shape = (2, 6)
    dtype = object()
    __module__ = "torch"


def test_predict_names_the_accepted_array_types():
    net = MultiLayerNet(6, [5], 3)
    with pytest.raises(TypeError, match="must be a NumPy or CuPy array, got torch"):
        net.predict(_TensorLike())


def test_load_params_of_a_directory_or_a_cut_file(tmp_path):
    net = MultiLayerNet(6, [5], 3)
    with pytest.raises(StateError, match="is a directory"):
        net.load_params(tmp_path)
    net.save_params(tmp_path / "p.npz")
    data = (tmp_path / "p.npz").read_bytes()
    for n in (1, 2, 3):
        (tmp_path / "cut.npz").write_bytes(data[:n])
        with pytest.raises(StateError, match=rf"truncated \({n} bytes\)") as info:
            net.load_params(tmp_path / "cut.npz")
        assert "allow_pickle" not in str(info.value)


def test_latest_json_pointing_outside_the_directory_is_refused(tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    run = tmp_path / "run"
    manager = CheckpointManager(run)
    net = MultiLayerNet(6, [5], 3)
    manager.save(1, net)
    CheckpointManager(outside).save(9, net)
    manager.pointer.write_text(json.dumps({"file": "../elsewhere/ckpt-000000009.npz"}))
    with pytest.raises(CheckpointError, match="not a checkpoint file of this directory"):
        manager.latest()


def test_a_killed_writers_temporary_file_is_removed_by_the_next_save(tmp_path):
    net = MultiLayerNet(6, [5], 3)
    stale = tmp_path / ".params.npz.abc123.tmp"  # what a writer killed outright leaves
    stale.write_bytes(b"half a file")
    other = tmp_path / ".other.npz.abc123.tmp"
    other.write_bytes(b"another file's")
    net.save_params(tmp_path / "params.npz")
    assert not stale.exists() and other.exists()  # only leftovers of the same path
    assert sorted(os.listdir(tmp_path)) == [".other.npz.abc123.tmp", "params.npz"]
    MultiLayerNet(6, [5], 3).load_params(tmp_path / "params.npz")  # the new file is whole
