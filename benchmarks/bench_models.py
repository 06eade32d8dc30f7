"""Train step and inference of the book's networks: xpnet against PyTorch.

On the current backend (DL_BACKEND or --backend) it times, for MultiLayerNet
784-[100]x4-10 (ReLU, He init), SimpleConvNet and DeepConvNet (book defaults), and
with ``--models`` also chapter 8's VGG, GoogLeNet and ResNet (their MNIST defaults):

* the train step, ``grads = net.gradient(x, t); Adam.update(net.params, grads)``, batch 100
  (dropout active);
* inference, ``net.predict(x, train_flg=False)``, batch 1000;
* the DeepConvNet train step at batch 32 ... 1024 (``--skip-sweep`` to leave out);
* the peak memory of the train step, one child process per (framework, model)
  (``--skip-memory`` to leave out).

When PyTorch is importable, the same networks (built from xpnet's layer tree, xpnet's
initial weights copied in) run in eager PyTorch on the same device, dtype (float32) and
thread count, rep by rep interleaved with xpnet; see benchmarks/README.md for the method.
Prints Markdown tables (medians, IQR, images/s, xpnet/PyTorch); --json, --md and --png
also write them to files, --doc into a section of docs/performance.md.

    python benchmarks/bench_models.py [--quick] [--backend numpy|cupy] [--threads 2]
        [--reps 20] [--models mlp simple-convnet deep-convnet vgg googlenet resnet]
        [--json FILE] [--md FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

# model name -> (label, xpnet build_model kwargs, shape of one sample)
MODELS: dict[str, tuple[str, dict, tuple[int, ...]]] = {
    "mlp": ("MultiLayerNet 784-[100]x4-10",
            {"input_size": 784, "hidden_size_list": [100] * 4, "output_size": 10,
             "activation": "relu", "weight_init_std": "relu"}, (784,)),
    "simple-convnet": ("SimpleConvNet", {}, (1, 28, 28)),
    "deep-convnet": ("DeepConvNet", {}, (1, 28, 28)),
    # chapter 8 (xpnet.models.zoo), default MNIST configurations; not in the default set
    "vgg": ("VGG 'mnist' (6 conv + BN, 2 FC)", {}, (1, 28, 28)),
    "googlenet": ("GoogLeNet 'mnist' (4 Inception)", {}, (1, 28, 28)),
    "resnet": ("ResNet-14 (width 16)", {}, (1, 28, 28)),
}
#: what runs without --models: the book's three networks
DEFAULT_MODELS = ("mlp", "simple-convnet", "deep-convnet")
SIZES = {"batch": 100, "infer_batch": 1000, "sweep": (32, 64, 128, 256, 512, 1024),
         "reps": 20, "warmup": 2, "memory_steps": 3}
QUICK = {"batch": 8, "infer_batch": 16, "sweep": (8, 16), "reps": 3, "warmup": 1,
         "memory_steps": 2}
FRAMEWORKS = ("xpnet", "pytorch")
SCHEDULES = ("settled", "interleaved", "blocks")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", choices=("numpy", "cupy"),
                   help="xpnet backend (default: DL_BACKEND, else numpy)")
    p.add_argument("--threads", type=int, default=2, help="BLAS/OpenMP threads (CPU)")
    p.add_argument("--reps", type=int, help=f"timed reps per case (default {SIZES['reps']})")
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(DEFAULT_MODELS),
                   help=f"default: {' '.join(DEFAULT_MODELS)}")
    p.add_argument("--quick", action="store_true", help="tiny sizes and reps (CI, notebook)")
    p.add_argument("--skip-sweep", action="store_true", help="no DeepConvNet batch sweep")
    p.add_argument("--skip-memory", action="store_true", help="no peak-memory children")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    p.add_argument("--schedule", choices=SCHEDULES, default="settled",
                   help="settled: interleaved rep by rep, waiting for idle worker threads "
                        "before each rep (default); interleaved: without waiting; "
                        "blocks: all xpnet reps, then all PyTorch reps")
    p.add_argument("--cuda-graph", choices=("on", "off"), default="on",
                   help="CuPy: time xpnet's train step recorded as a CUDA graph (TrainStep, "
                        "default on), with the eager step in an extra column; off: eager only")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    p.add_argument("--md", metavar="FILE", help="write the Markdown tables")
    p.add_argument("--png", metavar="FILE", help="plot the results (needs matplotlib)")
    p.add_argument("--doc", metavar="FILE",
                   help="put the tables between the markers <!-- bench_models:BACKEND --> "
                        "and <!-- /bench_models:BACKEND --> of this Markdown file")
    p.add_argument("--memory-child", nargs=2, metavar=("FRAMEWORK", "MODEL"),
                   help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)  # for the memory child
    p.add_argument("--memory-steps", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.sizes = dict(QUICK if args.quick else SIZES)
    for key in ("reps", "batch", "memory_steps"):
        if getattr(args, key) is not None:
            args.sizes[key] = getattr(args, key)
    return args


# ------------------------------------------------------------------ environment
def limit_threads(n: int) -> None:
    """Use ``n`` BLAS/OpenMP threads: env vars (read when numpy/torch load), then the
    pools already loaded (threadpoolctl, torch), for a caller that imported them first."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    # xpnet's own threads (xpnet.backend.threads), unless chosen explicitly.
    os.environ.setdefault("XPNET_NUM_THREADS", str(n))
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        pass
    else:
        threadpool_limits(n)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)


