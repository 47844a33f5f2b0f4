"""A real HTTP server on 127.0.0.1 serving a folder, with faults on demand: a connection dropped
mid-file, a 404, a stall (half the file, then silence). Started and stopped by the test."""

from __future__ import annotations

import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class LoopbackServer:
    """``with LoopbackServer(folder) as s: s.url`` -> ``http://127.0.0.1:PORT``.

    ``fault(name, kind, times)``: the next ``times`` GETs of ``name`` fail as ``kind``: "drop" (the
    bytes up to the file's middle, then the connection closes), "stall" (the same, then nothing until
    the server stops) or "404". ``requests[name]`` counts GETs. ``ranges=False`` ignores Range headers, as a
    server that cannot seek does (then the whole file comes again).
    """

    def __init__(self, root: Path, ranges: bool = True):
        self.root, self.ranges = Path(root), ranges
        self.faults: dict[str, list] = {}
        self.requests: Counter = Counter()
        self.release = threading.Event()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def fault(self, name: str, kind: str, times: int = 10**9) -> None:
        self.faults[name] = [kind, times]

    def __enter__(self) -> LoopbackServer:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def _handler(server: LoopbackServer):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the http.server API
            name = self.path.lstrip("/")
            server.requests[name] += 1
            fault = server.faults.get(name)
            kind = None
            if fault and fault[1] > 0:
                kind, fault[1] = fault[0], fault[1] - 1
            path = server.root / name
            if kind == "404" or "/" in name or not path.is_file():
                self.send_error(404)
                return
            data = path.read_bytes()
            start = self._range_start() if server.ranges else 0
            self.send_response(206 if start else 200)
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(data) - start))
            self.end_headers()
            body = data[start:]
            if kind in ("drop", "stall"):
                self.wfile.write(data[start : len(data) // 2])
                self.wfile.flush()
                if kind == "stall":
                    server.release.wait(120)
                self.close_connection = True
                return
            self.wfile.write(body)

        def _range_start(self) -> int:
            value = self.headers.get("Range", "")
            return int(value[len("bytes=") :].split("-")[0]) if value.startswith("bytes=") else 0

        def log_message(self, *args):  # quiet
            pass

    return Handler
