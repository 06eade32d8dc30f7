"""Weight initialisation on MNIST (the book's section 6.2.4, figure 6-15).

A 5-layer ReLU MultiLayerNet (784-100-100-100-100-10) is trained with SGD (lr 0.01)
for 2000 iterations on mini-batches of 128, its weights drawn with std 0.01, Xavier
(sqrt(1/n)) or He (sqrt(2/n)), n being the previous layer's size.  The three runs
scale the same normal draws and see the same mini-batches.

Checks: with std 0.01 the loss stays near ln 10 = 2.30 (the network does not learn);
He ends lower than Xavier (final loss = mean of the last 100 iterations).

    python examples/ch6_weight_init.py --out docs/figures/ch6_weight_init
"""

from __future__ import annotations

import _common
import numpy as np
from _common import plt

from xpnet.models import MultiLayerNet
from xpnet.optim import SGD

INITS = {"std=0.01": 0.01, "Xavier": "xavier", "He": "he"}
TAIL = 100


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    args = p.parse_args()
    iterations = 60 if args.quick else 2000
    n_train = 2000 if args.quick else None
    batch_size, lr = 128, 0.01
    run = _common.Run(args, "ch6_weight_init", "Weight initialisation on MNIST",
                      book="6.2.4 (figure 6-15)",
                      settings={"network": "MultiLayerNet 784-[100]x4-10, ReLU",
                                "optimizer": f"SGD lr {lr}", "iterations": iterations,
                                "batch_size": batch_size, "train_images": n_train or 60000,
                                "inits": {"std=0.01": 0.01, "Xavier": "sqrt(1/n)",
                                          "He": "sqrt(2/n)"},
                                "same_normal_draws_and_batches": True,
                                "final_loss": f"mean of the last {TAIL} iterations"})
    (x_train, t_train), _ = _common.load_mnist_subset(n_train, 1)

    losses = {}
    for name, spec in INITS.items():
        run.reseed()  # the same normal draws, scaled by each init's std
        net = MultiLayerNet(784, [100] * 4, 10, activation="relu", weight_init_std=spec)
        rng = np.random.default_rng(run.seed)
        losses[name] = _common.train_iterations(net, SGD(lr=lr), x_train, t_train,
                                                iterations, batch_size, rng, desc=name)
    final = {k: _common.tail_mean(v, TAIL) for k, v in losses.items()}
    run.results["final_loss"] = final
    run.results["loss_every_10th_iteration"] = {k: v[::10].tolist() for k, v in losses.items()}

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (name, values), m in zip(losses.items(), "osD", strict=True):
        s = _common.smooth(values)
        ax.plot(np.arange(len(s)), s, marker=m, markevery=max(1, iterations // 20),
                markersize=4, label=f"{name} (final {final[name]:.3f})")
    ax.axhline(_common.LN10, color="0.5", linestyle=":", linewidth=1, label="ln 10 = 2.303")
    ax.set_xlabel("iterations")
    ax.set_ylabel("loss (smoothed)")
    ax.set_ylim(0, 2.5)
    ax.set_title(f"ReLU MultiLayerNet 784-[100]x4-10, SGD lr {lr}, batch {batch_size}")
    ax.legend()
    run.savefig(fig, "weight_init.png")

    small = losses["std=0.01"]
    run.check("std001_no_learning",
              "with std 0.01 the loss stays near ln 10 = 2.30: the final loss is within "
              "0.05 of 2.30",
              abs(final["std=0.01"] - _common.LN10) < 0.05,
              {"std=0.01_final_loss": final["std=0.01"], "ln10": _common.LN10,
               "std=0.01_min_loss": float(small.min())})
    run.check("he_below_xavier",
              "He ends with a lower loss than Xavier",
              final["He"] < final["Xavier"],
              {"He_final_loss": final["He"], "Xavier_final_loss": final["Xavier"]},
              note="one seed; Xavier and He differ only by a factor sqrt(2) in the same "
                   "weight draws")
    run.finish()


if __name__ == "__main__":
    main()
