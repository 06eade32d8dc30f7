"""Transfer learning: digits 0-4 to digits 5-9 (the book's section 8.2.4).

The book: weights learned on one (large) data set are copied, in full or in part,
into a network for another task and re-trained there (fine-tuning); this works
especially well when the new task has few data.  Checked here on MNIST:

* **pretraining**: a small convnet learns the digits 0-4 from the training split,
  less 3000 of those images kept for validation (the only choice made, the number
  of pretraining epochs, is made on them: early stopping, patience 2, at most 6
  epochs).  Network: a ``trunk`` (conv 16 3x3 - ReLU - pool 2 - conv 32 3x3 - ReLU -
  pool 2, He init) and a head ``head04`` (affine 1568-100 - ReLU - affine 100-5).
* **the new task**: the digits 5-9, labels remapped to 0-4, learned by a network
  whose trunk is the same and whose head, ``head59``, is new (random), with 100,
  1000 and all (29404) training images of 5-9 (100 and 1000: 20 and 200 per digit),
  four ways:
  (a) ``scratch``: everything from random weights;
  (b) ``fine-tune``: the trunk from the pretrained file (``load_params(path,
  strict=False)``: the head's keys are reported missing / unexpected), all trained;
  (c) ``frozen trunk``: as (b) with ``network.freeze("trunk")``: only the head learns;
  (d) ``fine-tune, trunk lr/10``: as (b) with an optimizer parameter group
  ``{"params": "trunk", "lr": lr / 10}``.
  Every cell trains for the same fixed number of steps (600 mini-batches of 100,
  Adam lr 0.001, the book's settings, chosen beforehand and not tuned), so 100
  images are seen 600 times and all 29404 about twice; the methods of one repeat
  start from the same random head and see the same subset and mini-batches.  Test
  accuracy on all 4861 test digits 5-9; each cell is repeated (``--repeats``, 3:
  other subsets, initial weights and mini-batches); the means are printed and,
  with every cell, written to summary.json.  The pretrained parameters are saved
  to ``--out``/pretrained_0to4.npz.

Figure: test accuracy and test error against the number of training images, one
line per method.  Checks: the pretrained start (b) beats the start from scratch (a)
at 100 and at 1000 images (mean over the repeats); the frozen trunk (c) beats it at
100; the advantage of (b) over (a) is smaller with all the images than with 100.

``--quick``: pretraining on 2000 images for 1 epoch, 10 steps per cell, 1 repeat,
500 test images.  ``--steps`` and ``--repeats`` change the full run.

    XPNET_NUM_THREADS=1 python examples/ch8_transfer_learning.py \\
        --out docs/figures/ch8_transfer_learning
"""

from __future__ import annotations

import time
from typing import Any

import _common
import numpy as np
from _common import plt

from xpnet.backend import get_default_dtype, get_num_threads, to_backend, to_cpu
from xpnet.datasets import load_mnist
from xpnet.init import init_weight
from xpnet.layers import Affine, Chain, ConvReLU, Flatten, Pooling, ReLU
from xpnet.models import Network
from xpnet.optim import Adam
from xpnet.train import Trainer, TrainStep

METHODS = {  # key -> label
    "scratch": "(a) from scratch",
    "finetune": "(b) fine-tune all",
    "frozen": "(c) trunk frozen, new head",
    "finetune_lr10": "(d) fine-tune, trunk at lr/10",
}
LR, BATCH, HIDDEN = 0.001, 100, 100
VAL_IMAGES = 3000


def build_net(head: str) -> Network:
    """trunk (two conv-ReLU-pool blocks) + a head named ``head`` for 5 classes."""
    dt = get_default_dtype()

    def conv(c_in: int, c_out: int) -> ConvReLU:
        return ConvReLU(init_weight((c_out, c_in, 3, 3), "he", dt),
                        to_backend(np.zeros(c_out, dt)), 1, 1)

    def affine(n_in: int, n_out: int) -> Affine:
        return Affine(init_weight((n_in, n_out), "he", dt), to_backend(np.zeros(n_out, dt)))

    trunk = Chain(conv(1, 16), Pooling(2, 2, 2), conv(16, 32), Pooling(2, 2, 2), Flatten(),
                  name="trunk")
    top = Chain(affine(32 * 7 * 7, HIDDEN), ReLU(), affine(HIDDEN, 5), name=head)
    return Network([trunk, top], input_shape=(1, 28, 28))


