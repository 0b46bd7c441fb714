"""Crash-safe file writes: temp file in the same folder, fsync, rename, fsync the folder.
A reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import VepatchError


def write_bytes_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _os_error(path, exc) from None


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def append_line(path: Path, record: dict) -> None:
    """Append one JSON line in a single write (O_APPEND), then fsync."""
    line = (json.dumps(record, sort_keys=True) + "\n").encode("utf-8")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise _os_error(path, exc) from None


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _os_error(path: Path, exc: OSError) -> VepatchError:
    import errno

    if exc.errno == errno.ENOSPC:
        return VepatchError(f"{path}: disk full, nothing was changed", "free some space and run the command again")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return VepatchError(f"{path}: permission denied, nothing was changed", "check the folder's owner and mode")
    return VepatchError(f"{path}: {exc.strerror or exc}", "check the disk and the path")