def import_torch(want: bool, gpu: bool) -> tuple[Any, str | None]:
    """(torch or None, why not). On the GPU: cuDNN on, TF32 off, like float32 xpnet."""
    if not want:
        return None, "--no-torch"
    try:
        import torch
    except ImportError as exc:
        return None, f"cannot import torch: {exc}"
    if gpu:
        if not torch.cuda.is_available():
            return None, "this PyTorch has no CUDA device"
        torch.backends.cudnn.enabled = True
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    return torch, None


class Env:
    """Where the run happens: the xpnet backend, and PyTorch (or None) on its device."""

    def __init__(self, backend: str, gpu: bool, torch: Any, sizes: dict, schedule: str,
                 cuda_graph: bool = False):
        self.backend, self.gpu, self.torch = backend, gpu, torch
        self.sizes, self.schedule = sizes, schedule
        self.cuda_graph = gpu and cuda_graph  # xpnet's train step as a CUDA graph
        self.device = "cuda" if gpu else "cpu"
        self._cupy: Any = None

    def sync(self, framework: str) -> None:
        """Wait for the framework's queued GPU work (nothing to do on the CPU)."""
        if not self.gpu:
            return
        if framework.startswith("xpnet"):
            if self._cupy is None:
                import cupy
                self._cupy = cupy
            self._cupy.cuda.Device().synchronize()
        else:
            self.torch.cuda.synchronize()


def machine_info(env: Env, argv: list[str], threads: int, torch_note: str | None) -> dict:
    import numpy as np

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python benchmarks/bench_models.py " + shlex.join(argv),
        "backend": env.backend, "dtype": "float32", "threads": threads,
        "schedule": env.schedule, "cuda_graph": env.cuda_graph, "cpu": cpu, "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "loadavg": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg")
        else None,
        "python": sys.version.split()[0], "platform": platform.platform(),
        "numpy": np.__version__, "blas": blas_info(np),
        "torch": getattr(env.torch, "__version__", None), "torch_note": torch_note,
        "cupy": None, "gpu": None,
    }
    if not env.gpu:
        from xpnet.backend import get_num_threads
        info["xpnet_threads"] = get_num_threads()
    if env.torch is not None and not env.gpu:
        info["torch_threads"] = env.torch.get_num_threads()
    if env.gpu:
        import cupy

        from xpnet.backend import device_name
        info["cupy"] = cupy.__version__
        info["gpu"] = device_name()
    return info


def blas_info(np: Any) -> str:
    """'openblas 0.3.x (pthreads, threads: 2)' from threadpoolctl, else numpy's build."""
    try:
        from threadpoolctl import threadpool_info
        pools = [p for p in threadpool_info() if p.get("user_api") == "blas"]
        if pools:
            return "; ".join(f"{p['internal_api']} {p['version']} ({p.get('threading_layer')}"
                             f", threads: {p['num_threads']})" for p in pools)
    except ImportError:
        pass
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return f"{blas.get('name')} {blas.get('version')}"
    except Exception:  # older numpy: no dict mode
        return "unknown"


# ------------------------------------------------------------------ the models
def build_xpnet(name: str) -> Any:
    """A fresh network, batch normalisation's running variance set to 1 (PyTorch's start).

    xpnet starts it at 0 (see BatchNormalization), so a fresh network's inference divides
    by sqrt(eps) at every normalisation: VGG's logits reach 1e18 and ResNet's overflow to
    NaN, not what a trained network computes.  The train step does not read it.
    """
    from xpnet.models import build_model
    net = build_model(name, **MODELS[name][1])
    for key in net.buffers:
        if key.rsplit(".", 1)[-1].startswith("running_var"):
            net.buffers[key][...] = 1
    return net


