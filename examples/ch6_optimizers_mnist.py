"""Optimizers on MNIST (the book's section 6.1.8, figure 6-9).

A 5-layer ReLU MultiLayerNet (784-100-100-100-100-10, He initialisation) is trained
for 2000 iterations on mini-batches of 128 with each optimizer at its default
learning rate (SGD, Momentum, AdaGrad 0.01; Adam 0.001; plus RMSprop 0.01 and
Nesterov 0.01, which the book does not plot).  Every network starts from the same
weights and sees the same mini-batches (the book draws both afresh per optimizer).

Reported: the smoothed loss curves, and the mean loss of the last 100 iterations.
Check: SGD ends with the highest loss (of the book's four, and of all six).

    python examples/ch6_optimizers_mnist.py --out docs/figures/ch6_optimizers_mnist
"""

from __future__ import annotations

import _common
import numpy as np
from _common import plt

from xpnet.models import MultiLayerNet
from xpnet.optim import get_optimizer

OPTIMIZERS = {"SGD": "sgd", "Momentum": "momentum", "AdaGrad": "adagrad", "Adam": "adam",
              "RMSprop": "rmsprop", "Nesterov": "nesterov"}
BOOK = ("SGD", "Momentum", "AdaGrad", "Adam")
TAIL = 100  # iterations averaged for the final loss


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    args = p.parse_args()
    iterations = 60 if args.quick else 2000
    n_train = 2000 if args.quick else None
    batch_size = 128
    hidden = [100] * 4
    run = _common.Run(args, "ch6_optimizers_mnist", "Optimizers on MNIST",
                      book="6.1.8 (figure 6-9)",
                      settings={"network": "MultiLayerNet 784-[100]x4-10, ReLU, He init",
                                "iterations": iterations, "batch_size": batch_size,
                                "train_images": n_train or 60000,
                                "learning_rates": "each optimizer's default (SGD, Momentum, "
                                                  "AdaGrad, RMSprop, Nesterov 0.01; Adam "
                                                  "0.001)",
                                "same_initial_weights_and_batches": True,
                                "final_loss": f"mean of the last {TAIL} iterations",
                                "not_in_book": ["RMSprop", "Nesterov"]})
    (x_train, t_train), _ = _common.load_mnist_subset(n_train, 1)

    losses = {}
    for name, key in OPTIMIZERS.items():
        run.reseed()
        net = MultiLayerNet(784, hidden, 10, activation="relu", weight_init_std="relu")
        optimizer = get_optimizer(key)
        rng = np.random.default_rng(run.seed)
        losses[name] = _common.train_iterations(net, optimizer, x_train, t_train, iterations,
                                                batch_size, rng, desc=name)
    final = {k: _common.tail_mean(v, TAIL) for k, v in losses.items()}
    run.results["final_loss"] = final
    run.results["learning_rates"] = {k: get_optimizer(v).lr for k, v in OPTIMIZERS.items()}
    run.results["loss_every_10th_iteration"] = {k: v[::10].tolist() for k, v in losses.items()}
    run.results["final_order"] = sorted(final, key=final.get)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    marks = _common.markers()
    for name, values in losses.items():
        s = _common.smooth(values)
        ax.plot(np.arange(len(s)), s, marker=marks[name], markevery=max(1, iterations // 20),
                markersize=4, label=f"{name} (final {final[name]:.3f})")
    ax.set_xlabel("iterations")
    ax.set_ylabel("loss (smoothed)")
    ax.set_ylim(0, 1 if not args.quick else None)
    ax.set_title(f"MultiLayerNet 784-[100]x4-10 on MNIST, batch {batch_size}")
    ax.legend()
    run.savefig(fig, "optimizers_mnist.png")

    run.check("sgd_highest_loss",
              "SGD ends with the highest loss of the book's four (SGD, Momentum, AdaGrad, "
              "Adam): it learns the slowest",
              all(final["SGD"] > final[k] for k in BOOK[1:]),
              {f"{k}_final_loss": final[k] for k in BOOK})
    run.check("sgd_highest_loss_all_six",
              "SGD also ends above the two optimizers the book does not plot (RMSprop, "
              "Nesterov, at their default learning rates)",
              all(final["SGD"] > final[k] for k in final if k != "SGD"),
              {f"{k}_final_loss": v for k, v in final.items()})
    run.finish()


if __name__ == "__main__":
    main()
