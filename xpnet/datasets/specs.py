"""What a data set is made of: its files, their checksums, where they may be found.

A file is accepted when *any* recorded checksum matches: the SHA-256 or MD5 of the file as
it is (``.gz`` bytes), or the MD5 of its uncompressed IDX bytes.  The uncompressed MD5 does
not depend on the gzip wrapper, so a re-compressed or gunzipped copy of the right data is
accepted too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

from .errors import DatasetCorruptError

__all__ = ["DatasetSpec", "FileSpec", "digests", "md5_hex", "verify_checksums"]


@dataclass(frozen=True)
class FileSpec:
    """One IDX file of a data set and the checksums that identify it.

    ``filename`` is the ``.gz`` name; the uncompressed copy may sit beside it under the same
    name without ``.gz`` (:attr:`raw_filename`).
    """

    filename: str
    raw_md5: str | None = None
    gz_md5: tuple[str, ...] = ()
    gz_sha256: tuple[str, ...] = ()

    @property
    def raw_filename(self) -> str:
        """The file name without ``.gz``."""
        return self.filename.removesuffix(".gz")

    @property
    def has_checksum(self) -> bool:
        """Whether any checksum is recorded for this file."""
        return bool(self.raw_md5 or self.gz_md5 or self.gz_sha256)

    def describe_checksums(self) -> str:
        """The recorded checksums, for error messages."""
        parts = [f"sha256 of the .gz {h}" for h in self.gz_sha256]
        parts += [f"md5 of the .gz {h}" for h in self.gz_md5]
        if self.raw_md5:
            parts.append(f"md5 of the uncompressed file {self.raw_md5}")
        return "; ".join(parts) if parts else "no checksum recorded"


@dataclass(frozen=True)
class DatasetSpec:
    """A four-file IDX data set (MNIST layout) and where to look for it.

    ``name`` is the folder name used under ``$XPNET_DATA`` and the user cache.  ``mirrors``
    are base URLs tried in turn (the file name is appended).  ``bundled_dir`` is a copy
    shipped inside the package, ``system_dirs`` are directories a system package installs.
    """

    name: str
    title: str
    train_images: FileSpec
    train_labels: FileSpec
    test_images: FileSpec
    test_labels: FileSpec
    train_count: int
    test_count: int
    mirrors: tuple[str, ...] = ()
    bundled_dir: Path | None = None
    system_dirs: tuple[Path, ...] = ()
    rows: int = 28
    cols: int = 28
    num_classes: int = 10

    @property
    def files(self) -> tuple[FileSpec, FileSpec, FileSpec, FileSpec]:
        """The four files: train images, train labels, test images, test labels."""
        return (self.train_images, self.train_labels, self.test_images, self.test_labels)


def md5_hex(data: bytes) -> str:
    """MD5 of ``data`` as hex (an integrity check, not a security one)."""
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def digests(data: bytes) -> tuple[str, str]:
    """``(sha256, md5)`` of ``data`` as hex."""
    return hashlib.sha256(data).hexdigest(), md5_hex(data)


def verify_checksums(
    where: str | PathLike[str],
    spec: FileSpec,
    *,
    sha256: str,
    md5: str,
    raw_md5: Callable[[], str] | None,
) -> None:
    """Raise ``DatasetCorruptError`` unless the file matches a recorded checksum.

    ``sha256``/``md5`` are digests of the file as it is; ``raw_md5`` computes the MD5 of
    its uncompressed bytes (called only when needed).  A file for which no checksum is
    recorded passes here (the parser still checks its structure); downloads refuse such
    files before they start.
    """
    if sha256 in spec.gz_sha256 or md5 in spec.gz_md5 or not spec.has_checksum:
        return
    found = f"sha256 {sha256}, md5 {md5}"
    if spec.raw_md5 and raw_md5 is not None:
        got = raw_md5()
        if got == spec.raw_md5:
            return
        found += f", md5 of the uncompressed data {got}"
    raise DatasetCorruptError(
        where,
        f"checksum mismatch for {spec.filename}: found {found}; "
        f"expected {spec.describe_checksums()}",
    )