class TorchTwin:
    """A PyTorch module built layer for layer from an xpnet network, xpnet's weights and
    buffers copied in, and the pairs (xpnet layer, key, torch tensor) that were copied
    (for comparing gradients).  See :func:`build_torch`."""

    def __init__(self, module: Any, pairs: list[tuple[Any, str, Any]]) -> None:
        self.module, self.pairs = module, pairs


def _torch_containers(torch: Any) -> tuple[type, type]:
    """The torch modules for xpnet's ``Parallel``: branches summed, or concatenated on
    the channel axis (defined on first use: torch is imported lazily)."""
    nn = torch.nn

    class Sum(nn.Module):
        def __init__(self, branches: list) -> None:
            super().__init__()
            self.branches = nn.ModuleList(branches)

        def forward(self, x: Any) -> Any:
            out = self.branches[0](x)
            for branch in self.branches[1:]:
                out = out + branch(x)
            return out

    class Concat(Sum):
        def forward(self, x: Any) -> Any:
            return torch.cat([branch(x) for branch in self.branches], dim=1)

    return Sum, Concat


def build_torch(net: Any, torch: Any) -> TorchTwin:
    """The same network in torch.nn, by a walk over xpnet's layer tree.

    Convolution -> Conv2d, ConvReLU -> Conv2d + ReLU, Pooling -> MaxPool2d (both pad
    with -inf), BatchNormalization -> BatchNorm2d/1d with xpnet's eps and torch momentum
    1 - xpnet's (xpnet: running = m * running + (1 - m) * batch), GlobalAveragePooling ->
    AdaptiveAvgPool2d(1) + Flatten, Parallel -> branches summed or concatenated on axis 1,
    Chain -> Sequential, Affine -> Linear (W transposed; Flatten first when the input is
    not flat), Dropout -> Dropout (both inverted).  Every weight, bias and running
    statistic is copied from ``net``.  BatchNorm's running variance then evolves slightly
    differently (torch: unbiased batch variance; xpnet: biased), which changes no amount
    of work; train-mode outputs do not depend on it.
    """
    from xpnet.backend import to_cpu
    from xpnet.layers import (
        Affine,
        BatchNormalization,
        Chain,
        Convolution,
        ConvReLU,
        Dropout,
        Flatten,
        GlobalAveragePooling,
        Identity,
        Parallel,
        Pooling,
        ReLU,
        Sigmoid,
        Tanh,
    )
    nn = torch.nn
    Sum, Concat = _torch_containers(torch)
    pairs: list[tuple[Any, str, Any]] = []

    def copy(layer: Any, key: str, tensor: Any, transpose: bool = False) -> None:
        a = to_cpu(layer.params[key] if key in layer.params else layer.buffers[key])
        a = a.T if transpose else a
        if tuple(a.shape) != tuple(tensor.shape):
            raise AssertionError(f"{layer!r} {key}: shape {a.shape} != torch "
                                 f"{tuple(tensor.shape)}")
        with torch.no_grad():
            tensor.copy_(torch.from_numpy(a.copy()))
        if key in layer.params:
            pairs.append((layer, key, tensor))

    def seq(mods: list) -> Any:
        return mods[0] if len(mods) == 1 else nn.Sequential(*mods)

    def convert(layer: Any, ndim: int) -> tuple[Any, int]:
        """(torch module, ndim of its output) for ``layer`` given input of ``ndim``."""
        if isinstance(layer, Chain):
            mods = []
            for child in layer.layers:
                mod, ndim = convert(child, ndim)
                mods.append(mod)
            return (seq(mods) if mods else nn.Identity()), ndim
        if isinstance(layer, Parallel):
            outs = [convert(b, ndim) for b in layer.branches]
            merge = Sum if layer.merge == "add" else Concat
            return merge([m for m, _ in outs]), outs[0][1]
        if isinstance(layer, Convolution):  # ConvReLU too
            out_c, in_c, kh, kw = layer.params["W"].shape
            conv = nn.Conv2d(in_c, out_c, (kh, kw), stride=layer.stride, padding=layer.pad)
            copy(layer, "W", conv.weight)
            copy(layer, "b", conv.bias)
            return (seq([conv, nn.ReLU()]) if isinstance(layer, ConvReLU) else conv), 4
        if isinstance(layer, BatchNormalization):
            bn = (nn.BatchNorm2d if ndim == 4 else nn.BatchNorm1d)(
                layer.params["gamma"].shape[0], eps=layer.eps,
                momentum=round(1 - layer.momentum, 12))
            for key, tensor in (("gamma", bn.weight), ("beta", bn.bias),
                                ("running_mean", bn.running_mean),
                                ("running_var", bn.running_var)):
                copy(layer, key, tensor)
            return bn, ndim
        if isinstance(layer, Affine):
            n_in, n_out = layer.params["W"].shape
            linear = nn.Linear(n_in, n_out)
            copy(layer, "W", linear.weight, transpose=True)
            copy(layer, "b", linear.bias)
            return (seq([nn.Flatten(), linear]) if ndim > 2 else linear), 2
        if type(layer) is Pooling:
            k = layer.pool_h if layer.pool_h == layer.pool_w else (layer.pool_h, layer.pool_w)
            return nn.MaxPool2d(k, layer.stride, layer.pad), 4
        if isinstance(layer, GlobalAveragePooling):
            return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()), 2
        if isinstance(layer, Flatten):
            return nn.Flatten(), 2
        simple = {ReLU: nn.ReLU, Sigmoid: nn.Sigmoid, Tanh: nn.Tanh, Identity: nn.Identity}
        if type(layer) in simple:
            return simple[type(layer)](), ndim
        if isinstance(layer, Dropout):
            return nn.Dropout(layer.dropout_ratio), ndim
        raise NotImplementedError(f"no PyTorch twin for {type(layer).__name__}")

    ndim = 1 + len(net.input_shape) if net.input_shape else 2
    module, _ = convert(net.chain, ndim)
    return TorchTwin(module, pairs)


