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

Remote reads never hang and survive a flaky network. HTTP is read in process (``urllib``, a socket
timeout per read), a ``pipe:`` command's output through ``select``; no byte for ``read_timeout_s``
(``data.read_timeout_s``) is a stall. A stall, a dropped connection, an HTTP 5xx/408/429 answer or a
command that exits non-zero is retried up to ``retries`` times (``data.stream_retries``) with a short
backoff, reading on from the byte reached (an HTTP Range request, else the first bytes are read
again and discarded). Then ``StreamError`` is raised, naming the file and the cause, never the
command; the loaders count it as they count a corrupt shard. Another HTTP 4xx answer is final at
once (the server has answered): 404 and 410 raise ``MissingFile``. WebDataset's own ``http``
opener (curl without a read timeout) is not used.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import os
import re
import select
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import BinaryIO

SOURCE_HELP = (
    "where the shards are: a folder written by `mapdet pack`, an http(s):// base URL, "
    "or a pipe: command with {name}, e.g. 'pipe:aws s3 cp s3://bucket/vistas/{name} -'"
)
_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
_NOT_FINAL = (408, 429)  # 4xx answers worth asking again (timeout, throttled), as curl --retry does
_BUFFER = 1 << 20


class StreamError(OSError):
    """A file of a remote source that could not be read, after the retries; the message names the
    file and the cause (never a pipe: command)."""


class MissingFile(StreamError, FileNotFoundError):
    """The source answered that the file is not there (HTTP 404 or 410)."""


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
            body = partial(_HttpBody, name, self.where(name), self.read_timeout_s)
        else:
            body = partial(_PipeBody, self.location[len("pipe:") :].replace("{name}", name), self.read_timeout_s)
        raw = _Retrying(name, body, self.retries, self.read_timeout_s)
        raw.connect()
        return io.BufferedReader(raw, _BUFFER)

    def read_bytes(self, name: str) -> bytes:
        with self.open(name) as f:
            return f.read()


def shard_source(where: str | Path | ShardSource, data=None) -> ShardSource:
    """The source ``where`` names, with the stream settings of ``data`` (a ``DataConfig``; default
    settings when None). A ShardSource is returned as it is. Raises ValueError for a form mapdet
    does not read (a ``pipe:`` without ``{name}``, an ``s3://`` or other URL scheme)."""
    if isinstance(where, ShardSource):
        return where
    from mapdet.config import DataConfig  # the defaults' one home

    data = data or DataConfig()
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
        while self.read(_BUFFER):
            pass
        return self.size, self.hash.hexdigest()


class _Retrying(io.RawIOBase):
    """The bytes of one remote file, from bodies opened by ``body(offset)``; a failed body is
    replaced by one that goes on at the byte reached, at most ``retries`` times."""

    def __init__(self, name: str, body, retries: int, timeout: float):
        self.name, self._body_at, self.retries, self.timeout = name, body, retries, timeout
        self.pos, self.failures, self.body, self.failed = 0, 0, None, None

    def readable(self) -> bool:
        return True

    def connect(self) -> None:
        """Open the first body now, so that a missing file or a dead server shows at ``open``."""
        self._with_retries(lambda: None)

    def readinto(self, b) -> int:
        return self._with_retries(lambda: self._read(b))

    def _read(self, b) -> int:
        n = self.body.readinto(b)
        if not n and len(b):
            self.body.finish()  # the end: was the file complete?
        self.pos += n
        if n:
            self.failures = 0  # retries count failures in a row: a long read may meet several blips
        return n

    def _with_retries(self, action):
        if self.failed is not None:
            raise self.failed
        while True:
            try:
                if self.body is None:
                    self.body = self._body_at(self.pos)
                return action()
            except StreamError as e:  # a final answer: no retry
                self.failed = e
                raise
            except (OSError, http.client.HTTPException, subprocess.SubprocessError) as e:
                self._drop()
                self.failures += 1
                if self.failures > self.retries:
                    tries = "1 retry" if self.retries == 1 else f"{self.retries} retries"
                    self.failed = StreamError(
                        f"{self.name}: {_reason(e, self.timeout)}; {self.pos} bytes read, "
                        f"gave up after {tries} (data.stream_retries)"
                    )
                    raise self.failed from None
                time.sleep(min(0.5 * 2 ** (self.failures - 1), 8.0))

    def _drop(self) -> None:
        if self.body is not None:
            self.body.close()
            self.body = None

    def close(self) -> None:
        self._drop()
        super().close()