def split_digits(x: np.ndarray, t: np.ndarray, low: int) -> tuple[np.ndarray, np.ndarray]:
    """The images of digits low..low+4, labels remapped to 0..4."""
    keep = (t >= low) & (t < low + 5)
    return x[keep], (t[keep] - low).astype(t.dtype)


def subset(rng: np.random.Generator, t: np.ndarray, n: int | None) -> np.ndarray:
    """Indices of ``n`` images, n/5 per class (all of them when n is None)."""
    if n is None:
        return np.arange(len(t))
    per = n // 5
    return np.sort(np.concatenate([rng.permutation(np.flatnonzero(t == c))[:per]
                                   for c in range(5)]))


def batches(rng: np.random.Generator, n: int, steps: int) -> list[np.ndarray]:
    """``steps`` mini-batches of min(BATCH, n) indices, reshuffled every pass over n."""
    size = min(BATCH, n)
    order: list[int] = []
    out = []
    for _ in range(steps):
        if len(order) < size:
            order = [*order, *rng.permutation(n).tolist()]
        out.append(np.asarray(order[:size]))
        order = order[size:]
    return out


def train_cell(method: str, pretrained: Any, x: Any, t: Any, x_test: Any, t_test: Any,
               batch_idx: list[np.ndarray], run: _common.Run, init_offset: int
               ) -> dict[str, Any]:
    """One cell: build, (load, freeze), train for len(batch_idx) steps, test."""
    run.reseed(init_offset)  # the same random trunk and head for every method
    net = build_net("head59")
    report = None
    if method != "scratch":
        report = net.load_params(pretrained, strict=False)
    if method == "frozen":
        net.freeze("trunk")
    groups = [{"params": "trunk", "lr": LR / 10}] if method == "finetune_lr10" else None
    step = TrainStep(net, Adam(lr=LR, groups=groups))
    trunk0 = {k: to_cpu(v).copy() for k, v in net.params.items() if k.startswith("trunk.")}
    losses = []
    t0 = time.perf_counter()
    for idx in batch_idx:
        i = to_backend(idx)
        losses.append(step(x[i], t[i]))
    last = _common.host_floats(losses[-min(50, len(losses)):])  # reads back: syncs
    seconds = time.perf_counter() - t0
    n_train = int(x.shape[0])
    acc = net.accuracy(x_test, t_test, batch_size=500)
    train_acc = net.accuracy(x[:2000], t[:2000], batch_size=500) if n_train > 2000 else \
        net.accuracy(x, t, batch_size=500)
    change = max(float(np.abs(to_cpu(net.params[k]) - v).max()) for k, v in trunk0.items())
    return {"test_acc": acc, "train_acc": train_acc, "train_seconds": seconds,
            "final_loss": float(last.mean()), "trunk_max_change": change,
            "frozen": net.frozen, "trained_params": int(sum(
                net.params[k].size for k in net.params if k not in net.frozen)),
            "load_report": None if report is None else {"missing": report.missing,
                                                        "unexpected": report.unexpected}}


def pretrain(run: _common.Run, x04: np.ndarray, t04: np.ndarray, x04_test: np.ndarray,
             t04_test: np.ndarray, quick: bool) -> dict[str, Any]:
    """Learn the digits 0-4 (epochs chosen on the validation split); save the params."""
    perm = np.random.default_rng(run.seed).permutation(len(x04))
    n_val = 500 if quick else VAL_IMAGES
    val, train = perm[:n_val], perm[n_val:]
    if quick:
        train = train[:2000]
    run.reseed(0)
    net = build_net("head04")
    epochs = 1 if quick else 6
    trainer = Trainer(net, x04[train], t04[train], x04_test, t04_test, epochs=epochs,
                      mini_batch_size=BATCH, optimizer="adam", optimizer_param={"lr": LR},
                      evaluate_sample_num_per_epoch=1000, x_val=x04[val], t_val=t04[val],
                      early_stopping_patience=2, seed=run.seed,
                      progress=False, verbose=not quick)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    path = run.out / "pretrained_0to4.npz"
    net.save_params(path)
    h = trainer.history
    return {"params_file": path.name, "train_images": len(train), "val_images": len(val),
            "epochs_run": len(h["epoch"]), "best_epoch": trainer.best_epoch,
            "val_acc": h["val_acc"], "final_test_acc_0to4": trainer.final_test_acc,
            "train_seconds": seconds, "params": list(net.params), "path": path}


