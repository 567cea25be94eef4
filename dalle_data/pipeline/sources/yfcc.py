"""YFCC100M formats: the 25-column metadata TSV without header (plain or .bz2), and the
SQLite database the public multimedia-commons bucket serves (``yfcc100m_dataset.sql``).

A source file that starts with the SQLite header is read as the database (format ``yfcc``
detects it; ``yfcc_sqlite`` insists on it): table ``yfcc100m_dataset``, streamed in
``photoid`` order in batches, so memory stays bounded whatever the table's size (without an
index on ``photoid`` SQLite sorts in temporary files, not in memory). Both formats go
through the same rules below and give the same rows.

Title and description are URL-encoded (``+`` for space) and may hold HTML: both are decoded
and stripped, and the caption is the title followed by the description. Videos (marker 1)
are dropped; with ``subset`` (OpenAI's list of line number, photo id, photo hash, with or
without a header) only listed photo ids are kept; the license must be in ``licenses`` (by
name or URL), by default any Creative Commons license. The row id is the photo id.
"""

from __future__ import annotations

import html
import re
import sqlite3
import urllib.parse
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dalle_data.pipeline.sources import (
    Chunk,
    Lines,
    Options,
    SourceError,
    SourceFile,
    concat_dropped,
    decode_utf8,
    drop_first_failed,
    escaped,
    make_dropped,
    make_rows,
    map_blocks,
    read_blocks,
    split_lines,
)

STAGE = "normalize"
FIELDS = 25
PHOTO_ID, TITLE, DESCRIPTION, DOWNLOAD_URL, LICENSE_NAME, LICENSE_URL, MARKER = (
    1,
    8,
    9,
    16,
    17,
    18,
    24,
)
_TAG = re.compile(r"<[^>]*>")
SQLITE_HEADER = b"SQLite format 3\x00"
TABLE = "yfcc100m_dataset"
# The database's columns for the TSV fields the rules read (the other 16 are never fetched).
SQL_COLUMNS = {
    PHOTO_ID: "photoid",
    TITLE: "title",
    DESCRIPTION: "description",
    DOWNLOAD_URL: "downloadurl",
    LICENSE_NAME: "licensename",
    LICENSE_URL: "licenseurl",
    MARKER: "marker",
}
SQL_BATCH = 50_000


def read(files: list[SourceFile], options: Options) -> Iterator[Chunk]:
    """Yield chunks of each metadata file in file order: TSV blocks or database batches."""
    yield from _read(files, options, sqlite_only=False)


def read_sqlite(files: list[SourceFile], options: Options) -> Iterator[Chunk]:
    """Format ``yfcc_sqlite``: like :func:`read`, refusing files that are not SQLite."""
    yield from _read(files, options, sqlite_only=True)


def _read(files: list[SourceFile], options: Options, *, sqlite_only: bool) -> Iterator[Chunk]:
    subset = load_subset(options.subset) if options.subset else None
    parse = partial(parse_lines, subset=subset, licenses=options.licenses)
    for source in files:
        if is_sqlite(source.path):
            yield from read_database(source, subset=subset, licenses=options.licenses)
        elif sqlite_only:
            raise SourceError(
                f"source file {source.path} is not an SQLite database (format yfcc_sqlite); "
                "use format yfcc for the TSV"
            )
        else:
            yield from map_blocks(source, parse)


def is_sqlite(path: Path) -> bool:
    """Whether a (plain) file starts with the SQLite header."""
    try:
        with path.open("rb") as f:
            return f.read(len(SQLITE_HEADER)) == SQLITE_HEADER
    except OSError as err:
        raise SourceError(f"cannot open source file {path}: {err}") from err


def read_database(
    source: SourceFile, *, subset: np.ndarray | None, licenses: list[str]
) -> Iterator[Chunk]:
    """Stream the ``yfcc100m_dataset`` table in photoid order, one chunk per batch of rows."""
    path = source.path
    try:
        # immutable: no locks or journal (the file may sit on a read-only mount).
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro&immutable=1", uri=True)
    except sqlite3.Error as err:
        raise SourceError(f"cannot open SQLite source {path}: {err}") from err
    db.text_factory = bytes  # decoded below, so invalid UTF-8 is a counted drop, not a crash
    try:
        columns = {bytes(row[1]).decode() for row in db.execute(f"PRAGMA table_info({TABLE})")}
        missing = [c for c in SQL_COLUMNS.values() if c not in columns]
        if missing:
            found = "no such table" if not columns else f"it lacks {', '.join(missing)}"
            raise SourceError(
                f"SQLite source {path} is not the YFCC100M database: table {TABLE} ({found})"
            )
        # CAST: SQLite may store ids and markers as integers; the rules read text, as in the TSV.
        select = ", ".join(f"CAST({c} AS TEXT)" for c in SQL_COLUMNS.values())
        cursor = db.execute(f"SELECT {select} FROM {TABLE} ORDER BY photoid")
        while batch := cursor.fetchmany(SQL_BATCH):
            yield _database_chunk(list(zip(*batch, strict=True)), subset, licenses)
    except sqlite3.DatabaseError as err:
        raise SourceError(
            f"SQLite source {path} is corrupt or truncated ({err}): delete it and rerun fetch"
        ) from err
    finally:
        db.close()


