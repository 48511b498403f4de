"""Workdir files that a crash never leaves half-written. Paths go through etils.epath, so a workdir may be a bucket
(`gs://...`); pathlib would turn gs://bucket/run into gs:/bucket/run."""

from __future__ import annotations

import os

from etils import epath


def is_remote(path: epath.PathLike) -> bool:
    """A URI (gs://, s3://, ...) rather than a local path."""
    return "://" in os.fspath(path)


def write_atomic(path: epath.PathLike, data: str | bytes) -> None:
    """Writes `data` (text as UTF-8) to `path` whole or not at all: a process killed meanwhile, or a full disk,
    leaves the previous content (or no file), never a torn one that the next launch fails to read.

    A local file is written beside its destination under a temporary name, flushed to disk, then renamed over it
    (a rename within one folder is atomic on POSIX file systems). An object store makes a new object visible only
    once it has been uploaded whole, so there it is written directly: a rename would be a second, non-atomic copy.
    """
    path = epath.Path(path)
    content = data.encode("utf-8") if isinstance(data, str) else data
    if is_remote(path):
        path.write_bytes(content)
        return
    tmp = path.parent / f".{path.name}.tmp"  # one name: the next write reuses what a killed one left
    try:
        with open(tmp, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())  # the data on disk before the name points at it: else a power cut may leave it empty
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
