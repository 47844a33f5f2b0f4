"""The bytes of one remote file (an HTTP GET or a ``pipe:`` command's output), read with a bound on
every wait and retried from the byte reached; ``mapdet.shards.source`` opens files through it.

No byte for ``timeout`` seconds is a stall: HTTP reads carry a socket timeout (urllib, in process),
a command's output is read through ``select``. A stall, a dropped connection, an HTTP 5xx/408/429
answer or a command exiting non-zero is a failure that ``RetryingStream`` retries ``retries`` times
in a row (a read that delivers bytes resets the count), 0.5, 1, 2 ... 8 s apart, opening a new body
at the byte reached: an HTTP Range request, or for a server that ignores it and for a command the
first bytes again, skipped. Then ``StreamError``, naming the file and the cause, never the command.
Another HTTP 4xx is final at once (the server has answered): 404 and 410 raise ``MissingFile``.
"""

from __future__ import annotations

import contextlib
import fcntl
import http.client
import io
import os
import select
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

BUFFER = 1 << 20
_NOT_FINAL = (408, 429)  # 4xx answers worth asking again (timeout, throttled), as curl --retry does


class StreamError(OSError):
    """A file of a remote source that could not be read, after the retries; the message names the
    file and the cause (never a pipe: command)."""


class MissingFile(StreamError, FileNotFoundError):
    """The source answered that the file is not there (HTTP 404 or 410)."""


class RetryingStream(io.RawIOBase):
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


class HttpBody:
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


class PipeBody:
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
        # A 64 KiB pipe makes the command and the reader hand over 16 times per MiB; on a busy node
        # each handover waits for the scheduler (pipe:cat read 13 MB/s on the shared 2-core machine).
        with contextlib.suppress(OSError):  # above /proc/sys/fs/pipe-max-size: keep the default
            fcntl.fcntl(self.proc.stdout.fileno(), fcntl.F_SETPIPE_SZ, BUFFER)
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
    """Read and discard the first ``n`` bytes of ``body`` (a retry that cannot seek); on a failure
    the body is closed (its connection or command with it) before the error goes on."""
    buf = bytearray(min(max(n, 1), BUFFER))
    try:
        while n > 0:
            got = body.readinto(memoryview(buf)[: min(n, len(buf))])
            if not got:
                body.finish()
                raise http.client.IncompleteRead(b"")
            n -= got
    except BaseException:
        body.close()
        raise
