"""Files written whole or not at all: `write_atomic` and `sha256_file`.

A reader (a resumed run, a second process, a user's script) never sees half a file: the text goes to a
temporary file beside the target, which `os.replace` then swaps in, in one step on POSIX filesystems.
"""

from __future__ import annotations

import hashlib
import os
from typing import Callable, Optional


def write_atomic(
    path: str, text: str, *, fsync: bool = False, before_replace: Optional[Callable[[], None]] = None
) -> None:
    """Write `text` to `path` through `path.tmp.PID` and `os.replace`.

    fsync: flush the file to disk before the replace and the folder after it (what a checkpoint's commit
    needs to survive a power cut). before_replace: called between the write and the replace (the test-only
    crash hook of checkpoints).
    """
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        if fsync:
            fh.flush()
            os.fsync(fh.fileno())
    if before_replace is not None:
        before_replace()
    os.replace(tmp, path)
    if fsync:
        fsync_path(os.path.dirname(path) or ".")


def fsync_path(path: str) -> None:
    """fsync a file or a folder (a folder's entry list: makes a rename durable); silent where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256_file(path: str) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()
