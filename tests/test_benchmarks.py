"""The model benchmark and its notebook run end to end at tiny sizes (``--quick``).

They check that the suite works and reports what it promises, not the numbers.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from xpnet.backend import is_gpu_available

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks" / "bench_models.py"
NOTEBOOK = ROOT / "examples" / "gpu_benchmark.ipynb"
MODELS = ("mlp", "simple-convnet", "deep-convnet")
STAT_KEYS = ("median_ms", "q1_ms", "q3_ms", "iqr_ms", "images_per_s")


def _has_torch() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _check_side(side: dict, reps: int) -> None:
    for key in STAT_KEYS:
        assert math.isfinite(side[key]) and side[key] >= 0, (key, side[key])
    assert side["median_ms"] > 0 and len(side["times_ms"]) == reps


@pytest.mark.slow
def test_bench_models_quick_writes_complete_json(tmp_path):
    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--backend", "numpy", "--threads", "1",
         "--json", str(out), "--md", str(md)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert md.read_text() in proc.stdout and "| model | step | batch |" in proc.stdout

    info = res["info"]
    for key in ("date", "command", "cpu", "cpus", "numpy", "blas", "threads", "loadavg"):
        assert info[key] not in (None, ""), key
    assert info["backend"] == "numpy" and info["threads"] == 1
    assert "--quick" in info["command"]

    torch = _has_torch()
    reps = res["sizes"]["reps"]
    rows = res["steps"]
    assert [(r["model"], r["task"]) for r in rows] == [
        (m, task) for m in MODELS for task in ("train", "infer")]
    assert [r["batch"] for r in res["sweep"]] == res["sizes"]["sweep"]
    for row in rows + res["sweep"]:
        _check_side(row["xpnet"], reps)
        if torch:
            _check_side(row["pytorch"], reps)
            assert math.isfinite(row["ratio"]) and row["ratio"] > 0
    assert [r["model"] for r in res["memory"]] == list(MODELS)
    for row in res["memory"]:
        for fw in ("xpnet", "pytorch") if torch else ("xpnet",):
            assert math.isfinite(row[fw]["peak_mib"]) and row[fw]["peak_mib"] > -1
    if torch:  # the PyTorch networks are the same networks: same logits
        assert set(res["check"]) == set(MODELS)
        assert all(diff < 1e-3 for diff in res["check"].values()), res["check"]


@pytest.mark.slow
def test_bench_models_quick_chapter8_networks(tmp_path):
    """VGG, GoogLeNet and ResNet (batch norm, Parallel, global pooling) through the bench;
    with PyTorch present, its twins built from the layer tree give the same outputs."""
    out = tmp_path / "zoo.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--backend", "numpy", "--threads", "1",
         "--models", "vgg", "googlenet", "resnet", "--skip-sweep", "--skip-memory",
         "--json", str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert [(r["model"], r["task"]) for r in res["steps"]] == [
        (m, task) for m in ("vgg", "googlenet", "resnet") for task in ("train", "infer")]
    for row in res["steps"]:
        _check_side(row["xpnet"], res["sizes"]["reps"])
    if _has_torch():
        assert all(diff < 1e-3 for diff in res["check"].values()), res["check"]


def test_gpu_benchmark_notebook_runs_quick(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    monkeypatch.setenv("XPNET_BENCH_QUICK", "1")
    monkeypatch.setenv("XPNET_BENCH_OUT", str(tmp_path))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    # No kernel directories: jupyter_client falls back to ipykernel's own 'python3' spec,
    # which runs *this* interpreter (a kernel.json found on disk may name another one).
    km = KernelManager(kernel_name="python3",
                       kernel_spec_manager=KernelSpecManager(kernel_dirs=[]))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, km=km, timeout=300,
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o["output_type"] == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 2  # CPU plot, sweep
    text = "".join(o.get("text", "") for o in outputs if o["output_type"] == "stream")
    written = sorted(p.name for p in tmp_path.iterdir())
    if is_gpu_available():
        assert written == ["performance_gpu.json", "performance_gpu.png",
                           "performance_gpu_table.md"]
    else:
        assert "GPU benchmark skipped" in text and written == []


@pytest.mark.parametrize("model", ["mlp", "deep-convnet"])
def test_profile_layers_accounts_for_every_layer(tmp_path, model):
    out = tmp_path / "profile.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "profile_layers.py"), "--model", model,
         "--batch", "4", "--steps", "1", "--threads", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    parts = result["parts_ms"]
    layers = {key.rsplit(" ", 1)[0] for key in parts if key != "optimizer"}
    assert "optimizer" in parts and len(result["step_ms"]) == 1
    # layers before the loss (DeepConvNet's six Convolution -> ReLU pairs are ConvReLU layers)
    expected = {"mlp": 9, "deep-convnet": 14}[model]
    assert len(layers) == expected, sorted(layers)
    assert all(math.isfinite(v) and v >= 0 for v in parts.values())
    assert "| part | ms | share |" in done.stdout
