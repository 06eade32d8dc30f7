"""What every example script shares: arguments, seeding, summary.json, plots, curves.

The scripts run as ``python examples/NAME.py``, so Python puts ``examples/`` on
``sys.path`` and they import this module as a sibling (``import _common``).

Every script takes ``--out DIR`` (figures and ``summary.json``), ``--quick`` (a
seconds-long version for CI), ``--seed`` (default 0) and honours ``DL_BACKEND``.
``summary.json`` holds the settings, the measured numbers, and for each of the
book's claims the verdict ``holds: true/false`` with the numbers behind it;
``examples/make_results.py`` turns those files into ``docs/results.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

import xpnet  # noqa: E402
from xpnet.backend import (  # noqa: E402
    BackendError,
    device_name,
    get_array_module,
    get_backend_name,
    seed,
    to_backend,
    to_cpu,
)
from xpnet.datasets import load_mnist  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LN10 = math.log(10.0)  # the loss of a uniform guess over 10 classes: 2.3026

plt.rcParams.update({"figure.dpi": 100, "savefig.dpi": 100, "axes.grid": True,
                     "grid.alpha": 0.3, "font.size": 9, "axes.titlesize": 9,
                     "legend.fontsize": 8})


# --------------------------------------------------------------------- arguments
def parser(description: str) -> argparse.ArgumentParser:
    """An ArgumentParser with the common options ``--out``, ``--quick``, ``--seed``."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", type=Path, default=None,
                   help="directory for the figures and summary.json "
                        "(default: out/<script name>)")
    p.add_argument("--quick", action="store_true",
                   help="a seconds-long version (for CI): less data, fewer steps")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of every random draw (default: 0)")
    return p


