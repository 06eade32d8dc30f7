"""Dropout against overfitting (the book's section 6.4.3, figure 6-23).

The weight-decay experiment's setting: the first 300 MNIST training images, a
7-layer network (MultiLayerNetExtend 784-[100]x6-10, ReLU, He initialisation),
SGD lr 0.01, mini-batches of 100, here for 301 epochs, with Dropout (ratio 0.2,
after every hidden activation) and without.  Training runs through xpnet's
``Trainer`` as in the book (``overfit_dropout.py``); it measures training accuracy
(the 300 images) and test accuracy (the 10000 test images) after every epoch.
Both networks start from the same weights and see the mini-batches in the same
order.  xpnet's Dropout is the inverted kind (see docs/differences.md).

Check: the gap between training and test accuracy at the end is smaller with
Dropout (both reported, and their mean over the last 20 epochs).

    python examples/ch6_dropout.py --out docs/figures/ch6_dropout
"""

from __future__ import annotations

import _common
import numpy as np
from _common import plt

from xpnet.models import MultiLayerNetExtend
from xpnet.train import Trainer

LAST = 20


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    args = p.parse_args()
    epochs = 8 if args.quick else 301
    n_test = 1000 if args.quick else None
    n_train, batch_size, lr, ratio = 300, 100, 0.01, 0.2
    run = _common.Run(args, "ch6_dropout", "Dropout", book="6.4.3 (figure 6-23)",
                      settings={"network": "MultiLayerNetExtend 784-[100]x6-10, ReLU, He init",
                                "dropout_ratio": ratio, "train_images": n_train,
                                "test_images": n_test or 10000, "epochs": epochs,
                                "batch_size": batch_size, "optimizer": f"SGD lr {lr}",
                                "trainer": "xpnet.train.Trainer (each epoch a fresh "
                                           "permutation of the 300 images)",
                                "same_initial_weights_and_batches": True})
    (x, t), (x_test, t_test) = _common.load_mnist_subset(n_train, n_test, on_device=False)

    curves = {}
    for use_dropout in (False, True):
        run.reseed()
        net = MultiLayerNetExtend(784, [100] * 6, 10, weight_init_std="relu",
                                  use_dropout=use_dropout, dropout_ratio=ratio)
        label = "dropout" if use_dropout else "no dropout"
        trainer = Trainer(net, x, t, x_test, t_test, epochs=epochs, mini_batch_size=batch_size,
                          optimizer="sgd", optimizer_param={"lr": lr}, verbose=False,
                          seed=run.seed, callbacks=[_common.EpochBar(epochs, label)])
        trainer.train()
        curves[use_dropout] = (np.array(trainer.train_acc_list),
                               np.array(trainer.test_acc_list))

    res = {}
    for use_dropout, (tr, te) in curves.items():
        gap = tr - te
        res["dropout" if use_dropout else "no_dropout"] = {
            "final_train_acc": tr[-1], "final_test_acc": te[-1], "final_gap": gap[-1],
            f"mean_gap_last_{LAST}_epochs": float(gap[-LAST:].mean()),
            "train_acc": tr.tolist(), "test_acc": te.tolist()}
    run.results.update(res)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, use_dropout in zip(axes, (False, True), strict=True):
        tr, te = curves[use_dropout]
        ep = np.arange(1, len(tr) + 1)
        ax.plot(ep, tr, marker="o", markevery=max(1, epochs // 20), markersize=3, label="train")
        ax.plot(ep, te, marker="s", markevery=max(1, epochs // 20), markersize=3, label="test")
        what = f"Dropout {ratio}" if use_dropout else "no Dropout"
        ax.set_title(f"{what}: final train {tr[-1]:.3f}, test {te[-1]:.3f}, "
                     f"gap {tr[-1] - te[-1]:.3f}")
        ax.set_xlabel("epochs")
        ax.set_ylim(0, 1.0)
        ax.legend(loc="lower right")
    axes[0].set_ylabel("accuracy")
    fig.tight_layout()
    run.savefig(fig, "dropout.png")

    a, b = res["no_dropout"], res["dropout"]
    key = f"mean_gap_last_{LAST}_epochs"
    run.check("dropout_smaller_gap",
              "the gap between training and test accuracy is smaller with Dropout than "
              "without (final epoch)",
              b["final_gap"] < a["final_gap"],
              {"gap_without": a["final_gap"], "gap_with": b["final_gap"],
               "train_test_without": [a["final_train_acc"], a["final_test_acc"]],
               "train_test_with": [b["final_train_acc"], b["final_test_acc"]],
               f"gap_without_last_{LAST}": a[key], f"gap_with_last_{LAST}": b[key]})
    run.finish()


if __name__ == "__main__":
    main()
