"""A bucket collection through a local mirror, so one indexer serves disks and buckets.

``dalle-data collection s3://...`` copies the files the index reads (checkpoints, model
cards, sample pictures, eval.json; nothing else) to ``<cache_dir>/collections/<hash of the
URL>/``, indexes that folder with the code that indexes a local collection, and uploads
the outputs. Index paths are relative, so a bucket's ``index.json`` is byte for byte the
one of the same collection on disk. The mirror remembers each object's size and version
tag (S3/GCS ETag, Hub blob id, else its modification time) in ``.objects.json``: a
re-index downloads only objects that changed, and deletes copies of objects that are gone.
The mirror is a cache: deleting it costs one download of the collection.
"""

from __future__ import annotations

import json
import posixpath
from pathlib import Path
from typing import Any

from dalle_data import locations
from dalle_data.atomic import write_json
from dalle_data.hashing import sha256_bytes
from dalle_data.model.shard_cache import default_dir

STATE = ".objects.json"
_KINDS = (".pt", ".md", ".png")
# Listing fields that change when an object's content does, most specific first.
_VERSION_KEYS = ("ETag", "etag", "md5Hash", "blob_id", "LastModified", "updated", "mtime")


def mirror_dir(root: str, cache_dir: Path | None) -> Path:
    """The local mirror of the collection at URL ``root``."""
    return (cache_dir or default_dir()) / "collections" / sha256_bytes(root.encode())[:16]


def indexed(relative: str) -> bool:
    """Whether the indexer reads ``<family>/<file>`` or ``<family>/<name>/<file>``."""
    parts = relative.split("/")
    if len(parts) not in (2, 3) or any(p.startswith(".") for p in parts):
        return False
    return parts[-1] == "eval.json" or parts[-1].endswith(_KINDS)


def sync(root: str, cache_dir: Path | None) -> Path:
    """Bring the mirror of ``root`` up to date (see module doc); return its folder."""
    from tqdm import tqdm

    local = mirror_dir(root, cache_dir)
    local.mkdir(parents=True, exist_ok=True)
    fs, base = locations.filesystem(root)
    fs.invalidate_cache(base)
    try:
        found = fs.find(base, detail=True)
    except FileNotFoundError:
        found = {}
    objects = {
        posixpath.relpath(info["name"], base): info
        for info in found.values()
        if info.get("type") == "file"
    }
    objects = {rel: info for rel, info in objects.items() if indexed(rel)}
    state = _read_state(local)
    for relative in sorted(set(state) - set(objects)):
        (local / relative).unlink(missing_ok=True)
        del state[relative]
    for path in sorted(local.glob("*/**/*")):
        relative = path.relative_to(local).as_posix()
        if path.is_file() and indexed(relative) and relative not in objects:
            path.unlink()  # a file put there by hand, or by serve, of an object now gone
    stale = [
        rel
        for rel, info in sorted(objects.items())
        if _version(info) is None
        or state.get(rel) != _version(info)
        or _size(local / rel) != info.get("size")
    ]
    for relative in tqdm(stale, desc=f"mirror {root}", unit=" files", mininterval=2.0):
        locations.download(locations.join(root, relative), local / relative)
        state[relative] = _version(objects[relative])
        write_json(local / STATE, state)
    write_json(local / STATE, state)
    return local


def fetch(root: str, relative: str, cache_dir: Path | None) -> str:
    """Download one object of ``root`` into its mirror (remembering its version, when the
    indexer reads it) and return its sha256: how publish checks what it uploaded."""
    url = locations.join(root, relative)
    if not indexed(relative):
        return locations.sha256(url)
    local = mirror_dir(root, cache_dir)
    fs, path = locations.filesystem(url)
    fs.invalidate_cache(path)
    version = _version(fs.info(path))  # before the download: a later change is seen later
    digest = locations.download(url, local / relative)
    state = _read_state(local)
    state[relative] = version
    write_json(local / STATE, state)
    return digest


def upload_outputs(local: Path, root: str, names: tuple[str, ...]) -> None:
    """Upload the indexer's outputs from the mirror to ``root``, in the order given."""
    for name in names:
        if (local / name).is_file():
            locations.upload(local / name, locations.join(root, name))


def _version(info: dict[str, Any]) -> list[Any] | None:
    for key in _VERSION_KEYS:
        if info.get(key):
            return [int(info.get("size") or 0), key, str(info[key])]
    return None


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


def _read_state(local: Path) -> dict[str, Any]:
    try:
        state = json.loads((local / STATE).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return {}  # no mirror yet, or a damaged one: everything is downloaded again
    return state if isinstance(state, dict) else {}
