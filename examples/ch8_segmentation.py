"""FCN: per-pixel segmentation of digit canvases (the book's section 8.5.2, figure 8-19).

A fully convolutional network (FCN, Long et al. 2015) labels every pixel of a 64x64
canvas of MNIST digits (``xpnet.datasets.load_digit_canvases``) with one of 11 classes:
background or the digit 0..9 whose ink the pixel is.  As the chapter explains, there is
no Affine layer: the classifier is a convolution (a 1x1 convolution scoring the 11
classes at every position of a feature map; an Affine over a C x H x W input is the same
as a C x H x W convolution, see tests/test_fcn.py), so the net takes a canvas of any size
and scores every position in one forward pass.  The coarse scores are brought back to
the input's size by ``Deconvolution`` layers initialised to bilinear interpolation
(``Deconvolution.upsampling``, up-sampling by 2 each) and trained with the rest.

The net (FCN-8s's skip architecture, carried down to full resolution, as nested
``Parallel(..., merge="add")`` blocks; 3x3 convolutions with ReLU, 2x2 max pooling)::

    64x64  conv 16 ----------------------------------------------- score 1x1 -> + -> scores
    32x32    pool, conv 32 ---------------------------- score 1x1 -> + -> up x2 |
    16x16      pool, conv 64 ------------- score 1x1 -> + -> up x2 |
     8x8         pool, conv 64, conv 128 -> score 1x1 -> up x2 |

The deep 8x8 branch sees 54 pixels around each position (enough for a whole digit) and
says which digit is there; the shallow scores put the class edges on the ink.

Training: per-pixel softmax cross-entropy (``SoftmaxWithLoss`` on (N, 11, 64, 64) scores
and (N, 64, 64) masks) through the Trainer, Adam with a cosine learning rate.  The
settings were chosen on validation canvases (train-split canvases not trained on; the
Trainer's per-epoch "test" accuracy is theirs); the test canvases (MNIST's test digits)
are used once, for the final numbers.

Reported on the test canvases: mean IoU over the 11 classes (IoU of a class = pixels
labelled c and predicted c over pixels labelled c or predicted c, summed over all test
canvases) and pixel accuracy.  Figures: input, true mask and predicted mask for a grid
of test canvases; per-class IoU; the training curves.

Checks: test mean IoU >= 0.80; the bilinear initialisation of the up-sampling equals
``resize_bilinear`` away from the border.  ``--quick`` trains 300 canvases for 1 epoch.

    XPNET_NUM_THREADS=1 python examples/ch8_segmentation.py --out docs/figures/ch8_segmentation
"""

from __future__ import annotations

import time
from typing import Any

import _canvas_common as cc
import _common
import numpy as np
from _common import plt

from xpnet.backend import to_backend, to_cpu, xp
from xpnet.datasets.canvas import resize_bilinear
from xpnet.init import init_weight
from xpnet.layers import (
    Chain,
    Convolution,
    ConvReLU,
    Deconvolution,
    Parallel,
    Pooling,
    SoftmaxWithLoss,
)
from xpnet.models import Network
from xpnet.train import Trainer

TARGET = 0.80
NUM_CLASSES = 11


