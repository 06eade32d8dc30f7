"""MNIST and Fashion-MNIST loaders with the book's signature and return value.

``load_mnist(normalize=True, flatten=True, one_hot_label=False)`` returns
``(x_train, t_train), (x_test, t_test)`` as host NumPy arrays, like ``dataset/mnist.py`` of
"Deep Learning from Scratch", with these differences:

* no pickle: the book caches ``mnist.pkl`` next to its code; here the raw IDX files are
  read (bundled copy, user cache, ...) and, to skip gunzipping, a checksummed ``.npy``
  copy is kept in the user cache and read with ``allow_pickle=False``;
* the parsed arrays are kept in memory per process (``functools.lru_cache``), and every
  call returns fresh copies, so changing them does not change later results;
* every file is checked (IDX structure and a recorded checksum) before it is used;
* images are float32 in [0, 1] when normalized (as in the book), else uint8; one-hot labels
  are float32 (the book gives float64); plain labels stay uint8, as in the book.

Both data sets are 60,000 training and 10,000 test images of 28x28 pixels, 10 classes.
MNIST (Yann LeCun, Corinna Cortes, Christopher J.C. Burges; CC BY-SA 3.0) ships with the
package.  Fashion-MNIST (Zalando Research; MIT licence) does not: it is found on disk (see
:mod:`xpnet.datasets.fetch` for the look-up order) or downloaded on first use.
"""

from __future__ import annotations

import functools
from os import PathLike
from pathlib import Path
from typing import Literal

import numpy as np

from . import npycache
from .errors import DatasetCorruptError
from .fetch import ensure_files
from .idx import check_label_range, check_pair, decompress, parse_images, parse_labels
from .specs import DatasetSpec, FileSpec, digests, md5_hex, verify_checksums

__all__ = [
    "DATASETS",
    "FASHION_MNIST",
    "FASHION_MNIST_CLASSES",
    "MNIST",
    "clear_memory_cache",
    "load_dataset",
    "load_fashion_mnist",
    "load_mnist",
]

Split = tuple[np.ndarray, np.ndarray]
Kind = Literal["images", "labels"]

BUNDLED_MNIST_DIR = Path(__file__).resolve().parent / "data" / "mnist"

# MNIST checksums.  raw_md5: MD5 of the uncompressed IDX bytes (the well-known values of the
# files on the MNIST home page).  gz_md5: the .gz files on the public mirrors below.
# gz_sha256: the .gz files bundled in data/mnist/ (computed with sha256sum).
MNIST = DatasetSpec(
    name="mnist",
    title="MNIST",
    train_images=FileSpec(
        "train-images-idx3-ubyte.gz",
        raw_md5="6bbc9ace898e44ae57da46a324031adb",
        gz_md5=("f68b3c2dcbeaaa9fbdd348bbdeb94873",),
        gz_sha256=("71524e2cd1ad2968737f7f2f2ff69cbfc32df8ccddff51593f7cb2d4e0eb5b64",),
    ),
    train_labels=FileSpec(
        "train-labels-idx1-ubyte.gz",
        raw_md5="a25bea736e30d166cdddb491f175f624",
        gz_md5=("d53e105ee54ea40749a09fcbcd1e9432",),
        gz_sha256=("fe03b8bd7915f70bf5aa08be480aa413fbd85afcaa58b35d230d335f284fd88e",),
    ),
    test_images=FileSpec(
        "t10k-images-idx3-ubyte.gz",
        raw_md5="2646ac647ad5339dbf082846283269ea",
        gz_md5=("9fb629c4189551a2d022fa330f9573f3",),
        gz_sha256=("5634745efa576a17e7d4cf5cd9d09123c75e6538e5114267c2d156edaf519341",),
    ),
    test_labels=FileSpec(
        "t10k-labels-idx1-ubyte.gz",
        raw_md5="27ae3e4e09519cfbb04c329615203637",
        gz_md5=("ec29112dd5afa0611ce80d1b7f02629c",),
        gz_sha256=("ae18e77e031ccde52407f794d123116439864147d33ac992975f85dd4dc42af6",),
    ),
    train_count=60000,
    test_count=10000,
    mirrors=(
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
    ),
    bundled_dir=BUNDLED_MNIST_DIR,
)

