"""Where a pack lives, and the one way every stage opens a file of it (shards, manifest, COCO file).

A shard source is what the user names as ``data.shards``, ``predict --shards`` or the folder of
``verify`` and ``peek``:

- a local (or mounted) folder, as ``mapdet pack`` wrote it: ``/data/vistas-shards``;
- an ``http://`` or ``https://`` base URL: file ``NAME`` is read from ``BASE/NAME``;
- a ``pipe:`` command template: ``{name}`` is replaced by the file name and the command's standard
  output is the file, e.g. ``pipe:aws s3 cp s3://bucket/vistas/{name} -``. The command runs in a
  shell with mapdet's environment, so credentials come from the environment; mapdet stores none.

Nothing can be listed remotely: files are opened by name only (``{split}.manifest.json``, the
shards the manifest names, ``{split}.coco.json``). Every name is checked (``check_name``) before it
goes into a URL or a command: letters, digits, ``.``, ``_``, ``-``, not starting with ``.`` or ``-``,
so a manifest from a remote place cannot inject shell syntax or reach outside the base.

Remote reads never hang and survive a flaky network (``mapdet.shards.remote``): no byte for
``data.read_timeout_s`` is a stall; a stall, a dropped connection, an HTTP 5xx or a failing command
is retried ``data.stream_retries`` times from the byte reached, then raises ``StreamError`` naming the
file, never the command, which the loaders count as they count a corrupt shard. WebDataset's own
``http`` opener (curl without a read timeout) is not used.
"""

from __future__ import annotations

import hashlib
import io
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import BinaryIO

from mapdet.config import DataConfig
from mapdet.shards.remote import BUFFER, HttpBody, MissingFile, PipeBody, RetryingStream, StreamError

__all__ = ["SOURCE_HELP", "Digest", "MissingFile", "ShardSource", "StreamError", "check_name", "shard_source"]

SOURCE_HELP = (
    "where the shards are: a folder written by `mapdet pack`, an http(s):// base URL, "
    "or a pipe: command with {name}, e.g. 'pipe:aws s3 cp s3://bucket/vistas/{name} -'"
)
_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")


def check_name(name: str) -> str:
    """``name`` if it is a plain file name safe in a URL and a shell command, else ValueError."""
    if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name):
        raise ValueError(
            f"refusing file name {name!r}: names of a pack are letters, digits, '.', '_' and '-', "
            "not starting with '.' or '-' (they go into URLs and pipe: commands)"
        )
    return name


@dataclass(frozen=True)
class ShardSource:
    """A parsed shard source (see the module docstring); build it with ``shard_source``."""

    location: str  # a folder path, a base URL without its trailing '/', or 'pipe:...{name}...'
    retries: int  # data.stream_retries
    read_timeout_s: float  # data.read_timeout_s

    @property
    def kind(self) -> str:
        if self.location.startswith("pipe:"):
            return "pipe"
        return "http" if self.location.startswith(("http://", "https://")) else "local"

    @property
    def local_dir(self) -> Path | None:
        return Path(self.location) if self.kind == "local" else None

    def where(self, name: str) -> str:
        """Where file ``name`` is, for messages: a path, a URL, or for a command only the name."""
        check_name(name)
        if self.kind == "pipe":
            return name
        return f"{self.location}/{name}" if self.kind == "http" else str(Path(self.location) / name)

    def open(self, name: str) -> BinaryIO:
        """File ``name`` opened for reading (binary, buffered; close it, or use ``with``).

        Local: a plain file (FileNotFoundError when absent). Remote: connected here (a missing file
        raises ``MissingFile``); a failure that outlasts the retries raises ``StreamError``, here
        or from ``read``.
        """
        check_name(name)
        if self.kind == "local":
            return open(Path(self.location) / name, "rb")  # noqa: SIM115 - the caller closes it
        if self.kind == "http":
            body = partial(HttpBody, name, self.where(name), self.read_timeout_s)
        else:
            body = partial(PipeBody, self.location[len("pipe:") :].replace("{name}", name), self.read_timeout_s)
        raw = RetryingStream(name, body, self.retries, self.read_timeout_s)
        raw.connect()
        return io.BufferedReader(raw, BUFFER)

    def read_bytes(self, name: str) -> bytes:
        with self.open(name) as f:
            return f.read()


def shard_source(where: str | Path | ShardSource, data=None) -> ShardSource:
    """The source ``where`` names, with the stream settings of ``data`` (a ``DataConfig``; default
    settings when None). A ShardSource is returned as it is. Raises ValueError for a form mapdet
    does not read (a ``pipe:`` without ``{name}``, an ``s3://`` or other URL scheme)."""
    if isinstance(where, ShardSource):
        return where
    data = data or DataConfig()  # the defaults' one home
    if data.stream_retries < 0 or not data.read_timeout_s > 0:
        raise ValueError("data.stream_retries must be 0 or more and data.read_timeout_s more than 0")
    text = str(where)
    if text.startswith("pipe:"):
        if "{name}" not in text:
            raise ValueError(f"{text!r}: a pipe: shard source needs {{name}} where the file name goes")
    elif text.startswith(("http://", "https://")):
        text = text.rstrip("/")
    elif re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", text):
        raise ValueError(
            f"{text}: mapdet reads shards from a folder, an http(s):// URL or a pipe: command; for object "
            "storage use its own tool, e.g. 'pipe:aws s3 cp s3://bucket/path/{name} -' or "
            "'pipe:gcloud storage cat gs://bucket/path/{name}'"
        )
    return ShardSource(text, int(data.stream_retries), float(data.read_timeout_s))


class Digest:
    """Reads through ``stream`` while hashing: sha256 and size of every byte read, and ``finish()``
    reads the rest (a tar reader stops at the end-of-archive blocks, before the file's end)."""

    def __init__(self, stream: BinaryIO):
        self.stream, self.hash, self.size = stream, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.hash.update(data)
        self.size += len(data)
        return data

    def finish(self) -> tuple[int, str]:
        while self.read(BUFFER):
            pass
        return self.size, self.hash.hexdigest()
