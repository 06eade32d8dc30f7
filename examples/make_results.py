"""Build docs/results.md from the experiments' summary.json files and figures.

    python examples/make_results.py                       # docs/figures/<experiment>/
    python examples/make_results.py --results runs/ --output /tmp/results.md

Each experiment script writes ``summary.json`` (settings, numbers, the verdict of
each of the book's claims, where and how long it ran) next to its figures; this
script only collects them, so the report can be regenerated after new runs.
Experiments without a summary are listed as not run, with the command to run them.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from _common import ROOT, fmt, format_numbers

EXPERIMENTS = [
    ("ch6_optimizer_paths", "1"),
    ("ch6_optimizers_mnist", "2"),
    ("ch6_activation_histograms", "3"),
    ("ch6_weight_init", "4"),
    ("ch6_batch_norm", "5"),
    ("ch6_weight_decay", "6"),
    ("ch6_dropout", "7"),
    ("ch6_hyperparameter_search", "8"),
    ("ch7_simple_convnet", "9"),
    ("ch8_deep_convnet", "10"),
    ("ch8_transfer_learning", "11"),
    ("ch8_segmentation", "12"),
    ("ch8_detection", "13"),
    ("ch8_captioning", "14"),
]


def verdict(holds: bool) -> str:
    return "holds" if holds else "**does not hold**"


def duration(seconds: float) -> str:
    seconds = float(seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def where(s: dict) -> str:
    env = s.get("environment", {})
    load = env.get("load_average_start")
    parts = [f"{env.get('device', '?')}, backend `{env.get('backend', '?')}`",
             f"Python {env.get('python', '?')}, NumPy {env.get('numpy', '?')}"]
    if env.get("openblas_num_threads"):
        parts.append(f"OPENBLAS_NUM_THREADS={env['openblas_num_threads']}")
    if load:
        parts.append(f"load average {load[0]:g} at the start (shared machine)")
    return "; ".join(parts)


# --------------------------------------------------------------- per experiment
def extra_optimizer_paths(s: dict) -> list[str]:
    rows = ["| optimizer | lr | final (x, y) | distance to (0, 0) | y-reversals |",
            "| --- | --- | --- | --- | --- |"]
    lrs = s["settings"]["learning_rates"]
    for name, r in s["results"]["optimizers"].items():
        rows.append(f"| {name} | {lrs[name]} | ({r['final_x']:.3g}, {r['final_y']:.3g}) | "
                    f"{r['distance_to_minimum']:.3g} | {r['y_reversals']} of "
                    f"{r['steps'] - 1} |")
    return rows


def extra_final_loss(s: dict) -> list[str]:
    rows = ["| setting | final loss (mean of the last 100 iterations) |", "| --- | --- |"]
    rows += [f"| {k} | {v:.4f} |" for k, v in s["results"]["final_loss"].items()]
    return rows


def extra_histograms(s: dict) -> list[str]:
    rows = ["| activation | weights | std per layer (1..5) | saturated share | "
            "share near 0.5 |", "| --- | --- | --- | --- | --- |"]
    for act, by_scale in s["results"]["per_layer"].items():
        for scale, layers in by_scale.items():
            std = ", ".join(f"{x['std']:.3g}" for x in layers)
            sat = ", ".join(f"{x['saturated']:.2f}" for x in layers)
            half = ", ".join(f"{x['near_half']:.2f}" for x in layers)
            if act != "sigmoid":
                sat = half = "-"
            rows.append(f"| {act} | {scale} | {std} | {sat} | {half} |")
    return rows


def extra_batch_norm(s: dict) -> list[str]:
    rows = ["| panel | weight std | final train acc with BN | without BN | BN ahead |",
            "| --- | --- | --- | --- | --- |"]
    for i, p in enumerate(s["results"]["panels"]):
        rows.append(f"| {i + 1} | {p['weight_scale']:.3g} | {p['bn_final']:.3f} | "
                    f"{p['plain_final']:.3f} | "
                    f"{'yes' if p['bn_final'] > p['plain_final'] else 'no'} |")
    return rows


def extra_gap(keys: tuple[str, str], labels: tuple[str, str]):
    def render(s: dict) -> list[str]:
        rows = ["| setting | final train acc | final test acc | gap | mean gap, last 20 "
                "epochs |", "| --- | --- | --- | --- | --- |"]
        for key, label in zip(keys, labels, strict=True):
            r = s["results"][key]
            rows.append(f"| {label} | {r['final_train_acc']:.4f} | {r['final_test_acc']:.4f} | "
                        f"{r['final_gap']:.4f} | {r['mean_gap_last_20_epochs']:.4f} |")
        return rows
    return render


def extra_search(s: dict) -> list[str]:
    res = s["results"]
    reg = res["narrowed_region"]
    rows = [f"Best region (span of round 1's best trials, searched in round 2): learning "
            f"rate {reg['lr'][0]:.2e} .. {reg['lr'][1]:.2e}, weight decay "
            f"{reg['weight_decay'][0]:.2e} .. {reg['weight_decay'][1]:.2e}.", "",
            "| round | rank | validation accuracy | lr | weight decay |",
            "| --- | --- | --- | --- | --- |"]
    for rnd in ("round1", "round2"):
        for i, t in enumerate(res[rnd]["trials"][:5]):
            score = "-" if t["score"] is None else f"{t['score']:.2f}"
            rows.append(f"| {rnd[-1]} | {i + 1} | {score} | {t['params']['lr']:.2e} | "
                        f"{t['params']['weight_decay']:.2e} |")
    rows += ["", f"Median validation accuracy over all trials: round 1 "
             f"{res['round1']['median_score']:.3f}, round 2 {res['round2']['median_score']:.3f}."]
    return rows


def extra_convnet(s: dict) -> list[str]:
    r = s["results"]
    rows = [f"Final test accuracy (whole test set): **{100 * r['final_test_acc']:.2f} %**; "
            f"training {duration(r['train_seconds'])} "
            f"({sum(r['images_per_sec']) / max(1, len(r['images_per_sec'])):.0f} images/s "
            f"on average); parameters saved next to the figures as `{r['params_file']}`."]
    half = r.get("half_precision")
    if half:
        rows += ["", "| backend | float32 accuracy | float16 accuracy | float16 output dtype "
                 "| agreement | images | float16 time |",
                 "| --- | --- | --- | --- | --- | --- | --- |"]
        for b, h in half.items():
            rows.append(f"| {b} | {h['float32']['accuracy']:.4f} | {h['float16']['accuracy']:.4f} "
                        f"| {h['float16']['output_dtype']} | {h['agreement']:.4f} | "
                        f"{h['samples']} | {duration(h['float16']['seconds'])} |")
    return rows


EXTRAS = {
    "ch6_optimizer_paths": extra_optimizer_paths,
    "ch6_optimizers_mnist": extra_final_loss,
    "ch6_activation_histograms": extra_histograms,
    "ch6_weight_init": extra_final_loss,
    "ch6_batch_norm": extra_batch_norm,
    "ch6_weight_decay": extra_gap(("lambda=0.0", "lambda=0.1"), ("lambda 0", "lambda 0.1")),
    "ch6_dropout": extra_gap(("no_dropout", "dropout"), ("no Dropout", "Dropout 0.2")),
    "ch6_hyperparameter_search": extra_search,
    "ch7_simple_convnet": extra_convnet,
    "ch8_deep_convnet": extra_convnet,
}


# --------------------------------------------------------------- report
def build(results: Path, output: Path) -> str:
    summaries: dict[str, dict | None] = {}
    for name, _ in EXPERIMENTS:
        path = results / name / "summary.json"
        summaries[name] = json.loads(path.read_text()) if path.exists() else None
    seeds = sorted({s["seed"] for s in summaries.values() if s is not None})

    lines = ["# Results: the book's experiments on xpnet", "",
             "Generated by `python examples/make_results.py` from the `summary.json` files and "
             "figures that each script in `examples/` wrote under "
             f"`{os.path.relpath(results, ROOT)}/`"
             "; rerun it after new runs. Each claim of the book is checked in numbers and "
             "reported as it came out: a claim that does not hold is reported as such, "
             "never tuned until it does. "
             f"Seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds)) or '-'}, one per "
             "setting, so close comparisons can flip with another seed (noted where it "
             "matters).", "",
             f"Where they ran: {machines(summaries)}. Total wall time of the runs shown: "
             f"{duration(sum(x['wall_time_s'] for x in summaries.values() if x))}.", "",
             "## Overview", "",
             "| # | experiment | claim | numbers | verdict | run (wall time) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, num in EXPERIMENTS:
        s = summaries[name]
        if s is None:
            lines.append(f"| {num} | {name} | - | - | not run yet | - |")
            continue
        run = duration(s["wall_time_s"]) + (" (quick run)" if s.get("quick") else "")
        title = f"[{s['title']}](#{num}-{anchor(s['title'])})"
        for i, c in enumerate(s["checks"].values()):
            lines.append(f"| {num if i == 0 else ''} | {title if i == 0 else ''} | "
                         f"{cell(c['claim'])} | {cell(format_numbers(c['numbers']))} | "
                         f"{verdict(c['holds'])} | {run if i == 0 else ''} |")
    lines.append("")

    for name, num in EXPERIMENTS:
        s = summaries[name]
        if s is None:
            lines += [f"## {num}. {name}", "",
                      f"Not run yet: `python examples/{name}.py --out "
                      f"{os.path.relpath(results / name, ROOT)}`.", ""]
            continue
        lines += [f"## {num}. {s['title']}", "",
                  f"Book section {s['book']}. Script: `examples/{name}.py` "
                  f"(`{s['environment'].get('command', '')}`).", ""]
        if s.get("quick"):
            lines += ["**This is a quick run (`--quick`), not the book's setting.**", ""]
        lines += [f"Ran on {where(s)}; started {s['started']}, wall time "
                  f"**{duration(s['wall_time_s'])}**.", ""]
        settings = "; ".join(f"{k}: {fmt(v) if not isinstance(v, dict) else json.dumps(v)}"
                             for k, v in s["settings"].items())
        lines += [f"Settings: {cell(settings)}.", ""]
        lines += ["| claim | numbers | verdict |", "| --- | --- | --- |"]
        for c in s["checks"].values():
            note = f" *({c['note']})*" if c.get("note") else ""
            lines.append(f"| {cell(c['claim'])}{cell(note)} | "
                         f"{cell(format_numbers(c['numbers']))} | {verdict(c['holds'])} |")
        lines.append("")
        extra = EXTRAS.get(name)
        if extra is not None:
            lines += extra(s) + [""]
        lines += other_seeds(results / name, s)
        lines += gpu_runs(results / name)
        for note in s.get("notes", []):
            lines += [f"Note: {note}", ""]
        for fig in s["figures"]:
            rel = os.path.relpath(results / name / fig, output.parent)
            lines += [f"![{name}: {fig}]({rel})", ""]
    return "\n".join(lines).rstrip() + "\n"


def other_seeds(folder: Path, main: dict) -> list[str]:
    """Rows for ``seed<N>_summary.json`` files: the same experiment rerun with other seeds."""
    extra = sorted(folder.glob("seed*_summary.json"))
    if not extra:
        return []
    runs = [main] + sorted((json.loads(p.read_text()) for p in extra), key=lambda r: r["seed"])
    lines = ["The same run with other seeds (a single seed's accuracy is noisy, about +-0.2 "
             "points on MNIST):", "", "| seed | check | numbers | verdict | wall time |",
             "| --- | --- | --- | --- | --- |"]
    for r in runs:
        for key, c in r["checks"].items():
            lines.append(f"| {r['seed']} | {key} | {cell(format_numbers(c['numbers']))} | "
                         f"{verdict(c['holds'])} | {duration(r['wall_time_s'])} |")
    return lines + mean_accuracy(runs, "runs") + [""]


def gpu_runs(folder: Path) -> list[str]:
    """Rows for ``gpu_seed<N>_summary.json``: the same experiment run on a GPU."""
    paths = sorted(folder.glob("gpu_seed*_summary.json"))
    if not paths:
        return []
    runs = [json.loads(p.read_text()) for p in paths]
    devices = sorted({r["environment"].get("device", "?") for r in runs})
    commands = sorted({r["environment"].get("command", "?") for r in runs})
    lines = [f"The same run on a GPU ({', '.join(devices)}; backend "
             f"`{runs[0]['environment'].get('backend', '?')}`; command of the first: "
             f"`{commands[0]}`):", "",
             "| seed | check | numbers | verdict | training | wall time |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in runs:
        train = r["results"].get("train_seconds")
        for key, c in r["checks"].items():
            lines.append(f"| {r['seed']} | {key} | {cell(format_numbers(c['numbers']))} | "
                         f"{verdict(c['holds'])} | "
                         f"{duration(train) if train is not None else '-'} | "
                         f"{duration(r['wall_time_s'])} |")
    return lines + mean_accuracy(runs, "GPU runs") + [""]


def mean_accuracy(runs: list[dict], what: str) -> list[str]:
    """A line with the mean final test accuracy of ``runs``, if they report one."""
    accs = [r["results"]["final_test_acc"] for r in runs if "final_test_acc" in r["results"]]
    if not accs:
        return []
    return ["", f"Mean final test accuracy over these {len(accs)} {what}: "
            f"**{100 * sum(accs) / len(accs):.2f} %**."]


def machines(summaries: dict[str, dict | None]) -> str:
    """The distinct devices and backends of the runs, with the experiment numbers."""
    seen: dict[str, list[str]] = {}
    for name, num in EXPERIMENTS:
        s = summaries.get(name)
        if s:
            env = s.get("environment", {})
            key = f"{env.get('device', '?')} with backend `{env.get('backend', '?')}`"
            seen.setdefault(key, []).append(num)
    if not seen:
        return "nothing has run yet"
    return "; ".join(f"{k} (experiment{'s' if len(v) > 1 else ''} {', '.join(v)})"
                     for k, v in seen.items())


def anchor(title: str) -> str:
    keep = "".join(ch for ch in title.lower() if ch.isalnum() or ch in " -")
    return keep.replace(" ", "-")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=ROOT / "docs" / "figures",
                   help="directory holding one <experiment>/summary.json per experiment")
    p.add_argument("--output", type=Path, default=ROOT / "docs" / "results.md")
    args = p.parse_args()
    text = build(args.results.resolve(), args.output.resolve())
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