class Run:
    """One run of an example: output directory, seeds, timing and the summary.

    ``run = Run(args, "ch6_weight_init", "Weight initialisation", book="6.2.4")``
    seeds xpnet (parameters, dropout) and makes ``run.rng``, a NumPy generator for
    the mini-batches; ``run.check(...)`` records a claim's verdict, ``run.results``
    takes the numbers, ``run.savefig(fig, name)`` writes a PNG and ``run.finish()``
    writes ``summary.json``.
    """

    def __init__(self, args: argparse.Namespace, name: str, title: str, book: str,
                 settings: dict[str, Any]) -> None:
        self.args, self.name, self.title, self.book = args, name, title, book
        try:
            self.backend = get_backend_name()  # resolves DL_BACKEND
        except BackendError as exc:
            raise SystemExit(f"{name}: {exc}") from None
        self.out = Path(args.out) if args.out is not None else ROOT / "out" / name
        self.out.mkdir(parents=True, exist_ok=True)
        self.settings = dict(settings)
        self.results: dict[str, Any] = {}
        self.checks: dict[str, dict[str, Any]] = {}
        self.figures: list[str] = []
        self.notes: list[str] = []
        if args.quick:  # smaller files, faster to draw
            plt.rcParams.update({"savefig.dpi": 40})
        self.seed = int(args.seed)
        seed(self.seed)
        self.rng = np.random.default_rng(self.seed)
        self.started = datetime.datetime.now().astimezone()
        self._t0 = time.perf_counter()
        self._load0 = _loadavg()
        mode = "quick" if args.quick else "full"
        print(f"{name}: {title} ({mode} run, backend {self.backend}, seed {self.seed}) "
              f"-> {self.out}", flush=True)

    def reseed(self, offset: int = 0) -> None:
        """Reseed xpnet's source with seed + offset (e.g. so paired nets start equal)."""
        seed(self.seed + int(offset))

    def check(self, key: str, claim: str, holds: bool, numbers: dict[str, Any],
              note: str | None = None) -> bool:
        """Record whether the book's ``claim`` holds here, with the numbers behind it."""
        entry: dict[str, Any] = {"claim": claim, "holds": bool(holds),
                                 "numbers": numbers}
        if note:
            entry["note"] = note
        self.checks[key] = entry
        verdict = "holds" if holds else "DOES NOT HOLD"
        print(f"  check {key}: {verdict} - {claim} {format_numbers(numbers)}", flush=True)
        return bool(holds)

    def savefig(self, fig: Any, filename: str) -> Path:
        path = self.out / filename
        # a tight bounding box draws the figure twice: only worth it for full runs
        fig.savefig(path, bbox_inches=None if self.args.quick else "tight")
        plt.close(fig)
        if filename not in self.figures:
            self.figures.append(filename)
        return path

    def finish(self) -> Path:
        """Write summary.json (non-finite numbers become null and are listed)."""
        wall = time.perf_counter() - self._t0
        summary = {
            "experiment": self.name,
            "title": self.title,
            "book": self.book,
            "quick": bool(self.args.quick),
            "seed": self.seed,
            "settings": self.settings,
            "results": self.results,
            "checks": self.checks,
            "figures": self.figures,
            "notes": self.notes,
            "environment": {
                "backend": self.backend,
                "device": device_name(),
                "machine": platform.machine(),
                "cpu_count": os.cpu_count(),
                "python": platform.python_version(),
                "numpy": np.__version__,
                "xpnet": getattr(xpnet, "__version__", "unknown"),
                "openblas_num_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
                "load_average_start": self._load0,
                "load_average_end": _loadavg(),
                "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            },
            "started": self.started.isoformat(timespec="seconds"),
            "wall_time_s": round(wall, 2),
        }
        bad: list[str] = []
        clean = _jsonable(summary, "", bad)
        if bad:
            clean["non_finite"] = bad
        path = self.out / "summary.json"
        path.write_text(json.dumps(clean, indent=2, allow_nan=False) + "\n")
        n_hold = sum(c["holds"] for c in self.checks.values())
        print(f"{self.name}: {n_hold}/{len(self.checks)} checks hold; wall time "
              f"{wall:.1f} s; wrote {path}", flush=True)
        return path


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _jsonable(value: Any, where: str, bad: list[str]) -> Any:
    """``value`` with NumPy scalars/arrays made plain and non-finite floats as None."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v, f"{where}/{k}", bad) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]", bad) for i, v in enumerate(value)]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return _jsonable(to_cpu(value).tolist(), where, bad)
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if math.isfinite(v):
            return v
        bad.append(where or "/")
        return None
    return value


def format_numbers(numbers: dict[str, Any]) -> str:
    """``{'a': 0.12345, 'b': 3}`` -> ``a=0.1235, b=3`` (for logs and the report)."""
    return ", ".join(f"{k}={fmt(v)}" for k, v in numbers.items())


def fmt(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if v == 0 or not math.isfinite(v):
            return f"{v:g}"
        if abs(v) >= 1e4 or abs(v) < 1e-3:
            return f"{v:.3g}"
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(fmt(x) for x in v) + "]"
    return str(v)


# --------------------------------------------------------------------- progress
def progress(iterable: Iterable | None = None, *, total: int | None = None,
             desc: str = "", leave: bool = False) -> Any:
    """A tqdm bar on stderr (set TQDM_DISABLE=1 to hide it)."""
    tty = sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, leave=leave, dynamic_ncols=True,
                mininterval=0.2 if tty else 10.0, file=sys.stderr)


# --------------------------------------------------------------------- data
def load_mnist_subset(n_train: int | None = None, n_test: int | None = None,
                      flatten: bool = True, on_device: bool = True
                      ) -> tuple[tuple[Any, Any], tuple[Any, Any]]:
    """MNIST (normalized): the first n_train / n_test images (None: all of them).

    On the active backend, or as host arrays with ``on_device=False`` (what the
    Trainer takes: it moves each mini-batch itself).
    """
    (x_train, t_train), (x_test, t_test) = load_mnist(normalize=True, flatten=flatten)
    arrays = (x_train[:n_train], t_train[:n_train], x_test[:n_test], t_test[:n_test])
    if on_device:
        arrays = tuple(to_backend(a) for a in arrays)
    return (arrays[0], arrays[1]), (arrays[2], arrays[3])


class EpochBar:
    """A Trainer callback: one tqdm bar over all epochs, with the latest accuracies."""

    def __init__(self, epochs: int, desc: str = "epochs") -> None:
        self.bar = progress(total=epochs, desc=desc)

    def __call__(self, trainer: Any, event: str, info: dict[str, Any]) -> None:
        if event == "epoch_end":
            self.bar.set_postfix(train=f"{info['train_acc']:.3f}",
                                 test=f"{info['test_acc']:.3f}", refresh=False)
            self.bar.update(1)
        elif event == "train_end":
            self.bar.close()


def batch_indices(rng: np.random.Generator, n: int, batch_size: int) -> Any:
    """The book's ``np.random.choice(n, batch_size)`` (with replacement), on the backend."""
    return to_backend(rng.choice(n, batch_size))


def host_floats(values: Sequence[Any]) -> np.ndarray:
    """Scalars or 0-d device arrays as one host float64 array (one transfer on the GPU)."""
    if not len(values):
        return np.zeros(0)
    first = values[0]
    module = get_array_module(first) if hasattr(first, "shape") else np
    if module is np:
        return np.array([float(v) for v in values], dtype=np.float64)
    stacked = module.stack([module.asarray(v).reshape(()) for v in values])
    return to_cpu(stacked).astype(np.float64)


# --------------------------------------------------------------------- curves
def smooth(values: Sequence[float], window: int = 11, beta: float = 2.0) -> np.ndarray:
    """A smoothed copy of a noisy curve, same length.

    A weighted moving average with a Kaiser window (``numpy.kaiser``), the book's
    choice for its loss plots; the ends are padded with mirrored values.
    """
    y = np.asarray(values, dtype=np.float64)
    if y.size < 3:
        return y.copy()
    window = int(min(window, y.size if y.size % 2 else y.size - 1))
    half = window // 2
    padded = np.concatenate([y[half:0:-1], y, y[-2:-half - 2:-1]])
    w = np.kaiser(window, beta)
    return np.convolve(padded, w / w.sum(), mode="valid")


def tail_mean(values: Sequence[float], n: int) -> float:
    """The mean of the last ``n`` values (all of them when there are fewer)."""
    v = np.asarray(values, dtype=np.float64)
    return float(v[-min(n, v.size):].mean())


def mosaic(images: np.ndarray, cols: int, pad: int = 1, normalize: bool = True) -> np.ndarray:
    """Tile (N, H, W) images into one (rows*(H+pad)-pad, cols*(W+pad)-pad) array.

    Each tile is scaled to [0, 1] on its own when ``normalize``; the gaps are NaN
    (drawn as the colormap's "bad" colour), so one ``imshow`` shows them all.
    """
    n, h, w = images.shape
    rows = -(-n // cols)
    out = np.full((rows * (h + pad) - pad, cols * (w + pad) - pad), np.nan)
    for i, img in enumerate(np.asarray(images, dtype=np.float64)):
        if normalize:
            lo, hi = img.min(), img.max()
            img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
        r, c = divmod(i, cols)
        out[r * (h + pad):r * (h + pad) + h, c * (w + pad):c * (w + pad) + w] = img
    return out


def markers() -> dict[str, str]:
    """The book's marker per optimizer / setting."""
    return {"SGD": "o", "Momentum": "x", "Nesterov": "+", "AdaGrad": "s", "RMSprop": "v",
            "Adam": "D"}


# --------------------------------------------------------------------- training
def train_iterations(network: Any, optimizer: Any, x: Any, t: Any, iterations: int,
                     batch_size: int, rng: np.random.Generator, desc: str = "") -> np.ndarray:
    """The book's hand-written loop: ``iterations`` updates on random mini-batches.

    Returns the training loss of every iteration (host float64).
    """
    losses = []
    n = int(x.shape[0])
    for _ in progress(range(iterations), desc=desc):
        idx = batch_indices(rng, n, batch_size)
        grads = network.gradient(x[idx], t[idx])
        optimizer.update(network.params, grads)
        losses.append(network.last_loss)
    return host_floats(losses)


def gap_report(run: Run, curves: dict[str, tuple[str, Any, Any]], figure: str, check: str,
               claim: str, last: int = 20) -> None:
    """Results, a two-panel figure and the check of an overfitting comparison.

    ``curves`` maps a result key to (panel title, train accuracies, test accuracies) per
    epoch: first the run without the regulariser, then the run with it.  The check
    holds when the final train-test gap is smaller with it.
    """
    res = {}
    for key, (_, tr, te) in curves.items():
        gap = np.asarray(tr) - np.asarray(te)
        res[key] = {"final_train_acc": tr[-1], "final_test_acc": te[-1], "final_gap": gap[-1],
                    f"mean_gap_last_{last}_epochs": float(gap[-last:].mean()),
                    "train_acc": list(tr), "test_acc": list(te)}
    run.results.update(res)

    fig, axes = plt.subplots(1, len(curves), figsize=(11, 4), sharey=True)
    for ax, (title, tr, te) in zip(axes, curves.values(), strict=True):
        ep = np.arange(1, len(tr) + 1)
        every = max(1, len(tr) // 20)
        ax.plot(ep, tr, marker="o", markevery=every, markersize=3, label="train")
        ax.plot(ep, te, marker="s", markevery=every, markersize=3, label="test")
        ax.set_title(f"{title}: final train {tr[-1]:.3f}, test {te[-1]:.3f}, "
                     f"gap {tr[-1] - te[-1]:.3f}")
        ax.set_xlabel("epochs")
        ax.set_ylim(0, 1.0)
        ax.legend(loc="lower right")
    axes[0].set_ylabel("accuracy")
    fig.tight_layout()
    run.savefig(fig, figure)

    a, b = res.values()
    key = f"mean_gap_last_{last}_epochs"
    run.check(check, claim, b["final_gap"] < a["final_gap"],
              {"gap_without": a["final_gap"], "gap_with": b["final_gap"],
               "train_test_without": [a["final_train_acc"], a["final_test_acc"]],
               "train_test_with": [b["final_train_acc"], b["final_test_acc"]],
               f"gap_without_last_{last}": a[key], f"gap_with_last_{last}": b[key]})


def training_report(run: Run, trainer: Any, train_seconds: float, params_file: str,
                    test_images: int) -> float:
    """Record a Trainer run's numbers and plot its loss and accuracy curves.

    Returns the final test accuracy (over ``test_images`` images).
    """
    h = trainer.history
    acc = float(trainer.final_test_acc)
    run.results.update(final_test_acc=acc, train_seconds=train_seconds,
                       epoch_seconds=h["epoch_time"], images_per_sec=h["images_per_sec"],
                       train_acc=trainer.train_acc_list, test_acc=trainer.test_acc_list,
                       params_file=params_file)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    loss = np.asarray(trainer.train_loss_list)
    axes[0].plot(loss, color="0.75", linewidth=0.5, label="per step")
    axes[0].plot(smooth(loss, 101), label="smoothed")
    axes[0].set_xlabel("iterations")
    axes[0].set_ylabel("training loss")
    axes[0].set_ylim(0, max(0.5, float(np.median(loss[: max(1, len(loss) // 20)]))))
    axes[0].legend()
    ep = np.arange(1, len(trainer.train_acc_list) + 1)
    axes[1].plot(ep, trainer.train_acc_list, "o-", label="train (1000 samples)")
    axes[1].plot(ep, trainer.test_acc_list, "s-", label="test (1000 samples)")
    axes[1].set_xlabel("epochs")
    axes[1].set_ylabel("accuracy")
    axes[1].set_title(f"final test accuracy ({test_images}): {100 * acc:.2f} %")
    axes[1].legend(loc="lower right")
    fig.tight_layout()
    run.savefig(fig, "training_curves.png")
    return acc
