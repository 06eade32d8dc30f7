"""The book's ``Trainer`` (``common/trainer.py``), reworked for long runs on either backend.

``Trainer(network, x_train, t_train, x_test, t_test, epochs=20, mini_batch_size=100,
optimizer='adam', optimizer_param={'lr': 0.001}, evaluate_sample_num_per_epoch=None,
verbose=True)`` drives any object with the book's network API (``params``,
``gradient(x, t)``, ``loss``, ``accuracy``, ``predict``); ``train()`` runs it and
fills ``train_loss_list`` (one entry per step), ``train_acc_list`` and
``test_acc_list`` (one per epoch), as in the book.

Where it differs from the book:

* **Epochs without replacement.** Each epoch visits the training set in a fresh
  random order (a permutation from a ``numpy.random.Generator`` owned by the
  trainer, seeded by ``seed``); the book draws every mini-batch with
  ``np.random.choice``.  ``iter_per_epoch = max(train_size // mini_batch_size, 1)``
  as in the book; the remainder of an epoch's permutation is not used.
* **Accuracy at the end of each epoch** (the book measures it after the first
  step of each epoch), on the first ``evaluate_sample_num_per_epoch`` samples if
  set; the final test accuracy is always over the whole test set.
* **Host data, device batches.** The data stay host NumPy arrays; each mini-batch is
  cast to the network's dtype and moved to its device once.
* **No per-step device sync.** Training labels are validated once on the host, and
  the network's loss layer then skips its own check (``validate_labels = False``);
  the losses stay on the device and are read back only when reported.
* **Non-finite losses stop training** with :class:`NonFiniteLossError` naming the
  step and epoch; no checkpoint is written after it.  On NumPy the check runs at
  every step, before that step's update; on CuPy at each report (progress refresh,
  checkpoint, epoch end), naming the first bad step.
* **Extras:** validation data with early stopping, callbacks, checkpoints with exact
  resume, learning-rate schedules, gradient clipping (keyword-only arguments).
"""

from __future__ import annotations

import inspect
import math
import numbers
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import MappingProxyType, SimpleNamespace
from typing import Any

import numpy as np

from xpnet.backend import get_array_module, get_rng, to_backend, to_cpu
from xpnet.layers.loss import class_indices
from xpnet.optim import CosineLR, StepLR, get_optimizer
from xpnet.state import sha256_of
from xpnet.train.augment import AUGMENTATIONS
from xpnet.train.checkpoint import (
    Checkpoint,
    CheckpointManager,
    CheckpointMismatchError,
    load_checkpoint,
    network_backend,
)
from xpnet.train.distributed import GradientAllReduce, average_buffers, broadcast_parameters, shard
from xpnet.train.step import ClipGradNorm, NonFiniteError, TrainStep

__all__ = ["Trainer", "NonFiniteLossError"]

_DEFAULT_OPTIMIZER_PARAM: Mapping[str, float] = MappingProxyType({"lr": 0.001})
_EVENTS = ("step_end", "epoch_end", "train_end")
_EVAL_CHUNK = 10_000       # samples moved to the device at once for evaluation
_REFRESH_SECONDS = 0.5     # progress-bar refresh (each one reads the losses back)


class NonFiniteLossError(FloatingPointError):
    """The training loss became inf or nan.

    Attributes: ``step`` (1-based global step whose loss was non-finite), ``epoch``
    (1-based), ``iteration`` (1-based within the epoch), ``loss`` (the value) and
    ``checkpoint`` (path of the last checkpoint written, which is intact, or None).
    """

    def __init__(self, message: str, *, step: int, epoch: int, iteration: int,
                 loss: float, checkpoint: Path | None) -> None:
        super().__init__(message)
        self.step, self.epoch, self.iteration = step, epoch, iteration
        self.loss, self.checkpoint = loss, checkpoint


