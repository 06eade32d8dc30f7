"""Finding a data set's files on disk, and downloading them when they are nowhere.

Look-up order (the first directory holding all four files wins; sets are never mixed
across directories):

1. the ``data_dir`` argument: the four files directly in it;
2. ``$XPNET_DATA/<name>`` (``XPNET_DATA`` holds one sub-folder per data set, ``mnist/`` and
   ``fashion-mnist/``, because both data sets use the same file names);
3. the copy bundled with the package (MNIST only);
4. the user cache, ``$XDG_CACHE_HOME/xpnet/<name>`` or ``~/.cache/xpnet/<name>``;
5. system directories (``/usr/share/datasets/fashion-mnist`` from Debian's
   ``dataset-fashion-mnist`` package, for Fashion-MNIST);
6. a download of the files missing from the user cache, from each mirror in turn.

Each file may be gzip-compressed (``name.gz``, preferred) or not (``name``).  A download is
streamed into a temporary file in the cache folder, its length and checksum are verified,
and only then is it renamed into place; on any failure the temporary file is removed.
With ``XPNET_OFFLINE=1`` nothing is downloaded (no socket is opened) and a
:class:`DatasetNotFoundError` names the missing files, their checksums and where to put them.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import warnings
from collections.abc import Sequence
from contextlib import suppress
from os import PathLike
from pathlib import Path
from typing import NamedTuple

from .errors import DatasetCorruptError, DatasetNotFoundError
from .idx import decompress
from .paths import DATA_ENV, OFFLINE_ENV, dataset_cache_dir, env_flag
from .specs import DatasetSpec, FileSpec, md5_hex, verify_checksums

__all__ = [
    "DEFAULT_TIMEOUT",
    "DatasetFiles",
    "download_file",
    "ensure_files",
    "find_file",
    "is_offline",
    "locate",
    "search_dirs",
]

DEFAULT_TIMEOUT = 30.0
#: Refuse a download larger than this (the largest MNIST-layout file is ~30 MB).
MAX_DOWNLOAD_BYTES = 256 * 1024 * 1024
_CHUNK = 1 << 16
_USER_AGENT = "xpnet-datasets (Python urllib)"
_STALE_PART_SECONDS = 3600.0


class DatasetFiles(NamedTuple):
    """Paths of the four files of a data set, and the directory they were found in."""

    train_images: Path
    train_labels: Path
    test_images: Path
    test_labels: Path
    source: Path


def is_offline() -> bool:
    """Whether ``XPNET_OFFLINE`` forbids downloads."""
    return env_flag(OFFLINE_ENV, False)


def search_dirs(spec: DatasetSpec, data_dir: str | PathLike[str] | None = None) -> list[Path]:
    """The directories searched for ``spec``'s files, in order (see the module docstring)."""
    dirs: list[Path] = []
    if data_dir is not None:
        dirs.append(Path(data_dir).expanduser())
    env = os.environ.get(DATA_ENV, "")
    if env:
        dirs.append(Path(env).expanduser() / spec.name)
    if spec.bundled_dir is not None:
        dirs.append(spec.bundled_dir)
    dirs.append(dataset_cache_dir(spec.name))
    dirs.extend(spec.system_dirs)
    return dirs


def find_file(directory: Path, fspec: FileSpec) -> Path | None:
    """``directory/name.gz`` or else ``directory/name`` (uncompressed), if it is a file."""
    for name in (fspec.filename, fspec.raw_filename):
        candidate = directory / name
        if candidate.is_file():
            return candidate
    return None


def _find_all(directory: Path, spec: DatasetSpec) -> list[Path | None]:
    return [find_file(directory, f) for f in spec.files]


def locate(
    spec: DatasetSpec, data_dir: str | PathLike[str] | None = None
) -> DatasetFiles | None:
    """The first searched directory that holds all four files, or ``None`` (no download)."""
    for directory in search_dirs(spec, data_dir):
        found = _find_all(directory, spec)
        if all(p is not None for p in found):
            return DatasetFiles(*found, source=directory)  # type: ignore[arg-type]
    return None


def _missing_message(spec: DatasetSpec, data_dir: str | PathLike[str] | None,
                     missing: Sequence[FileSpec], reason: str) -> DatasetNotFoundError:
    searched = search_dirs(spec, data_dir)
    lines = [f"{spec.title} files not found ({reason}). Missing:"]
    for f in missing:
        lines.append(f"  {f.filename} ({f.describe_checksums()})")
    lines.append("Searched (a directory is used only when it holds all four files):")
    for d in searched:
        have = [p.name for p in _find_all(d, spec) if p is not None]
        lines.append(f"  {d}" + (f" (has only {', '.join(have)})" if have else ""))
    lines.append(
        f"Put the four files (gzip-compressed or not) in one of: the data_dir argument, "
        f"${DATA_ENV}/{spec.name}, or {dataset_cache_dir(spec.name)}"
    )
    return DatasetNotFoundError(
        "\n".join(lines),
        tuple(f.filename for f in missing),
        tuple(str(d) for d in searched),
    )