# --------------------------------------------------------------------- the network
def conv(c_in: int, c_out: int, k: int = 3, relu: bool = True) -> Convolution:
    """A k x k convolution, 'same' padding, He initialisation."""
    W = init_weight((c_out, c_in, k, k), "he")
    b = xp.zeros(c_out, dtype=W.dtype)
    return (ConvReLU if relu else Convolution)(W, b, stride=1, pad=k // 2)


def score(c_in: int) -> Convolution:
    """The classifier: a 1x1 convolution giving the 11 class scores at every position."""
    return conv(c_in, NUM_CLASSES, k=1, relu=False)


def up2() -> Deconvolution:
    """Up-sampling by 2, initialised to bilinear interpolation (trained afterwards)."""
    return Deconvolution.upsampling(NUM_CLASSES, 2)


def build_fcn(widths: tuple[int, int, int, int, int]) -> Network:
    """The FCN of the module docstring with the given convolution widths."""
    w1, w2, w3, w4, w5 = widths
    s8 = Chain(Pooling(2, 2, 2), conv(w3, w4), conv(w4, w5), score(w5), up2())
    s16 = Chain(Pooling(2, 2, 2), conv(w2, w3), Parallel(score(w3), s8, merge="add"), up2())
    s32 = Chain(Pooling(2, 2, 2), conv(w1, w2), Parallel(score(w2), s16, merge="add"), up2())
    layers = Chain(conv(1, w1), Parallel(score(w1), s32, merge="add"))
    return Network(layers, loss_layer=SoftmaxWithLoss(), input_shape=(1, 64, 64),
                   config={"widths": list(widths)})


# --------------------------------------------------------------------- evaluation
def predict_masks(net: Network, images: np.ndarray, batch: int = 100) -> np.ndarray:
    """The predicted class of every pixel, (N, H, W) uint8 on the host."""
    out = []
    for s in range(0, len(images), batch):
        y = net.predict(to_backend(images[s:s + batch]), train_flg=False)
        out.append(to_cpu(y.argmax(axis=1)).astype(np.uint8))
    return np.concatenate(out)


def confusion(true: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """(11, 11) pixel counts: row = true class, column = predicted class."""
    idx = true.astype(np.int64).ravel() * NUM_CLASSES + pred.astype(np.int64).ravel()
    return np.bincount(idx, minlength=NUM_CLASSES ** 2).reshape(NUM_CLASSES, NUM_CLASSES)


def scores_of(cm: np.ndarray) -> dict[str, Any]:
    """Per-class IoU, mean IoU over the 11 classes, pixel accuracy of a confusion matrix."""
    tp = np.diag(cm).astype(np.float64)
    union = cm.sum(axis=0) + cm.sum(axis=1) - tp
    iou = tp / np.maximum(union, 1)
    return {"mean_iou": float(iou.mean()), "pixel_acc": float(tp.sum() / cm.sum()),
            "iou": {name: float(v) for name, v in zip(cc.CLASS_NAMES, iou, strict=True)},
            "digit_pixel_acc": float(tp[1:].sum() / cm[1:].sum())}


def evaluate(net: Network, data: dict) -> dict[str, Any]:
    pred = predict_masks(net, data["images"])
    return {**scores_of(confusion(data["masks"], pred)), "canvases": len(pred)}, pred


class ValIoU:
    """A Trainer callback: mean IoU and pixel accuracy on the validation canvases per epoch."""

    def __init__(self, data: dict) -> None:
        self.data, self.mean_iou, self.pixel_acc = data, [], []

    def __call__(self, trainer: Any, event: str, info: dict[str, Any]) -> None:
        if event == "epoch_end":
            res, _ = evaluate(trainer.network, self.data)
            self.mean_iou.append(res["mean_iou"])
            self.pixel_acc.append(res["pixel_acc"])
            print(f"  epoch {info['epoch']}: validation mean IoU {res['mean_iou']:.4f}, "
                  f"pixel accuracy {res['pixel_acc']:.4f}", flush=True)


def bilinear_check() -> dict[str, float]:
    """How far ``Deconvolution.upsampling(c, 2)`` is from ``resize_bilinear`` (x2).

    Both put pixel centres at half-integers, so they agree exactly but at the border,
    where the transposed convolution sees zeros beyond the edge and the resize repeats it.
    """
    rng = np.random.default_rng(0)
    coarse = rng.random((2, NUM_CLASSES, 8, 8)).astype(np.float32)
    layer = Deconvolution.upsampling(NUM_CLASSES, 2)
    up = to_cpu(layer.forward(to_backend(coarse), train=False))
    ref = resize_bilinear(coarse, 16, 16)
    inner = np.abs(up - ref)[..., 1:-1, 1:-1]
    return {"max_abs_diff_interior": float(inner.max()),
            "max_abs_diff_border": float(np.abs(up - ref).max()),
            "output_shape": list(up.shape)}


# --------------------------------------------------------------------- figures
def mask_grid(run: _common.Run, data: dict, pred: np.ndarray, res: dict, n: int) -> None:
    """Input, true mask, predicted mask for the first ``n`` test canvases (2 per row)."""
    rows = -(-n // 2)
    fig, axes = plt.subplots(rows, 6, figsize=(12, 2.3 * rows + 0.6))
    axes = np.atleast_2d(axes)
    cmap = cc.mask_cmap()
    for k in range(rows * 2):
        trio = axes[k // 2, 3 * (k % 2):3 * (k % 2) + 3]
        for ax in trio:
            cc.bare(ax)
        if k >= n:
            for ax in trio:
                ax.axis("off")
            continue
        true, guess = data["masks"][k], pred[k]
        trio[0].imshow(data["images"][k, 0], cmap="gray", vmin=0, vmax=1)
        trio[1].imshow(true, cmap=cmap, vmin=0, vmax=10, interpolation="nearest")
        trio[2].imshow(guess, cmap=cmap, vmin=0, vmax=10, interpolation="nearest")
        wrong = (true != guess).mean()
        trio[0].set_title(f"#{k}: {data['captions'][k]}", fontsize=8)
        trio[1].set_title("true mask", fontsize=8)
        trio[2].set_title(f"predicted ({100 * wrong:.1f} % wrong)", fontsize=8)
    colours = cc.class_colours()
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[c]) for c in range(NUM_CLASSES)]
    fig.legend(handles, ["background", *(str(d) for d in range(10))], loc="lower center",
               ncol=11, fontsize=8, frameon=False)
    fig.suptitle(f"FCN on test canvases: mean IoU {res['mean_iou']:.3f}, pixel accuracy "
                 f"{res['pixel_acc']:.4f} over {res['canvases']} canvases")
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    run.savefig(fig, "segmentation.png")


def iou_bars(run: _common.Run, test: dict, val: dict) -> None:
    fig, ax = plt.subplots(figsize=(8, 3.4))
    x = np.arange(NUM_CLASSES)
    ax.bar(x - 0.2, list(val["iou"].values()), 0.4, label=f"validation ({val['canvases']})")
    ax.bar(x + 0.2, list(test["iou"].values()), 0.4, label=f"test ({test['canvases']})")
    ax.axhline(TARGET, color="0.4", linestyle="--", linewidth=0.8)
    ax.set_xticks(x, ["background", *(str(d) for d in range(10))])
    ax.set_ylabel("IoU")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"IoU per class; mean: validation {val['mean_iou']:.3f}, "
                 f"test {test['mean_iou']:.3f} (dashed: the target of the mean)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    run.savefig(fig, "iou_per_class.png")


def curves(run: _common.Run, trainer: Trainer, val: ValIoU) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    loss = np.asarray(trainer.train_loss_list)
    axes[0].plot(loss, color="0.75", linewidth=0.5, label="per step")
    axes[0].plot(_common.smooth(loss, 51), label="smoothed")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("iterations")
    axes[0].set_ylabel("per-pixel training loss")
    axes[0].legend()
    ep = np.arange(1, len(val.mean_iou) + 1)
    axes[1].plot(ep, val.mean_iou, "o-", label="mean IoU")
    axes[1].plot(ep, val.pixel_acc, "s-", label="pixel accuracy")
    axes[1].set_xlabel("epochs")
    axes[1].set_title("on the validation canvases")
    axes[1].set_ylim(0, 1.02)
    axes[1].legend(loc="lower right")
    fig.tight_layout()
    run.savefig(fig, "training_curves.png")


# --------------------------------------------------------------------- main
def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=None, help="epochs (default 12; quick: 1)")
    p.add_argument("--train-canvases", type=int, default=None,
                   help="training canvases (default 10000; quick: 300)")
    p.add_argument("--widths", default="16,32,64,64,128",
                   help="the five convolutions' filter counts (default 16,32,64,64,128)")
    p.add_argument("--lr", type=float, default=0.002, help="Adam's initial lr (cosine decay)")
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args()
    quick = args.quick
    epochs = args.epochs or (1 if quick else 12)
    n_train = args.train_canvases or (300 if quick else 10000)
    n_val, n_test = (50, 50) if quick else (1000, 2000)
    widths = tuple(int(w) for w in args.widths.split(","))
    if len(widths) != 5:
        p.error("--widths takes five numbers")
    run = _common.Run(args, "ch8_segmentation", "FCN segmentation of digit canvases",
                      book="8.5.2 (figure 8-19)",
                      settings={"network": f"FCN, conv widths {list(widths)}, 1x1 conv "
                                           "classifiers, skips at 1/1, 1/2, 1/4, 1/8, "
                                           "Deconvolution x2 up-sampling (bilinear init)",
                                "canvas": "64x64, 1-4 digits, scale 20-36 px",
                                "train_canvases": n_train, "val_canvases": n_val,
                                "test_canvases": n_test, "epochs": epochs,
                                "batch_size": args.batch_size,
                                "optimizer": f"Adam lr {args.lr}, cosine decay",
                                "classes": NUM_CLASSES})
    data = cc.canvas_splits(n_train, n_val, n_test, run.seed)
    train, val, test = data["train"], data["val"], data["test"]

    net = build_fcn(widths)
    run.results["num_params"] = net.num_params
    val_cb = ValIoU(val)
    # The Trainer's "test" data are the validation canvases; the test canvases are
    # read once, after training.
    trainer = Trainer(net, train["images"], train["masks"], val["images"], val["masks"],
                      epochs=epochs, mini_batch_size=args.batch_size, optimizer="adam",
                      optimizer_param={"lr": args.lr}, lr_schedule="cosine",
                      evaluate_sample_num_per_epoch=min(100, n_val), seed=run.seed,
                      callbacks=[val_cb])
    t0 = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - t0
    net.save_params(run.out / "fcn_params.npz")

    val_res, _ = evaluate(net, val)
    t0 = time.perf_counter()
    test_res, pred = evaluate(net, test)
    predict_seconds = time.perf_counter() - t0

    # Fully convolutional: two test canvases side by side are labelled in one pass.
    wide = np.concatenate([test["images"][0], test["images"][1]], axis=-1)[None]
    wide_pred = predict_masks(net, wide)[0]
    wide_true = np.concatenate([test["masks"][0], test["masks"][1]], axis=-1)
    bil = bilinear_check()

    run.results.update(test=test_res, val=val_res, train_seconds=train_seconds,
                       predict_seconds_test=predict_seconds,
                       val_mean_iou_per_epoch=val_cb.mean_iou,
                       val_pixel_acc_per_epoch=val_cb.pixel_acc,
                       train_loss_last_epoch=_common.tail_mean(trainer.train_loss_list,
                                                               trainer.iter_per_epoch),
                       any_size={"input_shape": list(wide.shape),
                                 "output_shape": [1, NUM_CLASSES, *wide_pred.shape],
                                 "pixel_acc": float((wide_pred == wide_true).mean())},
                       bilinear_upsampling=bil, params_file="fcn_params.npz")
    print(f"  test: mean IoU {test_res['mean_iou']:.4f}, pixel accuracy "
          f"{test_res['pixel_acc']:.4f} ({n_test} canvases)", flush=True)

    mask_grid(run, test, pred, test_res, n=8 if not quick else 4)
    iou_bars(run, test_res, val_res)
    curves(run, trainer, val_cb)

    short = quick or epochs != 12 or n_train != 10000
    run.check("mean_iou",
              f"the FCN reaches a mean IoU over the 11 classes of at least {TARGET} on test "
              "canvases (the issue's target)",
              test_res["mean_iou"] >= TARGET,
              {"test_mean_iou": test_res["mean_iou"], "test_pixel_acc": test_res["pixel_acc"],
               "val_mean_iou": val_res["mean_iou"], "test_canvases": n_test,
               "epochs": epochs, "train_seconds": train_seconds},
              note="a shortened run (--quick / --epochs / --train-canvases)" if short else None)
    run.check("bilinear_init",
              "a Deconvolution initialised by Deconvolution.upsampling(c, 2) interpolates "
              "bilinearly: equal to resize_bilinear x2 away from the border (within 1e-6)",
              bil["max_abs_diff_interior"] <= 1e-6,
              {"max_abs_diff_interior": bil["max_abs_diff_interior"],
               "max_abs_diff_border": bil["max_abs_diff_border"]})
    run.finish()


if __name__ == "__main__":
    main()
