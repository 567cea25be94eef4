"""normalized.parquet -> filtered.parquet: subset selection and small named filters.

Each filter is a unit in the datatrove style: it only says which rows of a batch to keep;
the runner counts what each one dropped and writes every dropped row, with the unit's name
as its reason, to dropped.parquet. Order: subset, url_scheme, duplicate_url (first row_id
wins among valid URLs), then min_values/max_values (bounds on a table source's numeric
columns), caption cleaning, empty_caption, caption_length, blocklist.

Everything is vectorised over pyarrow batches; only captions that are not plain ASCII (or
hold HTML entities, control characters or stray spaces) go through Python and ftfy, in
worker processes.
"""

from __future__ import annotations

import html
import json
import multiprocessing as mp
import os
import re
import time
import unicodedata
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import ftfy
import ftfy.badness
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from dalle_data import atomic
from dalle_data.errors import DalleDataError
from dalle_data.hashing import sha256_bytes, sha256_file
from dalle_data.pipeline.sources import (
    DROPPED_PARQUET,
    DROPPED_SCHEMA,
    ROWS_PARQUET,
    SCHEMA,
    make_dropped,
)

STAGE = "filter"
BATCH_ROWS = 1 << 18
_FTFY = ftfy.TextFixerConfig(unescape_html=False)
_MASK64 = (1 << 64) - 1


class FilterError(DalleDataError):
    """Bad filter input or options; the message names the file or value and the fix."""


def splitmix64(values: np.ndarray) -> np.ndarray:
    """A bijective 64-bit mix (SplitMix64): distinct row ids give distinct, uniform values."""
    with np.errstate(over="ignore"):
        z = values.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


@dataclass(frozen=True)
class Subset:
    """Rows whose ``splitmix64(row_id)`` is below ``limit`` (``None`` = every row)."""

    fraction: float
    max_rows: int | None
    limit: int | None
    size: int

    def record(self) -> dict[str, Any]:
        return {
            "rule": "keep rows with splitmix64(row_id) / 2**64 < fraction; with max_rows, "
            "only the max_rows smallest such values",
            "fraction": self.fraction,
            "max_rows": self.max_rows,
            "limit": self.limit,
            "size": self.size,
        }


def choose_subset(row_ids: np.ndarray, fraction: float, max_rows: int | None) -> Subset:
    """The deterministic subset: a larger fraction or max_rows always contains a smaller one."""
    if not 0 < fraction <= 1:
        raise FilterError(f"fraction {fraction} is out of range: use a number in (0, 1]")
    if max_rows is not None and max_rows < 1:
        raise FilterError(f"max_rows {max_rows} is out of range: use a positive integer or null")
    limit = None if fraction >= 1 else int(fraction * 2**64)
    hashes = splitmix64(row_ids)
    inside = hashes if limit is None else hashes[hashes < np.uint64(limit)]
    if max_rows is not None and len(inside) > max_rows:
        limit = int(np.partition(inside, max_rows - 1)[max_rows - 1]) + 1
        inside = inside[inside < np.uint64(limit)] if limit <= _MASK64 else inside
    return Subset(fraction=fraction, max_rows=max_rows, limit=limit, size=len(inside))


class Filter(ABC):
    """A named row filter; ``name`` is the reason its rows get in dropped.parquet."""

    name: str

    @abstractmethod
    def keep(self, rows: pa.Table) -> pa.Array:
        """A boolean array: True for the rows of ``rows`` to keep."""


class SubsetFilter(Filter):
    name = "subset"

    def __init__(self, subset: Subset) -> None:
        self.subset = subset

    def keep(self, rows: pa.Table) -> pa.Array:
        if self.subset.limit is None or self.subset.limit > _MASK64:
            return pa.array(np.ones(rows.num_rows, dtype=bool))
        hashes = splitmix64(rows.column("row_id").to_numpy())
        return pa.array(hashes < np.uint64(self.subset.limit))


class UrlSchemeFilter(Filter):
    """http(s) URLs with a host and no whitespace; ``file:`` only where a dataset allows it,
    so ``file:///etc/passwd``, ``ftp:`` or ``javascript:`` never reach a downloader."""

    name = "url_scheme"

    def __init__(self, *, allow_file_urls: bool) -> None:
        http = r"https?://[^\s/?#]+"
        scheme = rf"(?:{http}|file:)" if allow_file_urls else http
        self.pattern = rf"^(?i:{scheme})\S*$"

    def keep(self, rows: pa.Table) -> pa.Array:
        urls = rows.column("url").fill_null("")
        return pc.match_substring_regex(urls, self.pattern)


