"""Locations: a local path or an object-store URL, behind one small API.

Every place dalle-data takes a folder or file also takes ``s3://``, ``gs://`` and ``hf://``
URLs (read and write) and ``http(s)://`` URLs (read only), through fsspec (s3fs, gcsfs,
huggingface_hub's ``HfFileSystem``: the ``storage`` extra). A local path stays a ``Path``
and goes through ``dalle_data.atomic`` as before, so local behaviour is unchanged.

Writes to a bucket are built in a local temporary file and sent in one ``put_file``: one PUT,
or a multipart upload that is completed only at the end (s3fs aborts it on error), a GCS
resumable upload finalised at the end, one Hub commit. An object therefore appears under
its final key only complete, and a killed writer leaves nothing a listing shows.

Credentials and endpoints come only from the providers' standard places (``AWS_*``
variables such as ``AWS_ENDPOINT_URL_S3``, ``~/.aws``, ``GOOGLE_APPLICATION_CREDENTIALS``,
``HF_TOKEN``, instance roles). A URL carrying ``user:password@`` is refused, so a secret can
never reach a manifest, log or checkpoint through a location dalle-data records. Non-secret
fsspec options (a region, an addressing style) may be given per protocol as JSON in
``DALLE_DATA_STORAGE_OPTIONS`` (the pipeline sets it from the config's ``storage_options``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

from dalle_data.atomic import atomic_path
from dalle_data.errors import DalleDataError
from dalle_data.hashing import sha256_stream

Location = str | os.PathLike[str]
# fsspec protocol of each scheme dalle-data accepts; http(s) is read-only.
SCHEMES = {"s3": "s3", "gs": "gcs", "gcs": "gcs", "hf": "hf", "http": "http", "https": "https"}
READ_ONLY = frozenset({"http", "https"})
OPTIONS_ENV = "DALLE_DATA_STORAGE_OPTIONS"
# Option names that hold secrets: refused in DALLE_DATA_STORAGE_OPTIONS and the config.
SECRET_OPTION = re.compile(r"(?i)(secret|token|password|passwd|credential|(^|_)key$)")
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_CHUNK = 1 << 20


class LocationError(DalleDataError):
    """A location that cannot be used: unknown scheme, read-only, missing, or with a secret."""


def scheme(location: Location) -> str:
    """The URL scheme of ``location`` in lower case, or ``""`` for a local path."""
    match = _URL.match(os.fspath(location))
    if not match:
        return ""
    name = match.group(1).lower()
    return "" if name == "file" else name


def is_remote(location: Location) -> bool:
    """True for an object-store or HTTP URL, False for a local path (or ``file://``)."""
    return scheme(location) != ""


def normalize(location: Location) -> str | Path:
    """A local ``Path`` or a checked URL string (known scheme, no credentials in it)."""
    text = os.fspath(location)
    name = scheme(text)
    if not name:
        return Path(text[len("file://") :] if text.lower().startswith("file://") else text)
    if name not in SCHEMES:
        raise LocationError(
            f"{text}: unknown location scheme {name!r}: use a local path or an s3://, gs://, "
            "hf:// or http(s):// URL"
        )
    if "@" in urlsplit(text).netloc:
        raise LocationError(
            f"{name}:// location with credentials in it: remove the user:password@ part and "
            "give credentials the provider's standard way (e.g. AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, ~/.aws/credentials, HF_TOKEN)"
        )
    return text.rstrip("/")


def join(location: Location, *parts: str) -> str | Path:
    """``location / part / ...`` for a path or a URL."""
    base = normalize(location)
    if isinstance(base, Path):
        return base.joinpath(*parts)
    return posixpath.join(base, *parts)


def name(location: Location) -> str:
    """The last component of a path or URL."""
    return posixpath.basename(os.fspath(normalize(location)))


def parent(location: Location) -> str | Path:
    """The folder holding ``location``."""
    base = normalize(location)
    return base.parent if isinstance(base, Path) else posixpath.dirname(base)


def check_options(options: dict[str, Any], where: str) -> None:
    """Refuse secrets among fsspec storage options: they would end up in files."""
    for key, value in options.items():
        if SECRET_OPTION.search(str(key)):
            raise LocationError(
                f"{where}: storage option {key!r} looks like a secret; options hold only "
                "non-secret settings: give credentials through the provider's environment "
                "variables or config files"
            )
        if isinstance(value, dict):
            check_options(value, where)


def storage_options(protocol: str) -> dict[str, Any]:
    """Non-secret fsspec options for ``protocol`` from ``DALLE_DATA_STORAGE_OPTIONS``."""
    raw = os.environ.get(OPTIONS_ENV)
    if not raw:
        return {}
    try:
        options = json.loads(raw)
    except json.JSONDecodeError as err:
        raise LocationError(f"{OPTIONS_ENV} is not JSON ({err}): fix or unset it") from None
    if not isinstance(options, dict):
        raise LocationError(f"{OPTIONS_ENV} must map protocols to option objects")
    check_options(options, OPTIONS_ENV)
    chosen = options.get(protocol) or {}
    return dict(chosen)


def filesystem(location: Location) -> tuple[Any, str]:
    """fsspec's filesystem for a URL and the path inside it."""
    url = normalize(location)
    if isinstance(url, Path):
        raise LocationError(f"{url} is a local path, not a URL")
    import fsspec

    protocol = SCHEMES[scheme(url)]
    try:
        fs, path = fsspec.core.url_to_fs(url, **storage_options(protocol))
    except ImportError as err:
        raise LocationError(
            f"{url}: the {protocol} filesystem is not installed ({err}): "
            "pip install 'dalle-data[storage]'"
        ) from None
    return fs, path


def writable(location: Location) -> tuple[Any, str]:
    """fsspec's filesystem and path of a URL that may be written; http(s) is refused."""
    if scheme(location) in READ_ONLY:
        raise LocationError(
            f"{location}: http(s) locations are read-only: write to a local folder or an "
            "s3://, gs:// or hf:// URL"
        )
    return filesystem(location)


def _missing(location: Location, err: Exception) -> LocationError:
    return LocationError(f"{location} does not exist or cannot be read ({err}): check the URL")


@contextlib.contextmanager
def open_read(location: Location) -> Iterator[IO[bytes]]:
    """A binary file object for reading ``location``."""
    target = normalize(location)
    if isinstance(target, Path):
        with open(target, "rb") as fh:
            yield fh
        return
    fs, path = filesystem(target)
    fs.invalidate_cache(path)  # a cached listing's ETag would refuse an object changed since
    try:
        fh = fs.open(path, "rb")
    except (FileNotFoundError, PermissionError, OSError) as err:
        raise _missing(target, err) from None
    with fh:
        yield fh


def read_bytes(location: Location) -> bytes:
    """The whole content of a (small) file."""
    with open_read(location) as fh:
        return fh.read()


def exists(location: Location) -> bool:
    """Whether a file (or folder) is at ``location`` now (no stale listing cache)."""
    target = normalize(location)
    if isinstance(target, Path):
        return target.exists()
    fs, path = filesystem(target)
    fs.invalidate_cache(path)
    return bool(fs.exists(path))


def sizes(folder: Location) -> dict[str, int]:
    """The files directly in ``folder`` and their sizes in bytes (one listing call)."""
    target = normalize(folder)
    if isinstance(target, Path):
        if not target.is_dir():
            return {}
        return {p.name: p.stat().st_size for p in target.iterdir() if p.is_file()}
    fs, path = filesystem(target)
    fs.invalidate_cache(path)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return {}
    return {
        posixpath.basename(e["name"].rstrip("/")): int(e.get("size") or 0)
        for e in entries
        if e.get("type") == "file"
    }


def sha256(location: Location) -> str:
    """Hex sha256 of a file, streamed in 1 MiB chunks (no local copy of a remote object)."""
    with open_read(location) as fh:
        return sha256_stream(fh)


def download(location: Location, dest: Path) -> str:
    """Copy ``location`` whole to the local file ``dest`` (atomically); return its sha256."""
    digest = hashlib.sha256()
    with (
        open_read(location) as src,
        atomic_path(dest, durable=False) as tmp,
        open(tmp, "wb") as out,
    ):
        while chunk := src.read(_CHUNK):
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


def upload(local: Path, location: Location) -> None:
    """Put the local file ``local`` at ``location`` in one PUT or completed multipart upload."""
    fs, path = writable(location)
    fs.put_file(os.fspath(local), path)
    fs.invalidate_cache(path)


@contextlib.contextmanager
def write_path(location: Location) -> Iterator[Path]:
    """Yield a local file path to write; on success it appears at ``location`` complete.

    Local: :func:`dalle_data.atomic.atomic_path` (temp file + rename). Remote: the file is
    built in a temporary folder and uploaded once; on error nothing is uploaded.
    """
    target = normalize(location)
    if isinstance(target, Path):
        with atomic_path(target) as tmp:
            yield tmp
        return
    writable(target)
    with tempfile.TemporaryDirectory(prefix="dalle-data-put-") as tmp_dir:
        tmp = Path(tmp_dir) / name(target)
        yield tmp
        upload(tmp, target)


def write_bytes(location: Location, data: bytes) -> None:
    """Write ``data`` to ``location`` whole, atomically."""
    with write_path(location) as tmp:
        tmp.write_bytes(data)


def write_json(location: Location, obj: Any) -> None:
    """Stable JSON (sorted keys, as ``atomic.write_json``) at ``location``, atomically."""
    text = json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    write_bytes(location, text.encode("utf-8"))


def put_tree(local_dir: Path, location: Location, *, last: tuple[str, ...] = ()) -> None:
    """Upload (or, locally, hard-link or copy atomically) every file below ``local_dir`` to
    ``location``; hidden files (a killed writer's temporary files) stay behind.

    Files named in ``last`` go last, in that order: readers that take them as the sign of a
    finished folder (a checkpoint, its ``lineage.json``) never see it before the rest.
    """
    files = sorted(
        p
        for p in Path(local_dir).rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(local_dir).parts)
    )
    rank = {n: i for i, n in enumerate(last)}
    files.sort(key=lambda p: rank.get(p.relative_to(local_dir).as_posix(), -1))
    for path in files:
        target = join(location, *path.relative_to(local_dir).parts)
        if isinstance(target, Path):
            _link_or_copy(path, target)
        else:
            upload(path, target)


def put(source: Path, location: Location) -> None:
    """A local file or folder to ``location``: :func:`put_tree` for a folder, else the file
    uploaded once (or, locally, hard-linked or copied atomically)."""
    if source.is_dir():
        put_tree(source, location)
        return
    target = normalize(location)
    if isinstance(target, Path):
        _link_or_copy(source, target)
    else:
        upload(source, target)


def _link_or_copy(source: Path, target: Path) -> None:
    """``target`` becomes ``source``'s content atomically: a hard link where the filesystem
    allows (no second copy of multi-GB shards; every writer here replaces files, never
    edits them in place), else a copy."""
    if target.exists() and os.path.samefile(source, target):
        return  # linked already (and rename() of one link over another would do nothing)
    with atomic_path(target, durable=False) as tmp:
        tmp.unlink()
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)


def remove(location: Location) -> None:
    """Delete a file if it is there."""
    target = normalize(location)
    if isinstance(target, Path):
        target.unlink(missing_ok=True)
        return
    fs, path = writable(target)
    with contextlib.suppress(FileNotFoundError):
        fs.rm_file(path)
