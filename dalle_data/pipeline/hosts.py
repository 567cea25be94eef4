"""What each image request does for the host it goes to.

:class:`Fetch` replaces img2dataset's ``download_image`` in its worker processes (through
``compat.img2dataset_fetch``): it sends a User-Agent that names the crawler and a contact,
spaces the requests to each host by ``download.max_requests_per_second_per_host`` across
every thread and process of the download job, and records why a URL failed, with the
server's ``Retry-After``, in the message img2dataset stores (pipeline/failures.py reads it).
"""

from __future__ import annotations

import fcntl
import functools
import http.client
import io
import os
import re
import socket
import ssl
import struct
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import OrderedDict, defaultdict
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

from dalle_data.pipeline.failures import failure_reason, http_reason, tagged


def user_agent(token: str, contact: str | None) -> str:
    """``<token>/<version> (<contact>) img2dataset/<version> Python-urllib/<version>``.

    The shape Wikimedia's User-Agent policy asks for: who is crawling, how to reach them,
    and with what library.
    """
    from dalle_data import __version__

    who = f"{token}/{__version__}" + (f" ({contact})" if contact else "")
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    return f"{who} img2dataset/{version('img2dataset')} Python-urllib/{python}"


def host_of(url: str) -> str | None:
    """The host a politeness limit applies to (None for file: and other local URLs)."""
    parts = urlsplit(url)
    return parts.hostname if parts.scheme in ("http", "https") and parts.hostname else None


