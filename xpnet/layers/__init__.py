"""Layers: forward/backward pairs over the active array backend.

Every layer follows the protocol in :mod:`xpnet.layers.base`.
"""

from xpnet.layers.activation import ReLU, Sigmoid, Tanh
from xpnet.layers.base import Layer, free_workspace
from xpnet.layers.compose import Chain, Identity, Parallel, residual
from xpnet.layers.conv import Convolution, ConvReLU, Deconvolution
from xpnet.layers.dense import Affine, Flatten
from xpnet.layers.dropout import Dropout
from xpnet.layers.loss import SoftmaxWithLoss
from xpnet.layers.norm import BatchNormalization
from xpnet.layers.pool import AvgPooling, GlobalAveragePooling, Pooling
from xpnet.layers.rnn import LSTM, Embedding, TimeAffine, TimeSoftmaxWithLoss

__all__ = [
    "Layer",
    "free_workspace",
    "Chain",
    "Parallel",
    "Identity",
    "residual",
    "Affine",
    "Flatten",
    "ReLU",
    "Sigmoid",
    "Tanh",
    "Convolution",
    "ConvReLU",
    "Deconvolution",
    "GlobalAveragePooling",
    "Embedding",
    "LSTM",
    "TimeAffine",
    "TimeSoftmaxWithLoss",
    "Relu",
    "Pooling",
    "AvgPooling",
    "BatchNormalization",
    "Dropout",
    "SoftmaxWithLoss",
]

#: the book's name for ReLU (``common/layers.py``)
Relu = ReLU
