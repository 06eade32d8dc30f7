"""Reading IDX files (the MNIST file format), gzip-compressed or raw.

An IDX file is a big-endian header followed by the data.  The header starts with a
uint32 magic number whose low bytes give the element type (``0x08`` for uint8) and the
number of dimensions; then one uint32 per dimension.  Images are magic 2051
(``0x00000803``: uint8, 3 dimensions: count, rows, cols), labels are magic 2049
(``0x00000801``: uint8, 1 dimension: count).

Every check failure raises :class:`~xpnet.datasets.errors.DatasetCorruptError` naming the
file and the problem.  Arrays come back read-only (they are views on the file's bytes);
copy them before changing them.
"""

from __future__ import annotations

import gzip
import zlib
from os import PathLike
from pathlib import Path

import numpy as np

from .errors import DatasetCorruptError

__all__ = [
    "IMAGES_MAGIC",
    "LABELS_MAGIC",
    "check_label_range",
    "check_pair",
    "decompress",
    "idx_header",
    "parse_images",
    "parse_labels",
    "read_idx_bytes",
    "read_images",
    "read_labels",
]

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049
_IMAGES_HEADER = 16
_LABELS_HEADER = 8
_GZIP_MAGIC = b"\x1f\x8b"

PathArg = str | PathLike[str]


def decompress(data: bytes, path: PathArg) -> bytes:
    """Return ``data`` gunzipped when it starts with the gzip magic, else unchanged.

    A truncated stream, a bad CRC or any other gzip error raises ``DatasetCorruptError``.
    """
    if data[:2] != _GZIP_MAGIC:
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
        raise DatasetCorruptError(path, f"bad gzip data ({exc})") from exc


def read_idx_bytes(path: PathArg) -> bytes:
    """The uncompressed IDX bytes of the file at ``path`` (gzip or raw)."""
    return decompress(Path(path).read_bytes(), path)


def idx_header(data: bytes, path: PathArg, magic: int, ndim: int) -> tuple[int, ...]:
    """Check the magic number and return the dimension sizes from an IDX header."""
    header_len = 4 + 4 * ndim
    if len(data) >= 4:  # the magic number first: it says best what kind of file this is
        found = int(np.frombuffer(data, dtype=">u4", count=1)[0])
        if found != magic:
            raise DatasetCorruptError(
                path,
                f"wrong IDX magic number {found} (0x{found:08x}); "
                f"expected {magic} (0x{magic:08x})",
            )
    if len(data) < header_len:
        raise DatasetCorruptError(
            path, f"truncated IDX header: {len(data)} bytes, need at least {header_len}"
        )
    fields = np.frombuffer(data, dtype=">u4", count=1 + ndim)
    return tuple(int(v) for v in fields[1:])


def _check_length(data: bytes, path: PathArg, header_len: int, count: int, what: str,
                  item_size: int) -> None:
    expected = header_len + count * item_size
    if len(data) < expected:
        have = (len(data) - header_len) // item_size
        raise DatasetCorruptError(
            path,
            f"truncated: header says {count} {what} ({expected} bytes) but the data "
            f"holds {len(data)} bytes (about {have} {what})",
        )
    if len(data) > expected:
        raise DatasetCorruptError(
            path,
            f"{len(data) - expected} unexpected trailing bytes after {count} {what} "
            f"(header count disagrees with the data)",
        )


def parse_images(data: bytes, path: PathArg, rows: int = 28, cols: int = 28) -> np.ndarray:
    """Parse uncompressed IDX image bytes into a read-only ``(N, rows, cols)`` uint8 array."""
    count, r, c = idx_header(data, path, IMAGES_MAGIC, 3)
    if (r, c) != (rows, cols):
        raise DatasetCorruptError(path, f"images are {r}x{c}, expected {rows}x{cols}")
    _check_length(data, path, _IMAGES_HEADER, count, "images", rows * cols)
    return np.frombuffer(data, dtype=np.uint8, count=count * rows * cols,
                         offset=_IMAGES_HEADER).reshape(count, rows, cols)


def parse_labels(data: bytes, path: PathArg, num_classes: int = 10) -> np.ndarray:
    """Parse uncompressed IDX label bytes into a read-only ``(N,)`` uint8 array.

    Every label must lie in ``0 .. num_classes - 1``.
    """
    (count,) = idx_header(data, path, LABELS_MAGIC, 1)
    _check_length(data, path, _LABELS_HEADER, count, "labels", 1)
    labels = np.frombuffer(data, dtype=np.uint8, count=count, offset=_LABELS_HEADER)
    check_label_range(labels, path, num_classes)
    return labels


def check_label_range(labels: np.ndarray, path: PathArg, num_classes: int = 10) -> None:
    """Raise ``DatasetCorruptError`` unless every label lies in ``0 .. num_classes - 1``."""
    bad = np.flatnonzero(labels >= num_classes)
    if bad.size:
        first = int(bad[0])
        raise DatasetCorruptError(
            path,
            f"{bad.size} label(s) out of range 0..{num_classes - 1}, "
            f"first at index {first}: {int(labels[first])}",
        )


def read_images(path: PathArg, rows: int = 28, cols: int = 28) -> np.ndarray:
    """Read an IDX image file (gzip or raw) into a read-only ``(N, rows, cols)`` uint8 array."""
    return parse_images(read_idx_bytes(path), path, rows, cols)


def read_labels(path: PathArg, num_classes: int = 10) -> np.ndarray:
    """Read an IDX label file (gzip or raw) into a read-only ``(N,)`` uint8 array."""
    return parse_labels(read_idx_bytes(path), path, num_classes)


def check_pair(images: np.ndarray, labels: np.ndarray, images_path: PathArg,
               labels_path: PathArg) -> None:
    """Raise ``DatasetCorruptError`` unless there is one label per image."""
    if len(images) != len(labels):
        raise DatasetCorruptError(
            labels_path,
            f"{len(labels)} labels but {images_path} holds {len(images)} images",
        )
