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

    _common.gap_report(
        run, {"no_dropout": ("no Dropout", *curves[False]),
              "dropout": (f"Dropout {ratio}", *curves[True])},
        "dropout.png", "dropout_smaller_gap",
        "the gap between training and test accuracy is smaller with Dropout than "
        "without (final epoch)", last=LAST)
    run.finish()


if __name__ == "__main__":
    main()