# Fashion-MNIST checksums.  gz_md5: the official .gz files (as published in the
# zalandoresearch/fashion-mnist README and used by torchvision).  raw_md5: MD5 of the
# uncompressed IDX bytes, computed from Debian's dataset-fashion-mnist package
# (0.0~git20200523.55506a9-1) and matching the values other projects publish.  gz_sha256:
# Debian's re-compressed .gz files in /usr/share/datasets/fashion-mnist (computed with
# sha256sum).  The SHA-256 of the official .gz files is not recorded (not known for sure).
FASHION_MNIST = DatasetSpec(
    name="fashion-mnist",
    title="Fashion-MNIST",
    train_images=FileSpec(
        "train-images-idx3-ubyte.gz",
        raw_md5="f4a8712d7a061bf5bd6d2ca38dc4d50a",
        gz_md5=("8d4fb7e6c68d591d4c3dfef9ec88bf0d",),
        gz_sha256=("b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",),
    ),
    train_labels=FileSpec(
        "train-labels-idx1-ubyte.gz",
        raw_md5="9018921c3c673c538a1fc5bad174d6f9",
        gz_md5=("25c81989df183df01b3e8a0aad5dffbe",),
        gz_sha256=("0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",),
    ),
    test_images=FileSpec(
        "t10k-images-idx3-ubyte.gz",
        raw_md5="8181f5470baa50b63fa0f6fddb340f0a",
        gz_md5=("bef4ecab320f06d8554ea6380940ec79",),
        gz_sha256=("cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",),
    ),
    test_labels=FileSpec(
        "t10k-labels-idx1-ubyte.gz",
        raw_md5="15d484375f8d13e6eb1aabb0c3f46965",
        gz_md5=("bb300cfdad3c16e7a12a480ee83cd310",),
        gz_sha256=("8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",),
    ),
    train_count=60000,
    test_count=10000,
    mirrors=(
        "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
        # S3 website endpoints serve plain http only; the MD5 check guards the content.
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    ),
    system_dirs=(Path("/usr/share/datasets/fashion-mnist"),),
)

#: The data sets by name; the loaders read this at each call (tests may patch it).
DATASETS: dict[str, DatasetSpec] = {"mnist": MNIST, "fashion-mnist": FASHION_MNIST}

#: Fashion-MNIST class names, indexed by label.
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


@functools.lru_cache(maxsize=16)
def _read_verified(path: str, size: int, mtime_ns: int, fspec: FileSpec, kind: Kind,
                   rows: int, cols: int, num_classes: int) -> np.ndarray:
    """Parse and verify one IDX file; a read-only array.  ``size``/``mtime_ns`` are only
    part of the cache key, so a changed file is read again."""
    data = Path(path).read_bytes()
    sha256, md5 = digests(data)
    cached = npycache.load(sha256, kind, rows, cols)
    if cached is not None:
        arr, raw_md5 = cached
        if kind == "labels":
            check_label_range(arr, path, num_classes)
        verify_checksums(path, fspec, sha256=sha256, md5=md5, raw_md5=lambda: raw_md5)
        return arr
    raw = decompress(data, path)
    if kind == "images":
        arr = parse_images(raw, path, rows, cols)
    else:
        arr = parse_labels(raw, path, num_classes)
    raw_digest = functools.cache(lambda: md5_hex(raw))
    verify_checksums(path, fspec, sha256=sha256, md5=md5, raw_md5=raw_digest)
    npycache.store(sha256, raw_digest(), arr)
    return arr


def clear_memory_cache() -> None:
    """Forget the arrays kept in memory (the files are read again on the next load)."""
    _read_verified.cache_clear()


def _read(path: Path, fspec: FileSpec, kind: Kind, spec: DatasetSpec, count: int,
          split: str) -> np.ndarray:
    st = path.stat()
    arr = _read_verified(str(path.resolve()), st.st_size, st.st_mtime_ns, fspec, kind,
                         spec.rows, spec.cols, spec.num_classes)
    if len(arr) != count:
        raise DatasetCorruptError(
            path, f"holds {len(arr)} {kind}, but the {spec.title} {split} set has {count}"
        )
    return arr


