"""The command line: ``python train.py``, ``python -m xpnet.train`` or ``xpnet-train``.

With no arguments it trains the README's main job: SimpleConvNet on the bundled
MNIST with Adam (lr 0.001) for 2 epochs, then prints the test accuracy over the whole
test set as ``test accuracy: 98.87%``.  ``DL_BACKEND`` (or ``--backend``) picks
NumPy or CuPy.

Everything that can be checked before training is checked first (``--plot``,
``--data-dir``, ``--checkpoint-dir``, ``--resume``), and each failure is one line
``<prog>: error: ...`` on stderr and exit status 2, without a traceback; failures
during training (data, checkpoints, a non-finite loss) are one line ``error: ...``
and exit status 1.  Messages speak the command line's words (``--resume``, not
``resume=True``).  ``--lr`` with ``--resume`` is ignored with a warning: the
checkpoint's learning rate (and optimizer state) is used.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

import xpnet
from xpnet import backend
from xpnet.datasets import DatasetCorruptError, DatasetNotFoundError, load_fashion_mnist, load_mnist
from xpnet.datasets.fetch import find_file, search_dirs
from xpnet.datasets.mnist import DATASETS
from xpnet.models import MODELS, build_model
from xpnet.optim import OPTIMIZERS
from xpnet.train.checkpoint import CheckpointError, CheckpointManager, load_checkpoint
from xpnet.train.distributed import DistributedError, check_world, world
from xpnet.train.trainer import NonFiniteLossError, Trainer

__all__ = ["main", "build_parser", "DEFAULT_EPOCHS"]

DEFAULT_MODEL = "simple-convnet"
DEFAULT_EPOCHS = 2
DEFAULT_BATCH = 100
#: per-epoch accuracies are measured on this many samples (the final one on all)
EVAL_SAMPLES = 2000

_MLP_HIDDEN = [100, 100, 100]
_DEBIAN_FASHION = "dataset-fashion-mnist"


class _Refused(Exception):
    """A check before training failed: one line for the user, exit status 2."""


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
                   help="data set (default: mnist, bundled; fashion-mnist is looked for on "
                        "disk, e.g. Debian's dataset-fashion-mnist, then downloaded)")
    p.add_argument("--epochs", type=_positive_int, default=DEFAULT_EPOCHS,
                   help=f"passes over the training data (default: {DEFAULT_EPOCHS}); with "
                        "--resume, the total including the epochs already done")
    p.add_argument("--batch-size", type=_positive_int, default=DEFAULT_BATCH,
                   help=f"mini-batch size (default: {DEFAULT_BATCH}; at most the number of "
                        "training images is used)")
    p.add_argument("--optimizer", choices=list(OPTIMIZERS), default="adam",
                   type=str.lower, help="optimizer (default: adam)")
    p.add_argument("--lr", type=_positive_float, default=None,
                   help="learning rate (default: the optimizer's, 0.001 for adam/adamw, "
                        "0.01 for the others; with --resume the checkpoint's is used)")
    p.add_argument("--weight-decay", type=_nonneg_float, default=None,
                   help="adamw: decoupled weight decay (default 0.01); mlp/mlp-extend with "
                        "another optimizer: L2 weight decay lambda in the loss")
    p.add_argument("--clip-norm", metavar="MAX", type=_positive_float, default=None,
                   help="clip the gradients' global L2 norm to MAX before each update")
    p.add_argument("--seed", type=_nonneg_int, default=0,
                   help="seed of the initial weights, dropout and shuffling (default: 0)")
    p.add_argument("--checkpoint-dir", metavar="DIR", default=None,
                   help="write a checkpoint there after every epoch")
    p.add_argument("--checkpoint-every", metavar="STEPS", type=_positive_int, default=None,
                   help="also write a checkpoint every STEPS steps (needs --checkpoint-dir)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in --checkpoint-dir")
    p.add_argument("--plot", metavar="FILE.png", default=None,
                   help="save loss and accuracy curves; the suffix picks the format (png, "
                        "pdf, svg ...; needs matplotlib: the plot extra)")
    p.add_argument("--data-dir", metavar="DIR", default=None,
                   help="directory holding the data set's four files (.gz or not)")
    p.add_argument("--limit-train", metavar="N", type=_positive_int, default=None,
                   help="train on the first N training images only (quick runs)")
    p.add_argument("--validation", metavar="N", type=_positive_int, default=None,
                   help="hold out the last N training images (after --limit-train) as a "
                        "validation split, measured in full after every epoch; the test set "
                        "is then not used at all and the run ends with the validation "
                        "accuracy (for choosing settings)")
    p.add_argument("--backend", choices=list(backend.BACKENDS), default=None,
                   help="array backend; overrides DL_BACKEND (default: DL_BACKEND or numpy)")
    p.add_argument("--quiet", action="store_true",
                   help="print only the final test accuracy (validation accuracy with "
                        "--validation)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="on the GPU, record the train step as a CUDA graph and replay it "
                        "(faster; ignored on the CPU)")
    p.add_argument("--augment", choices=["shift"], default=None,
                   help="shift: move each training image by up to 2 pixels (seeded)")
    p.add_argument("--lr-schedule", choices=["cosine", "step"], default=None,
                   help="cosine: lr decays to 0 over the run; step: x0.1 every third")
    p.add_argument("--init-from", metavar="FILE", default=None,
                   help="start from the parameters in FILE (a --save or checkpoint file, or "
                        "the book's weights after xpnet-import-weights); names the network "
                        "lacks or the file lacks are listed and skipped")
    p.add_argument("--freeze", metavar="PREFIX", nargs="+", default=None,
                   help="train without these parameters (names like W1, or blocks like "
                        "stage1)")
    p.add_argument("--group-lr", metavar="PREFIX=LR", nargs="+", default=None,
                   help="a learning rate of their own for the parameters under PREFIX, e.g. "
                        "--group-lr W1=1e-4 W2=1e-4 (fine-tuning a trunk more gently)")
    p.add_argument("--save", metavar="FILE.npz", default=None,
                   help="write the trained parameters to FILE at the end (xpnet's format)")
    return p


# ------------------------------------------------------------------ CLI words
def _checkout_root() -> Path | None:
    """The repository this xpnet runs from, when it is a checkout (pyproject beside it)."""
    root = Path(xpnet.__file__).resolve().parent.parent
    try:
        text = (root / "pyproject.toml").read_text("utf-8")
    except OSError:
        return None
    return root if re.search(r'^name\s*=\s*"xpnet"', text, re.M) else None


def _install_hint(extra: str) -> str:
    """How to install an extra: from a checkout ``pip install -e '.[extra]'``."""
    root = _checkout_root()
    if root is None:
        return f"pip install 'xpnet[{extra}]'"
    where = "." if Path.cwd().resolve() == root else str(root)
    return f"pip install -e '{where}[{extra}]'"


def _cli_words(text: str, args: argparse.Namespace | None = None) -> str:
    """A message of the Python API in the command line's words."""
    text = re.sub(r"pass resume=True\b", "add --resume", text)
    text = re.sub(r"\bresume=True\b", "--resume", text)
    text = re.sub(r"\bthe data_dir argument\b", "--data-dir", text)
    for name in ("clip_norm", "data_dir", "checkpoint_dir", "checkpoint_every_steps",
                 "mini_batch_size"):
        flag = {"checkpoint_every_steps": "--checkpoint-every",
                "mini_batch_size": "--batch-size"}.get(name, "--" + name.replace("_", "-"))
        text = re.sub(rf"(?<![\w-]){name}\b", flag, text)
    if args is not None and args.backend is not None:
        text = text.replace("DL_BACKEND=numpy", "--backend numpy")
    root = _checkout_root()
    if root is not None:
        def extra(match: re.Match) -> str:
            return _install_hint(match.group(1))

        text = re.sub(r"pip install '?xpnet\[([\w,-]+)\]'?", extra, text)
        where = "." if Path.cwd().resolve() == root else str(root)
        text = re.sub(r"'xpnet\[([\w,-]+)\]'", rf"'{where}[\1]'", text)
    return text