def _database_chunk(
    values: list[tuple[bytes | None, ...]], subset: np.ndarray | None, licenses: list[str]
) -> Chunk:
    n = len(values[0])
    binary = [pc.fill_null(pa.array(col, pa.binary()), b"") for col in values]
    decoded = [decode_utf8(col) for col in binary]
    bad_utf8 = np.logical_or.reduce([bad for _, bad in decoded])
    good = pa.array(~bad_utf8)
    strings = dict(zip(SQL_COLUMNS, (text for text, _ in decoded), strict=True))

    def raw(mask: pa.Array) -> pa.Array:
        """Dropped rows as the tab-separated fields read (no line exists to quote)."""
        return pc.binary_join_element_wise(
            *(pc.cast(strings[k].filter(mask), pa.string()) for k in SQL_COLUMNS), "\t"
        )

    dropped = []
    if bad_utf8.any():
        mask = pa.array(bad_utf8)
        escaped_row = pc.binary_join_element_wise(*(escaped(b.filter(mask)) for b in binary), "\t")
        dropped.append(make_dropped(STAGE, "invalid_utf8", {"raw": escaped_row}, int(mask.sum())))
    kept = {k: v.filter(good) for k, v in strings.items()}
    chunk = select_rows(
        kept.__getitem__, lambda m: raw(good).filter(m), subset=subset, licenses=licenses
    )
    return Chunk(chunk.rows, concat_dropped([*dropped, chunk.dropped]), input_rows=n)


def load_subset(path: Path) -> np.ndarray:
    """Sorted photo ids of a subset list (line number, photo id, hash), header or not."""
    ids = []
    first = True
    for block in read_blocks(path):
        strings = decode_utf8(split_lines(block, 1).text)[0]
        strings = strings.filter(pc.greater(pc.binary_length(strings), 0))
        found = pc.extract_regex(strings, r"^[^\t]*\t\s*(?P<id>[^\t]*?)\s*(?:\t|$)")
        second = pc.struct_field(found, [0])
        if first and len(second):
            first = False
            if not str(second[0]).isdigit():
                second = second.slice(1)  # a header line
        ok = pc.fill_null(pc.match_substring_regex(second, r"^[0-9]{1,18}$"), False)
        if not pc.all(ok).as_py():
            bad = second.filter(pc.invert(ok))[0]
            raise SourceError(
                f"subset file {path} has a photo id {str(bad)!r} that is not a number: "
                "it must list line number, photo id, photo hash separated by tabs"
            )
        ids.append(pc.cast(second, pa.int64()).to_numpy())
    return np.unique(np.concatenate(ids)) if ids else np.zeros(0, dtype=np.int64)


def parse_lines(
    source: SourceFile, lines: Lines, *, subset: np.ndarray | None, licenses: list[str]
) -> Chunk:
    """Select photos and build their captions; every line lands in rows or in dropped."""
    text = lines.text
    n = len(text)
    strings, bad_utf8 = decode_utf8(text)
    blank = pc.equal(pc.binary_length(text), 0).to_numpy(zero_copy_only=False)
    bad_utf8 &= ~blank
    wrong = ~blank & ~bad_utf8 & (lines.tabs != FIELDS - 1)
    good = ~blank & ~bad_utf8 & ~wrong
    dropped = [
        make_dropped(STAGE, reason, {"raw": raw(pa.array(mask))}, int(mask.sum()))
        for reason, mask, raw in (
            ("blank_line", blank, strings.filter),
            ("invalid_utf8", bad_utf8, lambda m: escaped(text.filter(m))),
            ("wrong_column_count", wrong, strings.filter),
        )
        if mask.any()
    ]
    rows = strings.filter(pa.array(good))
    fields = pc.split_pattern(rows, "\t").flatten()
    m = len(rows)

    def field(k: int) -> pa.Array:
        return pc.take(fields, np.arange(k, FIELDS * m, FIELDS))

    chunk = select_rows(field, rows.filter, subset=subset, licenses=licenses)
    return Chunk(rows=chunk.rows, dropped=concat_dropped([*dropped, chunk.dropped]), input_rows=n)


