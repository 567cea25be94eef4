"""What a served collection offers: its entries by name, their files, cards and leaderboards.

Everything comes from ``ROOT/index.json`` (built by ``dalle-data collection`` when missing).
Request data only ever *selects* from the tables built here at start-up: a model by its
name, a file of its folder by the names found there. No path is built from a request.

A bucket or HTTP ROOT is served from its mirror (:mod:`dalle_data.collection.mirror`'s
folder): index.json, lineage.png and each model's card and samples named in the index are
fetched at start-up; a checkpoint when its model is first loaded, sha256-checked against
the index. Nothing is listed, so a read-only http(s) collection with an index.json serves.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dalle_data import locations
from dalle_data.errors import DalleDataError
from dalle_data.hashing import sha256_file

log = logging.getLogger(__name__)

# Files of a model folder the page may show (no SVG: it can carry script).
_PICTURES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".webp": "image/webp",
}
_FRONT_MATTER_END = "\n---\n"


class ServeError(DalleDataError):
    """A collection or a serve setting that cannot be served, and what to do."""


@dataclass(frozen=True)
class Entry:
    """One servable checkpoint: its index record and the files beside it."""

    name: str
    checkpoint: Path
    record: dict[str, Any]
    files: dict[str, Path] = field(default_factory=dict)
    source: str | None = None  # the checkpoint's URL in a bucket collection

    @property
    def card(self) -> Path | None:
        return self.files.get("README.md")

    def fetch(self) -> Path:
        """The local checkpoint; from a bucket, downloaded first (a copy already there is
        kept if its sha256 is the index's), refused if its bytes are not the indexed ones."""
        wanted = self.record.get("sha256")
        if self.source is None or (
            self.checkpoint.is_file() and sha256_file(self.checkpoint) == wanted
        ):
            return self.checkpoint
        log.info("fetching %s", self.source)
        digest = locations.download(self.source, self.checkpoint)
        if digest != wanted:
            self.checkpoint.unlink(missing_ok=True)
            raise ServeError(
                f"{self.source} has sha256 {digest[:12]}, index.json says {str(wanted)[:12]}: "
                "the collection changed since it was indexed; run `dalle-data collection` on it"
            )
        return self.checkpoint

    def beside(self, file_name: str) -> Path | None:
        """A file of the checkpoint's folder (fetched from a bucket), or None."""
        local = self.checkpoint.parent / file_name
        if not local.is_file() and self.source is not None:
            try:
                locations.download(locations.join(locations.parent(self.source), file_name), local)
            except locations.LocationError:
                return None
        return local if local.is_file() else None


@dataclass(frozen=True)
class Catalog:
    """The collection at ``location`` as the server sees it, from the local ``root``
    (the folder itself, or a bucket's mirror)."""

    root: Path
    entries: dict[str, Entry]
    skipped: list[str]
    location: Path | str

    @classmethod
    def open(cls, location: Path | str, *, cache_dir: Path | None = None) -> Catalog:
        """Read ``index.json`` (building it first if missing) into servable entries."""
        target = locations.normalize(location)
        if isinstance(target, Path):
            root = target
            if not root.is_dir():
                raise ServeError(f"collection {root} is not a folder: pass the collection's root")
        else:
            from dalle_data.collection.mirror import mirror_dir

            root = mirror_dir(target, cache_dir)
            root.mkdir(parents=True, exist_ok=True)
        index = _read_index(target, cache_dir)
        entries: dict[str, Entry] = {}
        skipped: list[str] = []
        for position, record in enumerate(index):
            entry, why = _entry(root, record, None if isinstance(target, Path) else target)
            if entry is None:
                skipped.append(f"index.json checkpoint {position}: {why}")
            elif entry.name in entries:
                skipped.append(
                    f"{record.get('path')}: the name {entry.name} is already served from "
                    f"{entries[entry.name].record.get('path')} (rename one of them)"
                )
            else:
                entries[entry.name] = entry
        for line in skipped:
            log.warning("not served: %s", line)
        if not isinstance(target, Path):
            _fetch_optional(locations.join(target, "lineage.png"), root / "lineage.png")
        return cls(root=root, entries=entries, skipped=skipped, location=target)

    @property
    def lineage_picture(self) -> Path | None:
        path = self.root / "lineage.png"
        return path if path.is_file() else None

    def summary(self) -> dict[str, Any]:
        """What the page shows: every entry, the leaderboards, what was left out and why."""
        models = [
            {
                **{key: entry.record.get(key) for key in _SHOWN},
                "name": name,
                "card": entry.card is not None,
                "samples": "samples.png" in entry.files,
            }
            for name, entry in self.entries.items()
        ]
        return {
            "root": locations.name(self.location),
            "models": models,
            "leaderboards": leaderboards(entry.record for entry in self.entries.values()),
            "lineage_picture": self.lineage_picture is not None,
            "skipped": self.skipped,
        }


_SHOWN = (
    "path", "family", "architecture", "lineage", "epochs", "parent",
    "bytes", "sha256", "tokenizer", "evals", "problems",
)  # fmt: skip


def leaderboards(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One board per eval set (dataset + eval manifest sha256), best ``loss`` first.

    Scores on different eval sets are never compared, as eval.json keeps them apart.
    """
    boards: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for record in records:
        for score in record.get("evals") or []:
            if not isinstance(score, dict) or not isinstance(score.get("loss"), int | float):
                continue
            key = (str(score.get("dataset", "?")), str(score.get("manifest_sha256", "")))
            boards.setdefault(key, []).append({"name": record.get("name"), **score})
    return [
        {"dataset": dataset, "manifest_sha256": sha, "rows": sorted(rows, key=lambda r: r["loss"])}
        for (dataset, sha), rows in sorted(boards.items())
    ]


def render_card(entry: Entry, file_url: Callable[[str], str]) -> str:
    """The entry's README.md as HTML: front matter dropped, raw HTML escaped, and pictures
    of its own folder pointed at ``file_url(file_name)``."""
    from markdown_it import MarkdownIt

    if entry.card is None:
        return ""
    text = entry.card.read_text(encoding="utf-8", errors="replace")
    if text.startswith("---\n") and _FRONT_MATTER_END in text[3:]:
        text = text[3:].split(_FRONT_MATTER_END, 1)[1]
    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    tokens = md.parse(text)
    for token in tokens:
        for child in token.children or []:
            src = child.attrGet("src") if child.type == "image" else None
            if isinstance(src, str) and src.removeprefix("./") in entry.files:
                child.attrSet("src", file_url(src.removeprefix("./")))
    return str(md.renderer.render(tokens, md.options, {}))


def _read_index(root: Path | str, cache_dir: Path | None) -> list[Any]:
    path = locations.join(root, "index.json")
    if not locations.exists(path):
        _build_index(root, cache_dir)
    try:
        index = json.loads(locations.read_bytes(path).decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ServeError(
            f"{path} is not readable JSON ({err}): rebuild it with `dalle-data collection {root}`"
        ) from None
    checkpoints = index.get("checkpoints") if isinstance(index, dict) else None
    if not isinstance(checkpoints, list):
        raise ServeError(
            f"{path} has no 'checkpoints' list: rebuild it with `dalle-data collection {root}`"
        )
    return checkpoints


def _build_index(root: Path | str, cache_dir: Path | None) -> None:
    if locations.scheme(root) in locations.READ_ONLY:
        raise ServeError(
            f"{root} has no index.json and an http(s) collection cannot be indexed in place: "
            "run `dalle-data collection` where it is stored (a folder or a bucket)"
        )
    try:
        from dalle_data.collection.index import write_index
    except ModuleNotFoundError as err:
        if err.name not in ("dalle_data.collection", "dalle_data.collection.index"):
            raise
        raise ServeError(
            f"{root} has no index.json and this dalle-data cannot build one: "
            f"run `dalle-data collection {root}` first"
        ) from None
    log.info("%s has no index.json: indexing the collection first", root)
    write_index(root, cache_dir=cache_dir)


def _entry(root: Path, record: Any, source: str | None) -> tuple[Entry | None, str]:
    """The entry for one index record, or None and why it cannot be served; ``source``:
    the collection's URL when ``root`` is its mirror."""
    if not isinstance(record, dict):
        return None, f"not an object ({type(record).__name__})"
    name, relative = record.get("name"), record.get("path")
    if not isinstance(name, str) or not name:
        return None, f"{relative}: no name (see its problems: {record.get('problems')})"
    if not isinstance(relative, str) or not relative:
        return None, f"{name}: no path"
    # Normalized, not resolved: a checkpoint may be a symlink the collection's owner made;
    # what is refused is an index entry that names a place outside the collection.
    base = Path(os.path.abspath(root))
    checkpoint = Path(os.path.normpath(base / relative))
    if Path(relative).is_absolute() or not checkpoint.is_relative_to(base):
        return None, f"{name}: path {relative!r} leads outside the collection"
    if source is not None:
        url = locations.join(source, *checkpoint.relative_to(base).parts)
        files = _remote_files(source, base, checkpoint)
        return Entry(name, checkpoint, record, files, source=str(url)), ""
    if not checkpoint.is_file():
        return None, f"{name}: {relative} does not exist (re-index the collection)"
    return Entry(name=name, checkpoint=checkpoint, record=record, files=_own_files(checkpoint)), ""


def _remote_files(source: str, root: Path, checkpoint: Path) -> dict[str, Path]:
    """The card and samples of a ``<family>/<name>/`` folder, fetched into the mirror (a
    bucket folder is not listed: http(s) cannot list; the layout names the files)."""
    if checkpoint.parent.name != checkpoint.stem:
        return {}
    folder = checkpoint.parent.relative_to(root).as_posix()
    files = {}
    for file_name in ("README.md", "samples.png"):
        local = checkpoint.parent / file_name
        if _fetch_optional(locations.join(source, folder, file_name), local):
            files[file_name] = local
    return files


def _fetch_optional(url: str | Path, local: Path) -> bool:
    """Download ``url`` to ``local``; when it is missing, drop a stale ``local`` (False)."""
    try:
        locations.download(url, local)
    except locations.LocationError as err:
        log.info("not shown: %s", err)
        local.unlink(missing_ok=True)
        return False
    return True


def _own_files(checkpoint: Path) -> dict[str, Path]:
    """Card and pictures of a ``<family>/<name>/<name>.pt`` folder (the seed's flat
    ``<family>/<name>.pt`` files share their folder, so nothing there is theirs alone)."""
    folder = checkpoint.parent
    if folder.name != checkpoint.stem:
        return {}
    return {
        path.name: path
        for path in sorted(folder.iterdir())
        if path.is_file() and (path.name == "README.md" or path.suffix.lower() in _PICTURES)
    }


def media_type(path: Path) -> str:
    """The content type of a file ``_own_files`` admits."""
    return _PICTURES.get(path.suffix.lower(), "text/markdown; charset=utf-8")
