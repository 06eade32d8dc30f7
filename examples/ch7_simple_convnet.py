"""SimpleConvNet on MNIST (the book's section 7.5 and 7.6.1, figures 7-23 and 7-24).

conv(30 filters 5x5) - ReLU - max pool 2x2 - affine(100) - ReLU - affine(10), trained
with the book's settings: the full 60000/10000 MNIST, 20 epochs, mini-batches of 100,
Adam lr 0.001, weight_init_std 0.01, through xpnet's Trainer (accuracy on 1000
samples after each epoch, as the book's ``evaluate_sample_num_per_epoch=1000``; the
final test accuracy over the whole test set).

Figures: the training curves; the 30 first-layer filters before and after training;
those filters applied to an MNIST test digit (the book uses a photo we do not ship;
bias left out, so the maps show the filters alone).  The trained parameters are
saved to ``--out``/simple_convnet_params.npz (``save_params``).

Check: final test accuracy >= 98.9 %.  ``--epochs`` shortens a run; ``--quick`` uses
1000 training and 500 test images and 1 epoch.

    python examples/ch7_simple_convnet.py --out docs/figures/ch7_simple_convnet
"""

from __future__ import annotations

import time

import _common
import numpy as np
from _common import plt

from xpnet.backend import to_backend, to_cpu, xp
from xpnet.layers import Convolution
from xpnet.models import SimpleConvNet
from xpnet.train import Trainer

TARGET = 0.989


def show_mosaic(ax, tiles: np.ndarray) -> None:
    cmap = plt.get_cmap("gray_r").with_extremes(bad="white")
    ax.imshow(tiles, cmap=cmap, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)


def filter_grid(run, W: np.ndarray, filename: str, title: str) -> None:
    """The filters, 3 rows of 10, each scaled to its own range (black = high)."""
    fig, ax = plt.subplots(figsize=(10, 3.4))
    show_mosaic(ax, _common.mosaic(W[:, 0], cols=10))
    ax.set_title(title)
    run.savefig(fig, filename)


def filter_responses(run, W: np.ndarray, digit: np.ndarray, label: int, filename: str,
                     title: str) -> dict[str, float]:
    """The digit, and its 30 maps through the filters (same order as filter_grid)."""
    conv = Convolution(to_backend(W), xp.zeros(W.shape[0], dtype=W.dtype))
    maps = to_cpu(conv.forward(to_backend(digit[None].astype(W.dtype)), False))[0]
    fig, (a0, a1) = plt.subplots(1, 2, figsize=(12, 3.6), width_ratios=[1, 5])
    show_mosaic(a0, digit[0])
    a0.set_title(f"input (label {label})")
    show_mosaic(a1, _common.mosaic(maps, cols=10, pad=2))
    a1.set_title(title)
    run.savefig(fig, filename)
    return {"response_std_mean": float(maps.std(axis=(1, 2)).mean())}


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=None, help="epochs (book: 20; quick: 1)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="on the GPU, replay the train step as a CUDA graph (Trainer's "
                        "cuda_graph)")
    args = p.parse_args()
    epochs = args.epochs or (1 if args.quick else 20)
    n_train, n_test = (1000, 500) if args.quick else (None, None)
    batch_size, lr = 100, 0.001
    run = _common.Run(args, "ch7_simple_convnet", "SimpleConvNet on MNIST",
                      book="7.5, 7.6.1 (figures 7-23, 7-24)",
                      settings={"network": "SimpleConvNet conv30x5x5-relu-pool2-affine100-"
                                           "relu-affine10, weight_init_std 0.01",
                                "train_images": n_train or 60000,
                                "test_images": n_test or 10000, "epochs": epochs,
                                "batch_size": batch_size, "optimizer": f"Adam lr {lr}",
                                "evaluate_sample_num_per_epoch": 1000,
                                "final_accuracy": "whole test set",
                                "cuda_graph": bool(args.cuda_graph)})
    (x_train, t_train), (x_test, t_test) = _common.load_mnist_subset(
        n_train, n_test, flatten=False, on_device=False)

    net = SimpleConvNet(input_dim=(1, 28, 28),
                        conv_param={"filter_num": 30, "filter_size": 5, "pad": 0, "stride": 1},
                        hidden_size=100, output_size=10, weight_init_std=0.01)
    w_before = to_cpu(net.params["W1"]).copy()
    trainer = Trainer(net, x_train, t_train, x_test, t_test, epochs=epochs,
                      mini_batch_size=batch_size, optimizer="adam",
                      optimizer_param={"lr": lr}, evaluate_sample_num_per_epoch=1000,
                      seed=run.seed, cuda_graph=args.cuda_graph)
    t0 = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - t0
    net.save_params(run.out / "simple_convnet_params.npz")
    w_after = to_cpu(net.params["W1"]).copy()

    acc = _common.training_report(run, trainer, train_seconds, "simple_convnet_params.npz",
                                  n_test or 10000)

    filter_grid(run, w_before, "filters_before.png", "conv1 filters before training (std 0.01)")
    filter_grid(run, w_after, "filters_after.png",
                f"conv1 filters after {epochs} epoch(s)")
    digit, label = x_test[0], int(t_test[0])
    r0 = filter_responses(run, w_before, digit, label, "filter_responses_before.png",
                          "the untrained filters applied to a test digit")
    r1 = filter_responses(run, w_after, digit, label, "filter_responses_after.png",
                          "the trained filters applied to a test digit")
    run.results.update(filter_responses_before=r0, filter_responses_after=r1,
                       filter_std_before=float(w_before.std()),
                       filter_std_after=float(w_after.std()))

    run.check("test_accuracy",
              f"SimpleConvNet reaches a test accuracy of at least {100 * TARGET:.1f} % "
              "(the book: 98.9 %)",
              acc >= TARGET,
              {"final_test_acc": acc, "epochs": epochs, "train_seconds": train_seconds},
              note="a shortened run (--quick / --epochs) is not the book's setting"
              if epochs != 20 or args.quick else None)
    run.finish()


if __name__ == "__main__":
    main()
