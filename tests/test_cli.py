"""The command line (train.py / python -m xpnet.train / xpnet.train.cli.main)."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest

from xpnet import backend
from xpnet.train import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
ACC_LINE = re.compile(r"^test accuracy: (\d{1,3}\.\d\d)%$", re.M)
TINY = ["--model", "mlp", "--epochs", "1", "--limit-train", "2000"]


def run_cli(*args: str, module: bool = False, env_extra: dict | None = None):
    env = {**os.environ, "DL_BACKEND": "numpy", **(env_extra or {})}
    cmd = [sys.executable, "-m", "xpnet.train"] if module else [sys.executable, "train.py"]
    return subprocess.run([*cmd, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "0"], "--epochs: must be >= 1, got 0"),
    (["--epochs", "two"], "--epochs: expected a whole number"),
    (["--lr", "-1"], "--lr: must be > 0, got -1"),
    (["--lr", "nan"], "--lr: must be finite"),
    (["--batch-size", "0"], "--batch-size: must be >= 1"),
    (["--limit-train", "-5"], "--limit-train: must be >= 1"),
    (["--weight-decay", "-0.1"], "--weight-decay: must be >= 0"),
    (["--seed", "-1"], "--seed: must be >= 0"),
    (["--model", "resnet"], "invalid choice: 'resnet'"),
    (["--optimizer", "lion"], "invalid choice: 'lion'"),
    (["--dataset", "cifar10"], "invalid choice: 'cifar10'"),
    (["--resume"], "--resume needs --checkpoint-dir"),
    (["--checkpoint-every", "10"], "--checkpoint-every needs --checkpoint-dir"),
    (["--weight-decay", "0.1"], "needs --model mlp or mlp-extend"),
])
def test_bad_arguments_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_plot_without_matplotlib_is_a_clear_error(monkeypatch, capsys, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    with pytest.raises(SystemExit) as info:
        cli.main([*TINY, "--plot", str(tmp_path / "c.png")])
    assert info.value.code == 2
    assert "pip install 'xpnet[plot]'" in capsys.readouterr().err


@pytest.mark.skipif(backend.is_gpu_available(), reason="a GPU is present")
def test_cupy_backend_without_gpu_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([*TINY, "--backend", "cupy"])
    assert info.value.code == 2
    assert "cupy" in capsys.readouterr().err.lower()
    assert backend.get_backend_name() == "numpy"


@pytest.mark.slow
def test_tiny_run_prints_backend_and_accuracy():
    proc = run_cli(*TINY)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "backend: numpy" in out and "device: CPU" in out
    assert re.search(r"^epoch 1/1: loss \d", out, re.M)
    match = ACC_LINE.search(out)
    assert match and 50.0 <= float(match.group(1)) <= 100.0


@pytest.mark.slow
def test_module_entry_point_quiet():
    proc = run_cli(*TINY, "--quiet", module=True)
    assert proc.returncode == 0, proc.stderr
    assert ACC_LINE.fullmatch(proc.stdout.strip())


def test_plot_writes_a_png(tmp_path, capsys):
    png = tmp_path / "curves.png"
    assert cli.main([*TINY, "--epochs", "2", "--limit-train", "500", "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    out = capsys.readouterr().out
    assert f"saved the curves to {png}" in out and ACC_LINE.search(out)


def test_checkpoint_and_resume(tmp_path, capsys):
    ck = str(tmp_path / "ck")
    base = ["--model", "mlp-extend", "--limit-train", "500", "--checkpoint-dir", ck]
    assert cli.main([*base, "--epochs", "1"]) == 0
    first = capsys.readouterr().out
    assert "ckpt-000000005.npz" in os.listdir(ck)
    # the same directory again without --resume: refused, nothing overwritten
    assert cli.main([*base, "--epochs", "1"]) == 1
    assert "already holds checkpoints" in capsys.readouterr().err
    assert cli.main([*base, "--epochs", "2", "--resume", "--optimizer", "adam"]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "epoch 2/2" in out and "epoch 1/2" not in out
    assert ACC_LINE.search(first) and ACC_LINE.search(out)


def test_resume_into_another_model_fails_cleanly(tmp_path, capsys):
    ck = str(tmp_path / "ck")
    assert cli.main(["--model", "mlp", "--limit-train", "300", "--epochs", "1",
                     "--checkpoint-dir", ck, "--quiet"]) == 0
    capsys.readouterr()
    assert cli.main(["--model", "mlp-extend", "--limit-train", "300", "--epochs", "2",
                     "--checkpoint-dir", ck, "--resume"]) == 1
    err = capsys.readouterr().err
    assert "cannot resume" in err and "gamma1" in err and "MultiLayerNet" in err


def test_cuda_graph_flag(xp, capsys):
    """--cuda-graph replays the step as a CUDA graph on CuPy and changes nothing on NumPy."""
    name = xp.__name__
    args = [*TINY, "--limit-train", "600", "--backend", name, "--seed", "1"]
    accs = []
    for extra in ([], ["--cuda-graph"]):
        assert cli.main([*args, *extra]) == 0
        match = ACC_LINE.search(capsys.readouterr().out)
        assert match, "no test accuracy line"
        accs.append(float(match.group(1)))
    if name == "numpy":
        assert accs[0] == accs[1]
    else:  # the same training; cuBLAS may round the recorded GEMMs differently
        assert abs(accs[0] - accs[1]) <= 1.0 and min(accs) >= 50.0
