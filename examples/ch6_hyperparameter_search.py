"""Random hyper-parameter search (the book's section 6.5.3, figure 6-24).

The first 500 MNIST training images are shuffled and split: 20 % for validation,
80 % for training.  Each trial trains MultiLayerNet 784-[100]x6-10 (ReLU, He
initialisation) for 50 epochs (SGD, mini-batches of 100, xpnet's Trainer) with
lr = 10^U(-6, -2) and weight decay = 10^U(-8, -4), scored by the final validation
accuracy.  Round 1: 100 trials; the best 20 are plotted as a 5x4 grid (validation
solid, training dashed).  Round 2 (the book's step 3): the ranges narrowed to the
span of the best 20 (``xpnet.tuning.narrow``) and searched again.  The test set is
never used.  The search itself is ``xpnet.tuning.random_search``.

Checks: the book's good region (lr 0.001..0.01, weight decay 1e-8..1e-6) holds most
(>= 75 %) of the best 20 trials; the second round does better than the first.

    python examples/ch6_hyperparameter_search.py --out docs/figures/ch6_hyperparameter_search
"""

from __future__ import annotations

import math

import _common
import numpy as np
from _common import plt

from xpnet.datasets import train_val_split
from xpnet.models import MultiLayerNet
from xpnet.train import Trainer
from xpnet.tuning import LogUniform, narrow, random_search

SPACE = {"lr": LogUniform(1e-6, 1e-2), "weight_decay": LogUniform(1e-8, 1e-4)}
BOOK_REGION = {"lr": (1e-3, 1e-2), "weight_decay": (1e-8, 1e-6)}


def make_objective(run: _common.Run, data, epochs: int, batch_size: int):
    (x_train, t_train), (x_val, t_val) = data
    counter = {"n": 0}

    def objective(params):
        run.reseed(1000 + counter["n"])  # each trial's weights, reproducibly
        counter["n"] += 1
        net = MultiLayerNet(784, [100] * 6, 10, weight_init_std="relu",
                            weight_decay_lambda=params["weight_decay"])
        trainer = Trainer(net, x_train, t_train, x_val, t_val, epochs=epochs,
                          mini_batch_size=batch_size, optimizer="sgd",
                          optimizer_param={"lr": params["lr"]}, verbose=False,
                          seed=run.seed)
        trainer.train()
        return {"score": trainer.test_acc_list[-1], "val_acc": trainer.test_acc_list,
                "train_acc": trainer.train_acc_list}

    return objective


def share_in(trials, region) -> float:
    inside = [all(region[k][0] <= t.params[k] <= region[k][1] for k in region) for t in trials]
    return float(np.mean(inside))


