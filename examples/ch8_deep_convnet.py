"""DeepConvNet on MNIST (the book's section 8.1, figures 8-1, 8-2 and 8.3.4).

The book's deep network: six 3x3 convolutions (16, 16, 32, 32, 64, 64 filters), ReLU,
max pooling after every second one, affine(50) - ReLU - Dropout 0.5 - affine(10) -
Dropout 0.5, He initialisation.  Trained with the book's settings: the full
60000/10000 MNIST, 20 epochs, mini-batches of 100, Adam lr 0.001, through xpnet's
Trainer (accuracy on 1000 samples after each epoch; the final test accuracy over
the whole test set).

Figures: the training curves; the first 20 misclassified test digits (4x5, label and
prediction).  Then half precision (the book's 8.3.4): a float16 copy of the trained
network (``DeepConvNet(dtype='float16')`` + ``load_state_dict`` of the cast
parameters) classifies float16 test images, on every backend available (NumPy
always, CuPy with a GPU), next to the float32 network on the same images.  The
trained parameters are saved to ``--out``/deep_convnet_params.npz.

Check: final test accuracy >= 99.35 %; float16 accuracy within 0.1 point of float32.
``--epochs`` shortens a run; ``--quick`` uses 300 training and 200 test images and
1 epoch; ``--fp16-samples`` limits the float16 comparison and ``--fp16-backends``
picks its backends (NumPy has no fast float16 kernels: about 0.1 s per image on one
CPU core, some 18 minutes for the whole test set).

    python examples/ch8_deep_convnet.py --out docs/figures/ch8_deep_convnet
"""

from __future__ import annotations

import time

import _common
import numpy as np
from _common import plt

from xpnet.backend import is_gpu_available, to_backend, to_cpu, use_backend
from xpnet.models import DeepConvNet
from xpnet.train import Trainer

TARGET = 0.9935


def predict_labels(net, x: np.ndarray, batch: int, desc: str) -> tuple[np.ndarray, str]:
    """Predicted labels of host images ``x`` (moved and cast batch by batch)."""
    out, dtype = [], None
    for start in _common.progress(range(0, len(x), batch), desc=desc):
        xb = to_backend(x[start:start + batch].astype(net.dtype), net.backend_name)
        y = net.predict(xb, train_flg=False)
        dtype = str(y.dtype)
        out.append(to_cpu(y.argmax(axis=1)))
    return np.concatenate(out), dtype


