"""What a served collection offers: its entries by name, their files, cards and leaderboards.

Everything comes from ``ROOT/index.json`` (built by ``dalle-data collection`` when missing).
Request data only ever *selects* from the tables built here at start-up: a model by its
name, a file of its folder by the names found there. No path is built from a request.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dalle_data.errors import DalleDataError

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

    @property
    def card(self) -> Path | None:
        return self.files.get("README.md")


@dataclass(frozen=True)
class Catalog:
    """The collection at ``root`` as the server sees it."""

    root: Path
    entries: dict[str, Entry]
    skipped: list[str]

    @classmethod
    def open(cls, root: Path) -> Catalog:
        """Read ``root/index.json`` (building it first if missing) into servable entries."""
        root = Path(root)
        if not root.is_dir():
            raise ServeError(f"collection {root} is not a folder: pass the collection's root")
        index = _read_index(root)
        entries: dict[str, Entry] = {}
        skipped: list[str] = []
        for position, record in enumerate(index):
            entry, why = _entry(root, record)
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
        return cls(root=root, entries=entries, skipped=skipped)

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
            "root": self.root.name,
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


def _read_index(root: Path) -> list[Any]:
    path = root / "index.json"
    if not path.is_file():
        _build_index(root)
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
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


def _build_index(root: Path) -> None:
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
    write_index(root)


def _entry(root: Path, record: Any) -> tuple[Entry | None, str]:
    """The entry for one index record, or None and why it cannot be served."""
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
    if not checkpoint.is_file():
        return None, f"{name}: {relative} does not exist (re-index the collection)"
    return Entry(name=name, checkpoint=checkpoint, record=record, files=_own_files(checkpoint)), ""


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
