"""Weight decay against overfitting (the book's section 6.4.2, figures 6-20 and 6-21).

Overfitting on purpose: a 7-layer MultiLayerNet (784-[100]x6-10, ReLU, He
initialisation) is trained on only the first 300 MNIST training images for 201
epochs (3 mini-batches of 100 per epoch, SGD lr 0.01), with weight decay lambda 0
and 0.1.  Training accuracy (the 300 images) and test accuracy (the 10000 test
images) are measured after every epoch.  Both runs start from the same weights and
see the same mini-batches.

Check: the gap between training and test accuracy at the end is smaller with weight
decay (both gaps reported, and their mean over the last 20 epochs).

    python examples/ch6_weight_decay.py --out docs/figures/ch6_weight_decay
"""

from __future__ import annotations

import _common
import numpy as np
from _common import plt

from xpnet.models import MultiLayerNet
from xpnet.optim import SGD

LAMBDAS = (0.0, 0.1)
LAST = 20


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    args = p.parse_args()
    epochs = 8 if args.quick else 201
    n_test = 1000 if args.quick else None
    n_train, batch_size, lr = 300, 100, 0.01
    run = _common.Run(args, "ch6_weight_decay", "Weight decay", book="6.4.2 (figures 6-20, "
                      "6-21)",
                      settings={"network": "MultiLayerNet 784-[100]x6-10, ReLU, He init",
                                "train_images": n_train, "test_images": n_test or 10000,
                                "epochs": epochs, "batch_size": batch_size,
                                "optimizer": f"SGD lr {lr}", "lambdas": list(LAMBDAS),
                                "same_initial_weights_and_batches": True})
    (x, t), (x_test, t_test) = _common.load_mnist_subset(n_train, n_test)

    curves = {}
    for lam in LAMBDAS:
        run.reseed()
        net = MultiLayerNet(784, [100] * 6, 10, weight_init_std="relu", weight_decay_lambda=lam)
        opt = SGD(lr=lr)
        rng = np.random.default_rng(run.seed)
        iter_per_epoch = max(n_train // batch_size, 1)
        train_acc, test_acc = [], []
        for _ in _common.progress(range(epochs), desc=f"lambda {lam}"):
            for _ in range(iter_per_epoch):
                idx = _common.batch_indices(rng, n_train, batch_size)
                opt.update(net.params, net.gradient(x[idx], t[idx]))
            train_acc.append(net.accuracy(x, t))
            test_acc.append(net.accuracy(x_test, t_test))
        curves[lam] = (np.array(train_acc), np.array(test_acc))

    res = {}
    for lam, (tr, te) in curves.items():
        gap = tr - te
        res[f"lambda={lam}"] = {"final_train_acc": tr[-1], "final_test_acc": te[-1],
                                "final_gap": gap[-1],
                                f"mean_gap_last_{LAST}_epochs": float(gap[-LAST:].mean()),
                                "train_acc": tr.tolist(), "test_acc": te.tolist()}
    run.results.update(res)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, lam in zip(axes, LAMBDAS, strict=True):
        tr, te = curves[lam]
        ep = np.arange(1, epochs + 1)
        ax.plot(ep, tr, marker="o", markevery=max(1, epochs // 20), markersize=3, label="train")
        ax.plot(ep, te, marker="s", markevery=max(1, epochs // 20), markersize=3, label="test")
        ax.set_title(f"weight decay lambda = {lam}: final train {tr[-1]:.3f}, test "
                     f"{te[-1]:.3f}, gap {tr[-1] - te[-1]:.3f}")
        ax.set_xlabel("epochs")
        ax.set_ylim(0, 1.0)
        ax.legend(loc="lower right")
    axes[0].set_ylabel("accuracy")
    fig.tight_layout()
    run.savefig(fig, "weight_decay.png")

    a, b = res["lambda=0.0"], res["lambda=0.1"]
    key = f"mean_gap_last_{LAST}_epochs"
    run.check("decay_smaller_gap",
              "the gap between training and test accuracy is smaller with weight decay "
              "(lambda 0.1) than without (final epoch)",
              b["final_gap"] < a["final_gap"],
              {"gap_without": a["final_gap"], "gap_with": b["final_gap"],
               "train_test_without": [a["final_train_acc"], a["final_test_acc"]],
               "train_test_with": [b["final_train_acc"], b["final_test_acc"]],
               f"gap_without_last_{LAST}": a[key], f"gap_with_last_{LAST}": b[key]})
    run.finish()


if __name__ == "__main__":
    main()