def half_precision(state: dict, x: np.ndarray, t: np.ndarray, backend: str,
                   batch: int) -> dict:
    """float32 and float16 accuracy of the trained parameters on ``backend``."""
    res = {}
    with use_backend(backend):
        preds = {}
        for dtype in ("float32", "float16"):
            net = DeepConvNet(dtype=dtype)
            net.load_state_dict({s: {k: v.astype(dtype) for k, v in d.items()}
                                 for s, d in state.items()})
            t0 = time.perf_counter()
            preds[dtype], out_dtype = predict_labels(net, x, batch, f"{backend} {dtype}")
            res[dtype] = {"accuracy": float(np.mean(preds[dtype] == t)),
                          "param_dtype": str(net.dtype), "output_dtype": out_dtype,
                          "seconds": time.perf_counter() - t0}
        res["agreement"] = float(np.mean(preds["float16"] == preds["float32"]))
        res["samples"] = int(len(x))
    return res


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=None, help="epochs (book: 20; quick: 1)")
    p.add_argument("--fp16-samples", type=int, default=None,
                   help="test images for the float16 comparison (default: all; quick: 10)")
    p.add_argument("--fp16-backends", default=None,
                   help="comma-separated backends for the float16 comparison (default: "
                        "numpy, and cupy when a GPU is usable)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="on the GPU, replay the train step as a CUDA graph (Trainer's "
                        "cuda_graph)")
    args = p.parse_args()
    epochs = args.epochs or (1 if args.quick else 20)
    n_train, n_test = (300, 200) if args.quick else (None, None)
    batch_size, lr = 100, 0.001
    run = _common.Run(args, "ch8_deep_convnet", "DeepConvNet on MNIST",
                      book="8.1, 8.3.4 (figures 8-1, 8-2)",
                      settings={"network": "DeepConvNet (book's configuration, He init)",
                                "train_images": n_train or 60000,
                                "test_images": n_test or 10000, "epochs": epochs,
                                "batch_size": batch_size, "optimizer": f"Adam lr {lr}",
                                "evaluate_sample_num_per_epoch": 1000,
                                "final_accuracy": "whole test set",
                                "cuda_graph": bool(args.cuda_graph)})
    (x_train, t_train), (x_test, t_test) = _common.load_mnist_subset(
        n_train, n_test, flatten=False, on_device=False)
    fp16_n = min(len(x_test), args.fp16_samples or (10 if args.quick else len(x_test)))
    run.settings["fp16_samples"] = fp16_n

    net = DeepConvNet()
    trainer = Trainer(net, x_train, t_train, x_test, t_test, epochs=epochs,
                      mini_batch_size=batch_size, optimizer="adam",
                      optimizer_param={"lr": lr}, evaluate_sample_num_per_epoch=1000,
                      seed=run.seed, cuda_graph=args.cuda_graph)
    t0 = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - t0
    net.save_params(run.out / "deep_convnet_params.npz")
    acc = _common.training_report(run, trainer, train_seconds, "deep_convnet_params.npz",
                                  len(x_test))

    # ---- the first 20 misclassified test digits
    pred, _ = predict_labels(net, x_test, 500, "misclassified")
    wrong = np.flatnonzero(pred != t_test)
    run.results.update(misclassified=int(wrong.size),
                       first_misclassified=[{"index": int(i), "label": int(t_test[i]),
                                             "prediction": int(pred[i])} for i in wrong[:20]])
    fig, axes = plt.subplots(4, 5, figsize=(8, 7.4))
    for k, ax in enumerate(axes.ravel()):
        ax.set_xticks([])
        ax.set_yticks([])
        ax.grid(False)
        if k >= wrong.size:
            ax.axis("off")
            continue
        i = wrong[k]
        ax.imshow(x_test[i, 0], cmap="gray_r", interpolation="nearest")
        ax.set_title(f"#{i}: label {t_test[i]}, pred {pred[i]}", fontsize=8)
    fig.suptitle(f"the first {min(20, wrong.size)} of {wrong.size} misclassified test "
                 f"digits ({len(x_test)})")
    fig.tight_layout()
    run.savefig(fig, "misclassified.png")

    # ---- half precision
    state = {s: {k: to_cpu(v) for k, v in d.items()} for s, d in net.state_dict().items()}
    if args.fp16_backends:
        backends = [b.strip().lower() for b in args.fp16_backends.split(",") if b.strip()]
    else:
        backends = ["numpy"] + (["cupy"] if is_gpu_available() else [])
    half = {b: half_precision(state, x_test[:fp16_n], t_test[:fp16_n], b, 100)
            for b in backends}
    run.results["half_precision"] = half
    if "cupy" not in backends:
        run.notes.append("the float16 comparison ran on NumPy only (no GPU here, or "
                         "--fp16-backends said so)")

    run.check("test_accuracy",
              f"DeepConvNet reaches a test accuracy of at least {100 * TARGET:.2f} % "
              "(the book: 99.38 %)",
              acc >= TARGET,
              {"final_test_acc": acc, "epochs": epochs, "train_seconds": train_seconds},
              note="a shortened run (--quick / --epochs) is not the book's setting"
              if epochs != 20 or args.quick else None)
    numbers = {}
    for b, r in half.items():
        numbers.update({f"{b}_float32_acc": r["float32"]["accuracy"],
                        f"{b}_float16_acc": r["float16"]["accuracy"],
                        f"{b}_float16_output_dtype": r["float16"]["output_dtype"],
                        f"{b}_agreement": r["agreement"]})
    numbers["samples"] = fp16_n
    run.check("float16_inference",
              "inference in float16 (parameters and data) loses no accuracy: within 0.1 "
              "point of float32 on the same images, on every backend tried",
              all(abs(r["float16"]["accuracy"] - r["float32"]["accuracy"]) <= 0.001
                  and r["float16"]["output_dtype"] == "float16" for r in half.values()),
              numbers)
    run.finish()


if __name__ == "__main__":
    main()
