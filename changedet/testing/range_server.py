"""A local HTTP file server for tests of remote inputs: honours ``Range`` requests (``206`` with
``Content-Range``), answers ``HEAD`` with ``Content-Length``, counts the body bytes it serves, and can
be told to fail (``404``, ``500`` for N requests or forever, only past some byte offset).

Python's :mod:`http.server` ignores ``Range`` and always sends whole files, which would hide a reader
that downloads a whole COG instead of the windows it needs. The server runs in a child process
(``python -m changedet.testing.range_server ROOT``), not in a thread of the reader's process: some
GDAL calls hold the GIL while they wait for the network, and would wait forever for a server thread
that needs it. :class:`RangeServer` starts it and drives it over control URLs (``/__control__/...``,
never logged or counted)::

    with RangeServer(root) as server:
        url = server.url("t1/item.json")
        server.fail(500, times=2, min_offset=1)   # the next two reads past byte 0 answer 500
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")
CONTROL = "/__control__/"


@dataclass
class Fault:
    """Answer ``status`` instead of the file, ``times`` more times (None: forever), for requests whose
    first byte is at ``min_offset`` or later (0: every request, HEAD included) and whose path contains ``path``."""

    status: int
    times: int | None = None
    min_offset: int = 0
    path: str = ""


@dataclass(frozen=True)
class Request:
    """One answered request: method, URL path, requested ``[start, end]`` (inclusive) or None, status, body bytes."""

    method: str
    path: str
    byte_range: list[int] | None
    status: int
    sent: int


class _State:
    """The serving process's faults and request log."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.faults: list[Fault] = []
        self.requests: list[Request] = []
        self.lock = threading.Lock()

    def fault(self, path: str, start: int) -> int | None:
        with self.lock:
            for fault in self.faults:
                if start >= fault.min_offset and fault.path in path and fault.times != 0:
                    if fault.times is not None:
                        fault.times -= 1
                    return fault.status
        return None

    def log(self, request: Request) -> None:
        with self.lock:
            self.requests.append(request)

    def control(self, command: str, body: bytes) -> bytes:
        with self.lock:
            if command == "fail":
                self.faults.append(Fault(**json.loads(body)))
            elif command == "reset":
                self.faults.clear()
                self.requests.clear()
            return json.dumps([asdict(r) for r in self.requests]).encode()


def _handler(state: _State) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as GDAL's curl expects

        def log_message(self, *args: object) -> None:  # quiet: the request log is the record
            pass

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

        def do_POST(self) -> None:
            payload = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self._send(200, {"Content-Type": "application/json"}, state.control(self.path[len(CONTROL):], payload), True)

        def _send(self, status: int, headers: dict[str, str], payload: bytes, body: bool, length: int | None = None) -> None:
            self.send_response(status)
            for key, value in {**headers, "Content-Length": str(len(payload) if length is None else length)}.items():
                self.send_header(key, value)
            self.end_headers()
            if body:
                self.wfile.write(payload)

        def _answer(self, status: int, headers: dict[str, str], payload: bytes, span: list[int] | None, body: bool,
                    length: int | None = None) -> None:  # fmt: skip
            self._send(status, headers, payload, body, length)
            state.log(Request(self.command, self.path, span, status, len(payload) if body else 0))

        def _serve(self, body: bool) -> None:
            if self.path.startswith(CONTROL):
                self._send(200, {"Content-Type": "application/json"}, state.control("log", b""), body)
                return
            file = (state.root / unquote(urlsplit(self.path).path).lstrip("/")).resolve()
            header = self.headers.get("Range")
            match = _RANGE.match(header.strip()) if header else None
            first, last = match.groups() if match else ("", "")
            status = state.fault(self.path, int(first or 0))
            if status is not None:
                self._answer(status, {"Content-Type": "text/plain"}, f"injected {status}\n".encode(), None, body)
                return
            if not file.is_relative_to(state.root) or not file.is_file():
                self._answer(404, {"Content-Type": "text/plain"}, b"not found\n", None, body)
                return
            stat = file.stat()
            size = stat.st_size
            headers = {"Accept-Ranges": "bytes", "ETag": f'"{stat.st_mtime_ns:x}-{size:x}"',
                       "Last-Modified": self.date_time_string(int(stat.st_mtime))}  # fmt: skip
            if not header:
                self._answer(200, headers, file.read_bytes() if body else b"", None, body, None if body else size)
                return
            begin, end = (size - int(last or 0), size - 1) if not first else (int(first), min(int(last or size - 1), size - 1))
            if not match or begin >= size or begin > end:  # several ranges, another unit, or past the end
                self._answer(416, {"Content-Range": f"bytes */{size}"}, b"", None, body)
                return
            with open(file, "rb") as fh:
                fh.seek(begin)
                payload = fh.read(end - begin + 1)
            self._answer(206, {**headers, "Content-Range": f"bytes {begin}-{end}/{size}"}, payload, [begin, end], body)

    return Handler


class RangeServer:
    """The server in a child process, on ``127.0.0.1`` (a free port), serving the files under ``root``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self.port = 0
        self._process: subprocess.Popen | None = None

    def url(self, relative: str = "") -> str:
        """``http://127.0.0.1:<port>/<relative>``."""
        return f"http://127.0.0.1:{self.port}/{relative.lstrip('/')}"

    def __enter__(self) -> "RangeServer":
        self._process = subprocess.Popen([sys.executable, "-m", __name__, str(self.root)], stdout=subprocess.PIPE, text=True)
        line = self._process.stdout.readline()
        if not line.strip().isdigit():
            self.__exit__()
            raise RuntimeError(f"range server did not start: {line!r}")
        self.port = int(line)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=10)
            self._process.stdout.close()
            self._process = None

    def _control(self, command: str, payload: dict | None = None) -> list[Request]:
        data = json.dumps(payload or {}).encode()
        with urllib.request.urlopen(urllib.request.Request(self.url(CONTROL + command), data=data), timeout=10) as response:
            return [Request(**r) for r in json.loads(response.read())]

    def fail(self, status: int, times: int | None = None, min_offset: int = 0, path: str = "") -> None:
        """Add a :class:`Fault` (faults are checked in the order added)."""
        self._control("fail", asdict(Fault(status, times, min_offset, path)))

    def reset(self) -> None:
        """Forget the faults and the request log."""
        self._control("reset")

    def requests(self) -> list[Request]:
        """Every request answered so far (control requests excepted)."""
        return self._control("log")

    def bytes_served(self, path: str = "") -> int:
        """Body bytes sent so far, for URL paths containing ``path``."""
        return sum(r.sent for r in self.requests() if path in r.path)


@contextmanager
def threaded_http_server(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """``handler`` served on ``127.0.0.1`` (a free port) in a thread of this process, for the ``with``
    block; yields ``http://127.0.0.1:<port>/``."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()
        httpd.server_close()


def serve(root: str | Path) -> None:
    """Serve ``root`` until killed, printing the port on the first line of stdout."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(_State(Path(root).resolve())))
    httpd.daemon_threads = True
    print(httpd.server_address[1], flush=True)
    httpd.serve_forever()


if __name__ == "__main__":
    serve(sys.argv[1])