def make_data(name: str, batch: int) -> tuple[Any, Any]:
    """Seeded host data: images in [0, 1) and labels 0..9."""
    import numpy as np
    rng = np.random.default_rng(batch)
    return (rng.random((batch, *MODELS[name][2]), dtype=np.float32),
            rng.integers(0, 10, batch))


def xpnet_case(name: str, task: str, batch: int,
               cuda_graph: bool = False) -> Callable[[], Any]:
    """One call of ``task`` ('train' or 'infer') on a fresh xpnet network.

    The train step is ``TrainStep(net, Adam)``: ``net.gradient`` then ``update``,
    recorded as a CUDA graph and replayed if ``cuda_graph`` (CuPy).
    """
    from xpnet.backend import seed, to_backend
    from xpnet.optim import Adam
    from xpnet.train import TrainStep
    seed(0)
    net = build_xpnet(name)
    x, t = (to_backend(a) for a in make_data(name, batch))
    if task == "infer":
        return lambda: net.predict(x, train_flg=False)
    train_step = TrainStep(net, Adam(lr=0.001), cuda_graph=cuda_graph)

    def step():
        return train_step(x, t)
    step.train_step = train_step  # type: ignore[attr-defined]
    return step


def torch_case(env: Env, name: str, task: str, batch: int) -> Callable[[], Any]:
    """The same call in eager PyTorch (weights copied from a fresh xpnet network)."""
    from xpnet.backend import seed, use_backend
    torch, f = env.torch, env.torch.nn.functional
    torch.manual_seed(0)
    seed(0)
    with use_backend("numpy"):  # host weights: no xpnet arrays on the GPU
        model = build_torch(build_xpnet(name), torch).module
    model.to(env.device)
    x, t = (torch.from_numpy(a).to(env.device) for a in make_data(name, batch))
    if task == "infer":
        model.eval()

        def infer():
            with torch.inference_mode():
                return model(x)
        return infer
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=0.001, eps=1e-7)

    def step():
        opt.zero_grad(set_to_none=True)
        f.cross_entropy(model(x), t).backward()
        opt.step()
    return step


def check_same_outputs(env: Env, name: str) -> tuple[float, float]:
    """(max |logits difference|, max |gradient difference| / max |gradient|) of the two
    networks on 4 samples, dropout off (they must agree).

    Logits in inference, then in training mode (batch statistics; the running ones
    are updated differently afterwards, see :func:`build_torch`); gradients of the
    training-mode loss.
    """
    from xpnet.backend import seed, to_backend, to_cpu
    from xpnet.layers import Dropout
    from xpnet.layers.compose import walk
    torch = env.torch
    seed(0)
    net = build_xpnet(name)
    for layer in walk(net.chain):
        if isinstance(layer, Dropout):
            layer.dropout_ratio = 0.0
    twin = build_torch(net, torch)
    model = twin.module.to(env.device)
    x, t = make_data(name, 4)
    xt = torch.from_numpy(x).to(env.device)
    diff = 0.0
    for train in (False, True):
        ours = to_cpu(net.predict(to_backend(x), train_flg=train))
        theirs = model.train(train)(xt)
        diff = max(diff, float(abs(ours - theirs.detach().cpu().numpy()).max()))
    torch.nn.functional.cross_entropy(theirs, torch.from_numpy(t).to(env.device)).backward()
    grads = net.gradient(to_backend(x), to_backend(t))
    names = {(id(layer), key): n for n in net.params for layer, key in [net.params.slot(n)]}
    worst = scale = 0.0
    for layer, key, tensor in twin.pairs:
        g = to_cpu(grads[names[id(layer), key]])
        g_torch = tensor.grad.cpu().numpy()
        g_torch = g_torch.T if key == "W" and g.ndim == 2 else g_torch
        worst = max(worst, float(abs(g - g_torch).max()))
        scale = max(scale, float(abs(g_torch).max()))
    return diff, worst / scale if scale else worst


