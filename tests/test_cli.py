"""The command line (train.py / python -m xpnet.train / xpnet.train.cli.main)."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import subprocess
import sys
import warnings

import pytest

from xpnet import backend
from xpnet.datasets import DatasetNotFoundError, load_mnist
from xpnet.train import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
ACC_LINE = re.compile(r"^test accuracy: (\d{1,3}\.\d\d)%$", re.M)
TINY = ["--model", "mlp", "--epochs", "1", "--limit-train", "2000"]


def one_line(capsys) -> str:
    """stderr, checked to be one line and no traceback; stdout empty (nothing ran)."""
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    return lines[0]


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
    (["--model", "alexnet"], "invalid choice: 'alexnet'"),
    (["--optimizer", "lion"], "invalid choice: 'lion'"),
    (["--dataset", "cifar10"], "invalid choice: 'cifar10'"),
    (["--resume"], "--resume needs --checkpoint-dir"),
    (["--checkpoint-every", "10"], "--checkpoint-every needs --checkpoint-dir"),
    (["--weight-decay", "0.1"], "needs a model with L2 weight decay in the loss"),
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
    monkeypatch.chdir(ROOT)
    assert cli.main([*TINY, "--plot", str(tmp_path / "c.png")]) == 2
    err = one_line(capsys)
    assert "--plot needs matplotlib" in err
    assert "pip install -e '.[plot]'" in err  # installed from this checkout


@pytest.mark.skipif(backend.is_gpu_available(), reason="a GPU is present")
def test_cupy_backend_without_gpu_is_a_clear_error(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert cli.main([*TINY, "--backend", "cupy"]) == 2
    err = one_line(capsys)
    assert "cupy" in err.lower()
    assert "DL_BACKEND" not in err and "pip install 'xpnet[" not in err
    assert "--backend numpy" in err or "pip install -e '.[cuda12]'" in err
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


def test_validation_split_keeps_the_test_set_out(monkeypatch, capsys):
    built = {}
    real = cli.Trainer

    def spy(network, x_train, t_train, x_test, t_test, **kwargs):
        built.update(train=len(x_train), test=x_test, val=len(kwargs["x_val"]),
                     first_val_label=int(kwargs["t_val"][0]))
        return real(network, x_train, t_train, x_test, t_test, **kwargs)

    monkeypatch.setattr(cli, "Trainer", spy)
    assert cli.main([*TINY, "--limit-train", "500", "--validation", "200", "--quiet"]) == 0
    (_, t), _ = load_mnist()
    assert built == {"train": 300, "test": None, "val": 200, "first_val_label": int(t[300])}
    assert re.fullmatch(r"validation accuracy: \d{1,3}\.\d\d%", capsys.readouterr().out.strip())


def test_validation_that_leaves_no_training_images_is_refused(capsys):
    assert cli.main([*TINY, "--limit-train", "500", "--validation", "500"]) == 2
    err = capsys.readouterr().err
    [line] = err.strip().splitlines()
    assert line.endswith(": error: --validation 500 leaves no training images: there are 500")


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
    # the same directory again without --resume: refused before training, in CLI words
    assert cli.main([*base, "--epochs", "1"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "already holds checkpoints" in captured.err and "add --resume" in captured.err
    assert "resume=True" not in captured.err
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


# ---------------------------------------------------------------- checks before training
def test_plot_in_a_format_matplotlib_cannot_write_is_refused_before_training(tmp_path):
    """train.py --plot curves.txt used to train fully, then crash in matplotlib."""
    proc = run_cli(*TINY, "--plot", str(tmp_path / "curves.txt"))
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "'.txt' is not a format matplotlib writes" in lines[0] and ".png" in lines[0]
    assert not (tmp_path / "curves.txt").exists()


@pytest.mark.parametrize("target, message", [
    ("curves", "the file name has no suffix"),
    ("missing/c.png", "does not exist"),
    ("a_file/c.png", "is not a directory"),
    ("a_dir", "is a directory"),
])
def test_plot_path_checked_before_training(target, message, tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "a_dir.png").mkdir()
    target = "a_dir.png" if target == "a_dir" else target
    assert cli.main([*TINY, "--plot", str(tmp_path / target)]) == 2
    err = one_line(capsys)
    assert err.startswith(f"{cli.build_parser().prog}: error: --plot ") and message in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_plot_into_a_read_only_directory(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert cli.main([*TINY, "--plot", str(ro / "c.png")]) == 2
        assert "cannot write there" in one_line(capsys)
    finally:
        ro.chmod(0o755)


def _mnist_files(directory: pathlib.Path, count: int = 4) -> None:
    from xpnet.datasets.mnist import BUNDLED_MNIST_DIR, MNIST  # noqa: PLC0415

    directory.mkdir(parents=True, exist_ok=True)
    for f in MNIST.files[:count]:
        (directory / f.filename).write_bytes((BUNDLED_MNIST_DIR / f.filename).read_bytes())


@pytest.mark.parametrize("case, message", [
    ("missing", "no such directory"),
    ("file", "is a file, not a directory"),
    ("partial", "missing 1 of the four MNIST files: t10k-labels-idx1-ubyte.gz"),
])
def test_data_dir_checked_before_training(case, message, tmp_path, capsys):
    """A --data-dir that is missing or incomplete used to warn, then look elsewhere."""
    target = tmp_path / "data"
    if case == "file":
        target.write_text("x")
    elif case == "partial":
        _mnist_files(target, count=3)
    assert cli.main([*TINY, "--data-dir", str(target)]) == 2
    err = one_line(capsys)
    assert f"--data-dir {target}: {message}" in err


def test_data_dir_with_the_four_files_is_used(tmp_path, capsys):
    _mnist_files(tmp_path / "data")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "does not hold the four files" warning
        assert cli.main([*TINY, "--limit-train", "300", "--quiet",
                         "--data-dir", str(tmp_path / "data")]) == 0
    assert ACC_LINE.search(capsys.readouterr().out)


def _no_fashion_files(monkeypatch, tmp_path) -> None:
    from xpnet.datasets.mnist import FASHION_MNIST  # noqa: PLC0415

    if any(d.is_dir() for d in FASHION_MNIST.system_dirs):
        pytest.skip("Fashion-MNIST is installed on this machine")
    monkeypatch.delenv("XPNET_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def test_fashion_mnist_missing_offline_says_where_to_put_it(monkeypatch, tmp_path, capsys):
    _no_fashion_files(monkeypatch, tmp_path)
    monkeypatch.setenv("XPNET_OFFLINE", "1")
    assert cli.main([*TINY, "--dataset", "fashion-mnist"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "data_dir" not in err
    assert "--data-dir" in err and str(tmp_path / "cache" / "xpnet" / "fashion-mnist") in err
    assert "dataset-fashion-mnist" in err and "/usr/share/datasets/fashion-mnist" in err


def test_fashion_mnist_failed_download_says_where_to_put_it(monkeypatch, tmp_path, capsys):
    """The download's own error names only the mirrors; the CLI adds where files go."""
    from xpnet.datasets import fetch  # noqa: PLC0415

    _no_fashion_files(monkeypatch, tmp_path)
    monkeypatch.delenv("XPNET_OFFLINE", raising=False)

    def unreachable(fspec, mirrors, dest_dir, **kwargs):
        raise DatasetNotFoundError(f"could not download {fspec.filename}; tried:\n  (offline)")

    monkeypatch.setattr(fetch, "download_file", unreachable)
    assert cli.main([*TINY, "--dataset", "fashion-mnist"]) == 1
    err = capsys.readouterr().err
    assert "could not download" in err
    assert "Put the four Fashion-MNIST files (train-images-idx3-ubyte.gz" in err
    assert "--data-dir DIR" in err and "sudo apt install dataset-fashion-mnist" in err


