"""Where xpnet keeps data on disk: the user cache directory and the environment switches."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "DATA_ENV",
    "NPY_CACHE_ENV",
    "OFFLINE_ENV",
    "cache_root",
    "dataset_cache_dir",
    "env_flag",
]

#: A directory holding one sub-folder per data set (``mnist/``, ``fashion-mnist/``).
DATA_ENV = "XPNET_DATA"
#: Set to 1 (or true/yes/on) to forbid any download: no socket is opened.
OFFLINE_ENV = "XPNET_OFFLINE"
#: Set to 0 (or false/no/off) to turn off the decompressed ``.npy`` cache.
NPY_CACHE_ENV = "XPNET_NPY_CACHE"

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def env_flag(name: str, default: bool) -> bool:
    """Read a yes/no environment variable; unset, empty or unrecognised gives ``default``."""
    value = os.environ.get(name, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    return default


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/xpnet`` when that variable holds an absolute path, else
    ``~/.cache/xpnet`` (read at each call, so tests can point it elsewhere)."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "xpnet"


def dataset_cache_dir(name: str) -> Path:
    """The cache folder for one data set, ``<cache_root>/<name>`` (downloads land here)."""
    return cache_root() / name
