"""Download failure reasons: the one list, which of them another round may recover, and
how a reason is read from img2dataset's free-text ``error_message``.

The fetch (pipeline/hosts.py) knows the exception and the HTTP status, so it writes its
messages as ``[<reason> retry-after=<value>] <text>``; messages img2dataset writes itself
(its resizer: too small, aspect ratio, decoding) are matched by their text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Reason:
    """A failure reason: what it means on the dataset card and whether a retry may help."""

    meaning: str
    retryable: bool = False


# Transient: the host or the network may answer next time. Everything else is permanent.
REASONS: dict[str, Reason] = {
    "http_429": Reason("the server asked for fewer requests (429 Too Many Requests)", True),
    "http_5xx": Reason("the server answered a 5xx error", True),
    "timeout": Reason("no complete answer within download.timeout seconds", True),
    "dns": Reason("name resolution failed for now (an overloaded or unreachable resolver)", True),
    "connection": Reason("connection refused, reset or closed early", True),
    "dns_not_found": Reason("the host name does not exist"),
    "http_404": Reason("the server answered 404 Not Found"),
    "too_many_redirects": Reason("a redirect loop"),
    "tls_certificate": Reason("the server's TLS certificate did not verify"),
    "decode_error": Reason(
        "the bytes are not a decodable image (HTML, text, empty, truncated, junk)"
    ),
    "image_too_small": Reason("shorter side below download.min_image_size"),
    "aspect_ratio": Reason("long side / short side above download.max_aspect_ratio"),
    "decompression_bomb": Reason(
        "more than 89,478,485 pixels (Pillow's limit), refused before decoding"
    ),
    "x_robots_tag_opt_out": Reason(
        "the server's X-Robots-Tag opts the image out of AI use (noai, ...)"
    ),
    "file_url_refused": Reason("not an http(s) URL, and the dataset does not allow file URLs"),
    "file_not_found": Reason("a file: URL naming a file that does not exist"),
}
RETRYABLE = frozenset(name for name, reason in REASONS.items() if reason.retryable)

# img2dataset's own messages (resizer, its download code) by the text they contain.
_NEEDLES: list[tuple[str, tuple[str, ...]]] = [
    ("too_many_redirects", ("redirect error that would lead to an infinite loop",)),
    ("x_robots_tag_opt_out", ("X-Robots-Tag",)),
    ("decompression_bomb", ("CV_IO_MAX_IMAGE_PIXELS", "image area too large")),
    ("image_too_small", ("image too small",)),
    ("aspect_ratio", ("aspect ratio too large",)),
    ("decode_error", ("Image decoding error", "imdecode", "buf.empty()")),
    ("dns", ("Temporary failure in name resolution",)),
    ("dns_not_found", ("Name or service not known", "No address associated with hostname")),
    ("timeout", ("timed out", "timeout")),
    ("file_url_refused", ("unknown url type",)),
    # A file: URL (datasets with allow_file_urls) naming a file that is not there.
    ("file_not_found", ("No such file or directory",)),
    (
        "connection",
        (
            "Connection reset",
            "Connection refused",
            "Remote end closed connection",
            "IncompleteRead",
            "urlopen error",
            "Connection aborted",
            "BadStatusLine",
        ),
    ),
]
_HTTP = re.compile(r"HTTP Error (\d{3})")
_TAG = re.compile(r"^\[(?P<reason>[a-z0-9_:]+)(?: retry-after=(?P<after>[^\]]*))?\] ")


def http_reason(code: int) -> str:
    """The reason for an HTTP error status."""
    if code == 429:
        return "http_429"
    return "http_5xx" if code >= 500 else f"http_{code}"


def tagged(reason: str, text: str, retry_after: str | None = None) -> str:
    """A message that names its reason (and the server's Retry-After) for :func:`failure_reason`."""
    after = f" retry-after={retry_after.replace(']', '').strip()}" if retry_after else ""
    return f"[{reason}{after}] {text}"


def failure_reason(message: str | None) -> str:
    """A small, stable reason name for img2dataset's ``error_message``."""
    text = message or ""
    tag = _TAG.match(text)
    if tag:
        return tag["reason"]
    for reason, needles in _NEEDLES:
        if any(n.lower() in text.lower() for n in needles):
            return reason
    match = _HTTP.search(text)
    if match:
        return http_reason(int(match.group(1)))
    short = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:40]
    return f"other:{short or 'unknown'}"


def retry_after(message: str | None) -> str | None:
    """The server's raw Retry-After value recorded in a tagged message, if it sent one."""
    tag = _TAG.match(message or "")
    return tag["after"] if tag and tag["after"] else None


def meaning(reason: str) -> str:
    """What a reason means, for the dataset card."""
    if reason in REASONS:
        return REASONS[reason].meaning
    if reason.startswith("http_"):
        return f"the server answered HTTP {reason.removeprefix('http_')}"
    return "other img2dataset error (see failures.parquet)"