def select_rows(
    field: Callable[[int], pa.Array],
    raw: Callable[[pa.Array], pa.Array],
    *,
    subset: np.ndarray | None,
    licenses: list[str],
) -> Chunk:
    """The rules both formats share, on parsed rows: ``field(k)`` is TSV column ``k`` as
    text, ``raw(mask)`` the source text of the rows in ``mask`` (kept for bad photo ids)."""
    photo = field(PHOTO_ID)
    m = len(photo)
    numeric = pc.match_substring_regex(photo, r"^[0-9]{1,18}$").to_numpy(zero_copy_only=False)
    ids = pc.cast(pc.if_else(pa.array(numeric), photo, pa.scalar(None, photo.type)), pa.int64())
    cols = {
        "row_id": ids,
        "url": field(DOWNLOAD_URL),
        "license": field(LICENSE_NAME),
    }
    license_ok = _license_ok(cols["license"], field(LICENSE_URL), licenses)
    checks = [
        ("bad_photo_id", ~numeric),
        ("video", pc.equal(field(MARKER), "1").to_numpy(zero_copy_only=False)),
    ]
    if subset is not None:
        checks.append(("not_in_subset", ~_member(ids.fill_null(-1).to_numpy(), subset)))
    checks.append(("license", ~license_ok))
    remaining, dropped = drop_first_failed(
        STAGE,
        checks,
        cols,
        also=lambda reason, sel: {"raw": raw(sel)} if reason == "bad_photo_id" else {},
    )
    keep = pa.array(remaining)
    captions = pa.array(
        [
            caption(t, d)
            for t, d in zip(
                field(TITLE).filter(keep).to_pylist(),
                field(DESCRIPTION).filter(keep).to_pylist(),
                strict=True,
            )
        ],
        pa.string(),
    )
    empty = pc.equal(pc.binary_length(captions), 0).to_numpy(zero_copy_only=False)
    kept = {k: v.filter(keep) for k, v in cols.items()}
    if empty.any():
        sel = pa.array(empty)
        picked = {k: v.filter(sel) for k, v in kept.items()}
        dropped.append(make_dropped(STAGE, "no_caption", picked, int(empty.sum())))
        kept = {k: v.filter(pa.array(~empty)) for k, v in kept.items()}
        captions = captions.filter(pa.array(~empty))
    out = make_rows(kept | {"caption": captions}, len(captions))
    return Chunk(rows=out, dropped=concat_dropped(dropped), input_rows=m)


def decode_text(value: str) -> str:
    """URL-decoded (``+`` = space) text without HTML tags or entities."""
    text = urllib.parse.unquote_plus(value)
    return " ".join(html.unescape(_TAG.sub(" ", text)).split())


def caption(title: str, description: str) -> str:
    """Title, then description, separated by a full stop unless the title ends a sentence."""
    parts = [p for p in (decode_text(title), decode_text(description)) if p]
    if len(parts) == 2 and not parts[0].endswith((".", "!", "?", ":", ";")):
        return f"{parts[0]}. {parts[1]}"
    return " ".join(parts)


def _member(ids: np.ndarray, subset: np.ndarray) -> np.ndarray:
    if not len(subset):
        return np.zeros(len(ids), dtype=bool)
    pos = np.clip(np.searchsorted(subset, ids), 0, len(subset) - 1)
    return subset[pos] == ids


def _license_ok(names: pa.Array, urls: pa.Array, licenses: list[str]) -> np.ndarray:
    if not licenses:
        found = pc.match_substring(pc.utf8_lower(urls), "creativecommons.org/")
        return found.to_numpy(zero_copy_only=False)
    allowed = pa.array([x.strip().lower() for x in licenses], names.type)
    by_name = pc.is_in(pc.utf8_lower(pc.utf8_trim_whitespace(names)), value_set=allowed)
    by_url = pc.is_in(pc.utf8_lower(pc.utf8_trim_whitespace(urls)), value_set=allowed)
    return pc.or_(by_name, by_url).to_numpy(zero_copy_only=False)
