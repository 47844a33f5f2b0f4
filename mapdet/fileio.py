"""Atomic file writes: the one way mapdet writes a file that another process or a rerun may read.

Every file goes to ``NAME.tmp`` first and is renamed over ``NAME`` only once complete (and flushed
to disk), so a job killed mid-write leaves the old file or none, never a truncated one that a
resume, a merge or a reader would trust.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_open(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """``open(NAME.tmp, mode)``; on a clean exit the data is fsynced and renamed to ``path``. On an
    exception the temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_open(path) as f:
        f.write(text)


def write_json_atomic(path: str | Path, obj: Any, indent: int | None = 1) -> None:
    with atomic_open(path) as f:
        json.dump(obj, f, indent=indent)
