"""Data sets for xpnet, as host (NumPy) arrays: MNIST (bundled) and Fashion-MNIST.

>>> from xpnet.datasets import load_mnist
>>> (x_train, t_train), (x_test, t_test) = load_mnist(normalize=True, flatten=True)
>>> x_train.shape, x_train.dtype, t_train.dtype
((60000, 784), dtype('float32'), dtype('uint8'))

This package never imports the rest of xpnet (nor CuPy): move the arrays to the device
with the backend when needed.  Modules: :mod:`~xpnet.datasets.idx` (IDX parsing),
:mod:`~xpnet.datasets.specs` (files and checksums), :mod:`~xpnet.datasets.fetch` (look-up
order, download, ``XPNET_DATA`` / ``XPNET_OFFLINE``), :mod:`~xpnet.datasets.npycache`
(decompressed cache), :mod:`~xpnet.datasets.mnist` (loaders), :mod:`~xpnet.datasets.split`
(shuffle and validation split), :mod:`~xpnet.datasets.canvas` (canvases of MNIST digits with
masks, boxes and captions, for the chapter 8 applications).
"""

from .canvas import VOCAB, decode_caption, encode_caption, load_digit_canvases
from .errors import DatasetCorruptError, DatasetNotFoundError
from .mnist import FASHION_MNIST_CLASSES, load_fashion_mnist, load_mnist
from .split import shuffle_dataset, train_val_split

__all__ = [
    "FASHION_MNIST_CLASSES",
    "VOCAB",
    "decode_caption",
    "encode_caption",
    "load_digit_canvases",
    "DatasetCorruptError",
    "DatasetNotFoundError",
    "load_fashion_mnist",
    "load_mnist",
    "shuffle_dataset",
    "train_val_split",
]