def _format_images(x: np.ndarray, normalize: bool, flatten: bool) -> np.ndarray:
    n, rows, cols = x.shape
    out = np.divide(x, np.float32(255.0), dtype=np.float32) if normalize else x.copy()
    return out.reshape(n, rows * cols) if flatten else out.reshape(n, 1, rows, cols)


def _format_labels(t: np.ndarray, one_hot: bool, num_classes: int) -> np.ndarray:
    if not one_hot:
        return t.copy()
    out = np.zeros((len(t), num_classes), dtype=np.float32)
    out[np.arange(len(t)), t] = 1.0
    return out


def load_dataset(
    dataset: str | DatasetSpec,
    normalize: bool = True,
    flatten: bool = True,
    one_hot_label: bool = False,
    data_dir: str | PathLike[str] | None = None,
) -> tuple[Split, Split]:
    """Load an MNIST-layout data set by name (a key of :data:`DATASETS`) or spec.

    See :func:`load_mnist` for the arguments and the return value.
    """
    spec = DATASETS[dataset] if isinstance(dataset, str) else dataset
    files = ensure_files(spec, data_dir)
    # labels first: they are small, so a damaged label file is reported without delay
    t_train = _read(files.train_labels, spec.train_labels, "labels", spec, spec.train_count,
                    "training")
    t_test = _read(files.test_labels, spec.test_labels, "labels", spec, spec.test_count, "test")
    x_train = _read(files.train_images, spec.train_images, "images", spec, spec.train_count,
                    "training")
    x_test = _read(files.test_images, spec.test_images, "images", spec, spec.test_count, "test")
    check_pair(x_train, t_train, files.train_images, files.train_labels)
    check_pair(x_test, t_test, files.test_images, files.test_labels)
    return (
        (_format_images(x_train, normalize, flatten),
         _format_labels(t_train, one_hot_label, spec.num_classes)),
        (_format_images(x_test, normalize, flatten),
         _format_labels(t_test, one_hot_label, spec.num_classes)),
    )


def load_mnist(
    normalize: bool = True,
    flatten: bool = True,
    one_hot_label: bool = False,
    data_dir: str | PathLike[str] | None = None,
) -> tuple[Split, Split]:
    """Load MNIST as ``(x_train, t_train), (x_test, t_test)`` host NumPy arrays.

    Parameters
    ----------
    normalize:
        True: images as float32 in [0, 1] (pixel / 255); False: uint8 in 0..255.
    flatten:
        True: images of shape ``(N, 784)``; False: ``(N, 1, 28, 28)``.
    one_hot_label:
        True: labels as ``(N, 10)`` float32 one-hot rows (the book uses float64);
        False: ``(N,)`` uint8 digits 0..9, as in the book.
    data_dir:
        A directory holding the four IDX files (``.gz`` or uncompressed), searched first.
        Then ``$XPNET_DATA/mnist``, the copy bundled with xpnet, the user cache, and
        finally a download (unless ``XPNET_OFFLINE=1``); see :mod:`xpnet.datasets.fetch`.

    Unlike the book, no pickle file is written: see the module docstring.  Raises
    :class:`DatasetNotFoundError` when the files are nowhere, :class:`DatasetCorruptError`
    when a file is damaged or does not match its recorded checksum.
    """
    return load_dataset("mnist", normalize, flatten, one_hot_label, data_dir)


def load_fashion_mnist(
    normalize: bool = True,
    flatten: bool = True,
    one_hot_label: bool = False,
    data_dir: str | PathLike[str] | None = None,
) -> tuple[Split, Split]:
    """Load Fashion-MNIST exactly like :func:`load_mnist` (same shapes, dtypes, flags).

    Labels index :data:`FASHION_MNIST_CLASSES`.  The files are not bundled: they are looked
    for in ``data_dir``, ``$XPNET_DATA/fashion-mnist``, the user cache and
    ``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist``), then
    downloaded into the user cache unless ``XPNET_OFFLINE=1``.
    """
    return load_dataset("fashion-mnist", normalize, flatten, one_hot_label, data_dir)