# ------------------------------------------------------------- checks up front
def _probe_writable(directory: Path) -> str | None:
    """Why no file can be created in ``directory`` (None: one can)."""
    try:
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(path.anchor or ".")


def _check_plot(path_text: str) -> None:
    if importlib.util.find_spec("matplotlib") is None:
        raise _Refused(f"--plot needs matplotlib, which is not installed; install it with: "
                       f"{_install_hint('plot')}")
    path = Path(path_text).expanduser()
    from matplotlib.backend_bases import FigureCanvasBase  # noqa: PLC0415 - optional

    formats = sorted(FigureCanvasBase.get_supported_filetypes())
    suffix = path.suffix.lower().lstrip(".")
    if suffix not in formats:
        what = f"'.{suffix}' is not a format matplotlib writes" if suffix else \
            "the file name has no suffix to pick the format"
        raise _Refused(f"--plot {path_text}: {what}; use one of "
                       f"{', '.join('.' + f for f in formats)} (e.g. curves.png)")
    if path.is_dir():
        raise _Refused(f"--plot {path_text}: is a directory; give a file name such as "
                       f"{path / 'curves.png'}")
    directory = path.absolute().parent
    if not directory.is_dir():
        what = "is not a directory" if directory.exists() else "does not exist"
        raise _Refused(f"--plot {path_text}: directory {directory} {what}")
    why = _probe_writable(directory)
    if why is None and path.exists() and not os.access(path, os.W_OK):
        why = "the file is read-only"
    if why is not None:
        raise _Refused(f"--plot {path_text}: cannot write there ({why})")


