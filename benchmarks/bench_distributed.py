"""Data-parallel DeepConvNet train step on 1 and 2 ranks, and the scaling model fed by it.

Measure (default): a DeepConvNet train step at global batch 100,
``grads = net.gradient(x, t); GradientAllReduce(comm)(grads); Adam.update(params, grads)``,
timed piece by piece on

* 1 rank, 1 thread (``python``, no MPI: the plain single-process step),
* 2 ranks, 1 thread each (``mpiexec -n 2 python -m mpi4py``; 50 samples per rank),
* 1 rank, 2 threads (xpnet's own threads; the same two cores used the other way),

each ``--repeats`` times in turn, plus the all-reduce alone at several sizes (2 ranks).
Reports images/s, the all-reduce time per step and its share of the step; ``--json``
writes everything.  Needs ``pip install 'xpnet[mpi]'`` for the 2-rank runs.

Project (``--project FILE.json``): the ring all-reduce cost model of
docs/distributed.md, fed with the measured step times and gradient sizes, for 1-256
GPUs over NVLink, InfiniBand and 10 GbE; prints a table and writes ``--png`` and
``--md``.

    python benchmarks/bench_distributed.py --json docs/figures/distributed/bench_cpu.json
    python benchmarks/bench_distributed.py --project docs/figures/distributed/bench_cpu.json \\
        --png docs/figures/distributed/scaling.png --md docs/figures/distributed/scaling.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]

SIZES = {"steps": 20, "warmup": 3, "batch": 100, "repeats": 2, "ar_reps": 30}
QUICK = {"steps": 2, "warmup": 1, "batch": 8, "repeats": 1, "ar_reps": 3}
AR_SIZES = (256, 4096, 65536, 262144, 1048576)  # float32 elements, all-reduce alone


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, help=f"timed steps (default {SIZES['steps']})")
    p.add_argument("--warmup", type=int, help=f"untimed steps first ({SIZES['warmup']})")
    p.add_argument("--repeats", type=int, help=f"rounds over the cases ({SIZES['repeats']})")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks that it runs")
    p.add_argument("--json", metavar="FILE", help="write the measurement as JSON")
    p.add_argument("--project", metavar="FILE", help="run the scaling model on a measurement")
    p.add_argument("--png", metavar="FILE", help="with --project: the plot (matplotlib)")
    p.add_argument("--md", metavar="FILE", help="with --project: the tables as Markdown")
    p.add_argument("--worker", metavar="FILE", help=argparse.SUPPRESS)
    p.add_argument("--sizes", help=argparse.SUPPRESS)  # JSON, for the worker
    args = p.parse_args(argv)
    args.sizes_dict = dict(QUICK if args.quick else SIZES)
    for key in ("steps", "warmup", "repeats"):
        if getattr(args, key) is not None:
            args.sizes_dict[key] = getattr(args, key)
    if args.sizes:
        args.sizes_dict = json.loads(args.sizes)
    return args


# ------------------------------------------------------------------ worker (each rank)
def _median_ms(values: list[float]) -> float:
    return 1e3 * statistics.median(values)


def worker(out: str, sizes: dict) -> None:
    """One rank: time the train step and the all-reduce alone; rank 0 writes ``out``."""
    import numpy as np

    from xpnet import backend
    from xpnet.models import DeepConvNet
    from xpnet.optim import Adam
    from xpnet.train.distributed import (
        GradientAllReduce,
        broadcast_parameters,
        check_world,
        shard,
        world,
    )

    comm = world()
    check_world(comm, {"bench": "distributed", **sizes})
    backend.seed(0)
    net = DeepConvNet()
    broadcast_parameters(net, comm)
    opt, allreduce = Adam(lr=0.001), GradientAllReduce(comm)
    batch = sizes["batch"]
    data = np.random.default_rng(0)
    n = batch * 4
    x = data.standard_normal((n, 1, 28, 28)).astype(np.float32)
    t = data.integers(0, 10, n)
    backend.seed(1 + comm.rank)  # dropout masks differ per rank, as in real training
    order = np.random.default_rng(1)
    rows: dict[str, list[float]] = {"grad": [], "allreduce": [], "update": [], "step": []}
    clock = time.perf_counter
    comm.barrier()
    for i in range(sizes["warmup"] + sizes["steps"]):
        if i % 4 == 0:
            perm = order.permutation(n)
        mine = shard(perm[(i % 4) * batch:(i % 4 + 1) * batch], comm.rank, comm.size)
        xb, tb = x[mine], t[mine]
        t0 = clock()
        grads = net.gradient(xb, tb)
        t1 = clock()
        allreduce(grads, net.params)
        t2 = clock()
        opt.update(net.params, grads)
        t3 = clock()
        if i >= sizes["warmup"]:
            for key, v in zip(rows, (t1 - t0, t2 - t1, t3 - t2, t3 - t0), strict=True):
                rows[key].append(v)
    per_rank = comm.allgather(rows)
    alone = []
    if comm.size > 1:  # the all-reduce by itself, ranks lined up by a barrier first
        for count in (*AR_SIZES, allreduce.flat.buffer.size):
            buf = np.ones(count, np.float32)
            times = []
            for _ in range(sizes["ar_reps"] + 2):
                comm.barrier()
                s = clock()
                comm.allreduce_sum(buf)
                times.append(clock() - s)
            alone.append({"floats": int(count), "bytes": int(count) * 4,
                          "median_ms": _median_ms(times[2:]),
                          "min_ms": 1e3 * min(times[2:])})
    if not comm.is_root:
        return
    step_ms = [max(r["step"][j] for r in per_rank) * 1e3 for j in range(sizes["steps"])]
    summary = {
        "ranks": comm.size,
        "threads": backend.get_num_threads(),
        "communicator": type(comm).__name__,
        "global_batch": batch,
        "batch_per_rank": batch // comm.size,
        "params": int(net.num_params),
        "grad_bytes": int(sum(g.nbytes for g in net.params.values())),
        "step_ms": statistics.median(step_ms),
        "images_per_s": batch / (statistics.median(step_ms) / 1e3),
        "per_rank": [{k: _median_ms(v) for k, v in r.items()} for r in per_rank],
        "step_ms_all": step_ms,
        "allreduce_alone": alone,
    }
    ar = statistics.median(r["allreduce"] for r in summary["per_rank"])
    summary["allreduce_ms"] = ar
    summary["allreduce_share"] = ar / summary["step_ms"]
    Path(out).write_text(json.dumps(summary, indent=1))


# ------------------------------------------------------------------ launcher
CASES = (("1 rank, 1 thread", 1, 1), ("2 ranks, 1 thread each", 2, 1),
         ("1 rank, 2 threads", 1, 2))


def _mpiexec() -> str | None:
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.exists() else shutil.which("mpiexec")


def run_case(ranks: int, threads: int, sizes: dict) -> dict:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                "XPNET_NUM_THREADS"):
        env[var] = str(threads)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["DL_BACKEND"] = "numpy"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(HERE), "--worker", str(out), "--sizes", json.dumps(sizes)]
        if ranks > 1:
            mpiexec = _mpiexec()
            if mpiexec is None:
                raise SystemExit("mpiexec not found: pip install 'xpnet[mpi]'")
            cmd = [mpiexec, "-n", str(ranks), sys.executable, "-m", "mpi4py", *cmd[1:]]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
        return json.loads(out.read_text())


def measure(sizes: dict) -> dict:
    import numpy as np

    runs: dict[str, list[dict]] = {label: [] for label, _, _ in CASES}
    for rnd in range(sizes["repeats"]):
        for label, ranks, threads in CASES:
            res = run_case(ranks, threads, sizes)
            runs[label].append(res)
            print(f"round {rnd + 1}: {label}: step {res['step_ms']:.1f} ms, "
                  f"{res['images_per_s']:.0f} images/s, all-reduce {res['allreduce_ms']:.2f} ms "
                  f"({100 * res['allreduce_share']:.1f} %)", flush=True)
    cases = []
    for label, ranks, threads in CASES:
        rs = runs[label]
        best = min(rs, key=lambda r: r["step_ms"])
        cases.append({"case": label, "ranks": ranks, "threads_per_rank": threads,
                      "step_ms_median_of_rounds": statistics.median(r["step_ms"] for r in rs),
                      "step_ms_rounds": [r["step_ms"] for r in rs],
                      "images_per_s": sizes["batch"] / (
                          statistics.median(r["step_ms"] for r in rs) / 1e3),
                      "step_ms_best_round": best["step_ms"],
                      "images_per_s_best_round": sizes["batch"] / (best["step_ms"] / 1e3),
                      "allreduce_ms": statistics.median(r["allreduce_ms"] for r in rs),
                      "allreduce_share": statistics.median(r["allreduce_share"] for r in rs),
                      "best_round": best, "rounds": rs})
    base = cases[0]["images_per_s"]
    best = cases[0]["images_per_s_best_round"]
    for c in cases:
        c["speedup_vs_1_rank"] = c["images_per_s"] / base
        c["speedup_vs_1_rank_best_rounds"] = c["images_per_s_best_round"] / best
    try:
        import mpi4py  # the version only: MPI itself is not initialised in the launcher
        mpi = f"mpi4py {mpi4py.__version__}"
    except ImportError:
        mpi = None
    return {
        "info": {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                 "command": " ".join([Path(sys.executable).name, *sys.argv]),
                 "model": "DeepConvNet (book defaults, float32, dropout on)",
                 "optimizer": "Adam(lr=0.001)", "cpu": platform.processor() or platform.machine(),
                 "cpus": os.cpu_count(), "loadavg": list(os.getloadavg()),
                 "python": platform.python_version(), "numpy": np.__version__, "mpi": mpi},
        "sizes": sizes,
        "cases": cases,
        "grad_bytes": cases[0]["best_round"]["grad_bytes"],
        "params": cases[0]["best_round"]["params"],
    }


def print_measurement(res: dict) -> None:
    print(f"\nDeepConvNet train step, global batch {res['sizes']['batch']}, "
          f"{res['params']:,} parameters ({res['grad_bytes'] / 1e3:.0f} kB of gradients)\n")
    print(f"Medians of {res['sizes']['repeats']} rounds [best round]; load average at the "
          f"start {res['info']['loadavg'][0]:.2f}\n")
    print("| case | step (ms) | images/s | speed-up | all-reduce in the step (ms) "
          "| its share of the step |")
    print("| --- | --- | --- | --- | --- | --- |")
    for c in res["cases"]:
        print(f"| {c['case']} | {c['step_ms_median_of_rounds']:.1f} [{c['step_ms_best_round']:.1f}]"
              f" | {c['images_per_s']:.0f} [{c['images_per_s_best_round']:.0f}] "
              f"| {c['speedup_vs_1_rank']:.2f} [{c['speedup_vs_1_rank_best_rounds']:.2f}] "
              f"| {c['allreduce_ms']:.2f} | {100 * c['allreduce_share']:.1f} % |")
    two = next(c for c in res["cases"] if c["ranks"] == 2)
    if two["best_round"]["allreduce_alone"]:
        print("\nThe all-reduce in the step includes waiting for the slower rank; "
              "alone, 2 ranks, after a barrier:")
        for a in two["best_round"]["allreduce_alone"]:
            print(f"  {a['bytes'] / 1e3:10.1f} kB: median {a['median_ms']:.3f} ms, "
                  f"min {a['min_ms']:.3f} ms")


# ------------------------------------------------------------------ the model
#: per-link (bandwidth in bytes/s per direction, latency in s per ring step), see
#: docs/distributed.md for where the numbers come from
LINKS = {
    "NVLink 4 (H100 SXM, NVLink Switch)": (350e9, 2e-6),
    "InfiniBand NDR 400 Gb/s": (45e9, 5e-6),
    "10 GbE (TCP)": (1.1e9, 30e-6),
}
#: a CIFAR-style ResNet as a stated assumption until xpnet's lands: 0.85 M parameters
#: (He et al.'s ResNet-56), about 125 M multiply-adds per 32x32 image forward
RESNET = {"params": 850_000, "macs_per_image": 125e6}
DEEPCONV_MACS = 8.8e6  # DeepConvNet forward, per 28x28 image (summed over its layers)


def ring_allreduce_s(p: int, nbytes: float, bandwidth: float, latency: float) -> float:
    """Ring all-reduce time: 2(p-1)/p * bytes / bandwidth + 2(p-1) * latency."""
    if p <= 1:
        return 0.0
    return 2 * (p - 1) / p * nbytes / bandwidth + 2 * (p - 1) * latency


def gpu_step_ms(batch: float) -> float:
    """DeepConvNet train step on one H100 (CUDA graph) at ``batch``, from
    docs/performance_gpu.json (batch sweep 32..1024 and the batch-100 row); below 32
    the step is launch-bound and taken as the batch-32 time."""
    pts = _gpu_sweep()
    b = max(batch, pts[0][0])
    for (b0, t0), (b1, t1) in zip(pts, pts[1:], strict=False):
        if b <= b1:
            return t0 + (t1 - t0) * (b - b0) / (b1 - b0)
    return pts[-1][1] * b / pts[-1][0]


_SWEEP: list[tuple[float, float]] = []


def _gpu_sweep() -> list[tuple[float, float]]:
    if not _SWEEP:
        data = json.loads((ROOT / "docs" / "performance_gpu.json").read_text())
        pts = {float(s["batch"]): s["xpnet"]["median_ms"] for s in data["sweep"]}
        for s in data["steps"]:
            if s["model"] == "deep-convnet" and s["task"] == "train":
                pts[float(s["batch"])] = s["xpnet"]["median_ms"]
        _SWEEP.extend(sorted(pts.items()))
    return _SWEEP


def scenarios(meas: dict) -> list[dict]:
    """The workloads the model is run on: (name, compute ms per step, gradient bytes)."""
    one = meas["cases"][0]
    dc_bytes = meas["grad_bytes"]
    gpu100 = gpu_step_ms(100)
    resnet_ms = gpu100 * RESNET["macs_per_image"] / DEEPCONV_MACS * 128 / 100
    return [
        {"name": "DeepConvNet, H100 step (batch 100 per GPU)", "compute_ms": gpu100,
         "bytes": dc_bytes, "source": "docs/performance_gpu.json (CUDA graph, H100)"},
        {"name": "DeepConvNet, CPU step measured here (batch 100 per rank, 1 thread)",
         "compute_ms": one["step_ms_best_round"], "bytes": dc_bytes,
         "source": "this measurement"},
        {"name": "ResNet-56-sized (0.85 M params, batch 128 per GPU), assumed",
         "compute_ms": resnet_ms, "bytes": RESNET["params"] * 4,
         "source": "assumption: DeepConvNet's H100 rate in multiply-adds per second"},
    ]


P_VALUES = (1, 2, 4, 8, 16, 32, 64, 100, 128, 256)


def project(meas: dict) -> dict:
    out = {"links": {k: {"bandwidth_GBps": v[0] / 1e9, "latency_us": v[1] * 1e6}
                     for k, v in LINKS.items()},
           "weak": [], "strong": []}
    for sc in scenarios(meas):
        for link, (bw, lat) in LINKS.items():
            rows = []
            for p in P_VALUES:
                ar = 1e3 * ring_allreduce_s(p, sc["bytes"], bw, lat)
                eff = sc["compute_ms"] / (sc["compute_ms"] + ar)
                rows.append({"p": p, "allreduce_ms": ar, "efficiency": eff,
                             "speedup": p * eff,
                             "efficiency_overlapped": sc["compute_ms"] / max(sc["compute_ms"],
                                                                            ar)})
            out["weak"].append({**sc, "link": link, "rows": rows})
    # strong scaling: DeepConvNet at a fixed global batch of 1024 on H100s
    t1 = gpu_step_ms(1024)
    for link, (bw, lat) in LINKS.items():
        rows = []
        for p in P_VALUES:
            t = gpu_step_ms(1024 / p) + 1e3 * ring_allreduce_s(p, meas["grad_bytes"], bw, lat)
            rows.append({"p": p, "step_ms": t, "speedup": t1 / t, "efficiency": t1 / t / p})
        out["strong"].append({"name": "DeepConvNet, global batch 1024, H100", "link": link,
                              "rows": rows})
    # the book's figure, 56x on 100 GPUs (efficiency 0.56): the compute time per step at
    # which the model gives it, for each gradient size and link
    out["book"] = []
    for name, nbytes in (("DeepConvNet", meas["grad_bytes"]),
                         ("ResNet-56-sized", RESNET["params"] * 4)):
        for link, (bw, lat) in LINKS.items():
            ar = 1e3 * ring_allreduce_s(100, nbytes, bw, lat)
            out["book"].append({"model": name, "bytes": nbytes, "link": link,
                                "allreduce_ms_p100": ar,
                                "compute_ms_for_56x": ar * 0.56 / (1 - 0.56)})
    # the local check: the model with this machine's measured all-reduce
    two = next(c for c in meas["cases"] if c["ranks"] == 2)
    out["local"] = {"allreduce_alone": two["best_round"]["allreduce_alone"],
                    "allreduce_in_step_ms": two["allreduce_ms"]}
    alone = out["local"]["allreduce_alone"]
    if len(alone) >= 2:  # alpha-beta fit for p = 2: t = bytes / bw + 2 latency
        xs = [a["bytes"] for a in alone]
        ys = [a["median_ms"] / 1e3 for a in alone]
        mx, my = statistics.mean(xs), statistics.mean(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
            (x - mx) ** 2 for x in xs)
        out["local"]["fit"] = {"bandwidth_GBps": 1 / slope / 1e9,
                               "latency_us": max(my - slope * mx, 0) / 2 * 1e6}
    return out


def markdown(proj: dict) -> str:
    lines = ["Weak scaling (batch per GPU fixed; efficiency = compute / (compute + "
             "all-reduce), no overlap):", ""]
    ps = (2, 8, 32, 100, 256)
    lines.append("| workload | link | " + " | ".join(f"p={p}" for p in ps) + " |")
    lines.append("| --- | --- | " + " | ".join("---" for _ in ps) + " |")
    for w in proj["weak"]:
        cells = [f"{100 * r['efficiency']:.0f} %" for r in w["rows"] if r["p"] in ps]
        lines.append(f"| {w['name']} ({w['compute_ms']:.1f} ms, {w['bytes'] / 1e3:.0f} kB) "
                     f"| {w['link']} | " + " | ".join(cells) + " |")
    lines += ["", "Speed-up at p = 100 (the book's 100 GPUs):", ""]
    for w in proj["weak"]:
        r = next(r for r in w["rows"] if r["p"] == 100)
        lines.append(f"- {w['name']}, {w['link']}: {r['speedup']:.0f}x "
                     f"(all-reduce {r['allreduce_ms']:.2f} ms per step)")
    lines += ["", "Strong scaling, DeepConvNet at global batch 1024 on H100s (speed-up over "
              "one GPU):", ""]
    lines.append("| link | " + " | ".join(f"p={p}" for p in ps) + " |")
    lines.append("| --- | " + " | ".join("---" for _ in ps) + " |")
    for s in proj["strong"]:
        cells = [f"{r['speedup']:.1f}x" for r in s["rows"] if r["p"] in ps]
        lines.append(f"| {s['link']} | " + " | ".join(cells) + " |")
    lines += ["", "Compute time per step at which 100 ranks give the book's 56x (efficiency "
              "56 %):", ""]
    for b in proj["book"]:
        lines.append(f"- {b['model']} ({b['bytes'] / 1e3:.0f} kB), {b['link']}: all-reduce "
                     f"{b['allreduce_ms_p100']:.2f} ms, so {b['compute_ms_for_56x']:.2f} ms "
                     "of compute")
    fit = proj["local"].get("fit")
    if fit:
        lines += ["", f"This machine, 2 ranks over shared memory (fit of the all-reduce alone): "
                  f"{fit['bandwidth_GBps']:.2f} GB/s, {fit['latency_us']:.1f} us per ring step."]
    return "\n".join(lines) + "\n"


def plot(proj: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(w["name"] for w in proj["weak"]))
    fig, axes = plt.subplots(2, 2, figsize=(11, 8.5))
    axes = axes.ravel()
    styles = dict(zip(LINKS, ("-", "--", ":"), strict=True))
    for ax, name in zip(axes, names, strict=False):
        for w in (w for w in proj["weak"] if w["name"] == name):
            ps = [r["p"] for r in w["rows"]]
            ax.plot(ps, [100 * r["efficiency"] for r in w["rows"]], styles[w["link"]],
                    marker="o", ms=3, label=w["link"])
        ax.scatter([100], [56], marker="*", s=140, color="crimson", zorder=5,
                   label="book: 56x on 100 GPUs (56 %)")
        ax.set_xscale("log", base=2)
        ax.set_ylim(0, 105)
        ax.set_title(f"{name}\n{w['compute_ms']:.1f} ms compute per step, "
                     f"{w['bytes'] / 1e3:.0f} kB of gradients", fontsize=9)
        ax.set_xlabel("ranks (GPUs)")
        ax.set_ylabel("parallel efficiency, weak scaling (%)")
        ax.grid(alpha=0.3, which="both")
    ax = axes[len(names)]
    for s in proj["strong"]:
        ps = [r["p"] for r in s["rows"]]
        ax.plot(ps, [r["speedup"] for r in s["rows"]], styles[s["link"]], marker="o", ms=3,
                label=s["link"])
    ax.plot(ps, ps, color="grey", lw=0.8, label="linear")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_title("DeepConvNet, global batch 1024 split over the GPUs\n(strong scaling, "
                 "H100 step times by batch)", fontsize=9)
    ax.set_xlabel("GPUs")
    ax.set_ylabel("speed-up over 1 GPU")
    ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8, loc="lower left")
    fig.suptitle("Data parallelism: ring all-reduce alpha-beta model, no overlap of "
                 "communication and compute", fontsize=11)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args.worker, args.sizes_dict)
        return 0
    if args.project:
        meas = json.loads(Path(args.project).read_text())
        proj = project(meas)
        text = markdown(proj)
        print(text)
        if args.md:
            Path(args.md).write_text(text)
        if args.png:
            plot(proj, args.png)
        return 0
    res = measure(args.sizes_dict)
    print_measurement(res)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
