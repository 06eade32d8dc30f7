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

    _common.gap_report(
        run, {f"lambda={lam}": (f"weight decay lambda = {lam}", *curves[lam])
              for lam in LAMBDAS},
        "weight_decay.png", "decay_smaller_gap",
        "the gap between training and test accuracy is smaller with weight decay "
        "(lambda 0.1) than without (final epoch)", last=LAST)
    run.finish()


if __name__ == "__main__":
    main()