class EmptyCaptionFilter(Filter):
    name = "empty_caption"

    def keep(self, rows: pa.Table) -> pa.Array:
        return pc.greater(pc.binary_length(rows.column("caption").fill_null("")), 0)


class CaptionLengthFilter(Filter):
    """Caption length in words (single spaces after cleaning) within [min_words, max_words]."""

    name = "caption_length"

    def __init__(self, *, min_words: int, max_words: int) -> None:
        if min_words > max_words:
            raise FilterError(
                f"filters.min_words {min_words} is above filters.max_words {max_words}: "
                "lower min_words or raise max_words"
            )
        self.min_words, self.max_words = min_words, max_words

    def keep(self, rows: pa.Table) -> pa.Array:
        captions = rows.column("caption").combine_chunks().fill_null("")
        words = word_counts(captions)
        return pa.array((words >= self.min_words) & (words <= self.max_words))


class BlocklistFilter(Filter):
    """Drops captions holding a listed word (case-insensitive, whole words)."""

    name = "blocklist"

    def __init__(self, words: list[str]) -> None:
        cleaned = [w.strip() for w in words if w.strip()]
        self.pattern = r"(?i)\b(?:" + "|".join(re.escape(w) for w in cleaned) + r")\b"

    def keep(self, rows: pa.Table) -> pa.Array:
        return pc.invert(pc.match_substring_regex(rows.column("caption"), self.pattern))


class ValueBoundFilter(Filter):
    """Rows whose numeric columns (a table source's ``values``) reach the bounds: at least
    ``min_values`` (name ``min_values``) or at most ``max_values`` (``max_values``). A row
    without the value does not reach the bound."""

    def __init__(self, bounds: dict[str, float], *, minimum: bool) -> None:
        self.name = "min_values" if minimum else "max_values"
        self.bounds, self.minimum = dict(bounds), minimum

    def keep(self, rows: pa.Table) -> pa.Array:
        values = rows.column("values").combine_chunks()
        keep = np.ones(rows.num_rows, dtype=bool)
        for column, bound in self.bounds.items():
            value = pc.map_lookup(values, pa.scalar(column), "first")
            ok = pc.greater_equal(value, bound) if self.minimum else pc.less_equal(value, bound)
            keep &= pc.fill_null(ok, False).to_numpy(zero_copy_only=False)
        return pa.array(keep)


# Bytes after which a caption may change under cleaning: anything but printable ASCII, and
# "&" (HTML entities). Captions without them, and without doubled or edge spaces, are
# already clean; only the rest (a few percent) go through Python.
_PLAIN = np.zeros(256, dtype=bool)
_PLAIN[0x20:0x7F] = True
_PLAIN[ord("&")] = False
# Characters ftfy's non-mojibake fixers change (C1 controls, ligatures, full width, curly
# quotes, line separators, surrogates, controls); mojibake itself is ftfy.badness.is_bad.
_FTFY_TOUCHES = re.compile(
    "[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u0132\u0133\u013f\u0140\u0149\u01c4-\u01cc"
    "\u01f1-\u01f3\ufb00-\ufb06\u3000\uff01-\uffef\u2018-\u201f\u2028\u2029\ud800-\udfff"
    "\u200b-\u200f\u202a-\u202e\u2060-\u206f\ufeff\ufff9-\ufffc]"
)


def clean_caption(text: str) -> str:
    """The cleaning rule: HTML unescape, ftfy, then single spaces, trimmed."""
    text = html.unescape(text)
    if _needs_ftfy(text):
        text = ftfy.fix_text(text, _FTFY)
    return " ".join(text.split())


def clean_caption_list(texts: list[str]) -> list[str]:
    """``clean_caption`` over a list (one task for a worker process)."""
    return [clean_caption(t) for t in texts]


def _needs_ftfy(text: str) -> bool:
    """False only where ftfy.fix_text returns ``text`` unchanged (it costs ~100 us a call)."""
    return (
        bool(_FTFY_TOUCHES.search(text))
        or not unicodedata.is_normalized("NFC", text)
        or (not text.isascii() and ftfy.badness.is_bad(text))
    )


