"""Atomic file writes: the one way mapdet writes a file that another process or a rerun may read;
and ``read_json``, the one way a command reads a JSON file a user named.

Every file goes to ``NAME.tmp`` first and is renamed over ``NAME`` only once complete (and flushed
to disk), so a job killed mid-write leaves the old file or none, never a truncated one that a
resume, a merge or a reader would trust.

``read_json(path, what)`` parses with orjson (``mapdet cocoeval``'s inputs are results files of
tens of MB: 2.4x faster than ``json``, bench/RESULTS.md) and turns a missing file or bad JSON into
a ``ValueError`` of one line naming ``what`` and the file, which a command prints as is (exit 2).
This module imports no torch: ``mapdet cocoeval`` reads through it and must start fast.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import orjson


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


def read_json(path: str | Path, what: str) -> Any:
    """The parsed content of the JSON file ``path``; ``what`` names it in the error (e.g. "results"):
    ``ValueError("results file not found: PATH")`` or ``ValueError("results file PATH is not valid
    JSON: <orjson's reason and position>")``."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} file not found: {path}")
    try:
        return orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as e:  # also bytes that are not UTF-8
        raise ValueError(f"{what} file {path} is not valid JSON: {e}") from None