# ------------------------------------------------------------------ timing
def _other_threads_running() -> bool | None:
    """Whether a thread of this process other than the caller is running or runnable
    (state R in /proc: a BLAS/OpenMP worker spinning for work); None off Linux."""
    me = threading.get_native_id()
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return None
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:  # the thread has just exited
            continue
        if tid != me and state == "R":
            return True
    return False


def settle(limit: float = 1.0) -> None:
    """Wait until the worker threads of the previous call have parked.

    After a call, OpenBLAS's workers spin for about 2**28 cycles (~0.1 s) and
    OpenMP's (PyTorch) for some ms, taking cores from whatever runs next; see
    benchmarks/README.md.  Off Linux: a fixed 0.15 s pause.
    """
    end, idle = time.perf_counter() + limit, 0
    while time.perf_counter() < end and idle < 2:  # two idle looks in a row
        running = _other_threads_running()
        if running is None:
            time.sleep(0.15)
            return
        idle = 0 if running else idle + 1
        time.sleep(0.002)


def timed(env: Env, framework: str, fn: Callable[[], Any]) -> float:
    """Milliseconds of one call, the device synchronised before and after."""
    env.sync(framework)
    t0 = time.perf_counter()
    fn()
    env.sync(framework)
    return (time.perf_counter() - t0) * 1e3


def measure(env: Env, cases: dict[str, Callable[[], Any]]) -> dict[str, list[float]]:
    """Per framework the times (ms) of ``reps`` calls, after ``warmup`` calls each."""
    reps, settled = env.sizes["reps"], env.schedule == "settled"
    for fw, fn in cases.items():
        for _ in range(env.sizes["warmup"]):
            fn()
        env.sync(fw)
    times: dict[str, list[float]] = {fw: [] for fw in cases}
    if env.schedule == "blocks":
        for fw, fn in cases.items():
            settle()
            times[fw] = [timed(env, fw, fn) for _ in range(reps)]
        return times
    for _ in range(reps):
        for fw, fn in cases.items():
            if settled:
                settle()
            times[fw].append(timed(env, fw, fn))
    return times


def summary(times: list[float], batch: int) -> dict:
    q1, _, q3 = statistics.quantiles(times, n=4) if len(times) > 1 else times * 3
    med = statistics.median(times)
    return {"median_ms": med, "q1_ms": q1, "q3_ms": q3, "iqr_ms": q3 - q1,
            "images_per_s": batch / med * 1e3, "times_ms": [round(v, 4) for v in times]}


def bench_case(env: Env, name: str, task: str, batch: int) -> dict:
    """One row: the model's ``task`` at ``batch`` for each framework, and the ratio."""
    graph = env.cuda_graph and task == "train"
    cases = {"xpnet": xpnet_case(name, task, batch, cuda_graph=graph)}
    if graph:  # the same step without the graph, for comparison
        cases["xpnet_eager"] = xpnet_case(name, task, batch)
    if env.torch is not None:
        cases["pytorch"] = torch_case(env, name, task, batch)
    times = measure(env, cases)
    if graph and not cases["xpnet"].train_step.graphed:
        raise RuntimeError(f"{name} train {batch}: the CUDA graph was not recorded")
    row = {"model": name, "task": task, "batch": batch}
    row.update({fw: summary(v, batch) for fw, v in times.items()})
    if "pytorch" in row:
        row["ratio"] = row["xpnet"]["median_ms"] / row["pytorch"]["median_ms"]
        if "xpnet_eager" in row:
            row["ratio_eager"] = row["xpnet_eager"]["median_ms"] / row["pytorch"]["median_ms"]
    print(f"{name} {task} {batch}: " + ", ".join(
        f"{fw} {row[fw]['median_ms']:.2f} ms" for fw in times), file=sys.stderr, flush=True)
    return row


