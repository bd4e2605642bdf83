"""Writing files so that a crash never leaves a half-written one.

Every file the package writes for the user (checkpoints, metrics, predictions, exported models) goes through
`atomic_write`: the content is written to a temporary file beside the target, flushed to disk, then renamed over
the target (atomic within one file system). A reader sees the old file or the new one, never a truncated one.
"""
from __future__ import annotations

import itertools
import json
import os
from typing import Callable

_counter = itertools.count()


def atomic_write(path: str, write: Callable[[str], None], suffix: str = ".tmp") -> None:
    """Calls `write(tmp_path)`, then renames the temporary file over `path`. The temporary name keeps `suffix`
    (some writers want their own extension, e.g. AOTInductor's `.pt2`); it is removed if anything fails."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{next(_counter)}{suffix}")
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


def write_text_atomic(path: str, text: str) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)


def write_json_atomic(path: str, obj, indent: int | None = 2, default=None) -> None:
    write_text_atomic(path, json.dumps(obj, indent=indent, default=default))
