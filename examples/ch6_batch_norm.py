"""Batch Normalization (the book's section 6.3.2, figures 6-18 and 6-19).

MultiLayerNetExtend 784-[100]x5-10 (ReLU) with and without Batch Normalization is
trained on the first 1000 MNIST training images for 20 epochs (mini-batches of 100,
SGD lr 0.01), for 16 weight scales logspace(0, -4, 16) (the std of every weight).
For each scale both networks start from the same normal draws and see the same
mini-batches.  The training accuracy (on the 1000 images) is measured before
training and after every epoch, in inference mode as in the book; for the BN
network also with batch statistics (dotted; see the note in summary.json).

Check: the network with BN is ahead in most of the 16 panels (higher final training
accuracy); also reported, ahead by the mean accuracy over the 20 epochs.

    python examples/ch6_batch_norm.py --out docs/figures/ch6_batch_norm
"""

from __future__ import annotations

import _common
import numpy as np
from _common import plt

from xpnet.models import MultiLayerNetExtend
from xpnet.optim import SGD


def batch_stats_accuracy(net, x, t) -> float:
    """Accuracy with BN normalising by the statistics of ``x`` itself (training mode),
    the running averages left untouched."""
    saved = {k: v.copy() for k, v in net.buffers.items()}
    y = net.predict(x, train_flg=True)
    for k, v in saved.items():
        net.buffers[k][...] = v
    return float((y.argmax(axis=1) == t).mean())


def train(run: _common.Run, scale: float, use_bn: bool, data, epochs: int, batch_size: int,
          lr: float) -> tuple[list[float], list[float] | None, int]:
    x, t = data
    run.reseed()
    net = MultiLayerNetExtend(784, [100] * 5, 10, activation="relu", weight_init_std=scale,
                              use_batchnorm=use_bn)
    opt = SGD(lr=lr)
    rng = np.random.default_rng(run.seed)
    n = int(x.shape[0])
    iter_per_epoch = max(n // batch_size, 1)
    acc = [net.accuracy(x, t)]
    batch_acc = [batch_stats_accuracy(net, x, t)] if use_bn else None
    losses = []
    with np.errstate(all="ignore"):  # the unnormalised net at std 1 overflows
        for _ in range(epochs):
            for _ in range(iter_per_epoch):
                idx = _common.batch_indices(rng, n, batch_size)
                opt.update(net.params, net.gradient(x[idx], t[idx]))
                losses.append(net.last_loss)
            acc.append(net.accuracy(x, t))
            if use_bn:
                batch_acc.append(batch_stats_accuracy(net, x, t))
    non_finite = int(np.count_nonzero(~np.isfinite(_common.host_floats(losses))))
    return acc, batch_acc, non_finite


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    args = p.parse_args()
    n_train = 200 if args.quick else 1000
    epochs = 2 if args.quick else 20
    batch_size, lr = 100, 0.01
    scales = np.logspace(0, -4, num=16)
    run = _common.Run(args, "ch6_batch_norm", "Batch Normalization",
                      book="6.3.2 (figures 6-18, 6-19)",
                      settings={"network": "MultiLayerNetExtend 784-[100]x5-10, ReLU",
                                "train_images": n_train, "epochs": epochs,
                                "batch_size": batch_size, "optimizer": f"SGD lr {lr}",
                                "weight_scales": scales.tolist(),
                                "accuracy": "training accuracy on the training images, "
                                            "before training and after each epoch",
                                "same_initial_draws_and_batches": True})
    (x, t), _ = _common.load_mnist_subset(n_train, 1)

    panels = []
    jobs = [(s, bn) for s in scales for bn in (True, False)]
    curves: dict[tuple[float, bool], list[float]] = {}
    batch_curves: dict[float, list[float]] = {}
    bad: dict[tuple[float, bool], int] = {}
    for s, bn in _common.progress(jobs, desc="networks"):
        curves[(s, bn)], b_acc, bad[(s, bn)] = train(run, float(s), bn, (x, t), epochs,
                                                     batch_size, lr)
        if bn:
            batch_curves[s] = b_acc
    for s in scales:
        bn, plain = curves[(s, True)], curves[(s, False)]
        panels.append({"weight_scale": float(s), "bn_train_acc": bn, "plain_train_acc": plain,
                       "bn_batch_stats_train_acc": batch_curves[s],
                       "bn_final": bn[-1], "plain_final": plain[-1],
                       "bn_mean": float(np.mean(bn[1:])), "plain_mean": float(np.mean(plain[1:])),
                       "plain_non_finite_losses": bad[(s, False)],
                       "bn_non_finite_losses": bad[(s, True)]})
    run.results["panels"] = panels
    ahead_final = sum(pn["bn_final"] > pn["plain_final"] for pn in panels)
    ahead_mean = sum(pn["bn_mean"] > pn["plain_mean"] for pn in panels)
    ties = sum(pn["bn_final"] == pn["plain_final"] for pn in panels)
    run.results.update(bn_ahead_final=ahead_final, bn_ahead_mean=ahead_mean, ties_final=ties)

    fig, axes = plt.subplots(4, 4, figsize=(12, 10), sharex=True, sharey=True)
    ep = np.arange(epochs + 1)
    for i, (ax, pn) in enumerate(zip(axes.ravel(), panels, strict=True)):
        ax.plot(ep, pn["bn_train_acc"], label="Batch Normalization", markevery=2)
        ax.plot(ep, pn["plain_train_acc"], "--", label="Normal (without BatchNorm)",
                markevery=2)
        ax.plot(ep, pn["bn_batch_stats_train_acc"], ":", color="C0", linewidth=1,
                label="BN, batch statistics")
        ax.set_title(f"{i + 1}: W std = {pn['weight_scale']:.3g}")
        ax.set_ylim(0, 1.0)
        if i % 4 == 0:
            ax.set_ylabel("accuracy")
        if i >= 12:
            ax.set_xlabel("epochs")
    axes[0, 0].legend(loc="lower right", fontsize=7)
    fig.suptitle(f"training accuracy, {n_train} images, BN ahead at the end in "
                 f"{ahead_final} of 16 panels")
    fig.tight_layout()
    run.savefig(fig, "batch_norm.png")

    run.notes.append(
        "The solid BN curves are the book's measure: inference mode, normalising by the "
        "running averages (which start at 0, as in the book, and follow momentum 0.9). "
        "The dotted curve normalises with batch statistics over the 1000 images instead "
        "(training mode, running averages untouched); where the two differ, the running "
        "averages have not yet caught up with the batch statistics.")
    run.check("bn_ahead_most",
              "the network with Batch Normalization is ahead (higher final training "
              "accuracy) in most of the 16 panels",
              ahead_final > 8,
              {"bn_ahead_panels": ahead_final, "panels": 16, "ties": ties,
               "bn_ahead_by_mean_accuracy": ahead_mean},
              note="one seed per panel")
    run.finish()


if __name__ == "__main__":
    main()