def _check_data_dir(args: argparse.Namespace) -> None:
    spec = DATASETS[args.dataset]
    directory = Path(args.data_dir).expanduser()
    if not directory.exists():
        raise _Refused(f"--data-dir {args.data_dir}: no such directory")
    if not directory.is_dir():
        raise _Refused(f"--data-dir {args.data_dir}: is a file, not a directory")
    missing = [f.filename for f in spec.files if find_file(directory, f) is None]
    if missing:
        raise _Refused(f"--data-dir {args.data_dir}: missing {len(missing)} of the four "
                       f"{spec.title} files: {', '.join(missing)} (gzip-compressed or not)")


def _check_checkpoint_dir(args: argparse.Namespace) -> Any:
    """Check --checkpoint-dir (and --resume); return the checkpoint to resume, if any."""
    directory = Path(args.checkpoint_dir).expanduser()
    if directory.exists() and not directory.is_dir():
        raise _Refused(f"--checkpoint-dir {args.checkpoint_dir}: is a file, not a directory")
    if directory.is_dir():
        why = _probe_writable(directory)
    else:  # created at the first save: its nearest existing parent must take it
        parent = _nearest_existing(directory.absolute())
        if not parent.is_dir():
            why = f"{parent} is not a directory"
        elif not os.access(parent, os.W_OK | os.X_OK):
            why = f"cannot create it in {parent}: permission denied"
        else:
            why = None
    if why is not None:
        raise _Refused(f"--checkpoint-dir {args.checkpoint_dir}: cannot write checkpoints "
                       f"there ({why})")
    try:
        latest = CheckpointManager(directory).latest()
    except CheckpointError as exc:
        raise _Refused(f"--checkpoint-dir {args.checkpoint_dir}: {exc}") from None
    if latest is None:
        return None
    if not args.resume:
        raise _Refused(f"--checkpoint-dir {args.checkpoint_dir} already holds checkpoints "
                       f"(latest: {latest.name}); add --resume to continue that run, or "
                       "choose an empty directory")
    try:
        return load_checkpoint(latest)
    except CheckpointError as exc:
        raise _Refused(f"--resume: {exc}") from None


