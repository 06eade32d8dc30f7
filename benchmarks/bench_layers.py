"""Convolution forward+backward at the six conv shapes of the book's DeepConvNet.

Times xpnet's Convolution (forward + backward), im2col and col2im alone, and, when
PyTorch is importable, torch.nn.functional.conv2d forward + backward at the same
shapes, dtype and thread count, interleaved rep by rep; prints medians and the
ratio xpnet / PyTorch as a Markdown table (and JSON with --json).

    python benchmarks/bench_layers.py [--reps 20] [--threads 2] [--batch 100]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

# (C, H, W, FN, K, pad) of DeepConvNet's conv1..conv6 on 28x28 MNIST.
DEEPCONVNET_CONVS = [
    (1, 28, 28, 16, 3, 1),
    (16, 28, 28, 16, 3, 1),
    (16, 14, 14, 32, 3, 1),
    (32, 14, 14, 32, 3, 2),
    (32, 8, 8, 64, 3, 1),
    (64, 8, 8, 64, 3, 1),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    # sibling script (benchmarks/ is sys.path[0]); it imports no numpy at module level
    from bench_models import import_torch, limit_threads, settle

    limit_threads(args.threads)  # before numpy loads its BLAS
    import numpy as np

    from xpnet.backend import get_backend, get_backend_name, get_rng, seed, to_cpu
    from xpnet.layers import Convolution
    from xpnet.layers.im2col import col2im, im2col

    xp = get_backend()
    gpu = get_backend_name() == "cupy"
    # The same PyTorch set-up as bench_models: on the GPU, cuDNN with TF32 off (float32).
    torch, torch_note = import_torch(not args.no_torch, gpu)
    if torch is None and torch_note:
        print(f"# no PyTorch comparison: {torch_note}")
    elif torch is not None:
        torch.set_num_threads(args.threads)

    def sync():
        if gpu:
            xp.cuda.Device().synchronize()

    def timed(fn):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return (time.perf_counter() - t0) * 1e3

    seed(0)
    rng = get_rng()
    rows = []
    for c, h, w, fn, k, pad in DEEPCONVNET_CONVS:
        n = args.batch
        x = rng.normal((n, c, h, w))
        conv = Convolution(rng.normal((fn, c, k, k), std=0.1), rng.normal((fn,), std=0.1), 1, pad)
        dout = rng.normal(conv.forward(x).shape)
        col = im2col(x, k, k, 1, pad)

        def ours():
            conv.forward(x)
            conv.backward(dout)

        cases = {"xpnet": ours, "im2col": lambda: im2col(x, k, k, 1, pad),
                 "col2im": lambda: col2im(col, x.shape, k, k, 1, pad)}
        if torch is not None:
            dev = "cuda" if gpu else "cpu"
            xt = torch.tensor(to_cpu(x), device=dev, requires_grad=True)
            wt = torch.tensor(to_cpu(conv.params["W"]), device=dev, requires_grad=True)
            bt = torch.tensor(to_cpu(conv.params["b"]), device=dev, requires_grad=True)
            dt = torch.tensor(to_cpu(dout), device=dev)

            def theirs():
                y = torch.nn.functional.conv2d(xt, wt, bt, padding=pad)
                y.backward(dt)
                xt.grad = wt.grad = bt.grad = None
                if gpu:
                    torch.cuda.synchronize()

            cases["pytorch"] = theirs
        times = {name: [] for name in cases}
        for fn_ in cases.values():  # warm-up
            fn_()
        for _ in range(args.reps):  # interleaved rep by rep, each after idle workers
            for name, fn_ in cases.items():
                settle()  # see benchmarks/README.md: spinning BLAS/OpenMP threads
                times[name].append(timed(fn_))
        med = {name: statistics.median(v) for name, v in times.items()}
        row = {"shape": f"{n}x{c}x{h}x{w}, {fn}x{k}x{k}, pad {pad}", **med}
        if "pytorch" in med:
            row["ratio"] = med["xpnet"] / med["pytorch"]
        rows.append(row)

    info = {"backend": get_backend_name(), "threads": args.threads, "batch": args.batch,
            "reps": args.reps, "dtype": "float32", "machine": platform.machine(),
            "cpus": os.cpu_count(), "python": sys.version.split()[0],
            "numpy": np.__version__, "torch": getattr(torch, "__version__", None)}
    print(f"# Convolution forward+backward, DeepConvNet shapes ({info})\n")
    head = "| conv | input, filters | xpnet ms | im2col ms | col2im ms | PyTorch ms | ratio |"
    print(head)
    print("|" + "---|" * 7)
    for i, r in enumerate(rows, 1):
        pt = f"{r['pytorch']:.2f}" if "pytorch" in r else "-"
        ratio = f"{r['ratio']:.2f}" if "ratio" in r else "-"
        print(f"| conv{i} | {r['shape']} | {r['xpnet']:.2f} | {r['im2col']:.2f} | "
              f"{r['col2im']:.2f} | {pt} | {ratio} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