def plot(run: _common.Run, sizes: list[int], mean: dict, spread: dict, n_test: int) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    style = {"scratch": "o-", "finetune": "s-", "frozen": "^-", "finetune_lr10": "D--"}
    for key, label in METHODS.items():
        m = np.array([mean[key][s] for s in sizes])
        lo = np.array([spread[key][s][0] for s in sizes])
        hi = np.array([spread[key][s][1] for s in sizes])
        axes[0].errorbar(sizes, m, yerr=[m - lo, hi - m], fmt=style[key], capsize=3,
                         markersize=4, label=label)
        axes[1].errorbar(sizes, 1 - m, yerr=[hi - m, m - lo], fmt=style[key], capsize=3,
                         markersize=4, label=label)
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.minorticks_off()
        ax.set_xlabel("training images of the digits 5-9")
    axes[0].set_ylabel(f"test accuracy (digits 5-9, {n_test} images)")
    axes[0].set_title("test accuracy (mean; bars: min..max over the repeats)")
    axes[0].legend(loc="lower right")
    axes[1].set_yscale("log")
    axes[1].set_ylabel("test error")
    axes[1].set_title("test error, log scale")
    fig.tight_layout()
    run.savefig(fig, "transfer_learning.png")


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None,
                   help="mini-batches per cell (default 600; quick: 10)")
    p.add_argument("--repeats", type=int, default=None,
                   help="repeats of each cell (default 3; quick: 1)")
    args = p.parse_args()
    steps = args.steps or (10 if args.quick else 600)
    repeats = args.repeats or (1 if args.quick else 3)
    (x_train, t_train), (x_test, t_test) = load_mnist(normalize=True, flatten=False)
    x04, t04 = split_digits(x_train, t_train, 0)
    x04_test, t04_test = split_digits(x_test, t_test, 0)
    x59, t59 = split_digits(x_train, t_train, 5)
    x59_test, t59_test = split_digits(x_test, t_test, 5)
    if args.quick:
        x04_test, t04_test = x04_test[:500], t04_test[:500]
        x59_test, t59_test = x59_test[:500], t59_test[:500]
    sizes = [100, 1000, len(x59)]
    run = _common.Run(
        args, "ch8_transfer_learning", "Transfer learning: digits 0-4 to digits 5-9",
        book="8.2.4 (transfer learning)",
        settings={"network": "trunk: conv16 3x3 pad1-ReLU-pool2-conv32 3x3 pad1-ReLU-pool2; "
                             f"head: affine 1568-{HIDDEN}-ReLU-affine {HIDDEN}-5; He init",
                  "pretraining": "digits 0-4 of the training split, "
                                 f"{500 if args.quick else VAL_IMAGES} of them held out for "
                                 "validation; at most "
                                 f"{1 if args.quick else 6} epochs, early stopping on the "
                                 "validation accuracy (patience 2)",
                  "sizes": sizes, "steps_per_cell": steps, "batch_size": BATCH,
                  "optimizer": f"Adam lr {LR}", "repeats": repeats,
                  "methods": METHODS, "test_images": len(x59_test),
                  "subsets": "100 and 1000: 20 and 200 per digit, drawn per repeat",
                  "tuned_on_test": False, "cpu_threads": get_num_threads()})

    pre = pretrain(run, x04, t04, x04_test, t04_test, args.quick)
    print(f"  pretrained on {pre['train_images']} images of 0-4: {pre['epochs_run']} epochs, "
          f"best val epoch {pre['best_epoch']}, test acc (0-4) "
          f"{pre['final_test_acc_0to4']:.4f}, {pre['train_seconds']:.1f} s", flush=True)

    xd_test, td_test = to_backend(x59_test), to_backend(t59_test)
    cells: list[dict[str, Any]] = []
    bar = _common.progress(total=repeats * len(sizes) * len(METHODS), desc="cells")
    for r in range(repeats):
        pick = np.random.default_rng([run.seed, r])
        for si, size in enumerate(sizes):
            idx = subset(pick, t59, None if size == len(x59) else size)
            xs, ts = to_backend(x59[idx]), to_backend(t59[idx])
            batch_idx = batches(np.random.default_rng([run.seed, r, si]), len(idx), steps)
            for method in METHODS:
                res = train_cell(method, pre["path"], xs, ts, xd_test, td_test, batch_idx,
                                 run, init_offset=1 + r)
                cells.append({"method": method, "size": size, "repeat": r, **res})
                bar.set_postfix(method=method, size=size, acc=f"{res['test_acc']:.3f}",
                                refresh=False)
                bar.update(1)
    bar.close()

    def of(method: str, size: int, key: str = "test_acc") -> np.ndarray:
        return np.array([c[key] for c in cells if c["method"] == method and c["size"] == size])

    mean = {m: {s: float(of(m, s).mean()) for s in sizes} for m in METHODS}
    spread = {m: {s: (float(of(m, s).min()), float(of(m, s).max())) for s in sizes}
              for m in METHODS}
    seconds = {m: {s: float(of(m, s, "train_seconds").mean()) for s in sizes} for m in METHODS}
    load_report = next(c["load_report"] for c in cells if c["load_report"] is not None)
    frozen_change = max(c["trunk_max_change"] for c in cells if c["method"] == "frozen")
    run.results.update(
        pretraining={k: v for k, v in pre.items() if k != "path"},
        load_report=load_report, frozen_trunk_max_change=frozen_change,
        mean_test_acc={m: {str(s): v for s, v in d.items()} for m, d in mean.items()},
        min_max_test_acc={m: {str(s): list(v) for s, v in d.items()} for m, d in spread.items()},
        mean_train_seconds={m: {str(s): v for s, v in d.items()} for m, d in seconds.items()},
        trained_params={m: next(c["trained_params"] for c in cells if c["method"] == m)
                        for m in METHODS},
        cells=cells)
    print(f"  load_params(strict=False): missing {load_report['missing']}, unexpected "
          f"{load_report['unexpected']}", flush=True)
    print("  test accuracy (mean of repeats) / train seconds per cell:", flush=True)
    for s in sizes:
        print(f"    {s:>6}: " + ", ".join(f"{m} {mean[m][s]:.4f} ({seconds[m][s]:.1f} s)"
                                          for m in METHODS), flush=True)
    plot(run, sizes, mean, spread, len(x59_test))

    def wins(m: str, size: int) -> int:
        return int((of(m, size) > of("scratch", size)).sum())

    for size in (100, 1000):
        run.check(f"pretrained_beats_scratch_at_{size}",
                  f"with {size} training images, fine-tuning from the weights learned on "
                  "0-4 gives a higher test accuracy on 5-9 than training from scratch "
                  "(mean over the repeats)",
                  mean["finetune"][size] > mean["scratch"][size],
                  {"finetune_acc": mean["finetune"][size], "scratch_acc": mean["scratch"][size],
                   "difference": mean["finetune"][size] - mean["scratch"][size],
                   "repeats_won": wins("finetune", size), "repeats": repeats})
    run.check("frozen_beats_scratch_at_100",
              "with 100 training images, the frozen pretrained trunk with a new head gives a "
              "higher test accuracy than training from scratch (mean over the repeats)",
              mean["frozen"][100] > mean["scratch"][100],
              {"frozen_acc": mean["frozen"][100], "scratch_acc": mean["scratch"][100],
               "difference": mean["frozen"][100] - mean["scratch"][100],
               "repeats_won": wins("frozen", 100), "repeats": repeats})
    gain = {s: mean["finetune"][s] - mean["scratch"][s] for s in sizes}
    run.check("advantage_shrinks_with_data",
              "the advantage of the pretrained start over the start from scratch is largest "
              f"when data are few: smaller with all {sizes[-1]} images than with 100",
              gain[sizes[-1]] < gain[100],
              {"gain_at_100": gain[100], "gain_at_1000": gain[1000],
               f"gain_at_{sizes[-1]}": gain[sizes[-1]]},
              note="our reading of 'effective when data are few', not a sentence of the book")
    if args.quick:
        run.notes.append("quick run: 10 steps per cell and a barely pretrained trunk; the "
                         "verdicts mean nothing")
    run.finish()


if __name__ == "__main__":
    main()