def rows_needing_python(captions: pa.Array) -> np.ndarray:
    """Rows whose caption ``clean_caption`` might change, found by scanning the raw bytes."""
    n = len(captions)
    rel, data = _buffers(captions)
    space = data == 0x20
    odd = ~_PLAIN[data]
    odd[1:] |= space[1:] & space[:-1]
    row_of = np.searchsorted(rel, np.flatnonzero(odd), side="right") - 1
    mask = np.zeros(n, dtype=bool)
    mask[row_of] = True
    lengths = np.diff(rel)
    nonempty = lengths > 0
    mask[nonempty] |= space[rel[:-1][nonempty]] | space[rel[1:][nonempty] - 1]
    return mask


def word_counts(captions: pa.Array) -> np.ndarray:
    """Words per cleaned caption (single spaces, trimmed): spaces + 1, or 0 when empty."""
    offsets, data = _buffers(captions)
    spaces_before = np.searchsorted(np.flatnonzero(data == 0x20), offsets)
    return np.where(np.diff(offsets) > 0, np.diff(spaces_before) + 1, 0)


def _buffers(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Offsets (from 0) and bytes of a string array, without copying the bytes."""
    _, offsets_buf, data_buf = arr.buffers()
    if len(arr) == 0 or offsets_buf is None:
        return np.zeros(len(arr) + 1, dtype=np.int64), np.zeros(0, dtype=np.uint8)
    offsets: np.ndarray = np.frombuffer(offsets_buf, dtype=_offset_dtype(arr))
    offsets = offsets[arr.offset : arr.offset + len(arr) + 1]
    if data_buf is None:
        return offsets - offsets[0], np.zeros(0, dtype=np.uint8)
    data = np.frombuffer(data_buf, dtype=np.uint8)[offsets[0] : offsets[-1]]
    return offsets - offsets[0], data


def _offset_dtype(arr: pa.Array) -> type:
    return np.int64 if pa.types.is_large_string(arr.type) else np.int32


def clean_captions(captions: pa.Array) -> pa.Array:
    """``clean_caption`` over an array; rows that are already clean are left as they are."""
    captions = pc.fill_null(captions, "")
    slow = rows_needing_python(captions)
    if not slow.any():
        return captions
    mask = pa.array(slow)
    done = clean_caption_list(captions.filter(mask).to_pylist())
    return pc.replace_with_mask(captions, mask, pa.array(done, captions.type))


def url_hashes(urls: pa.Array) -> np.ndarray:
    """64-bit hashes of URLs; collisions are resolved by comparing the URLs themselves."""
    return pd.util.hash_array(urls.to_numpy(zero_copy_only=False), categorize=False)


def duplicate_mask(hashes: np.ndarray, urls_of: Any) -> np.ndarray:
    """True for every row whose URL appeared in an earlier row (rows are in row_id order).

    ``urls_of(positions)`` returns the URLs of the given row positions; it is called only
    for rows whose hash is shared, so the exact comparison costs little.
    """
    order = np.argsort(hashes, kind="stable")
    sorted_h = hashes[order]
    same_as_prev = np.zeros(len(hashes), dtype=bool)
    same_as_prev[1:] = sorted_h[1:] == sorted_h[:-1]
    shared = same_as_prev.copy()
    shared[:-1] |= same_as_prev[1:]
    candidates = np.sort(order[shared])
    dup = np.zeros(len(hashes), dtype=bool)
    seen: set[str] = set()
    for pos, url in zip(candidates.tolist(), urls_of(candidates), strict=True):
        if url in seen:
            dup[pos] = True
        else:
            seen.add(url)
    return dup


@dataclass
class FilterOptions:
    fraction: float = 1.0
    max_rows: int | None = None
    allow_file_urls: bool = False
    min_words: int = 1
    max_words: int = 200
    blocklist: tuple[str, ...] = ()
    # Bounds on a table source's numeric columns (datasets.<name>.min_values/max_values).
    min_values: dict[str, float] = field(default_factory=dict)
    max_values: dict[str, float] = field(default_factory=dict)
    # Processes cleaning captions; 0 = every core this process may use.
    workers: int = 0


URL_REASONS = ("subset", "url_scheme", "duplicate_url")


def run(metadata_dir: Path, options: FilterOptions) -> dict[str, Any]:
    """Filter ``normalized.parquet`` in ``metadata_dir``; write filtered.parquet,
    dropped.parquet (normalize's and filter's dropped rows), filter.json and report.json.

    Two passes: the first reads only row ids and URLs and decides subset, URL scheme and
    duplicates (first row_id wins among valid URLs); the second cleans captions (in worker
    processes when there are several batches), applies the caption filters and writes every
    row to one of the outputs.
    """
    start = time.perf_counter()
    normalized = metadata_dir / "normalized.parquet"
    if not normalized.exists():
        raise FilterError(f"{normalized} does not exist: run `dalle-data normalize` first")
    source = pq.ParquetFile(normalized)
    if not source.schema_arrow.equals(SCHEMA):
        raise FilterError(
            f"{normalized} does not have the normalized schema ({source.schema_arrow}): "
            "rerun `dalle-data normalize`"
        )
    row_ids = source.read(columns=["row_id"]).column(0).to_numpy()
    subset = choose_subset(row_ids, options.fraction, options.max_rows)
    del row_ids
    url_units: list[Filter] = [
        SubsetFilter(subset),
        UrlSchemeFilter(allow_file_urls=options.allow_file_urls),
    ]
    caption_units: list[Filter] = [
        ValueBoundFilter(bounds, minimum=minimum)
        for bounds, minimum in ((options.min_values, True), (options.max_values, False))
        if bounds
    ]
    caption_units += [
        EmptyCaptionFilter(),
        CaptionLengthFilter(min_words=options.min_words, max_words=options.max_words),
    ]
    if any(w.strip() for w in options.blocklist):
        caption_units.append(BlocklistFilter(list(options.blocklist)))
    verdict = url_verdicts(source, url_units)
    dropped = {reason: int(np.sum(verdict == i + 1)) for i, reason in enumerate(URL_REASONS)}
    dropped |= {u.name: 0 for u in caption_units}

    workers = options.workers or len(os.sched_getaffinity(0))
    batches = -(-source.metadata.num_rows // BATCH_ROWS)
    with (
        atomic.atomic_path(metadata_dir / "dropped.parquet") as dropped_tmp,
        atomic.atomic_path(metadata_dir / "filtered.parquet") as out_tmp,
        pq.ParquetWriter(dropped_tmp, DROPPED_SCHEMA, **DROPPED_PARQUET) as dropped_writer,
        pq.ParquetWriter(out_tmp, SCHEMA, **ROWS_PARQUET) as writer,
        _caption_executor(workers, batches) as pool,
    ):
        _copy_normalize_dropped(metadata_dir, dropped_writer)
        finish = partial(
            _finish,
            units=caption_units,
            dropped=dropped,
            writer=writer,
            dropped_writer=dropped_writer,
        )
        output_rows = 0
        pending: deque[tuple[pa.Table, Future[pa.Array]]] = deque()
        offset = 0
        for rows in _batches(source, "filter"):
            codes = verdict[offset : offset + rows.num_rows]
            offset += rows.num_rows
            for i, reason in enumerate(URL_REASONS):
                gone = codes == i + 1
                if gone.any():
                    dropped_writer.write_table(_as_dropped(reason, rows.filter(pa.array(gone))))
            if codes.any():
                rows = rows.filter(pa.array(codes == 0))
            # Batch k's captions are cleaned in a worker while batch k+1 is read.
            captions = rows.column("caption").combine_chunks()
            pending.append((rows, pool.submit(clean_captions, captions)))
            if len(pending) > workers:
                output_rows += finish(*pending.popleft())
        while pending:
            output_rows += finish(*pending.popleft())
    settings = {
        "allow_file_urls": options.allow_file_urls,
        "min_words": options.min_words,
        "max_words": options.max_words,
        "blocklist": sorted(w.strip() for w in options.blocklist if w.strip()),
    }
    settings |= {
        key: dict(sorted(bounds.items()))
        for key, bounds in (("min_values", options.min_values), ("max_values", options.max_values))
        if bounds
    }
    record = {
        "input_rows": source.metadata.num_rows,
        "dropped": dropped,
        "output_rows": output_rows,
        "subset": subset.record(),
        "options": settings,
        "options_sha256": sha256_bytes(json.dumps(settings, sort_keys=True).encode()),
        "input_sha256": sha256_file(normalized),
        "seconds": round(time.perf_counter() - start, 3),
    }
    atomic.write_json(metadata_dir / "filter.json", record)
    atomic.write_json(metadata_dir / "report.json", report(metadata_dir, record))
    return record


def _caption_executor(workers: int, batches: int) -> Executor:
    """Worker processes for caption cleaning, or none when there is a single batch: a spawned
    pool takes about a second to start, and one batch leaves nothing to overlap."""
    if batches <= 1:
        return _Inline()
    return ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"))


class _Inline(Executor):
    """An executor that runs each task in this process when it is submitted."""

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        future.set_result(fn(*args, **kwargs))
        return future


def url_verdicts(source: pq.ParquetFile, units: list[Filter]) -> np.ndarray:
    """Per row: 0 = keep, else 1 + the index in URL_REASONS of the rule that drops it."""
    codes = []
    hashes = []
    for batch in source.iter_batches(batch_size=BATCH_ROWS, columns=["row_id", "url"]):
        rows = pa.Table.from_batches([batch])
        code = np.zeros(rows.num_rows, dtype=np.uint8)
        for i, unit in enumerate(units):
            keep = unit.keep(rows).to_numpy(zero_copy_only=False)
            code[(code == 0) & ~keep] = i + 1
        codes.append(code)
        alive = code == 0
        urls = rows.column("url").combine_chunks()
        hashes.append(url_hashes(urls.filter(pa.array(alive)) if not alive.all() else urls))
    verdict = np.concatenate(codes) if codes else np.zeros(0, dtype=np.uint8)
    alive_at = np.flatnonzero(verdict == 0)
    dup = duplicate_mask(
        np.concatenate(hashes) if hashes else np.zeros(0, dtype=np.uint64),
        lambda pos: _take_urls(source, alive_at[pos]),
    )
    verdict[alive_at[dup]] = URL_REASONS.index("duplicate_url") + 1
    return verdict


def _finish(
    rows: pa.Table,
    cleaned: Future[pa.Array],
    units: list[Filter],
    dropped: dict[str, int],
    writer: pq.ParquetWriter,
    dropped_writer: pq.ParquetWriter,
) -> int:
    """Put the cleaned captions in, run the caption filters, write the survivors."""
    rows = rows.set_column(rows.schema.get_field_index("caption"), "caption", cleaned.result())
    for unit in units:
        mask = unit.keep(rows)
        gone = rows.filter(pc.invert(mask))
        if gone.num_rows:
            dropped[unit.name] += gone.num_rows
            dropped_writer.write_table(_as_dropped(unit.name, gone))
            rows = rows.filter(mask)
    writer.write_table(rows.cast(SCHEMA))
    return rows.num_rows


def _copy_normalize_dropped(metadata_dir: Path, writer: pq.ParquetWriter) -> None:
    path = metadata_dir / "normalize_dropped.parquet"
    if path.exists():
        for batch in pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS):
            writer.write_batch(batch)


def _batches(source: pq.ParquetFile, desc: str) -> Iterator[pa.Table]:
    with tqdm(total=source.metadata.num_rows, desc=desc, unit="rows", unit_scale=True) as bar:
        for batch in source.iter_batches(batch_size=BATCH_ROWS):
            bar.update(batch.num_rows)
            yield pa.Table.from_batches([batch])


def _as_dropped(reason: str, rows: pa.Table) -> pa.Table:
    columns = {name: rows.column(name).combine_chunks() for name in rows.column_names}
    return make_dropped(STAGE, reason, columns, rows.num_rows)


def _take_urls(source: pq.ParquetFile, positions: np.ndarray) -> list[str]:
    """URLs at sorted row ``positions``, reading one batch of the url column at a time."""
    urls: list[str] = []
    offset = 0
    for batch in source.iter_batches(batch_size=BATCH_ROWS, columns=["url"]):
        lo, hi = np.searchsorted(positions, [offset, offset + batch.num_rows])
        if hi > lo:
            urls.extend(batch.column(0).take(pa.array(positions[lo:hi] - offset)).to_pylist())
        offset += batch.num_rows
    return urls


def report(metadata_dir: Path, filter_record: dict[str, Any]) -> dict[str, Any]:
    """Sizes and throughput of the metadata stages, for the dataset card and BENCHMARKS.md."""
    out: dict[str, Any] = {}
    norm_path = metadata_dir / "normalize.json"
    if norm_path.exists():
        norm = json.loads(norm_path.read_text())
        out["normalize"] = {
            "input_rows": norm["input_rows"],
            "output_rows": norm["output_rows"],
            "source_bytes": sum(f["bytes"] for f in norm.get("sources", [])),
            "seconds": norm["seconds"],
            "rows_per_second": round(norm["input_rows"] / max(norm["seconds"], 1e-9)),
        }
    out["filter"] = {
        "input_rows": filter_record["input_rows"],
        "output_rows": filter_record["output_rows"],
        "seconds": filter_record["seconds"],
        "rows_per_second": round(filter_record["input_rows"] / max(filter_record["seconds"], 1e-9)),
    }
    out["files"] = {
        name: (metadata_dir / name).stat().st_size
        for name in ("normalized.parquet", "filtered.parquet", "dropped.parquet")
        if (metadata_dir / name).exists()
    }
    return out