@pytest.mark.parametrize("case, message", [
    ("file", "is a file, not a directory"),
    ("under_a_file", "is not a directory"),
])
def test_checkpoint_dir_checked_before_training(case, message, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    target = tmp_path / "f" if case == "file" else tmp_path / "f" / "ck"
    assert cli.main([*TINY, "--checkpoint-dir", str(target)]) == 2
    err = one_line(capsys)
    assert err.startswith(f"{cli.build_parser().prog}: error: --checkpoint-dir {target}")
    assert message in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_checkpoint_dir_read_only(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        for target in (ro, ro / "ck"):
            assert cli.main([*TINY, "--checkpoint-dir", str(target)]) == 2
            assert "cannot write checkpoints there" in one_line(capsys)
    finally:
        ro.chmod(0o755)


def test_save_error_during_training_is_one_line(monkeypatch, tmp_path, capsys):
    """An OSError out of training (a full disk) ends as one line naming the path."""
    path = tmp_path / "ck" / "ckpt-000000005.npz"

    def disk_full(self, resume=False):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(cli.Trainer, "train", disk_full)
    assert cli.main([*TINY, "--checkpoint-dir", str(tmp_path / "ck")]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"error: [Errno 28] No space left on device: '{path}'"]


# ---------------------------------------------------------------- what the header says
def test_batch_larger_than_the_data_is_said(capsys):
    assert cli.main([*TINY, "--limit-train", "500", "--batch-size", "70000"]) == 0
    captured = capsys.readouterr()
    assert "1 epoch(s) of 1 steps, batch 500," in captured.out
    assert ("warning: --batch-size 70000 is larger than the 500 training images; each step "
            "uses all 500") in captured.err


def test_resume_with_fewer_epochs_than_done_says_so(tmp_path, capsys):
    ck = str(tmp_path / "ck")
    base = [*TINY, "--limit-train", "300", "--checkpoint-dir", ck]
    assert cli.main([*base, "--epochs", "2", "--quiet"]) == 0
    capsys.readouterr()
    assert cli.main([*base, "--epochs", "1", "--resume"]) == 0
    captured = capsys.readouterr()
    assert "has already done 2 epoch(s) and --epochs 1 asks for no more: nothing to train " \
           "(give --epochs 3 or more to continue)" in captured.err
    assert not re.search(r"^epoch \d", captured.out, re.M) and ACC_LINE.search(captured.out)


def test_lr_with_resume_warns_that_the_checkpoints_is_used(tmp_path, capsys):
    ck = str(tmp_path / "ck")
    base = [*TINY, "--limit-train", "300", "--checkpoint-dir", ck, "--optimizer", "sgd"]
    assert cli.main([*base, "--epochs", "1", "--lr", "0.05", "--quiet"]) == 0
    capsys.readouterr()
    assert cli.main([*base, "--epochs", "2", "--resume", "--lr", "0.5"]) == 0
    captured = capsys.readouterr()
    assert "warning: --lr 0.5 is ignored with --resume: the checkpoint's learning rate " \
           "(0.05)" in captured.err
    assert "lr=0.05) from the checkpoint" in captured.out and "lr=0.5" not in captured.out
    assert "epoch 2/2" in captured.out


# ---------------------------------------------------------------- CLI words
def test_non_finite_loss_message_speaks_cli_words(capsys):
    assert cli.main([*TINY, "--optimizer", "sgd", "--lr", "1e6"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: non-finite") and len(err.strip().splitlines()) == 1
    assert "--clip-norm" in err and "clip_norm" not in err
    assert "no --checkpoint-dir" in err and "checkpoint_dir" not in err


def test_clip_norm_option(capsys):
    assert cli.main([*TINY, "--limit-train", "500", "--clip-norm", "1", "--quiet"]) == 0
    assert ACC_LINE.search(capsys.readouterr().out)
    with pytest.raises(SystemExit) as info:
        cli.main([*TINY, "--clip-norm", "1", "--cuda-graph"])
    assert info.value.code == 2
    assert "--cuda-graph cannot be combined with --clip-norm" in capsys.readouterr().err


@pytest.mark.parametrize("api, cli_text", [
    ("pass resume=True to continue", "add --resume to continue"),
    ("gradient clipping (clip_norm)", "gradient clipping (--clip-norm)"),
    ("in one of: the data_dir argument, $XPNET_DATA", "in one of: --data-dir, $XPNET_DATA"),
    ("Use DL_BACKEND=numpy to run on the CPU", "Use --backend numpy to run on the CPU"),
    ("Install it with: pip install 'xpnet[cuda12]' (CUDA 12) or 'xpnet[cuda13]' (CUDA 13)",
     "Install it with: pip install -e '.[cuda12]' (CUDA 12) or '.[cuda13]' (CUDA 13)"),
])
def test_cli_words(api, cli_text, monkeypatch):
    monkeypatch.chdir(ROOT)
    args = cli.build_parser().parse_args(["--backend", "cupy"])
    assert cli._cli_words(api, args) == cli_text


def test_install_hint_outside_a_checkout(monkeypatch, tmp_path):
    monkeypatch.setattr(cli, "_checkout_root", lambda: None)
    assert cli._install_hint("plot") == "pip install 'xpnet[plot]'"
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)  # a checkout, run from elsewhere: its path
    assert cli._install_hint("plot") == f"pip install -e '{ROOT}[plot]'"


def test_plot_labels_say_how_many_images(tmp_path):
    pytest.importorskip("matplotlib")
    from xpnet.datasets import load_mnist  # noqa: PLC0415
    from xpnet.models import MultiLayerNet  # noqa: PLC0415

    (x, t), (xt, tt) = load_mnist()
    trainer = cli.Trainer(MultiLayerNet(784, [20], 10), x[:300], t[:300], xt[:3000], tt[:3000],
                          epochs=1, evaluate_sample_num_per_epoch=2000, verbose=False)
    trainer.train()
    fig = cli._curves_figure(trainer, 2000)
    labels = fig.axes[1].get_legend_handles_labels()[1]
    assert labels == ["train (all 300 images)", "test (first 2000 images)",
                      "final test (all 3000 images)"]


# ------------------------------------------------------- transfer learning, --save
def test_save_then_init_from_with_frozen_layers(tmp_path, capsys):
    from xpnet.state import load_state

    first, second = tmp_path / "first.npz", tmp_path / "second.npz"
    small = ["--epochs", "1", "--limit-train", "300", "--quiet"]
    assert cli.main([*small, "--save", str(first)]) == 0
    assert cli.main([*small, "--init-from", str(first), "--freeze", "W1", "b1",
                     "--group-lr", "W2=1e-5", "--augment", "shift", "--lr-schedule", "cosine",
                     "--save", str(second)]) == 0
    a, b = load_state(first).params, load_state(second).params
    assert (a["W1"] == b["W1"]).all() and (a["b1"] == b["b1"]).all()  # frozen
    assert not (a["W3"] == b["W3"]).all()  # trained on
    capsys.readouterr()


@pytest.mark.parametrize("argv, message", [
    (["--group-lr", "W1"], "--group-lr W1: expected PREFIX=LR"),
    (["--group-lr", "W1=-2"], "--group-lr W1=-2: expected PREFIX=LR"),
    (["--freeze", "W9"], "freeze: no parameter matches ['W9']"),
    (["--model", "mlp", "--augment", "shift"], "augment needs image data"),
])
def test_transfer_options_refused_in_one_line(argv, message, capsys):
    assert cli.main([*argv, "--epochs", "1", "--limit-train", "200"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_init_from_a_file_of_another_network_names_the_shapes(tmp_path, capsys):
    saved = tmp_path / "mlp.npz"
    assert cli.main(["--model", "mlp", "--epochs", "1", "--limit-train", "200", "--quiet",
                     "--save", str(saved)]) == 0
    capsys.readouterr()
    assert cli.main(["--init-from", str(saved), "--epochs", "1", "--limit-train", "200"]) == 2
    err = capsys.readouterr().err
    assert "W1" in err and "(784, 100)" in err and "Traceback" not in err
