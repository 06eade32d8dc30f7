"""The two errors that :mod:`xpnet.datasets` raises for missing or damaged data."""

from __future__ import annotations

from os import PathLike

__all__ = ["DatasetCorruptError", "DatasetNotFoundError"]


class DatasetNotFoundError(FileNotFoundError):
    """The data set files are in none of the searched places and could not be downloaded.

    The message names the missing files, their checksums and the directories where they
    could be put.  ``missing`` holds the missing file names and ``searched`` the directories
    that were looked in.
    """

    def __init__(
        self,
        message: str,
        missing: tuple[str, ...] = (),
        searched: tuple[str, ...] = (),
    ) -> None:
        super().__init__(message)
        self.missing = missing
        self.searched = searched

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""

    def __reduce__(self):  # keep the extra fields through pickling (multiprocessing)
        return (type(self), (str(self), self.missing, self.searched))


class DatasetCorruptError(ValueError):
    """A data set file is damaged or not what it claims to be.

    Raised for a bad gzip stream (CRC error, truncation), a wrong IDX magic number, a header
    whose counts disagree with the data, out-of-range labels, or a checksum mismatch.  The
    message starts with the path; ``path`` holds it too.
    """

    def __init__(self, path: str | PathLike[str], problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self):
        return (type(self), (self.path, self.problem))