def ensure_files(
    spec: DatasetSpec,
    data_dir: str | PathLike[str] | None = None,
    *,
    mirrors: Sequence[str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> DatasetFiles:
    """Find ``spec``'s files, downloading the ones missing from the user cache if need be.

    ``mirrors`` overrides ``spec.mirrors``.  Raises :class:`DatasetNotFoundError` when the
    files are nowhere and cannot be downloaded (offline, or every mirror failed).
    """
    found = locate(spec, data_dir)
    if data_dir is not None and (found is None or found.source != Path(data_dir).expanduser()):
        warnings.warn(
            f"data_dir {data_dir} does not hold the four {spec.title} files; "
            "looking elsewhere",
            UserWarning,
            stacklevel=4,  # the caller of load_mnist / load_fashion_mnist
        )
    if found is not None:
        return found
    cache = dataset_cache_dir(spec.name)
    have = _find_all(cache, spec)
    missing = [f for f, p in zip(spec.files, have, strict=True) if p is None]
    if is_offline():
        raise _missing_message(spec, data_dir, missing, f"{OFFLINE_ENV} is set, no download")
    urls = tuple(spec.mirrors if mirrors is None else mirrors)
    if not urls:
        raise _missing_message(spec, data_dir, missing, "no download mirror is known")
    for fspec in missing:
        download_file(fspec, urls, cache, timeout=timeout)
    found = locate(spec, data_dir)
    if found is None:  # pragma: no cover - the cache now holds every file
        raise _missing_message(spec, data_dir, missing, "download did not complete")
    return found


def _clean_stale_parts(dest_dir: Path, fspec: FileSpec) -> None:
    """Remove temporary files left by a download that was killed long ago."""
    cutoff = time.time() - _STALE_PART_SECONDS
    for part in dest_dir.glob(f".{fspec.filename}.*.part"):
        with suppress(OSError):
            if part.stat().st_mtime < cutoff:
                part.unlink()


def download_file(
    fspec: FileSpec,
    mirrors: Sequence[str],
    dest_dir: str | PathLike[str],
    *,
    timeout: float = DEFAULT_TIMEOUT,
) -> Path:
    """Download ``fspec`` from the first mirror that serves it intact into ``dest_dir``.

    Each mirror is a base URL (``https://host/path/``) to which the file name is appended.
    Returns the final path.  Raises :class:`DatasetNotFoundError` naming every mirror's
    failure when none succeeds; nothing partial or unverified is left in ``dest_dir``.
    """
    if not fspec.has_checksum:
        raise DatasetNotFoundError(
            f"no checksum recorded for {fspec.filename}: refusing to download it",
            (fspec.filename,),
        )
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    _clean_stale_parts(dest, fspec)
    failures: list[str] = []
    for base in mirrors:
        url = base if base.endswith("/") else base + "/"
        url += fspec.filename
        try:
            return _download_one(url, fspec, dest, timeout)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            # URLError, HTTPError, timeouts and DatasetCorruptError (a ValueError) land here
            failures.append(f"  {url}: {exc}")
    raise DatasetNotFoundError(
        f"could not download {fspec.filename} ({fspec.describe_checksums()}) "
        f"into {dest}; tried:\n" + "\n".join(failures or ["  (no mirror given)"]),
        (fspec.filename,),
        (str(dest),),
    )


def _download_one(url: str, fspec: FileSpec, dest: Path, timeout: float) -> Path:
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme not in ("https", "http"):
        raise ValueError(f"unsupported URL scheme {scheme!r}")
    print(f"xpnet: downloading {url}", file=sys.stderr)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{fspec.filename}.", suffix=".part", dir=dest)
    tmp = Path(tmp_name)
    try:
        sha256 = hashlib.sha256()
        md5 = hashlib.md5(usedforsecurity=False)
        received = 0
        request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
        # build_opener() per call: honours the proxy variables as they are now
        opener = urllib.request.build_opener()
        with os.fdopen(fd, "wb") as out, opener.open(request, timeout=timeout) as response:
            declared = response.headers.get("Content-Length")
            while chunk := response.read(_CHUNK):
                received += len(chunk)
                if received > MAX_DOWNLOAD_BYTES:
                    raise DatasetCorruptError(url, f"larger than {MAX_DOWNLOAD_BYTES} bytes")
                out.write(chunk)
                sha256.update(chunk)
                md5.update(chunk)
        if declared is not None and received != int(declared):
            raise DatasetCorruptError(
                url, f"connection closed after {received} of {declared} bytes"
            )
        verify_checksums(
            url,
            fspec,
            sha256=sha256.hexdigest(),
            md5=md5.hexdigest(),
            raw_md5=lambda: md5_hex(decompress(tmp.read_bytes(), url)),
        )
        final = dest / fspec.filename
        os.replace(tmp, final)
        return final
    finally:
        with suppress(OSError):
            tmp.unlink(missing_ok=True)
