"""Every script in examples/ runs in --quick mode and writes a sane summary.json.

Each script runs as a subprocess (``python examples/NAME.py --quick --out DIR``), as
a user would run it; the summary must hold the expected keys, only finite numbers,
a verdict for each check, and the figures it lists.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from xpnet.models import build_model

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

# name -> (result keys, check keys, extra files); slow ones take more than a few seconds
SPECS = {
    "ch6_optimizer_paths": ({"optimizers"},
                            {"sgd_zigzag", "sgd_most_reversals", "adagrad_best",
                             "sgd_farthest"}, ()),
    "ch6_optimizers_mnist": ({"final_loss", "loss_every_10th_iteration", "final_order"},
                             {"sgd_highest_loss", "sgd_highest_loss_all_six"}, ()),
    "ch6_activation_histograms": ({"per_layer"},
                                  {"std1_sigmoid_saturates", "std001_sigmoid_at_half",
                                   "xavier_sigmoid_spread", "he_relu_keeps_spread"}, ()),
    "ch6_weight_init": ({"final_loss", "loss_every_10th_iteration"},
                        {"std001_no_learning", "he_below_xavier"}, ()),
    "ch6_batch_norm": ({"panels", "bn_ahead_final", "bn_ahead_mean", "ties_final"},
                       {"bn_ahead_most"}, ()),
    "ch6_weight_decay": ({"lambda=0.0", "lambda=0.1"}, {"decay_smaller_gap"}, ()),
    "ch6_dropout": ({"no_dropout", "dropout"}, {"dropout_smaller_gap"}, ()),
    "ch6_hyperparameter_search": ({"round1", "round2", "narrowed_region"},
                                  {"book_lr_region", "book_weight_decay_region",
                                   "round2_better"}, ()),
    "ch7_simple_convnet": ({"final_test_acc", "train_seconds", "filter_std_before",
                            "filter_std_after"}, {"test_accuracy"},
                           ("simple_convnet_params.npz",)),
    "ch8_deep_convnet": ({"final_test_acc", "train_seconds", "misclassified",
                          "first_misclassified", "half_precision"},
                         {"test_accuracy", "float16_inference"},
                         ("deep_convnet_params.npz",)),
    "ch8_transfer_learning": ({"pretraining", "load_report", "frozen_trunk_max_change",
                               "mean_test_acc", "min_max_test_acc", "mean_train_seconds",
                               "cells"},
                              {"pretrained_beats_scratch_at_100",
                               "pretrained_beats_scratch_at_1000",
                               "frozen_beats_scratch_at_100", "advantage_shrinks_with_data"},
                              ()),
    "ch8_segmentation": ({"test", "val", "train_seconds", "val_mean_iou_per_epoch",
                          "bilinear_upsampling", "any_size"},
                         {"mean_iou", "bilinear_init"}, ()),
    "ch8_detection": ({"test", "val", "train_regions", "train_seconds", "warp_max_abs_diff"},
                      {"map50", "proposal_recall", "labelling_matches_flood_fill",
                       "warp_matches_resize_bilinear"}, ()),
    "ch8_captioning": ({"test", "validation", "validation_per_epoch", "train_seconds",
                        "examples"}, {"exact_caption_accuracy", "decoding_ends"}, ()),
}
SLOW = {"ch6_activation_histograms", "ch6_batch_norm", "ch6_hyperparameter_search",
        "ch7_simple_convnet", "ch8_deep_convnet", "ch8_transfer_learning", "ch8_detection"}
TOP_KEYS = {"experiment", "title", "book", "quick", "seed", "settings", "results", "checks",
            "figures", "notes", "environment", "started", "wall_time_s"}


def run_example(name: str, out: Path, *extra: str) -> dict:
    env = dict(os.environ, TQDM_DISABLE="1", MPLBACKEND="Agg")
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    proc = subprocess.run([sys.executable, str(EXAMPLES / f"{name}.py"), "--quick", "--out",
                           str(out), *extra], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads((out / "summary.json").read_text())


def numbers_in(value, where=""):
    """Yield (path, number) for every number in a JSON value."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from numbers_in(v, f"{where}/{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from numbers_in(v, f"{where}[{i}]")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield where, value


def params(name):
    marks = [pytest.mark.slow] if name in SLOW else []
    return pytest.param(name, marks=marks, id=name)


def check_summary(name: str, out: Path, summary: dict) -> None:
    result_keys, check_keys, files = SPECS[name]
    assert TOP_KEYS <= set(summary), TOP_KEYS - set(summary)
    assert "non_finite" not in summary, summary.get("non_finite")
    assert summary["experiment"] == name
    assert summary["quick"] is True
    assert summary["environment"]["backend"] in ("numpy", "cupy")
    assert result_keys <= set(summary["results"]), result_keys - set(summary["results"])
    assert set(summary["checks"]) == check_keys
    for check in summary["checks"].values():
        assert isinstance(check["holds"], bool)
        assert check["claim"] and isinstance(check["numbers"], dict) and check["numbers"]
    for where, value in numbers_in(summary):
        assert math.isfinite(value), where
    assert summary["wall_time_s"] > 0
    assert summary["figures"]
    for fig in summary["figures"]:
        assert (out / fig).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", fig
    for extra in files:  # saved parameters load into a fresh network
        net = build_model(name.split("_", 1)[1].replace("_", "-"))
        net.load_params(out / extra)


@pytest.mark.parametrize("name", [params(n) for n in SPECS if n != "ch6_weight_decay"])
def test_example_quick_run(name, tmp_path):
    out = tmp_path / name
    summary = run_example(name, out)
    assert summary["seed"] == 0
    check_summary(name, out, summary)


@pytest.mark.slow
def test_seeded_runs_repeat_and_make_results_builds_the_report(tmp_path):
    """ch6_weight_decay twice with --seed 3: the same numbers; then the report from it."""
    results = tmp_path / "figures"
    name = "ch6_weight_decay"
    a = run_example(name, results / name, "--seed", "3")
    check_summary(name, results / name, a)
    b = run_example(name, tmp_path / "again", "--seed", "3")
    assert a["seed"] == b["seed"] == 3
    assert a["results"] == b["results"]

    output = tmp_path / "docs" / "results.md"
    proc = subprocess.run([sys.executable, str(EXAMPLES / "make_results.py"), "--results",
                           str(results), "--output", str(output)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = output.read_text()
    assert "Weight decay" in text and "quick run" in text
    assert "../figures/ch6_weight_decay/weight_decay.png" in text
    assert "not run yet" in text  # the other experiments
    assert "holds" in text
