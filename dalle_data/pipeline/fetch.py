"""datasets.<name>.source -> <out>/<dataset>/raw/: download or link each source file.

http(s) URLs download to ``<name>.part`` and resume with an HTTP Range request after an
interruption; the file gets its final name only when complete. Local paths and ``file://``
URLs are symlinked, never copied (sources reach tens of GB); a local folder (the
``folder`` format) is linked whole and hashed as a tree. ``raw/fetch.json`` records the
sha256 and size of every file, which normalize and the manifest cite.
"""

from __future__ import annotations

import http.client
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from dalle_data import atomic
from dalle_data.errors import DalleDataError
from dalle_data.hashing import sha256_file, sha256_tree

CHUNK = 1 << 20
USER_AGENT = "dalle-data (+https://github.com/rom1504/img2dataset)"


class FetchError(DalleDataError):
    """A source that cannot be fetched; the message names it and the fix."""


@dataclass(frozen=True)
class Wanted:
    source: str
    index: int
    role: str  # "source" or "subset"

    @property
    def name(self) -> str:
        path = urllib.parse.urlparse(self.source).path if is_url(self.source) else self.source
        name = Path(urllib.parse.unquote(path)).name
        if not name:
            raise FetchError(
                f"source {self.source!r} does not name a file: give a file URL or path"
            )
        return name


def is_url(source: str) -> bool:
    return re.match(r"^(?i:https?|file)://", source) is not None


def fetch(
    sources: list[str],
    raw_dir: Path,
    *,
    subset: str | None = None,
    select: list[int] | None = None,
    timeout: float = 60.0,
) -> dict[str, Any]:
    """Fetch ``sources`` (only the indices in ``select`` when given) and ``subset`` into
    ``raw_dir``; write and return the fetch.json record."""
    if not sources:
        raise FetchError("no source given: set datasets.<name>.source in the config")
    if select:
        unknown = sorted(set(select) - set(range(len(sources))))
        if unknown:
            raise FetchError(
                f"selected source indices {unknown} do not exist: the source list has "
                f"{len(sources)} entries (0-{len(sources) - 1})"
            )
    wanted = [Wanted(s, i, "source") for i, s in enumerate(sources) if not select or i in select]
    if subset:
        wanted.append(Wanted(subset, 0, "subset"))
    names = [w.name for w in wanted]
    if len(set(names)) != len(names):
        raise FetchError(f"two sources have the same file name in {names}: rename one of them")
    raw_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for item in wanted:
        dest = raw_dir / item.name
        linked = fetch_one(item.source, dest, timeout=timeout)
        digest, size = sha256_tree(dest) if dest.is_dir() else (sha256_file(dest), None)
        files.append(
            {
                "name": item.name,
                "index": item.index,
                "role": item.role,
                "source": item.source,
                "linked": linked,
                "bytes": dest.stat().st_size if size is None else size,
                "sha256": digest,
            }
        )
    record = {"files": files}
    atomic.write_json(raw_dir / "fetch.json", record)
    return record


def fetch_one(source: str, dest: Path, *, timeout: float = 60.0) -> bool:
    """Put ``source`` at ``dest``; True when it is a link to a local file or folder."""
    if re.match(r"^(?i:https?)://", source):
        if not dest.exists() or dest.is_symlink():
            download(source, dest, timeout=timeout)
        return False
    path = source
    if source.lower().startswith("file://"):
        path = urllib.request.url2pathname(urllib.parse.urlparse(source).path)
    target = Path(path).resolve()
    if not (target.is_file() or target.is_dir()):
        raise FetchError(f"source file {path} does not exist: check datasets.<name>.source")
    if dest.is_symlink() or dest.exists():
        if dest.is_symlink() and Path(os.readlink(dest)) == target:
            return True
        dest.unlink()
    tmp = dest.with_name(dest.name + ".link")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    tmp.replace(dest)
    return True


def download(url: str, dest: Path, *, timeout: float = 60.0) -> None:
    """Download ``url`` to ``dest`` through ``dest.part``, resuming a partial ``.part``."""
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT}
    if have:
        headers["Range"] = f"bytes={have}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have and _complete_size(err.headers) == have:
            part.replace(dest)
            return
        raise FetchError(f"download of {url} failed: HTTP {err.code} {err.reason}") from err
    except (urllib.error.URLError, OSError) as err:
        raise FetchError(f"download of {url} failed ({err}): check the URL and network") from err
    with response:
        if have and response.status != 206:
            have = 0  # the server ignored the Range header: start over
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        mode = "ab" if have else "wb"
        with (
            open(part, mode) as out,
            tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=dest.name) as bar,
        ):
            try:
                while chunk := response.read(CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))
            except (OSError, http.client.HTTPException) as err:
                raise FetchError(
                    f"download of {url} was interrupted ({err}): rerun to resume from "
                    f"{part.stat().st_size} bytes"
                ) from err
    got = part.stat().st_size
    if total is not None and got != total:
        raise FetchError(f"download of {url} stopped at {got} of {total} bytes: rerun to resume")
    with open(part, "rb") as fh:
        os.fsync(fh.fileno())
    part.replace(dest)


def _complete_size(headers: Any) -> int | None:
    match = re.match(r"bytes \*/(\d+)", headers.get("Content-Range", "") or "")
    return int(match.group(1)) if match else None