def _resume_notes(args: argparse.Namespace, ckpt: Any) -> list[str]:
    """Warnings about what --resume will and will not do with this checkpoint."""
    notes = []
    done = int(ckpt.progress.get("epoch", 0))
    if done >= args.epochs:
        notes.append(f"warning: the checkpoint {ckpt.path} has already done {done} epoch(s) "
                     f"and --epochs {args.epochs} asks for no more: nothing to train (give "
                     f"--epochs {done + 1} or more to continue); evaluating it only")
    if args.lr is not None:
        hyper = (ckpt.optimizer or {}).get("hyper", {})
        used = hyper.get("lr")
        used_text = f" ({used:g})" if isinstance(used, (int, float)) else ""
        notes.append(f"warning: --lr {args.lr:g} is ignored with --resume: the checkpoint's "
                     f"learning rate{used_text} and optimizer state are used")
    return notes


# ------------------------------------------------------------------- building
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
        if args.model in ("simple-convnet", "deep-convnet"):
            parser.error(f"--weight-decay with --optimizer {args.optimizer} needs a model with "
                         "L2 weight decay in the loss (mlp, mlp-extend, vgg, googlenet, resnet); "
                         "or use --optimizer adamw")
        kwargs["weight_decay_lambda"] = args.weight_decay
    return kwargs


def _groups(specs: Sequence[str] | None) -> list[dict[str, Any]]:
    """``--group-lr PREFIX=LR ...`` as optimizer groups."""
    groups = []
    for spec in specs or ():
        prefix, sep, value = spec.partition("=")
        try:
            lr = float(value)
        except ValueError:
            lr = float("nan")
        if not sep or not prefix or not math.isfinite(lr) or lr <= 0:
            raise _Refused(f"--group-lr {spec}: expected PREFIX=LR with LR > 0, e.g. W1=1e-4")
        groups.append({"params": prefix, "lr": lr})
    return groups


def _optimizer_param(args: argparse.Namespace, resuming: bool) -> dict[str, Any]:
    param: dict[str, Any] = {}
    if args.lr is not None and not resuming:  # a checkpoint brings its own
        param["lr"] = args.lr
    if args.group_lr:
        param["groups"] = _groups(args.group_lr)
    if args.optimizer == "adamw" and args.weight_decay is not None:
        param["weight_decay"] = args.weight_decay
    return param


def _data_error(args: argparse.Namespace, exc: Exception) -> str:
    text = _cli_words(str(exc), args)
    if args.dataset == "fashion-mnist" and isinstance(exc, DatasetNotFoundError) \
            and _DEBIAN_FASHION not in text:
        spec = DATASETS["fashion-mnist"]
        names = ", ".join(f.filename for f in spec.files)
        places = ["--data-dir DIR", *(str(d) for d in search_dirs(spec)
                                      if d not in spec.system_dirs)]
        system = ", ".join(str(d) for d in spec.system_dirs)
        if "Put the four files" not in text:  # a failed download says nothing of where
            text += f"\nPut the four Fashion-MNIST files ({names}) in one of: " \
                    f"{', '.join(places)}."
        text += (f"\nOn Debian or Ubuntu, the {_DEBIAN_FASHION} package provides them in "
                 f"{system}, where they are found: sudo apt install {_DEBIAN_FASHION}")
    return text


# ------------------------------------------------------------------- the plot
def _plot(path: str, trainer: Trainer, eval_samples: int | None) -> None:
    import matplotlib  # noqa: PLC0415 - optional dependency

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig = _curves_figure(trainer, eval_samples)
    try:
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)


