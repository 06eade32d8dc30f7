"""Where one train step's time goes: forward/backward of every layer, and the optimizer.

Each layer call is bracketed by a device synchronisation on the GPU, so on CuPy the
per-layer sum exceeds an unsynchronised step (printed first); it shows which layers
cost what, not how the step overlaps.

    python benchmarks/profile_layers.py [--model deep-convnet] [--batch 100] [--steps 10]
    DL_BACKEND=cupy python benchmarks/profile_layers.py --batch 1000
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="deep-convnet",
                   choices=["mlp", "simple-convnet", "deep-convnet"])
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=2, help="BLAS and xpnet threads (CPU)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    # sibling script (benchmarks/ is sys.path[0]); it imports no numpy at module level
    from bench_models import MODELS, build_xpnet, limit_threads, make_data

    limit_threads(args.threads)  # before numpy loads its BLAS
    from xpnet.backend import device_name, get_backend, get_backend_name, seed, to_backend
    from xpnet.optim import Adam

    xp = get_backend()
    sync = xp.cuda.Device().synchronize if get_backend_name() == "cupy" else (lambda: None)
    seed(0)
    net = build_xpnet(args.model)  # the benchmark's model and data, on the active backend
    opt = Adam()
    x, t = (to_backend(a) for a in make_data(args.model, args.batch))

    def step():
        opt.update(net.params, net.gradient(x, t))

    for _ in range(2):
        step()
    sync()
    step_ms = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        sync()
        step_ms.append((time.perf_counter() - t0) * 1e3)

    totals: dict[str, float] = collections.defaultdict(float)

    def timed(key, fn):
        def call(*a, **k):
            sync()
            t0 = time.perf_counter()
            out = fn(*a, **k)
            sync()
            totals[key] += (time.perf_counter() - t0) * 1e3
            return out
        return call

    # Wrapping a layer's forward turns off the container's Convolution -> ReLU
    # fusion, so the split below runs them as two passes (the step above fused).
    for i, layer in enumerate(net.layers):
        name = f"{i:02d} {layer.name}"
        layer.forward = timed(f"{name} forward", layer.forward)
        layer.backward = timed(f"{name} backward", layer.backward)
    opt.update = timed("optimizer", opt.update)
    for _ in range(args.steps):
        step()
    per_step = {k: v / args.steps for k, v in totals.items()}

    print(f"# {MODELS[args.model][0]}, batch {args.batch}, {get_backend_name()} on {device_name()}")
    print(f"train step (no per-layer sync): median {statistics.median(step_ms):.2f} ms")
    print(f"sum of the synchronised parts: {sum(per_step.values()):.2f} ms "
          "(each layer on its own: a Convolution and its ReLU as two passes)\n")
    print("| part | ms | share |\n|---|--:|--:|")
    whole = sum(per_step.values())
    for key, ms in sorted(per_step.items(), key=lambda kv: -kv[1]):
        print(f"| {key} | {ms:.2f} | {100 * ms / whole:.0f} % |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "batch": args.batch, "backend": get_backend_name(),
                       "device": device_name(), "step_ms": step_ms, "parts_ms": per_step},
                      f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
