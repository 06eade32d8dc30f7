"""A disk cache of parsed IDX arrays as ``.npy`` files, to skip gunzipping on later runs.

Gunzipping the 47 MB of MNIST training images takes about half a second; loading the same
array from ``.npy`` takes a few milliseconds.  The cache is content-addressed and
self-checking:

* the file name is ``<sha256 of the source file>-<md5 of its uncompressed bytes>.npy``, so
  an entry can only ever be used for the exact source file it was made from;
* on load (``np.load(..., allow_pickle=False)``, so no code can run) the IDX bytes are
  rebuilt from the array and their MD5 must equal the one in the name; anything else is
  ignored (and the source is parsed again);
* entries are written to a temporary file and renamed into place, so readers never see
  a partial one.

The source file's checksum is still verified by the caller on every load.  The cache lives
in ``<cache_root>/parsed`` and is off when ``XPNET_NPY_CACHE=0``; any error writing it is
ignored (a read-only home directory just means no cache).
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import IO, Literal

import numpy as np

from .idx import IMAGES_MAGIC, LABELS_MAGIC
from .paths import NPY_CACHE_ENV, cache_root, env_flag

__all__ = ["cache_dir", "enabled", "idx_md5", "load", "store"]

Kind = Literal["images", "labels"]
_HEX = re.compile(r"[0-9a-f]{32}")


def enabled() -> bool:
    """Whether the ``.npy`` cache is on (``XPNET_NPY_CACHE`` not set to 0)."""
    return env_flag(NPY_CACHE_ENV, True)


def cache_dir() -> Path:
    """Where the ``.npy`` entries live."""
    return cache_root() / "parsed"


def idx_md5(arr: np.ndarray, kind: Kind) -> str:
    """MD5 of the uncompressed IDX file that ``arr`` was parsed from (header + data)."""
    magic = IMAGES_MAGIC if kind == "images" else LABELS_MAGIC
    digest = hashlib.md5(np.array([magic, *arr.shape], dtype=">u4").tobytes(),
                         usedforsecurity=False)
    digest.update(memoryview(np.ascontiguousarray(arr)).cast("B"))
    return digest.hexdigest()


def _shape_ok(arr: np.ndarray, kind: Kind, rows: int, cols: int) -> bool:
    if arr.dtype != np.uint8:
        return False
    if kind == "images":
        return arr.ndim == 3 and arr.shape[1:] == (rows, cols)
    return arr.ndim == 1


def load(src_sha256: str, kind: Kind, rows: int = 28, cols: int = 28
         ) -> tuple[np.ndarray, str] | None:
    """The cached array for the source file with this SHA-256 and its uncompressed MD5.

    Returns ``None`` when the cache is off, holds no entry, or the entry fails its checks.
    The array is read-only.
    """
    if not enabled():
        return None
    with suppress(OSError):
        for entry in sorted(cache_dir().glob(f"{src_sha256}-*.npy")):
            raw_md5 = entry.stem.split("-", 1)[1]
            if not _HEX.fullmatch(raw_md5):
                continue
            try:
                arr = np.load(entry, allow_pickle=False)
            except (OSError, ValueError, EOFError):
                continue
            if not isinstance(arr, np.ndarray) or not _shape_ok(arr, kind, rows, cols):
                continue
            if idx_md5(arr, kind) != raw_md5:
                continue
            arr.flags.writeable = False
            return arr, raw_md5
    return None


def store(src_sha256: str, raw_md5: str, arr: np.ndarray) -> None:
    """Save ``arr`` as the entry for this source file; errors are ignored."""
    if not enabled():
        return
    directory = cache_dir()
    final = directory / f"{src_sha256}-{raw_md5}.npy"
    write_quietly(final, lambda f: np.save(f, np.ascontiguousarray(arr), allow_pickle=False))


def write_quietly(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Write a cache file atomically (a temporary file, then a rename); a cache that
    cannot be written is no error, so OSErrors are ignored."""
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
        tmp = Path(name)
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
        tmp = None
    except OSError:
        pass
    finally:
        if tmp is not None:
            with suppress(OSError):
                tmp.unlink()