def _reason(e: BaseException, timeout: float) -> str:
    """What went wrong, in words (a socket timeout may also arrive wrapped in a URLError)."""
    if isinstance(e, urllib.error.URLError) and isinstance(e.reason, TimeoutError):
        e = e.reason
    if isinstance(e, (TimeoutError, subprocess.TimeoutExpired)):
        return f"no data for {timeout:g} s (data.read_timeout_s)"
    if isinstance(e, http.client.IncompleteRead):
        return "the connection closed before the end of the file"
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError):
        return f"cannot connect: {e.reason}"
    return str(e) if isinstance(e, _CommandFailed) else f"{type(e).__name__}: {e}"


class _HttpBody:
    """One GET of ``url`` from byte ``offset`` on (a Range request; a server that ignores it sends
    the whole file and the first ``offset`` bytes are skipped)."""

    def __init__(self, name: str, url: str, timeout: float, offset: int):
        request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
        try:
            self.response = urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 - http(s) only
        except urllib.error.HTTPError as e:
            if 400 <= e.code < 500 and e.code not in _NOT_FINAL:
                kind = MissingFile if e.code in (404, 410) else StreamError
                raise kind(f"{name}: HTTP {e.code} {e.reason} from {url}") from None
            raise
        self.left = self.response.length  # Content-Length (None when chunked: http.client checks those)
        if offset and self.response.status != 206:
            _skip(self, offset)

    def readinto(self, b) -> int:
        n = self.response.readinto(b)
        if self.left is not None:
            self.left -= n
        return n

    def finish(self) -> None:
        """A connection closed before Content-Length bytes came (http.client returns 0, not an error)."""
        if self.left:
            raise http.client.IncompleteRead(b"", self.left)

    def close(self) -> None:
        self.response.close()


class _CommandFailed(OSError):
    pass


class _PipeBody:
    """One run of a ``pipe:`` command, its output from byte ``offset`` on (the first bytes skipped).
    The command runs in a process group of its own, killed whole when the body is dropped."""

    def __init__(self, command: str, timeout: float, offset: int):
        self.timeout, self.err = timeout, tempfile.TemporaryFile()  # a file: a chatty stderr never blocks it
        self.proc = subprocess.Popen(
            command,
            shell=True,  # the user's own command line, by design; names in it are check_name'd
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self.err,
            start_new_session=True,
        )
        _skip(self, offset)

    def readinto(self, b) -> int:
        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout)
        if not ready:
            raise TimeoutError
        data = os.read(self.proc.stdout.fileno(), len(b))
        b[: len(data)] = data
        return len(data)

    def finish(self) -> None:
        status = self.proc.wait(self.timeout)
        if status != 0:
            self.err.seek(0)
            lines = self.err.read().decode(errors="replace").strip().splitlines()
            said = f" ({lines[-1][:300]})" if lines else ""
            raise _CommandFailed(f"the pipe: command exited with status {status}{said}")

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.stdout.close()
        self.proc.wait()
        self.err.close()


def _skip(body, n: int) -> None:
    """Read and discard the first ``n`` bytes of ``body`` (a retry that cannot seek)."""
    buf = bytearray(min(max(n, 1), _BUFFER))
    while n > 0:
        got = body.readinto(memoryview(buf)[: min(n, len(buf))])
        if not got:
            body.finish()
            raise http.client.IncompleteRead(b"")
        n -= got
