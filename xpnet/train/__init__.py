"""Training: the book's ``Trainer``, checkpoints, and the ``train.py`` command line.

>>> from xpnet.train import Trainer
>>> trainer = Trainer(network, x_train, t_train, x_test, t_test, epochs=3)  # doctest: +SKIP
>>> trainer.train()                                                       # doctest: +SKIP

This package may import :mod:`xpnet.models`, :mod:`xpnet.optim`, :mod:`xpnet.datasets`
and :mod:`xpnet.backend`; none of those import it.
"""

from xpnet.train import distributed
from xpnet.train.checkpoint import (
    Checkpoint,
    CheckpointError,
    CheckpointManager,
    CheckpointMismatchError,
    load_checkpoint,
    save_checkpoint,
)
from xpnet.train.step import ClipGradNorm, NonFiniteError, TrainStep
from xpnet.train.trainer import NonFiniteLossError, Trainer

__all__ = [
    "Trainer",
    "TrainStep",
    "ClipGradNorm",
    "NonFiniteError",
    "distributed",
    "NonFiniteLossError",
    "save_checkpoint",
    "load_checkpoint",
    "Checkpoint",
    "CheckpointError",
    "CheckpointMismatchError",
    "CheckpointManager",
]