# ------------------------------------------------------------------ memory
def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def memory_child(args: argparse.Namespace) -> None:
    """In a fresh process: build one network and its data, then report the peak memory
    of a few train steps above that baseline as one JSON line."""
    framework, name = args.memory_child
    gpu = args.backend == "cupy"
    batch, steps = args.sizes["batch"], args.sizes["memory_steps"]
    if framework == "xpnet":
        from xpnet.backend import set_backend
        set_backend(args.backend)
        torch = None
    else:
        torch, why = import_torch(True, gpu)
        if torch is None:
            raise SystemExit(why)
        torch.set_num_threads(args.threads)
    env = Env(args.backend, gpu, torch, args.sizes, args.schedule, args.cuda_graph == "on")
    step = xpnet_case(name, "train", batch, env.cuda_graph) if framework == "xpnet" else \
        torch_case(env, name, "train", batch)
    out = {"framework": framework, "model": name, "batch": batch, "steps": steps}
    if gpu:
        env.sync(framework)
        if framework == "xpnet":
            import cupy
            pool = cupy.get_default_memory_pool()
            pool.free_all_blocks()
            base = pool.used_bytes()
        else:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        for _ in range(steps):
            step()
        env.sync(framework)
        if framework == "xpnet":  # the CUDA graph's private pool counts too
            peak = pool.total_bytes() + step.train_step.memory_bytes()
        else:
            peak = torch.cuda.max_memory_allocated()
        out.update(method="cupy pool total_bytes" if framework == "xpnet"
                   else "torch.cuda.max_memory_allocated", peak_mib=(peak - base) / 2**20)
    else:
        import gc
        import resource
        gc.collect()
        base = _proc_status_kib("VmRSS")
        if base is None:
            print(json.dumps({**out, "method": "unavailable (no /proc)", "peak_mib": math.nan}))
            return
        try:  # "5" resets VmHWM (the peak RSS) to the current RSS
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            method = "VmHWM after clear_refs"
        except OSError:
            method = "ru_maxrss (may include peaks before the baseline)"
        for _ in range(steps):
            step()
        peak = _proc_status_kib("VmHWM") if method.startswith("VmHWM") else \
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        out.update(method=method, baseline_mib=base / 1024, peak_mib=(peak - base) / 1024)
    print(json.dumps(out))