def _curves_figure(trainer: Trainer, eval_samples: int | None) -> Any:
    """The loss per step and the accuracies per epoch, each labelled with how many
    images it was measured on."""
    import matplotlib.pyplot as plt  # noqa: PLC0415 - optional dependency

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

    def label(name: str, total: int) -> str:
        n = total if eval_samples is None else min(eval_samples, total)
        return f"{name} (first {n} images)" if n < total else f"{name} (all {total} images)"

    ax_acc.plot(epochs, hist["train_acc"], "o-", label=label("train", len(trainer.x_train)))
    if trainer.x_test is not None:
        ax_acc.plot(epochs, hist["test_acc"], "s-", label=label("test", len(trainer.x_test)))
    if hist.get("val_acc"):
        ax_acc.plot(epochs, hist["val_acc"], "^-",
                    label=f"validation (all {len(trainer.x_val)} images)")
    final = trainer.final_test_acc
    if final is not None and epochs:
        ax_acc.plot([epochs[-1]], [final], "*", ms=12,
                    label=f"final test (all {len(trainer.x_test)} images)")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy")
    ax_acc.grid(alpha=0.3)
    ax_acc.legend()
    val = trainer.final_val_acc
    fig.suptitle(f"{type(trainer.network).__name__}"
                 + (f" - final test accuracy {100 * final:.2f}%" if final is not None else
                    f" - final validation accuracy {100 * val:.2f}%" if val is not None else ""))
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (argparse errors exit with 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume and args.checkpoint_dir is None:
        parser.error("--resume needs --checkpoint-dir")
    if args.checkpoint_every is not None and args.checkpoint_dir is None:
        parser.error("--checkpoint-every needs --checkpoint-dir")
    if args.cuda_graph and args.clip_norm is not None:
        parser.error("--cuda-graph cannot be combined with --clip-norm (the clipping reads "
                     "the gradient norm back from the GPU every step)")
    model_kwargs = _model_kwargs(args, parser)

    def refuse(message: str) -> int:
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        return 2

    ckpt = None
    try:
        if args.plot is not None:
            _check_plot(args.plot)
        if args.data_dir is not None:
            _check_data_dir(args)
        if args.checkpoint_dir is not None:
            ckpt = _check_checkpoint_dir(args)
    except _Refused as exc:
        return refuse(str(exc))
    try:
        if args.backend is not None:
            backend.set_backend(args.backend)
        backend_name = backend.get_backend_name()
        device = backend.device_name()
    except backend.BackendError as exc:
        return refuse(_cli_words(str(exc), args))

    # data parallelism: under `mpiexec -n N python -m mpi4py train.py ...`, N processes
    comm = world()
    root = comm.is_root
    if comm.size > 1:
        try:
            check_world(comm, {k: v for k, v in vars(args).items()
                               if k not in ("quiet", "plot", "save")})
        except DistributedError as exc:
            return refuse(str(exc))

    def say(text: str) -> None:
        if not args.quiet and root:
            print(text, flush=True)

    def warn(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    say(f"xpnet {xpnet.__version__} | backend: {backend_name} | device: {device}")
    loader = load_mnist if args.dataset == "mnist" else load_fashion_mnist
    flatten = args.model in ("mlp", "mlp-extend")
    try:
        (x_train, t_train), (x_test, t_test) = loader(normalize=True, flatten=flatten,
                                                      data_dir=args.data_dir)
    except (DatasetNotFoundError, DatasetCorruptError) as exc:
        print(f"error: {_data_error(args, exc)}", file=sys.stderr)
        return 1
    if args.limit_train is not None:
        x_train, t_train = x_train[:args.limit_train], t_train[:args.limit_train]
    x_val = t_val = None
    if args.validation is not None:
        if args.validation >= len(x_train):
            return refuse(f"--validation {args.validation} leaves no training images: there "
                          f"are {len(x_train)}")
        cut = len(x_train) - args.validation
        x_train, x_val = x_train[:cut], x_train[cut:]
        t_train, t_val = t_train[:cut], t_train[cut:]
        x_test = t_test = None  # a search of settings never sees the test set
    batch = min(args.batch_size, len(x_train))
    if args.batch_size > len(x_train):
        warn(f"warning: --batch-size {args.batch_size} is larger than the {len(x_train)} "
             f"training images; each step uses all {len(x_train)}")
    if ckpt is not None:
        for note in _resume_notes(args, ckpt):
            warn(note)

    backend.seed(args.seed)
    network = build_model(args.model, **model_kwargs)
    try:
        if args.init_from is not None:
            report = network.load_params(args.init_from, strict=False)
            say(f"initialised from {args.init_from}"
                + (f"; not in the file (kept fresh): {', '.join(report.missing)}"
                   if report.missing else "")
                + (f"; in the file only (skipped): {', '.join(report.unexpected)}"
                   if report.unexpected else ""))
        if args.freeze:
            say(f"frozen: {', '.join(network.freeze(*args.freeze))}")
        optimizer_param = _optimizer_param(args, ckpt is not None)
    except _Refused as exc:
        return refuse(str(exc))
    except (KeyError, ValueError) as exc:
        return refuse(_cli_words(str(exc).strip('"'), args))
    try:
        trainer = Trainer(network, x_train, t_train, x_test, t_test, x_val=x_val, t_val=t_val,
                          epochs=args.epochs,
                          mini_batch_size=batch, optimizer=args.optimizer,
                          optimizer_param=optimizer_param, augment=args.augment,
                          lr_schedule=args.lr_schedule, comm=comm,
                          evaluate_sample_num_per_epoch=EVAL_SAMPLES, verbose=not args.quiet,
                          checkpoint_dir=args.checkpoint_dir,
                          checkpoint_every_steps=args.checkpoint_every, seed=args.seed,
                          cuda_graph=args.cuda_graph, clip_norm=args.clip_norm)
    except ValueError as exc:
        return refuse(_cli_words(str(exc), args))
    n_params = sum(int(p.size) for p in network.params.values())
    if x_val is None:
        held_out = f"{len(x_test)} test images"
        measured = (f"per-epoch accuracies on the first {min(EVAL_SAMPLES, len(x_test))} "
                    f"images, the final one on all {len(x_test)}")
    else:
        held_out = f"{len(x_val)} validation images (the test set is not used)"
        measured = (f"train accuracy on the first {min(EVAL_SAMPLES, len(x_train))} "
                    f"images, validation accuracy on all {len(x_val)}, every epoch")
    say(f"model: {args.model} ({n_params:,} parameters, {np.dtype(network.dtype).name}) | "
        f"data: {args.dataset}, {len(x_train)} train / {held_out}")
    optimizer = repr(trainer.optimizer)
    if ckpt is not None:
        hyper = (ckpt.optimizer or {}).get("hyper") or {}
        optimizer = (f"{(ckpt.optimizer or {}).get('type', optimizer)}("
                     + ", ".join(f"{k}={v}" for k, v in hyper.items()) + ") from the checkpoint")
    say(f"optimizer: {optimizer} | {args.epochs} epoch(s) of "
        f"{trainer.iter_per_epoch} steps, batch {batch}, seed {args.seed} | {measured}")
    t0 = time.perf_counter()
    try:
        trainer.train(resume=args.resume)
    except (NonFiniteLossError, CheckpointError, FileExistsError, OSError) as exc:
        print(f"error: {_cli_words(str(exc), args)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        where = f"; continue with --resume --checkpoint-dir {args.checkpoint_dir}" \
            if args.checkpoint_dir else ""
        print(f"\ninterrupted{where}", file=sys.stderr)
        return 130
    elapsed = time.perf_counter() - t0
    if not root:
        return 0  # rank 0 reports and writes files
    if comm.size > 1:
        say(f"data parallel: {comm.size} processes ({comm.kind}), batch {batch // comm.size} "
            "each")
    if args.quiet and x_val is not None:
        print(f"validation accuracy: {100 * trainer.final_val_acc:.2f}%")
    elif args.quiet:
        print(f"test accuracy: {100 * trainer.final_test_acc:.2f}%")
    else:
        say(f"training time: {elapsed:.1f} s")
    if args.plot is not None:
        try:
            _plot(args.plot, trainer, EVAL_SAMPLES)
        except (OSError, ValueError, RuntimeError) as exc:
            print(f"error: --plot {args.plot}: the curves could not be saved: {exc}",
                  file=sys.stderr)
            return 1
        say(f"saved the curves to {args.plot}")
    if args.save is not None:
        try:
            network.save_params(args.save)
        except OSError as exc:
            print(f"error: --save {args.save}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        say(f"saved the parameters to {args.save}")
    return 0
