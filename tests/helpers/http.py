"""A local HTTP server for tests: every image URL a test uses points at 127.0.0.x."""

from __future__ import annotations

import http.server
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field

Handler = Callable[[http.server.BaseHTTPRequestHandler], None]


@dataclass(frozen=True)
class Seen:
    """A request as the server saw it: when (``time.time()``), the path, the User-Agent."""

    at: float
    path: str
    user_agent: str | None


@dataclass
class Route:
    """A canned answer: status, headers and body; or a ``handler`` for odd behaviour."""

    body: bytes = b""
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    handler: Handler | None = None


class LocalServer:
    """Serves ``routes`` (path -> Route) on ``host`` (a loopback address) in a background
    thread; ``seen`` logs every request."""

    def __init__(self, routes: dict[str, Route] | None = None, host: str = "127.0.0.1") -> None:
        self.routes: dict[str, Route] = dict(routes or {})
        self.requests: list[str] = []
        self.seen: list[Seen] = []
        self.host = host
        server = self

        class _Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # keep test output quiet
                pass

            def _answer(self, send_body: bool) -> None:
                path = self.path.split("?", 1)[0]
                server.requests.append(path)
                server.seen.append(Seen(time.time(), path, self.headers.get("User-Agent")))
                route = server.routes.get(path)
                if route is None:
                    route = Route(body=b"not found", status=404)
                if route.handler is not None:
                    route.handler(self)
                    return
                body = route.body
                start, end = 0, len(body)
                status = route.status
                rng = self.headers.get("Range")
                if rng and status == 200 and rng.startswith("bytes="):
                    first, _, last = rng[6:].partition("-")
                    start = int(first or 0)
                    end = int(last) + 1 if last else len(body)
                    status = 206
                self.send_response(status)
                headers = {"Content-Length": str(end - start), **route.headers}
                if status == 206:
                    headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(body)}"
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                if send_body:
                    with suppress(BrokenPipeError, ConnectionResetError):
                        self.wfile.write(body[start:end])

            def do_GET(self) -> None:  # noqa: N802 (http.server API)
                self._answer(send_body=True)

            def do_HEAD(self) -> None:  # noqa: N802
                self._answer(send_body=False)

        self.httpd = http.server.ThreadingHTTPServer((host, 0), _Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"

    def start(self) -> LocalServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def times(self, path: str) -> list[float]:
        """When each request for ``path`` came."""
        return [s.at for s in self.seen if s.path == path]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a server started in another process)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serve(routes: dict[str, Route] | None = None, host: str = "127.0.0.1") -> Iterator[LocalServer]:
    """Run a LocalServer for the duration of a ``with`` block."""
    server = LocalServer(routes, host).start()
    try:
        yield server
    finally:
        server.stop()


def stall(seconds: float) -> Handler:
    """A handler that sends headers, then nothing for ``seconds`` (longer than a timeout)."""

    def handle(req: http.server.BaseHTTPRequestHandler) -> None:
        req.send_response(200)
        req.send_header("Content-Type", "image/jpeg")
        req.send_header("Content-Length", "100000")
        req.end_headers()
        time.sleep(seconds)

    return handle


def reset(req: http.server.BaseHTTPRequestHandler) -> None:
    """A handler that resets the TCP connection without answering."""
    linger_zero = b"\x01\x00\x00\x00\x00\x00\x00\x00"  # SO_LINGER on, 0 s: send RST
    req.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger_zero)
    req.connection.close()
    req.close_connection = True


def send(req: http.server.BaseHTTPRequestHandler, route: Route) -> None:
    """Answer with ``route``'s status, headers and body (from inside a handler)."""
    req.send_response(route.status)
    for key, value in {"Content-Length": str(len(route.body)), **route.headers}.items():
        req.send_header(key, value)
    req.end_headers()
    with suppress(BrokenPipeError, ConnectionResetError):
        req.wfile.write(route.body)


def in_turn(*routes: Route) -> Handler:
    """A handler answering the n-th request with ``routes[n]`` (the last one from then on)."""
    count = iter(range(len(routes) - 1))

    def handle(req: http.server.BaseHTTPRequestHandler) -> None:
        send(req, routes[next(count, len(routes) - 1)])

    return handle


def slow_down(seconds: int, then: Route) -> Handler:
    """429 with ``Retry-After: seconds``; asked again sooner, 429 again (with what is left);
    asked later, ``then``."""
    lock = threading.Lock()
    until: list[float] = []

    def handle(req: http.server.BaseHTTPRequestHandler) -> None:
        with lock:
            now = time.time()
            if not until:
                until.append(now + seconds)
            left = until[0] - now
        if left > 0:
            wait = str(max(1, int(left + 0.999)))
            send(req, Route(b"slow down", status=429, headers={"Retry-After": wait}))
        else:
            send(req, then)

    return handle