def memory_of(env: Env, framework: str, name: str, threads: int) -> dict:
    """What :func:`memory_child` reports for one (framework, model), run in a child."""
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", framework, name,
           "--backend", env.backend, "--threads", str(threads),
           "--batch", str(env.sizes["batch"]), "--memory-steps", str(env.sizes["memory_steps"]),
           "--cuda-graph", "on" if env.cuda_graph else "off"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "DL_BACKEND": env.backend})
    if proc.returncode != 0:
        raise RuntimeError(f"memory child {framework}/{name} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_memory(env: Env, names: list[str], threads: int) -> list[dict]:
    """Per model a row: each framework's train-step peak memory.  Every (framework, model)
    gets its own child process; they run two at a time (a process's peak is its own, and
    nothing is timed meanwhile)."""
    fws = FRAMEWORKS if env.torch is not None else FRAMEWORKS[:1]
    with ThreadPoolExecutor(2) as pool:
        jobs = {(fw, n): pool.submit(memory_of, env, fw, n, threads) for n in names for fw in fws}
    rows = []
    for n in names:
        row = {"model": n, "batch": env.sizes["batch"], **{fw: jobs[fw, n].result() for fw in fws}}
        if "pytorch" in row and row["pytorch"]["peak_mib"] > 0:
            row["ratio"] = row["xpnet"]["peak_mib"] / row["pytorch"]["peak_mib"]
        rows.append(row)
    return rows


# ------------------------------------------------------------------ the suite
def run(argv: list[str] | None = None) -> dict:
    """Run the suite as the command line would; return the results (what --json writes)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    limit_threads(args.threads)
    from xpnet.backend import get_backend_name, use_backend

    backend = args.backend or get_backend_name()
    with use_backend(backend):
        torch, note = import_torch(not args.no_torch, backend == "cupy")
        if torch is not None and backend != "cupy":
            torch.set_num_threads(args.threads)
        env = Env(backend, backend == "cupy", torch, args.sizes, args.schedule,
                  args.cuda_graph == "on")
        res: dict[str, Any] = {"info": machine_info(env, argv, args.threads, note),
                               "sizes": {k: list(v) if isinstance(v, tuple) else v
                                         for k, v in args.sizes.items()},
                               "models": {m: MODELS[m][0] for m in args.models},
                               "check": {}, "check_grad": {}, "steps": [], "sweep": [],
                               "memory": []}
        for name in args.models:
            if torch is not None:
                res["check"][name], res["check_grad"][name] = check_same_outputs(env, name)
            res["steps"].append(bench_case(env, name, "train", args.sizes["batch"]))
            res["steps"].append(bench_case(env, name, "infer", args.sizes["infer_batch"]))
        if not args.skip_sweep and "deep-convnet" in args.models:
            res["sweep"] = [bench_case(env, "deep-convnet", "train", b)
                            for b in args.sizes["sweep"]]
        if not args.skip_memory:
            res["memory"] = bench_memory(env, args.models, args.threads)
        res["info"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()] \
            if hasattr(os, "getloadavg") else None
    return res


# ------------------------------------------------------------------ output
def _ms(side: dict | None) -> str:
    return f"{side['median_ms']:.2f} ({side['iqr_ms']:.2f})" if side else "-"


def _ips(side: dict | None) -> str:
    return f"{side['images_per_s']:,.0f}" if side else "-"


def _ratio(row: dict) -> str:
    return f"{row['ratio']:.2f}" if "ratio" in row else "-"


def markdown(res: dict) -> str:
    """The results as Markdown: a header naming machine, command and date, then tables."""
    i = res["info"]
    title = f"**xpnet `{i['backend']}` backend vs PyTorch {i['torch']}**, float32" if i["torch"] \
        else f"**xpnet `{i['backend']}` backend**, float32 (no PyTorch: {i['torch_note']})"
    versions = f"numpy {i['numpy']}" + (f", CuPy {i['cupy']}" if i["cupy"] else "")
    load = "-".join(str(v[0]) for v in (i["loadavg"], i.get("loadavg_end")) if v)
    lines = [title, "",
             f"- machine: {i['cpu']}, {i['cpus_usable']} usable cores"
             + (f"; {i['gpu']}" if i["gpu"] else
                f"; threads: {i['threads']} (xpnet's own: {i.get('xpnet_threads', '?')}, "
                f"PyTorch: {i.get('torch_threads', '-')})"),
             f"- software: Python {i['python']}, {versions}, BLAS {i['blas']}",
             f"- date: {i['date']}; load average {load} (start-end)",
             f"- command: `{i['command']}`",
             f"- median of {res['sizes']['reps']} reps, {i['schedule']} schedule (see "
             "benchmarks/README.md), IQR in brackets; ratio = xpnet ms / PyTorch ms "
             "(above 1: xpnet slower)"]
    if res.get("check"):
        grad = res.get("check_grad", {})
        lines.append("- same networks, checked before timing (4 samples, dropout off): largest "
                     "|logit difference| / largest gradient difference relative to the "
                     "largest gradient: " + "; ".join(
                         f"{m} {d:.1e}" + (f" / {grad[m]:.1e}" if m in grad else "")
                         for m, d in res["check"].items()))
    eager = any("xpnet_eager" in r for r in res["steps"] + res["sweep"])
    if eager:
        lines.append("- xpnet's train step is `TrainStep(net, Adam(), cuda_graph=True)`: "
                     "recorded once as a CUDA graph, then replayed; the eager columns time "
                     "the same step without the graph (PyTorch: eager)")
    lines += ["", "| model | step | batch | xpnet ms | PyTorch ms | xpnet img/s | PyTorch img/s "
              "| xpnet/PyTorch |" + (" xpnet eager ms | eager/PyTorch |" if eager else ""),
              "|---|---|--:|--:|--:|--:|--:|--:|" + ("--:|--:|" if eager else "")]

    def eager_cells(r: dict) -> str:
        if not eager:
            return ""
        ratio = f"{r['ratio_eager']:.2f}" if "ratio_eager" in r else "-"
        return f" {_ms(r.get('xpnet_eager'))} | {ratio} |"

    for r in res["steps"]:
        lines.append(f"| {res['models'][r['model']]} | {r['task']} | {r['batch']} | "
                     f"{_ms(r['xpnet'])} | {_ms(r.get('pytorch'))} | {_ips(r['xpnet'])} | "
                     f"{_ips(r.get('pytorch'))} | {_ratio(r)} |" + eager_cells(r))
    if res["sweep"]:
        lines += ["", "DeepConvNet train step by batch size:", "",
                  "| batch | xpnet ms | PyTorch ms | xpnet img/s | PyTorch img/s "
                  "| xpnet/PyTorch |" + (" xpnet eager ms | eager/PyTorch |" if eager else ""),
                  "|--:|--:|--:|--:|--:|--:|" + ("--:|--:|" if eager else "")]
        for r in res["sweep"]:
            lines.append(f"| {r['batch']} | {_ms(r['xpnet'])} | {_ms(r.get('pytorch'))} | "
                         f"{_ips(r['xpnet'])} | {_ips(r.get('pytorch'))} | {_ratio(r)} |"
                         + eager_cells(r))
    if res["memory"]:
        m = res["memory"][0]
        how = "; ".join(dict.fromkeys(m[fw]["method"] for fw in FRAMEWORKS if fw in m))
        lines += ["", f"Peak memory of the train step (batch {m['batch']}, {m['xpnet']['steps']}"
                  f" steps) above the memory after building model and data ({how}; one "
                  "process per cell):", "",
                  "| model | xpnet MiB | PyTorch MiB | xpnet/PyTorch |", "|---|--:|--:|--:|"]
        for r in res["memory"]:
            pt = f"{r['pytorch']['peak_mib']:.1f}" if "pytorch" in r else "-"
            lines.append(f"| {res['models'][r['model']]} | {r['xpnet']['peak_mib']:.1f} | "
                         f"{pt} | {_ratio(r)} |")
    return "\n".join(lines) + "\n"


def update_doc(path: str | os.PathLike, res: dict) -> None:
    """Replace the text between ``<!-- bench_models:BACKEND -->`` and
    ``<!-- /bench_models:BACKEND -->`` in the Markdown file ``path`` by the tables."""
    backend = res["info"]["backend"]
    begin, end = f"<!-- bench_models:{backend} -->", f"<!-- /bench_models:{backend} -->"
    with open(path) as f:
        text = f.read()
    i, j = text.find(begin), text.find(end)
    if i < 0 or j < i:
        raise ValueError(f"{path}: no {begin} ... {end} markers")
    with open(path, "w") as f:
        f.write(text[: i + len(begin)] + "\n" + markdown(res) + text[j:])


def plot(res: dict) -> Any:
    """A matplotlib figure: ms/step, images/s, the ratio to PyTorch, and the batch sweep."""
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    rows = res["steps"]
    short = {"mlp": "MLP", "simple-convnet": "Simple", "deep-convnet": "Deep", "vgg": "VGG",
             "googlenet": "GoogLeNet", "resnet": "ResNet"}
    labels = [f"{short.get(r['model'], r['model'])}\n{r['task']} {r['batch']}" for r in rows]
    pos = np.arange(len(rows))
    fws = [fw for fw in ("xpnet", "xpnet_eager", "pytorch") if any(fw in r for r in rows)]
    width = 0.8 / max(1, len(fws))
    for ax, key, title in ((axes[0, 0], "median_ms", "ms per step (log)"),
                           (axes[0, 1], "images_per_s", "images/s (log)")):
        for k, fw in enumerate(fws):
            ax.bar(pos + (k - 0.5 * (len(fws) - 1)) * width,
                   [r[fw][key] if fw in r else math.nan for r in rows], width, label=fw)
        ax.set(title=title, yscale="log", xticks=pos, xticklabels=labels)
        ax.legend()
    ax = axes[1, 0]
    if "pytorch" in fws:
        ax.bar(pos, [r["ratio"] for r in rows], color="tab:gray")
        ax.axhline(1, color="k", lw=0.8)
    else:
        ax.text(0.5, 0.5, "no PyTorch: " + str(res["info"]["torch_note"]), ha="center",
                transform=ax.transAxes)
    ax.set(title="xpnet ms / PyTorch ms", xticks=pos, xticklabels=labels)
    ax = axes[1, 1]
    for fw in fws:
        if res["sweep"] and fw in res["sweep"][0]:
            ax.plot([r["batch"] for r in res["sweep"]],
                    [r[fw]["images_per_s"] for r in res["sweep"]], "o-", label=fw)
    ax.set(title="DeepConvNet train step: images/s by batch", xlabel="batch")
    if res["sweep"]:
        batches = [r["batch"] for r in res["sweep"]]
        ax.set_xscale("log")
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_xticks([], minor=True)
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no batch sweep in this run", ha="center", transform=ax.transAxes)
    i = res["info"]
    fig.suptitle(f"xpnet ({i['backend']}) vs PyTorch, {i['gpu'] or i['cpu']}, "
                 f"threads: {i['threads']}, {i['date'][:10]}")
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    limit_threads(args.threads)  # before numpy loads
    if args.memory_child:
        memory_child(args)
        return 0
    from xpnet.backend import BackendError
    try:
        res = run(argv)
    except BackendError as exc:  # e.g. --backend cupy without CuPy or a GPU
        print(f"bench_models: {exc}", file=sys.stderr)
        return 2
    md = markdown(res)
    print(md)
    if args.md:
        with open(args.md, "w") as f:
            f.write(md)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    if args.png:
        plot(res).savefig(args.png, dpi=120)
    if args.doc:
        update_doc(args.doc, res)
    bad = [r for r in res["steps"] + res["sweep"] for fw in FRAMEWORKS
           if fw in r and not math.isfinite(r[fw]["median_ms"])]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