def plot_grid(run, trials, filename, title):
    rows = min(5, -(-len(trials) // 4))
    fig, axes = plt.subplots(rows, 4, figsize=(12, 2.6 * rows), sharex=True, sharey=True,
                             squeeze=False)
    for i, ax in enumerate(axes.ravel()):
        if i >= len(trials):
            ax.axis("off")
            continue
        tr = trials[i]
        val, train = tr.info["val_acc"], tr.info["train_acc"]
        ep = np.arange(1, len(val) + 1)
        ax.plot(ep, val, "-", label="validation")
        ax.plot(ep, train, "--", label="training")
        ax.set_title(f"best-{i + 1}: val {tr.score:.2f}\nlr {tr.params['lr']:.2e}, "
                     f"wd {tr.params['weight_decay']:.2e}", fontsize=8)
        ax.set_ylim(0.0, 1.0)
    axes[0, 0].legend(loc="lower right", fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    run.savefig(fig, filename)


def scatter(run, rounds, filename):
    fig, ax = plt.subplots(figsize=(6.5, 5))
    for (label, trials), m in zip(rounds.items(), "os", strict=True):
        lr = [t.params["lr"] for t in trials]
        wd = [t.params["weight_decay"] for t in trials]
        sc = ax.scatter(lr, wd, c=[t.score if math.isfinite(t.score) else 0 for t in trials],
                        cmap="viridis", vmin=0, vmax=1, marker=m, s=25, label=label,
                        edgecolors="k", linewidths=0.3)
    lo, hi = BOOK_REGION["lr"], BOOK_REGION["weight_decay"]
    ax.add_patch(plt.Rectangle((lo[0], hi[0]), lo[1] - lo[0], hi[1] - hi[0], fill=False,
                               linestyle=":", color="red", label="book's region"))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("weight decay")
    ax.legend(loc="upper left", fontsize=7)
    fig.colorbar(sc, ax=ax, label="validation accuracy")
    run.savefig(fig, filename)


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=None, help="trials per round (100; quick 6)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per trial (50; quick 2)")
    args = p.parse_args()
    n_trials = args.trials or (6 if args.quick else 100)
    epochs = args.epochs or (2 if args.quick else 50)
    n_best = min(20, n_trials)
    n_images, val_ratio, batch_size = 500, 0.2, 100
    run = _common.Run(args, "ch6_hyperparameter_search", "Hyper-parameter search",
                      book="6.5.3 (figure 6-24)",
                      settings={"network": "MultiLayerNet 784-[100]x6-10, ReLU, He init",
                                "images": n_images, "validation_share": val_ratio,
                                "trials_per_round": n_trials, "epochs": epochs,
                                "batch_size": batch_size, "optimizer": "SGD",
                                "space": {"lr": "10^U(-6, -2)",
                                          "weight_decay": "10^U(-8, -4)"},
                                "score": "validation accuracy after the last epoch",
                                "narrowing": f"span of the best {n_best} of round 1",
                                "book_region": BOOK_REGION})
    (x, t), _ = _common.load_mnist_subset(n_images, 1, on_device=False)
    train, val = train_val_split(x, t, val_ratio=val_ratio, seed=run.seed)
    objective = make_objective(run, (train, val), epochs, batch_size)

    def bar(desc):
        return lambda it: _common.progress(it, desc=desc)

    round1 = random_search(objective, SPACE, n_trials, seed=run.seed, progress=bar("round 1"))
    space2 = narrow(SPACE, round1[:n_best])
    round2 = random_search(objective, space2, n_trials, seed=run.seed + 1,
                           progress=bar("round 2"))

    def summary(trials):
        scores = np.array([t.score for t in trials])
        return {"best": trials[0].as_dict(), "median_score": float(np.nanmedian(scores)),
                f"median_score_best_{n_best}": float(np.nanmedian(scores[:n_best])),
                "trials": [t.as_dict() for t in trials]}

    r1, r2 = summary(round1), summary(round2)
    region = {k: [v.low, v.high] for k, v in space2.items()}
    run.results.update(round1=r1, round2=r2, narrowed_region=region)

    plot_grid(run, round1[:n_best], "best20_round1.png",
              f"round 1: the best {n_best} of {n_trials} trials (validation solid, "
              "training dashed)")
    plot_grid(run, round2[:n_best], "best20_round2.png",
              f"round 2 (lr {region['lr'][0]:.1e}..{region['lr'][1]:.1e}, weight decay "
              f"{region['weight_decay'][0]:.1e}..{region['weight_decay'][1]:.1e}): the best "
              f"{n_best} of {n_trials}")
    scatter(run, {"round 1": round1, "round 2": round2}, "search_space.png")

    best1 = round1[:n_best]
    lr_share = share_in(best1, {"lr": BOOK_REGION["lr"]})
    wd_share = share_in(best1, {"weight_decay": BOOK_REGION["weight_decay"]})
    run.check("book_lr_region",
              f"the book's good learning rates, 0.001..0.01, hold most (>= 75 %) of the "
              f"best {n_best} trials",
              lr_share >= 0.75,
              {"share_of_best_in_lr_region": lr_share,
               "narrowed_lr": region["lr"]})
    run.check("book_weight_decay_region",
              f"the book's good weight decays, 1e-8..1e-6, hold most (>= 75 %) of the best "
              f"{n_best} trials",
              wd_share >= 0.75,
              {"share_of_best_in_wd_region": wd_share,
               "narrowed_weight_decay": region["weight_decay"]},
              note="with 400 training images and 50 epochs weight decay this small barely "
                   "changes the weights, so its region is poorly determined")
    run.check("round2_better",
              "the narrowed second round does better: a higher median validation accuracy "
              "over all its trials than round 1",
              r2["median_score"] > r1["median_score"],
              {"round1_median": r1["median_score"], "round2_median": r2["median_score"],
               "round1_best": r1["best"]["score"], "round2_best": r2["best"]["score"]})
    run.finish()


if __name__ == "__main__":
    main()