def _int_at_least(name: str, value: Any, low: int, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"Trainer: {name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _host_array(name: str, a: Any) -> np.ndarray:
    if a is None:
        raise ValueError(f"Trainer: {name} is required")
    h = np.asarray(to_cpu(a))
    if h.ndim == 0:
        raise ValueError(f"Trainer: {name} must be an array with one sample per row, "
                         f"got a 0-d array")
    return h


class Trainer:
    """Train ``network`` on ``(x_train, t_train)``; evaluate on ``(x_test, t_test)``.

    ``x_test`` and ``t_test`` may both be None (a search of settings on a validation
    split, which should never see the test set): test accuracies are then None and
    ``final_test_acc`` stays None; ``final_val_acc`` is measured on all of ``x_val``.

    The first nine arguments are the book's.  ``optimizer`` is a name for
    :func:`xpnet.optim.get_optimizer` (case-insensitive: 'sgd', 'momentum',
    'nesterov', 'adagrad', 'rmsprop', 'adam', 'adamw') built with ``optimizer_param``,
    or an optimizer object (``optimizer_param`` is then ignored).

    Keyword-only extras:
        x_val, t_val: validation data, evaluated after every epoch ('val_acc').
        early_stopping_patience: stop when val accuracy has not improved for this
            many epochs; at the end the parameters (and buffers) of the best epoch
            are restored, and a message says so.  Needs validation data.
        callbacks: callables ``cb(trainer, event, info)`` (or objects with
            ``on_step_end`` / ``on_epoch_end`` / ``on_train_end(trainer, info)``),
            events 'step_end', 'epoch_end', 'train_end'.  The 'step_end' info holds
            the loss as a device array (reading it syncs).  Setting
            ``trainer.stop_training = True`` stops after the current step.
        checkpoint_dir: write a checkpoint there after every epoch (and every
            ``checkpoint_every_steps`` steps); ``train(resume=True)`` continues from
            the latest one.  ``keep_checkpoints`` files are kept (default 3).
        seed: seed of the shuffling (and augmentation) generators (None: fresh
            entropy; their states are saved in checkpoints either way).  Parameter
            initialisation uses ``xpnet.backend.seed``; each Dropout layer has its own
            generator, whose state is checkpointed too.
        shuffle: False visits the training data in order every epoch.
        lr_schedule: None, 'cosine' (CosineLR over the whole run), 'step' (StepLR:
            lr x 0.1 every third of the run), a schedule object bound to this
            trainer's optimizer, or a callable ``f(optimizer, total_steps)`` making one.
            It is stepped once per update.
        clip_norm: clip the global gradient norm to this value before each update.
        progress: True/False forces the tqdm bar on/off; None (default) shows it when
            stdout is a terminal and prints one line per epoch otherwise.
        cuda_graph: on CuPy, record the train step as a CUDA graph and replay it
            (:class:`xpnet.train.TrainStep`); much faster for small layers. Not with
            ``clip_norm``, which reads the gradient norm back every step. Ignored on
            the CPU.
        transforms: gradient transforms ``t(grads, params)`` run before clipping in
            every step (:class:`xpnet.train.TrainStep`), e.g. a gradient all-reduce.
        augment: 'shift' (each training image moved by up to 2 pixels,
            :func:`xpnet.train.augment.random_shift`) or a function ``f(batch, rng)``
            of a host batch (N, C, H, W); drawn from a generator seeded by ``seed``
            and checkpointed, so a resumed run repeats the uninterrupted one.
        comm: a communicator of :mod:`xpnet.train.distributed` (``world()``) for
            data-parallel training: ``mini_batch_size`` is the global batch, each process
            takes its slice of every global batch of one shared permutation, gradients
            are averaged by one all-reduce per step, rank 0's parameters are broadcast at
            the start, batch-norm statistics stay per process while training and are
            averaged before each evaluation and checkpoint; only rank 0 prints and writes
            checkpoints.  Resuming with another number of processes is refused.
        verbose: also ``"book"``, which prints the book's lines (``train loss:`` per
            step, ``=== epoch:...`` per epoch, the final test accuracy) instead of xpnet's.
    """

    def __init__(self, network: Any, x_train: Any, t_train: Any, x_test: Any, t_test: Any,
                 epochs: int = 20, mini_batch_size: int = 100, optimizer: Any = "adam",
                 optimizer_param: Mapping[str, Any] = _DEFAULT_OPTIMIZER_PARAM,
                 evaluate_sample_num_per_epoch: int | None = None, verbose: bool = True, *,
                 x_val: Any = None, t_val: Any = None,
                 early_stopping_patience: int | None = None,
                 callbacks: Iterable[Any] = (), checkpoint_dir: str | Path | None = None,
                 checkpoint_every_steps: int | None = None, seed: int | None = None,
                 shuffle: bool = True, lr_schedule: Any = None, clip_norm: float | None = None,
                 keep_checkpoints: int = 3, progress: bool | None = None,
                 cuda_graph: bool = False, transforms: Iterable[Any] = (),
                 augment: str | Callable[..., Any] | None = None, comm: Any = None) -> None:
        self.network = network
        # data parallelism (xpnet.train.distributed): None or a world of one is one process
        self.comm = comm if comm is not None and comm.size > 1 else None
        for attr in ("params", "gradient", "accuracy", "predict"):
            if not hasattr(network, attr):
                raise TypeError(f"Trainer: the network lacks {attr!r} (the book's network "
                                "API: params, gradient, loss, accuracy, predict)")
        self.epochs = _int_at_least("epochs", epochs, 1)
        self.batch_size = _int_at_least("mini_batch_size", mini_batch_size, 1)
        self.evaluate_sample_num_per_epoch = _int_at_least(
            "evaluate_sample_num_per_epoch", evaluate_sample_num_per_epoch, 1, allow_none=True)
        self.book_output = verbose == "book"
        self.verbose = bool(verbose) and (self.comm is None or self.comm.is_root)
        if self.comm is not None and self.batch_size % self.comm.size:
            raise ValueError(f"Trainer: mini_batch_size {self.batch_size} is the global batch "
                             f"and must be a multiple of the {self.comm.size} processes")
        self.progress = progress

        self.x_train, self.t_train = _host_array("x_train", x_train), _host_array("t_train",
                                                                                   t_train)
        if (x_test is None) != (t_test is None):
            raise ValueError("Trainer: give both x_test and t_test, or neither")
        self.x_test = None if x_test is None else _host_array("x_test", x_test)
        self.t_test = None if t_test is None else _host_array("t_test", t_test)
        if (x_val is None) != (t_val is None):
            raise ValueError("Trainer: give both x_val and t_val, or neither")
        self.x_val = None if x_val is None else _host_array("x_val", x_val)
        self.t_val = None if t_val is None else _host_array("t_val", t_val)
        for name, x, t in (("train", self.x_train, self.t_train),
                           ("test", self.x_test, self.t_test),
                           ("val", self.x_val, self.t_val)):
            if x is None:
                continue
            if len(x) != len(t):
                raise ValueError(f"Trainer: x_{name} has {len(x)} samples but t_{name} "
                                 f"has {len(t)}")
            if len(x) == 0:
                raise ValueError(f"Trainer: x_{name} is empty")
            if x.shape[1:] != self.x_train.shape[1:]:
                raise ValueError(f"Trainer: x_{name} samples have shape {x.shape[1:]}, "
                                 f"x_train samples {self.x_train.shape[1:]}")

        self.early_stopping_patience = _int_at_least(
            "early_stopping_patience", early_stopping_patience, 1, allow_none=True)
        if self.early_stopping_patience is not None and self.x_val is None:
            raise ValueError("Trainer: early_stopping_patience needs validation data "
                             "(x_val, t_val)")
        self.callbacks = list(callbacks)
        for cb in self.callbacks:
            if not callable(cb) and not any(hasattr(cb, f"on_{e}") for e in _EVENTS):
                raise TypeError(f"Trainer: callback {cb!r} is neither callable nor has "
                                "on_step_end/on_epoch_end/on_train_end")
        self.checkpoint_every_steps = _int_at_least(
            "checkpoint_every_steps", checkpoint_every_steps, 1, allow_none=True)
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        if self.checkpoint_every_steps is not None and self.checkpoint_dir is None:
            raise ValueError("Trainer: checkpoint_every_steps needs checkpoint_dir")
        self._manager = (None if self.checkpoint_dir is None
                         else CheckpointManager(self.checkpoint_dir, keep=keep_checkpoints))
        try:
            clip = None if clip_norm is None else ClipGradNorm(clip_norm)
        except ValueError as exc:
            raise ValueError(f"Trainer: {exc}") from None
        self.clip_norm = None if clip is None else clip.max_norm
        self.seed = seed
        self.shuffle = bool(shuffle)
        if isinstance(augment, str):
            if augment not in AUGMENTATIONS:
                raise ValueError(f"Trainer: unknown augment {augment!r}; valid: "
                                 f"{', '.join(AUGMENTATIONS)} or a function (batch, rng)")
            augment = AUGMENTATIONS[augment]
        if augment is not None and not callable(augment):
            raise TypeError(f"Trainer: augment must be a name or a function, got {augment!r}")
        if augment is not None and self.x_train.ndim != 4:
            raise ValueError("Trainer: augment needs image data (N, C, H, W); load it with "
                             f"flatten=False (x_train has shape {self.x_train.shape})")
        self.augment = augment

        # the book's bookkeeping
        self.train_size = int(self.x_train.shape[0])
        self.iter_per_epoch = max(self.train_size // self.batch_size, 1)
        self.max_iter = self.epochs * self.iter_per_epoch
        self.current_iter = 0      # completed steps (global)
        self.current_epoch = 0     # completed epochs
        self.position = 0          # completed steps in the current epoch

        if isinstance(optimizer, str):
            self.optimizer_name = optimizer.strip().lower()
            self.optimizer_param = dict(optimizer_param or {})
            self.optimizer = get_optimizer(optimizer, **self.optimizer_param)
        elif hasattr(optimizer, "update"):
            self.optimizer_name = type(optimizer).__name__.lower()
            self.optimizer_param = {}
            self.optimizer = optimizer
        else:
            raise TypeError(f"Trainer: optimizer must be a name or an object with "
                            f"update(params, grads), got {optimizer!r}")
        self.lr_schedule = self._make_schedule(lr_schedule)
        if cuda_graph and self.clip_norm is not None:
            raise ValueError("Trainer: cuda_graph cannot be combined with clip_norm (the "
                             "clipping reads the gradient norm back from the GPU every step)")
        self.cuda_graph = bool(cuda_graph)
        # the one step path: gradient -> transforms (all-reduce, then clipping) -> update
        if self.comm is not None:  # averaged first, so that clipping sees the mean gradient
            transforms = [GradientAllReduce(self.comm), *transforms]
        self.step_runner = TrainStep(network, self.optimizer, cuda_graph=self.cuda_graph,
                                     transforms=[*transforms, *([clip] if clip else [])],
                                     check_finite=True)

        self.rng = np.random.default_rng(seed)
        # its own stream, so that augmenting changes neither the order nor the masks
        self.augment_rng = np.random.default_rng(
            None if seed is None else np.random.SeedSequence(seed).spawn(1)[0])
        self._epoch_start_state: dict[str, Any] = self.rng.bit_generator.state
        self._perm: np.ndarray | None = None

        self.train_loss_list: list[float] = []
        self.train_acc_list: list[float] = []
        self.test_acc_list: list[float] = []
        self.history: dict[str, list[Any]] = {
            "epoch": [], "step": [], "train_loss": [], "train_acc": [], "test_acc": [],
            "lr": [], "epoch_time": [], "images_per_sec": []}
        if self.x_val is not None:
            self.history["val_acc"] = []
        self.final_test_acc: float | None = None
        self.final_val_acc: float | None = None
        self.stop_training = False
        self.stopped_early = False
        self.best_score: float | None = None
        self.best_epoch: int | None = None
        self._bad_epochs = 0
        self._best_state: dict[str, dict[str, Any]] | None = None
        self.last_checkpoint: Path | None = None
        self._pending: list[tuple[int, int, int, Any]] = []
        self._num_classes: int | None = None

    # ------------------------------------------------------------------ setup
    def _make_schedule(self, spec: Any) -> Any:
        if spec is None:
            return None
        total = self.max_iter
        if isinstance(spec, str):
            kind = spec.strip().lower()
            if kind == "cosine":
                return CosineLR(self.optimizer, total_steps=total)
            if kind == "step":
                return StepLR(self.optimizer, step_size=max(total // 3, 1), gamma=0.1)
            raise ValueError(f"Trainer: unknown lr_schedule {spec!r}; use 'cosine', 'step', "
                             "a schedule object or a callable (optimizer, total_steps)")
        if hasattr(spec, "step") and hasattr(spec, "state_dict"):
            bound = getattr(spec, "optimizer", self.optimizer)
            if bound is not self.optimizer:
                raise ValueError("Trainer: lr_schedule drives another optimizer than the "
                                 "trainer's; pass the optimizer object too, or a callable "
                                 "(optimizer, total_steps) -> schedule")
            return spec
        if callable(spec):
            return spec(self.optimizer, total)
        raise TypeError(f"Trainer: lr_schedule must be None, 'cosine', 'step', a schedule or "
                        f"a callable, got {spec!r}")

    @property
    def backend(self) -> str:
        """'numpy' or 'cupy': where the network's parameters live."""
        return network_backend(self.network)

    @property
    def dtype(self) -> np.dtype:
        dt = getattr(self.network, "dtype", None)
        if dt is None:
            for p in self.network.params.values():
                return np.dtype(p.dtype)
            return np.dtype(np.float32)
        return np.dtype(dt)

    def _loss_layers(self) -> list[Any]:
        found: dict[int, Any] = {}
        net = self.network
        candidates = [getattr(net, "loss_layer", None), getattr(net, "last_layer", None)]
        layers = getattr(net, "layers", None)
        if isinstance(layers, Mapping):
            candidates += list(layers.values())
        elif isinstance(layers, (list, tuple)):
            candidates += list(layers)
        for c in candidates:
            if c is not None and hasattr(c, "validate_labels"):
                found[id(c)] = c
        return list(found.values())

    def _to_device_x(self, x: np.ndarray) -> Any:
        dtype = self.dtype
        if x.dtype != dtype:
            x = x.astype(dtype)
        return to_backend(x, self.backend)

    def _to_device_t(self, t: np.ndarray) -> Any:
        if t.dtype.kind == "f":
            t = t.astype(self.dtype, copy=False)
        return to_backend(t, self.backend)

    def _check_labels(self) -> None:
        """Validate every label array once, on the host, against the network's outputs
        (:func:`xpnet.layers.loss.class_indices`, the check the loss makes)."""
        with np.errstate(all="ignore"):  # an untrained net may overflow: only the shape counts
            y = self.network.predict(self._to_device_x(self.x_train[:1]))
        self._num_classes = int(y.shape[1])
        ignore = getattr(getattr(self.network, "loss_layer", None), "ignore_label", None)
        problems = []
        for name, t in (("t_train", self.t_train), ("t_test", self.t_test),
                        ("t_val", self.t_val)):
            if t is None:
                continue
            scores = SimpleNamespace(shape=(len(t), *y.shape[1:]))  # only its shape is read
            try:
                class_indices(name, scores, t, ignore)
            except (TypeError, ValueError) as exc:
                problems.append(str(exc))
        if problems:
            raise ValueError("Trainer: invalid labels:\n" + "\n".join(f"  - {p}"
                                                                      for p in problems))

    # ------------------------------------------------------------- evaluation
    def _accuracy_kwargs(self) -> dict[str, int]:
        try:
            sig = inspect.signature(self.network.accuracy)
        except (TypeError, ValueError):
            return {}
        if "batch_size" in sig.parameters:
            return {"batch_size": max(self.batch_size, 500)}
        return {}

    def evaluate(self, x: Any, t: Any, num: int | None = None) -> float:
        """Accuracy on the first ``num`` samples of host arrays ``(x, t)`` (all if None)."""
        x, t = np.asarray(to_cpu(x)), np.asarray(to_cpu(t))
        if num is not None:
            x, t = x[:num], t[:num]
        n = len(x)
        kwargs = self._accuracy_kwargs()
        correct = 0
        for s in range(0, n, _EVAL_CHUNK):
            xs, ts = x[s:s + _EVAL_CHUNK], t[s:s + _EVAL_CHUNK]
            acc = float(self.network.accuracy(self._to_device_x(xs), self._to_device_t(ts),
                                              **kwargs))
            correct += acc * len(xs)  # per-pixel accuracies are not whole counts
        return correct / n

    # ---------------------------------------------------------------- output
    def _say(self, text: str) -> None:
        if self.verbose:
            print(text, flush=True)

    def _use_bar(self) -> bool:
        if not self.verbose or self.book_output:
            return False
        if self.progress is not None:
            return bool(self.progress)
        try:  # a terminal of width 0 shows no bar: the epoch lines carry the progress
            return sys.stdout.isatty() and shutil.get_terminal_size().columns > 0
        except (AttributeError, ValueError, OSError):
            return False

    # ---------------------------------------------------------------- losses
    def _flush(self) -> None:
        """Read the pending losses back to the host; raise on the first non-finite one."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        arrays = [p[3] for p in pending]
        module = get_array_module(arrays[0])
        if module is np:
            values = [float(a) for a in arrays]
        else:
            values = to_cpu(module.stack([module.asarray(a).reshape(()) for a in arrays]))
            values = [float(v) for v in values]
        for (step, epoch, iteration, _), v in zip(pending, values, strict=True):
            if not math.isfinite(v):
                self._raise_nonfinite("loss", v, step, epoch, iteration)
            self.train_loss_list.append(v)

    def _raise_nonfinite(self, what: str, value: float, step: int, epoch: int,
                         iteration: int) -> None:
        if self.backend == "numpy":
            when = "training stopped before that step's update"
        else:
            when = f"detected at step {self.current_iter}; training stopped"
        if self.last_checkpoint is not None:
            ck = f"the last checkpoint, {self.last_checkpoint}, was written before it and is intact"
        elif self._manager is not None:
            ck = "no checkpoint had been written yet"
        else:
            ck = "no checkpoint_dir was set"
        raise NonFiniteLossError(
            f"non-finite {what} ({value}) at step {step} (epoch {epoch}, iteration "
            f"{iteration} of {self.iter_per_epoch}); {when}; {ck}. Try a lower learning "
            "rate, gradient clipping (clip_norm) or check the data",
            step=step, epoch=epoch, iteration=iteration, loss=value,
            checkpoint=self.last_checkpoint)

    # ------------------------------------------------------------- callbacks
    def _emit(self, event: str, info: dict[str, Any]) -> None:
        for cb in self.callbacks:
            if callable(cb):
                cb(self, event, info)
            else:
                method = getattr(cb, f"on_{event}", None)
                if method is not None:
                    method(self, info)

    # ------------------------------------------------------------ checkpoints
    def _trainer_config(self) -> dict[str, Any]:
        return {
            "epochs": self.epochs, "mini_batch_size": self.batch_size,
            "optimizer": self.optimizer_name,
            "optimizer_param": {k: v for k, v in self.optimizer_param.items()
                                if isinstance(v, (int, float, str, bool)) or v is None},
            "evaluate_sample_num_per_epoch": self.evaluate_sample_num_per_epoch,
            "seed": self.seed if isinstance(self.seed, int) else None,
            "shuffle": self.shuffle, "early_stopping_patience": self.early_stopping_patience,
            "checkpoint_every_steps": self.checkpoint_every_steps,
            "clip_norm": self.clip_norm,
            "train_size": self.train_size, "sample_shape": list(self.x_train.shape[1:]),
            "train_labels_sha256": sha256_of(self.t_train),
            "val_size": None if self.x_val is None else int(len(self.x_val)),
            "world_size": 1 if self.comm is None else self.comm.size,
        }

    def _save_checkpoint(self) -> Path | None:
        if self._manager is None:
            return None
        self._flush()  # never write a checkpoint after a non-finite loss
        if self.comm is not None:
            average_buffers(self.network, self.comm)  # collective: every rank comes here
            if not self.comm.is_root:
                return None
        arrays: dict[str, Any] = {
            "train_loss_list": np.asarray(self.train_loss_list, dtype=np.float64)}
        if self._best_state is not None:
            for section, table in self._best_state.items():
                for k, a in table.items():
                    arrays[f"best/{section}/{k}"] = a
        try:
            backend_rng = get_rng(self.backend).get_state()
        except NotImplementedError:
            backend_rng = None
        path = self._manager.save(
            self.current_iter, self.network, self.optimizer, lr_schedule=self.lr_schedule,
            rng={"shuffle": self.rng.bit_generator.state,
                 "epoch_start": self._epoch_start_state, "backend": backend_rng,
                 "augment": self.augment_rng.bit_generator.state,
                 "layers": (self.network.rng_states()
                            if hasattr(self.network, "rng_states") else {})},
            progress={"epoch": self.current_epoch, "step": self.current_iter,
                      "position": self.position, "iter_per_epoch": self.iter_per_epoch,
                      "finished": self.current_epoch >= self.epochs or self.stopped_early,
                      "stopped_early": self.stopped_early},
            history={"history": self.history, "train_acc_list": self.train_acc_list,
                     "test_acc_list": self.test_acc_list,
                     "early_stopping": {"best_score": self.best_score,
                                        "best_epoch": self.best_epoch,
                                        "bad_epochs": self._bad_epochs}},
            config={"trainer": self._trainer_config()},
            arrays=arrays)
        self.last_checkpoint = path
        return path

    def _resume_problems(self, ckpt: Checkpoint) -> list[str]:
        problems = ckpt.check(self.network, self.optimizer, self.lr_schedule)
        if self.lr_schedule is None and ckpt.lr_schedule is not None:
            problems.append(f"lr_schedule: the checkpoint has {ckpt.lr_schedule.get('type')}, "
                            "the trainer has none")
        saved = ckpt.config.get("trainer", {})
        mine = self._trainer_config()
        for key in ("mini_batch_size", "train_size", "sample_shape", "train_labels_sha256",
                    "shuffle", "val_size", "world_size"):
            if key in saved and saved[key] != mine[key]:
                what = "(the training labels differ)" if key == "train_labels_sha256" else \
                    f"{saved[key]!r} in the checkpoint, {mine[key]!r} now"
                problems.append(f"trainer: {key}: {what}")
        model = ckpt.config.get("model", {})
        if model.get("class") and model["class"] != type(self.network).__name__:
            problems.append(f"model: the checkpoint is of a {model['class']}, the network is "
                            f"a {type(self.network).__name__}")
        params = dict(self.network.params)
        for name, a in ckpt.arrays.items():
            if name.startswith("best/params/"):
                k = name[len("best/params/"):]
                if k not in params or tuple(params[k].shape) != tuple(a.shape):
                    problems.append(f"early stopping: best parameter {k!r} does not fit "
                                    "the network")
        progress, rng = ckpt.progress, ckpt.rng
        missing = [f"progress[{k!r}]" for k in ("epoch", "step", "position")
                   if not isinstance(progress.get(k), int)]
        missing += [f"rng[{k!r}]" for k in ("shuffle", "epoch_start") if k not in rng]
        if missing:
            problems.append(f"not a Trainer checkpoint (no {', '.join(missing)})")
            return problems
        position = progress["position"]
        if not 0 <= position <= self.iter_per_epoch:
            problems.append(f"progress: position {position} is outside an epoch of "
                            f"{self.iter_per_epoch} steps")
        # replay the epoch's shuffle on a scratch generator: it must end in the saved state
        try:
            scratch = np.random.default_rng()
            scratch.bit_generator.state = rng["epoch_start"]
            if position > 0 and self.shuffle:
                scratch.permutation(self.train_size)
            replayed = scratch.bit_generator.state
            scratch.bit_generator.state = rng["shuffle"]
            if position > 0 and replayed != rng["shuffle"]:
                problems.append("rng: the saved shuffling state does not follow from the "
                                "epoch's start state")
            backend_state = rng.get("backend")
            if backend_state is not None:
                scratch.bit_generator.state = backend_state["bit_generator"]
        except (TypeError, ValueError, KeyError) as exc:
            problems.append(f"rng: invalid generator state ({exc})")
        return problems

    def resume(self, path: str | Path | None = None) -> Path | None:
        """Restore everything from checkpoint ``path`` (default: the latest in
        ``checkpoint_dir``); returns the path used, or None when there is none.

        Raises :class:`~xpnet.train.CheckpointMismatchError` (a ValueError) listing
        every mismatch with this trainer, network, optimizer or schedule; nothing is
        changed then.
        """
        if path is None:
            if self._manager is None:
                raise ValueError("Trainer.resume: no checkpoint_dir and no path given")
            path = self._manager.latest()
            if path is None:
                return None
        ckpt = load_checkpoint(path)
        problems = self._resume_problems(ckpt)
        if problems:
            listing = "\n".join(f"  - {p}" for p in problems)
            raise CheckpointMismatchError(
                f"{ckpt.path}: cannot resume ({len(problems)} problem(s)); nothing was "
                f"changed:\n{listing}", problems)
        ckpt.restore(self.network, self.optimizer, self.lr_schedule)

        rng = ckpt.rng
        backend_state = rng.get("backend")
        if backend_state is not None and self.backend == "numpy":
            get_rng("numpy").set_state(backend_state)
        if rng.get("layers") and hasattr(self.network, "set_rng_states"):
            self.network.set_rng_states(rng["layers"])
        progress = ckpt.progress
        self.current_epoch = int(progress["epoch"])
        self.current_iter = int(progress["step"])
        self.position = int(progress["position"])
        self.stopped_early = bool(progress.get("stopped_early", False))
        self._epoch_start_state = rng["epoch_start"]
        self._perm = None
        if self.position > 0:  # regenerate this epoch's order from its start state
            self.rng.bit_generator.state = rng["epoch_start"]
            self._perm = self._draw_permutation()
        self.rng.bit_generator.state = rng["shuffle"]
        if "augment" in rng:
            self.augment_rng.bit_generator.state = rng["augment"]

        hist = ckpt.history
        self.history = {k: list(v) for k, v in hist.get("history", {}).items()}
        self.train_acc_list = list(hist.get("train_acc_list", []))
        self.test_acc_list = list(hist.get("test_acc_list", []))
        es = hist.get("early_stopping", {})
        self.best_score, self.best_epoch = es.get("best_score"), es.get("best_epoch")
        self._bad_epochs = int(es.get("bad_epochs", 0))
        self.train_loss_list = [float(v) for v in ckpt.arrays.get("train_loss_list", [])]
        best: dict[str, dict[str, Any]] = {"params": {}, "buffers": {}}
        for name, a in ckpt.arrays.items():
            if name.startswith("best/"):
                _, section, key = name.split("/", 2)
                best[section][key] = to_backend(a, self.backend)
        self._best_state = best if best["params"] else None
        self._pending = []
        self.last_checkpoint = Path(path)
        note = ""
        if self.backend != "numpy":
            note = ("; note: the GPU random generator (dropout) cannot be restored, so the "
                    "run is not bitwise identical to an uninterrupted one")
        self._say(f"resumed from {path} (epoch {self.current_epoch + 1}, step "
                  f"{self.current_iter}, {self.position}/{self.iter_per_epoch} of the epoch "
                  f"done){note}")
        return Path(path)

    # --------------------------------------------------------------- training
    def _draw_permutation(self) -> np.ndarray:
        if self.shuffle:
            return self.rng.permutation(self.train_size)
        return np.arange(self.train_size)

    def _snapshot(self) -> dict[str, dict[str, Any]]:
        return {"params": {k: v.copy() for k, v in self.network.params.items()},
                "buffers": {k: v.copy() for k, v in
                            (getattr(self.network, "buffers", None) or {}).items()}}

    def _load_snapshot(self, state: dict[str, dict[str, Any]]) -> None:
        if hasattr(self.network, "load_state_dict"):
            self.network.load_state_dict(state)
            return
        for k, v in state["params"].items():
            self.network.params[k][...] = v
        for k, v in state.get("buffers", {}).items():
            self.network.buffers[k][...] = v

    def _step(self, x_batch: Any, t_batch: Any) -> Any:
        """One update on a device batch; returns the loss (a device array, not synced)."""
        step, epoch, iteration = self.current_iter + 1, self.current_epoch + 1, self.position + 1
        try:
            loss = self.step_runner(x_batch, t_batch)
        except NonFiniteError as exc:  # checked on the host, before anything was updated
            self._flush()
            self._raise_nonfinite(exc.what, exc.value, step, epoch, iteration)
        self._pending.append((step, epoch, iteration, loss))
        if self.book_output:
            self._flush()
            print("train loss:" + str(self.train_loss_list[-1]), flush=True)
        return self._end_step(loss)

    def _end_step(self, loss: Any) -> Any:
        if self.lr_schedule is not None:
            self.lr_schedule.step()
        self.current_iter += 1
        self.position += 1
        return loss

    def train(self, resume: bool = False, resume_from: str | Path | None = None) -> dict:
        """Run the training; returns ``history``.

        ``resume=True`` continues from the latest checkpoint in ``checkpoint_dir``
        (or starts from scratch, saying so, when there is none); ``resume_from=path``
        continues from that file.  Without either, a ``checkpoint_dir`` that already
        holds checkpoints is refused (so that an earlier run is not mixed in).
        """
        self._check_labels()  # before anything changes
        if resume_from is not None:
            self.resume(resume_from)
        elif resume:
            if self._manager is None:
                raise ValueError("Trainer.train(resume=True) needs checkpoint_dir")
            self._manager.remove_stale_temp_files()
            if self.resume() is None:
                self._say(f"no checkpoint in {self.checkpoint_dir}; starting from scratch")
        elif self._manager is not None and self.current_iter == 0:
            latest = self._manager.latest()
            if latest is not None:
                raise FileExistsError(
                    f"{self.checkpoint_dir} already holds checkpoints (latest: {latest.name}); "
                    "pass resume=True to continue that run, or use an empty directory")
        if self._manager is not None and (self.comm is None or self.comm.is_root):
            self._manager.remove_stale_temp_files()
            self._manager.check_writable()  # before the first step, not after an epoch
        if self.comm is not None:  # one start for all: rank 0's weights (also after a resume)
            broadcast_parameters(self.network, self.comm)

        loss_layers = self._loss_layers()
        saved_flags = [(layer, layer.validate_labels) for layer in loss_layers]
        self.stop_training = False
        bar = None
        try:
            for layer in loss_layers:
                layer.validate_labels = False
            while (self.current_epoch < self.epochs and not self.stopped_early
                   and not self.stop_training):
                bar = self._run_epoch()
                if self.stop_training and self.position < self.iter_per_epoch:
                    break
                self._end_epoch(bar)
                bar = None
        finally:
            if bar is not None:
                bar.close()
            for layer, flag in saved_flags:
                layer.validate_labels = flag
        self._flush()
        if self.stop_training and self.position and self._manager is not None:
            self._save_checkpoint()
        self._finish()
        return self.history

    def _begin_epoch(self) -> None:
        if self.position == 0 or self._perm is None:
            self._epoch_start_state = self.rng.bit_generator.state
            self._perm = self._draw_permutation()
            self.position = 0
        self._epoch_t0 = time.perf_counter()
        self._epoch_images = 0

    def _batch_step(self) -> Any:
        """The step on the next batch of the epoch's order, then checkpoint and callbacks."""
        bs = self.batch_size
        idx = self._perm[self.position * bs:(self.position + 1) * bs]
        if self.comm is not None:  # this process's slice of the global batch
            idx = shard(idx, self.comm.rank, self.comm.size)
        x = self.x_train[idx]
        if self.augment is not None:
            x = self.augment(x, self.augment_rng)
        loss = self._step(self._to_device_x(x),
                          self._to_device_t(self.t_train[idx]))
        self._epoch_images += bs if self.comm is not None else len(idx)
        if (self.checkpoint_every_steps is not None
                and self.current_iter % self.checkpoint_every_steps == 0):
            self._save_checkpoint()
        self._emit("step_end", {"epoch": self.current_epoch + 1, "step": self.current_iter,
                                "iteration": self.position, "loss": loss})
        return loss

    def train_step(self) -> float:
        """One step, as the book's ``Trainer.train_step()``; returns its loss.

        Takes the next batch of the current epoch (starting one when needed); after an
        epoch's last step evaluates, reports and checkpoints as :meth:`train` does.
        """
        if self._num_classes is None:
            self._check_labels()
        if self.position == 0 or self._perm is None:
            self._begin_epoch()
        self._batch_step()
        self._flush()
        if self.position >= self.iter_per_epoch:
            self._end_epoch(None)
        return self.train_loss_list[-1]

    def _run_epoch(self) -> Any:
        self._begin_epoch()
        bar = None
        if self._use_bar():
            from tqdm import tqdm  # noqa: PLC0415 - only on a terminal (tqdm.auto imports IPython)

            bar = tqdm(total=self.iter_per_epoch, initial=self.position,
                       desc=f"epoch {self.current_epoch + 1}/{self.epochs}", unit="step",
                       file=sys.stdout, dynamic_ncols=True, leave=False)
        last_refresh = time.perf_counter()
        while self.position < self.iter_per_epoch and not self.stop_training:
            self._batch_step()
            if bar is not None:
                bar.update(1)
                now = time.perf_counter()
                if now - last_refresh >= _REFRESH_SECONDS:
                    last_refresh = now
                    self._flush()
                    bar.set_postfix(self._postfix(), refresh=False)
        return bar

    def _epoch_mean_loss(self) -> float:
        n = min(self.position, len(self.train_loss_list))
        return float(np.mean(self.train_loss_list[-n:])) if n else float("nan")

    def _images_per_sec(self) -> float:
        elapsed = time.perf_counter() - self._epoch_t0
        return self._epoch_images / elapsed if elapsed > 0 else 0.0

    def _postfix(self, ips: float | None = None, **extra: Any) -> dict[str, str]:
        out = {"loss": f"{self._epoch_mean_loss():.4f}"}
        out.update({k: f"{v:.4f}" for k, v in extra.items()})
        out["img/s"] = f"{self._images_per_sec() if ips is None else ips:.0f}"
        return out

    def _end_epoch(self, bar: Any) -> None:
        """Flush, evaluate, record, report, early-stop and checkpoint; closes ``bar``."""
        self._flush()
        if self.comm is not None:  # every rank evaluates the same averaged statistics
            average_buffers(self.network, self.comm)
        epoch = self.current_epoch + 1
        elapsed = time.perf_counter() - self._epoch_t0
        ips = self._images_per_sec()
        mean_loss = self._epoch_mean_loss()
        num = self.evaluate_sample_num_per_epoch
        train_acc = self.evaluate(self.x_train, self.t_train, num)
        test_acc = None if self.x_test is None else self.evaluate(self.x_test, self.t_test, num)
        val_acc = None if self.x_val is None else self.evaluate(self.x_val, self.t_val)
        self.train_acc_list.append(train_acc)
        if test_acc is not None:
            self.test_acc_list.append(test_acc)
        lr = getattr(self.optimizer, "lr", None)
        h = self.history
        h["epoch"].append(epoch)
        h["step"].append(self.current_iter)
        h["train_loss"].append(mean_loss)
        h["train_acc"].append(train_acc)
        h["test_acc"].append(test_acc)
        h["lr"].append(None if lr is None else float(lr))
        h["epoch_time"].append(elapsed)
        h["images_per_sec"].append(ips)
        if val_acc is not None:
            h["val_acc"].append(val_acc)

        if bar is not None:
            bar.close()  # the bar shows progress; the epoch's line stays, in every terminal
        if self.book_output:
            print(f"=== epoch:{epoch}, train acc:{train_acc}, test acc:{test_acc} ===", flush=True)
        else:
            line = f"epoch {epoch}/{self.epochs}: loss {mean_loss:.4f}, train acc {train_acc:.4f}"
            if test_acc is not None:
                line += f", test acc {test_acc:.4f}"
            if val_acc is not None:
                line += f", val acc {val_acc:.4f}"
            line += f", {elapsed:.1f} s, {ips:.0f} images/s"
            self._say(line)

        if val_acc is not None and self.early_stopping_patience is not None:
            if self.best_score is None or val_acc > self.best_score:
                self.best_score, self.best_epoch, self._bad_epochs = val_acc, epoch, 0
                self._best_state = self._snapshot()
            else:
                self._bad_epochs += 1
                if self._bad_epochs >= self.early_stopping_patience:
                    self.stopped_early = True
                    self._say(f"early stopping after epoch {epoch}: val acc has not improved "
                              f"for {self._bad_epochs} epoch(s) (best {self.best_score:.4f} at "
                              f"epoch {self.best_epoch})")
        self.current_epoch += 1
        self.position = 0
        self._perm = None
        info = {"epoch": epoch, "step": self.current_iter, "train_loss": mean_loss,
                "train_acc": train_acc, "test_acc": test_acc, "val_acc": val_acc,
                "lr": h["lr"][-1], "epoch_time": elapsed, "images_per_sec": ips}
        self._save_checkpoint()
        self._emit("epoch_end", info)

    def _finish(self) -> None:
        restored = False
        if (self.early_stopping_patience is not None and self._best_state is not None
                and self.best_epoch is not None and self.history["epoch"]
                and self.best_epoch != self.history["epoch"][-1]):
            self._load_snapshot(self._best_state)
            restored = True
            self._say(f"restored the parameters of epoch {self.best_epoch} (best val acc "
                      f"{self.best_score:.4f})")
        if self.x_test is not None:
            self.final_test_acc = self.evaluate(self.x_test, self.t_test)
        self.final_val_acc = None if self.x_val is None else self.evaluate(self.x_val, self.t_val)
        self._emit("train_end", {"epochs": self.current_epoch, "step": self.current_iter,
                                 "test_acc": self.final_test_acc,
                                 "val_acc": self.final_val_acc,
                                 "stopped_early": self.stopped_early,
                                 "best_epoch": self.best_epoch, "restored_best": restored})
        if self.final_test_acc is None:
            if self.final_val_acc is not None:
                self._say(f"validation accuracy: {100 * self.final_val_acc:.2f}% (no test set "
                          "given)")
        elif self.book_output:
            print("=============== Final Test Accuracy ===============")
            print("test acc:" + str(self.final_test_acc), flush=True)
        else:
            self._say(f"test accuracy: {100 * self.final_test_acc:.2f}%")

    def __repr__(self) -> str:
        return (f"Trainer({type(self.network).__name__}, epochs={self.epochs}, "
                f"mini_batch_size={self.batch_size}, optimizer={self.optimizer!r}, "
                f"step={self.current_iter})")