class HostSchedule:
    """Spaces the requests to each host at least ``1 / rate`` seconds apart.

    One small file per host under ``folder`` holds the next free start time; ``flock``
    (per open file, so threads exclude each other as processes do) makes taking a slot
    atomic. A request to one host never waits for another host's slots.
    """

    def __init__(self, folder: str | Path, rate: float) -> None:
        self.folder = Path(folder)
        self.interval = 1.0 / rate

    def reserve(self, host: str) -> float:
        """Take the next start time for a request to ``host`` (``time.time()`` scale)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder / re.sub(r"[^a-z0-9.:-]", "_", host), os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            raw = os.pread(fd, 8, 0)
            start = max(time.time(), struct.unpack("<d", raw)[0] if len(raw) == 8 else 0.0)
            os.pwrite(fd, struct.pack("<d", start + self.interval), 0)
        finally:
            os.close(fd)
        return start

    def wait(self, host: str) -> None:
        """Block until a request to ``host`` may start."""
        time.sleep(max(0.0, self.reserve(host) - time.time()))


@dataclass(frozen=True)
class Fetch:
    """img2dataset's ``download_image(row, timeout, user_agent_token, disallowed)``, polite.

    Picklable (img2dataset sends it to its worker processes). Returns img2dataset's
    ``(key, BytesIO | None, error_message | None)``.
    """

    user_agent: str
    max_requests_per_second: float | None = None
    hosts_dir: str | None = None

    def __call__(
        self,
        row: tuple[int, str],
        timeout: float,
        user_agent_token: str | None,
        disallowed_header_directives: set[str] | None,
    ) -> tuple[int, io.BytesIO | None, str | None]:
        from img2dataset.downloader import is_disallowed

        key, url = row
        host = host_of(url)
        if host and self.max_requests_per_second and self.hosts_dir:
            HostSchedule(self.hosts_dir, self.max_requests_per_second).wait(host)
        try:
            headers, body = get(url, {"User-Agent": self.user_agent}, timeout)
            if disallowed_header_directives and is_disallowed(
                headers, user_agent_token, disallowed_header_directives
            ):
                message = "Use of image disallowed by X-Robots-Tag directive"
                return key, None, tagged("x_robots_tag_opt_out", message)
            return key, io.BytesIO(body), None
        except Exception as err:  # noqa: BLE001 (every failure becomes a counted reason)
            after = (
                err.headers.get("Retry-After") if isinstance(err, urllib.error.HTTPError) else None
            )
            return key, None, tagged(reason_of(err), str(err), after)


# Connections a download thread keeps open (one per host, the least recently used closed).
KEEP_CONNECTIONS = 8
# Redirects followed before giving up, as urllib does.
MAX_REDIRECTS = 10
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


class _Connections(threading.local):
    """This thread's open HTTP(S) connections, by ``(scheme, host, port)``.

    urllib opens a connection (and a TLS session) per request and asks the server to close
    it; a crawl of one big host (WIT's upload.wikimedia.org, Flickr's farms) then pays a TCP
    and TLS handshake per image and the host a connection per image.
    """

    def __init__(self) -> None:
        self.open = _OpenConnections()

    def take(self, scheme: str, host: str, port: int, timeout: float) -> tuple[Any, bool]:
        """A connection to the origin and whether it was used before."""
        origin = (scheme, host, port)
        connection = self.open.pop(origin, None)
        if connection is not None:
            connection.timeout = timeout
            if connection.sock is not None:
                connection.sock.settimeout(timeout)
            return connection, True
        if scheme == "https":
            connection = http.client.HTTPSConnection(
                host, port, timeout=timeout, context=_tls_context()
            )
        else:
            connection = http.client.HTTPConnection(host, port, timeout=timeout)
        return connection, False

    def give_back(self, scheme: str, host: str, port: int, connection: Any) -> None:
        self.open[(scheme, host, port)] = connection
        while len(self.open) > KEEP_CONNECTIONS:
            self.open.popitem(last=False)[1].close()


class _OpenConnections(OrderedDict[tuple[str, str, int], http.client.HTTPConnection]):
    """Closes what it holds when its thread ends (the thread-local goes with it)."""

    def __del__(self) -> None:
        for connection in self.values():
            connection.close()


_CONNECTIONS = _Connections()


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """urllib's default: the system's CA certificates, hostnames checked (loaded once)."""
    return ssl.create_default_context()


def get(url: str, headers: dict[str, str], timeout: float) -> tuple[Any, bytes]:
    """GET ``url``: ``(response headers, body)``, following redirects; what urllib's
    ``urlopen`` does, raising the same errors (HTTPError for a non-2xx answer, URLError
    around a connection failure), but over a kept-alive connection per host and thread.
    URLs urllib handles otherwise (file:, a configured proxy) go through urllib."""
    seen: list[str] = []
    while True:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or _proxied(parts.scheme, parts.hostname or ""):
            with urllib.request.urlopen(
                urllib.request.Request(url, headers=headers), timeout=timeout
            ) as answer:
                return answer.headers, answer.read()
        status, reason, answer_headers, body = _exchange(parts, headers, timeout)
        location = answer_headers.get("Location") if status in _REDIRECTS else None
        if location is not None:
            seen.append(url)
            url = urljoin(url, location)
            if (
                len(seen) > MAX_REDIRECTS
                or url in seen
                or urlsplit(url).scheme not in ("http", "https", "ftp")
            ):
                raise urllib.error.HTTPError(
                    url, status, f"redirect error: {reason}", answer_headers, None
                )
            continue
        if not 200 <= status < 300:
            raise urllib.error.HTTPError(url, status, reason, answer_headers, None)
        return answer_headers, body


# What a kept connection the host (or a proxy, or TLS) closed meanwhile raises when reused.
_CLOSED = (http.client.RemoteDisconnected, ConnectionError, ssl.SSLEOFError, ssl.SSLZeroReturnError)


def _exchange(parts: Any, headers: dict[str, str], timeout: float) -> tuple[int, str, Any, bytes]:
    """One request and its whole answer, on a kept connection when there is one; a kept
    connection the server closed meanwhile is replaced once (the request never reached it)."""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = parts.hostname or ""
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    while True:
        connection, reused = _CONNECTIONS.take(parts.scheme, host, port, timeout)
        try:
            connection.request("GET", target, headers=headers)
            answer = connection.getresponse()
            body = answer.read()
        except _CLOSED as err:
            connection.close()
            if reused:
                continue
            raise urllib.error.URLError(err) from err
        except OSError as err:
            connection.close()
            raise urllib.error.URLError(err) from err
        except BaseException:
            connection.close()
            raise
        if answer.will_close:
            connection.close()
        else:
            _CONNECTIONS.give_back(parts.scheme, host, port, connection)
        return answer.status, answer.reason, answer.headers, body


def _proxied(scheme: str, host: str) -> bool:
    """Whether the environment sends ``scheme`` requests to ``host`` through a proxy."""
    return scheme in _proxies() and not urllib.request.proxy_bypass(host)


@functools.cache
def _proxies() -> dict[str, str]:
    """The environment's proxies, read once a process: urllib reads the whole environment
    on every call (50 us an image, in a worker that spends 7 ms on one)."""
    return urllib.request.getproxies()


def reason_of(err: BaseException) -> str:
    """The failure reason for an exception urllib raised while fetching an image."""
    if isinstance(err, urllib.error.HTTPError):
        # urllib gives up on a redirect loop with the 30x it was answered last.
        return "too_many_redirects" if 300 <= err.code < 400 else http_reason(err.code)
    cause: Any = err.reason if isinstance(err, urllib.error.URLError) else err
    if isinstance(cause, TimeoutError):
        return "timeout"
    if isinstance(cause, socket.gaierror):
        gone = (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME))
        return "dns_not_found" if cause.errno in gone else "dns"
    if isinstance(cause, FileNotFoundError):
        return "file_not_found"
    if isinstance(cause, ssl.SSLCertVerificationError):
        return "tls_certificate"
    if isinstance(cause, ConnectionError | http.client.HTTPException | ssl.SSLError):
        return "connection"
    return failure_reason(str(err))


def host_order(urls: list[str | None], chunks: int) -> list[int]:
    """Row positions in the order img2dataset should take them when hosts are rate-limited.

    A host's k-th row cannot start before k intervals have passed, so rows sorted by
    (k, position) come as the limit lets each host take them: the rows of a host with many
    of them move to the back instead of holding every thread while they wait their turn.
    img2dataset cuts its input into ``chunks`` consecutive pieces run side by side, so the
    sorted rows are dealt to the pieces in turn.
    """
    seen: defaultdict[str, int] = defaultdict(int)
    due = []
    for position, url in enumerate(urls):
        host = host_of(url or "") or f"#{position}"
        due.append((seen[host], position))
        seen[host] += 1
    order = [position for _, position in sorted(due)]
    return [p for chunk in range(chunks) for p in order[chunk::chunks]]
