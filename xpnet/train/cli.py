"""The command line: ``python train.py``, ``python -m xpnet.train`` or ``xpnet-train``.

With no arguments it trains the README's main job: SimpleConvNet on the bundled
MNIST with Adam (lr 0.001) for 2 epochs, then prints the test accuracy over the whole
test set as ``test accuracy: 98.87%``.  ``DL_BACKEND`` (or ``--backend``) picks
NumPy or CuPy.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

import xpnet
from xpnet import backend
from xpnet.datasets import DatasetCorruptError, DatasetNotFoundError, load_fashion_mnist, load_mnist
from xpnet.models import MODELS, build_model
from xpnet.optim import OPTIMIZERS
from xpnet.train.checkpoint import CheckpointError
from xpnet.train.trainer import NonFiniteLossError, Trainer

__all__ = ["main", "build_parser", "DEFAULT_EPOCHS"]

DEFAULT_MODEL = "simple-convnet"
DEFAULT_EPOCHS = 2
DEFAULT_BATCH = 100
#: per-epoch accuracies are measured on this many samples (the final one on all)
EVAL_SAMPLES = 2000

_MLP_HIDDEN = [100, 100, 100]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _float(text: str, positive: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
    if positive and value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    if not positive and value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    return _float(text, positive=True)


def _nonneg_float(text: str) -> float:
    return _float(text, positive=False)


def build_parser() -> argparse.ArgumentParser:
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "train.py"
    if prog in ("__main__.py", "-c", ""):
        prog = "python -m xpnet.train"
    p = argparse.ArgumentParser(
        prog=prog,
        description="Train a network from 'Deep Learning from Scratch' on MNIST or "
                    "Fashion-MNIST, on NumPy (CPU) or CuPy (GPU; DL_BACKEND=cupy). With no "
                    f"arguments: {DEFAULT_MODEL}, Adam lr 0.001, {DEFAULT_EPOCHS} epochs on "
                    "MNIST.",
    )
    p.add_argument("--model", choices=list(MODELS), default=DEFAULT_MODEL,
                   help=f"network (default: {DEFAULT_MODEL})")
    p.add_argument("--dataset", choices=["mnist", "fashion-mnist"], default="mnist",
                   help="data set (default: mnist, bundled)")
    p.add_argument("--epochs", type=_positive_int, default=DEFAULT_EPOCHS,
                   help=f"passes over the training data (default: {DEFAULT_EPOCHS})")
    p.add_argument("--batch-size", type=_positive_int, default=DEFAULT_BATCH,
                   help=f"mini-batch size (default: {DEFAULT_BATCH})")
    p.add_argument("--optimizer", choices=list(OPTIMIZERS), default="adam",
                   type=str.lower, help="optimizer (default: adam)")
    p.add_argument("--lr", type=_positive_float, default=None,
                   help="learning rate (default: the optimizer's, 0.001 for adam/adamw, "
                        "0.01 for the others)")
    p.add_argument("--weight-decay", type=_nonneg_float, default=None,
                   help="adamw: decoupled weight decay (default 0.01); mlp/mlp-extend with "
                        "another optimizer: L2 weight decay lambda in the loss")
    p.add_argument("--seed", type=_nonneg_int, default=0,
                   help="seed of the initial weights, dropout and shuffling (default: 0)")
    p.add_argument("--checkpoint-dir", metavar="DIR", default=None,
                   help="write a checkpoint there after every epoch")
    p.add_argument("--checkpoint-every", metavar="STEPS", type=_positive_int, default=None,
                   help="also write a checkpoint every STEPS steps (needs --checkpoint-dir)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in --checkpoint-dir")
    p.add_argument("--plot", metavar="FILE.png", default=None,
                   help="save loss and accuracy curves (needs matplotlib: xpnet[plot])")
    p.add_argument("--data-dir", metavar="DIR", default=None,
                   help="directory holding the four data set files")
    p.add_argument("--limit-train", metavar="N", type=_positive_int, default=None,
                   help="train on the first N training images only (quick runs)")
    p.add_argument("--backend", choices=list(backend.BACKENDS), default=None,
                   help="array backend; overrides DL_BACKEND (default: DL_BACKEND or numpy)")
    p.add_argument("--quiet", action="store_true",
                   help="print only the final test accuracy")
    p.add_argument("--cuda-graph", action="store_true",
                   help="on the GPU, record the train step as a CUDA graph and replay it "
                        "(faster; ignored on the CPU)")
    return p


def _model_kwargs(args: argparse.Namespace, parser: argparse.ArgumentParser,
                  ) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if args.model in ("mlp", "mlp-extend"):
        kwargs = {"input_size": 784, "hidden_size_list": list(_MLP_HIDDEN), "output_size": 10}
        if args.model == "mlp-extend":
            kwargs["use_batchnorm"] = True
    elif args.model == "simple-convnet":
        kwargs = {"weight_init_std": "relu"}  # He init: converges faster than the book's 0.01
    if args.weight_decay is not None and args.optimizer != "adamw":
        if args.model not in ("mlp", "mlp-extend"):
            parser.error(f"--weight-decay with --optimizer {args.optimizer} needs --model mlp "
                         "or mlp-extend (L2 weight decay in the loss); or use --optimizer adamw")
        kwargs["weight_decay_lambda"] = args.weight_decay
    return kwargs


def _optimizer_param(args: argparse.Namespace) -> dict[str, Any]:
    param: dict[str, Any] = {}
    if args.lr is not None:
        param["lr"] = args.lr
    if args.optimizer == "adamw" and args.weight_decay is not None:
        param["weight_decay"] = args.weight_decay
    return param


def _plot(path: str, trainer: Trainer) -> None:
    import matplotlib  # noqa: PLC0415 - optional dependency

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    losses = np.asarray(trainer.train_loss_list, dtype=np.float64)
    steps = np.arange(1, len(losses) + 1)
    ax_loss.plot(steps, losses, lw=0.6, alpha=0.4, label="loss per step")
    window = max(1, min(len(losses) // 20, trainer.iter_per_epoch))
    if len(losses) >= window > 1:
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax_loss.plot(steps[window - 1:], smooth, lw=1.5, label=f"mean of {window} steps")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss")
    ax_loss.set_yscale("log" if len(losses) and losses.min() > 0 else "linear")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    hist = trainer.history
    epochs = hist["epoch"]
    ax_acc.plot(epochs, hist["train_acc"], "o-", label="train")
    ax_acc.plot(epochs, hist["test_acc"], "s-", label="test")
    if hist.get("val_acc"):
        ax_acc.plot(epochs, hist["val_acc"], "^-", label="validation")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy")
    ax_acc.grid(alpha=0.3)
    ax_acc.legend()
    final = trainer.final_test_acc
    fig.suptitle(f"{type(trainer.network).__name__}"
                 + (f" - final test accuracy {100 * final:.2f}%" if final is not None else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (argparse errors exit with 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume and args.checkpoint_dir is None:
        parser.error("--resume needs --checkpoint-dir")
    if args.checkpoint_every is not None and args.checkpoint_dir is None:
        parser.error("--checkpoint-every needs --checkpoint-dir")
    if args.plot is not None:
        if importlib.util.find_spec("matplotlib") is None:
            parser.error("--plot needs matplotlib, which is not installed; install it with: "
                         "pip install 'xpnet[plot]'")
        directory = os.path.dirname(os.path.abspath(args.plot))
        if not os.path.isdir(directory):
            parser.error(f"--plot: directory {directory} does not exist")
    model_kwargs = _model_kwargs(args, parser)
    try:
        if args.backend is not None:
            backend.set_backend(args.backend)
        backend_name = backend.get_backend_name()
        device = backend.device_name()
    except backend.BackendError as exc:
        parser.error(str(exc))

    def say(text: str) -> None:
        if not args.quiet:
            print(text, flush=True)

    say(f"xpnet {xpnet.__version__} | backend: {backend_name} | device: {device}")
    loader = load_mnist if args.dataset == "mnist" else load_fashion_mnist
    flatten = args.model in ("mlp", "mlp-extend")
    try:
        (x_train, t_train), (x_test, t_test) = loader(normalize=True, flatten=flatten,
                                                      data_dir=args.data_dir)
    except (DatasetNotFoundError, DatasetCorruptError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.limit_train is not None:
        x_train, t_train = x_train[:args.limit_train], t_train[:args.limit_train]

    backend.seed(args.seed)
    network = build_model(args.model, **model_kwargs)
    try:
        trainer = Trainer(network, x_train, t_train, x_test, t_test, epochs=args.epochs,
                          mini_batch_size=args.batch_size, optimizer=args.optimizer,
                          optimizer_param=_optimizer_param(args),
                          evaluate_sample_num_per_epoch=EVAL_SAMPLES, verbose=not args.quiet,
                          checkpoint_dir=args.checkpoint_dir,
                          checkpoint_every_steps=args.checkpoint_every, seed=args.seed,
                          cuda_graph=args.cuda_graph)
    except ValueError as exc:
        parser.error(str(exc))
    n_params = sum(int(p.size) for p in network.params.values())
    say(f"model: {args.model} ({n_params:,} parameters, {np.dtype(network.dtype).name}) | "
        f"data: {args.dataset}, {len(x_train)} train / {len(x_test)} test images")
    say(f"optimizer: {trainer.optimizer!r} | {args.epochs} epoch(s) of "
        f"{trainer.iter_per_epoch} steps, batch {args.batch_size}, seed {args.seed} | "
        f"per-epoch accuracies on the first {EVAL_SAMPLES} images, the final one on all "
        f"{len(x_test)}")
    t0 = time.perf_counter()
    try:
        trainer.train(resume=args.resume)
    except NonFiniteLossError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (CheckpointError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        where = f"; continue with --resume --checkpoint-dir {args.checkpoint_dir}" \
            if args.checkpoint_dir else ""
        print(f"\ninterrupted{where}", file=sys.stderr)
        return 130
    elapsed = time.perf_counter() - t0
    if args.quiet:
        print(f"test accuracy: {100 * trainer.final_test_acc:.2f}%")
    else:
        say(f"training time: {elapsed:.1f} s")
    if args.plot is not None:
        _plot(args.plot, trainer)
        say(f"saved the curves to {args.plot}")
    return 0
