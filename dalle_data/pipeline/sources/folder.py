"""folder format: a local folder of images, each with a same-named ``.txt`` caption beside it.

DALLE-pytorch's train_dalle.py reads this layout (``photos/a/cat.jpg`` + ``photos/a/cat.txt``).
The folder is walked recursively, folder by folder (a folder's files, then its subfolders,
each sorted by name), and read in place: each image's URL
is its ``file:`` URL (img2dataset reads it; the dataset needs ``allow_file_urls``). A caption
file with several lines gives its first line (``caption_lines: first``) or one sample per
line (``each``; lines after the first get ``#<line>`` on the URL, so they are not duplicate
URLs). Blank lines are not captions.

Every entry is a row, numbered in walk order from 1 (row id ``source_index * 10**9 + n``):
images without a caption file are dropped as ``missing_caption``, caption files without an
image as ``orphan_caption``, captions that are not UTF-8 as ``invalid_utf8``. Images that
cannot be decoded fail at download, counted there. Other files are not rows.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dalle_data.pipeline.sources import (
    Chunk,
    Options,
    SourceError,
    SourceFile,
    concat_dropped,
    make_dropped,
    make_rows,
    row_ids,
)

STAGE = "normalize"
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})
CAPTION_SUFFIX = ".txt"
CHUNK_ROWS = 1 << 16


def read(files: list[SourceFile], options: Options) -> Iterator[Chunk]:
    """Yield chunks of rows for each configured folder, in path order."""
    if options.caption_lines not in ("first", "each"):
        raise SourceError(
            f"caption_lines {options.caption_lines!r} is not known: use first or each"
        )
    for source in files:
        root = source.path.resolve()
        if not root.is_dir():
            raise SourceError(
                f"{source.path} is not a folder: a `folder` dataset's source is a folder of "
                "images with .txt captions"
            )
        yield from _chunks(source, _entries(root, options.caption_lines))


def _entries(root: Path, caption_lines: str) -> Iterator[tuple[str, str | None, str | None]]:
    """(reason or "", url, caption) per row, in walk order."""
    for folder, names in _walk(root):
        stems: dict[str, list[str]] = {}
        for name in names:
            stem, suffix = os.path.splitext(name)
            stems.setdefault(stem, []).append(suffix)
        for name in names:
            stem, suffix = os.path.splitext(name)
            path = folder / name
            if suffix == CAPTION_SUFFIX:
                if not any(s.lower() in IMAGE_SUFFIXES for s in stems[stem]):
                    yield "orphan_caption", path.as_uri(), None
                continue
            if suffix.lower() not in IMAGE_SUFFIXES:
                continue
            if CAPTION_SUFFIX not in stems[stem]:
                yield "missing_caption", path.as_uri(), None
                continue
            try:
                text = (folder / (stem + CAPTION_SUFFIX)).read_bytes().decode("utf-8-sig")
            except UnicodeDecodeError:
                yield "invalid_utf8", path.as_uri(), None
                continue
            lines = [line.strip() for line in text.splitlines() if line.strip()] or [""]
            if caption_lines == "first":
                lines = lines[:1]
            for number, line in enumerate(lines, start=1):
                url = path.as_uri() + (f"#{number}" if number > 1 else "")
                yield "", url, line


def _walk(root: Path) -> Iterator[tuple[Path, list[str]]]:
    """Each folder below ``root`` (links followed) with its file names, all sorted."""
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs.sort()
        yield Path(folder), sorted(files)


def _chunks(
    source: SourceFile, entries: Iterator[tuple[str, str | None, str | None]]
) -> Iterator[Chunk]:
    number = 0
    batch: list[tuple[str, str | None, str | None]] = []
    for entry in entries:
        batch.append(entry)
        if len(batch) == CHUNK_ROWS:
            yield _chunk(source, batch, number)
            number += len(batch)
            batch = []
    if batch or not number:
        yield _chunk(source, batch, number)


def _chunk(
    source: SourceFile, batch: list[tuple[str, str | None, str | None]], before: int
) -> Chunk:
    ids = row_ids(source, np.arange(before + 1, before + len(batch) + 1, dtype=np.int64))
    reasons = pa.array([r for r, _, _ in batch], pa.string())
    urls = pa.array([u for _, u, _ in batch], pa.string())
    captions = pa.array([c for _, _, c in batch], pa.string())
    dropped = []
    for reason in ("missing_caption", "orphan_caption", "invalid_utf8"):
        sel = pc.equal(reasons, reason)
        count = pc.sum(sel).as_py() or 0
        if count:
            picked = {"row_id": ids.filter(sel), "url": urls.filter(sel)}
            dropped.append(make_dropped(STAGE, reason, picked, count))
    good = pc.equal(reasons, "")
    rows = make_rows(
        {"row_id": ids.filter(good), "url": urls.filter(good), "caption": captions.filter(good)},
        pc.sum(good).as_py() or 0,
    )
    return Chunk(rows=rows, dropped=concat_dropped(dropped), input_rows=len(batch))
