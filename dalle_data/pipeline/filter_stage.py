"""The filter stage: normalized.parquet -> filtered.parquet + dropped.parquet.

Order: subset, url_scheme, duplicate_url (first row_id wins among valid URLs), then
min_values/max_values (bounds on a table source's numeric columns), caption cleaning,
empty_caption, caption_length, blocklist. Two passes keep memory bounded: the
first reads only row ids and URLs and applies the URL filters; the second cleans captions
(in worker processes when there are several batches), applies the caption filters and
writes every row to one of the outputs.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from dalle_data import atomic
from dalle_data.hashing import sha256_bytes, sha256_file
from dalle_data.pipeline.captions import clean_captions
from dalle_data.pipeline.filters import (
    BlocklistFilter,
    CaptionLengthFilter,
    DuplicateUrlFilter,
    EmptyCaptionFilter,
    Exclusions,
    Filter,
    FilterError,
    SubsetFilter,
    UrlSchemeFilter,
    ValueBoundFilter,
    choose_subset,
)
from dalle_data.pipeline.malloc import keep_freed_memory
from dalle_data.pipeline.sources import DROPPED_PARQUET, DROPPED_SCHEMA, ROWS_PARQUET, SCHEMA

BATCH_ROWS = 1 << 18


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


def run(metadata_dir: Path, options: FilterOptions) -> dict[str, Any]:
    """Filter ``normalized.parquet`` in ``metadata_dir``; write filtered.parquet,
    dropped.parquet (normalize's and filter's dropped rows), filter.json and report.json."""
    start = time.perf_counter()
    keep_freed_memory()
    normalized = metadata_dir / "normalized.parquet"
    if not normalized.exists():
        raise FilterError(f"{normalized} does not exist: run `dalle-data normalize` first")
    # pre_buffer=False: the pre-buffered reader keeps every column chunk it has read until
    # it is closed (the whole file, by the last batch).
    source = pq.ParquetFile(normalized, pre_buffer=False)
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
    duplicates = DuplicateUrlFilter()
    codes = _url_pass(source, url_units, duplicates)

    workers = options.workers or len(os.sched_getaffinity(0))
    batches = -(-source.metadata.num_rows // BATCH_ROWS)
    reasons = [u.name for u in (*url_units, duplicates, *caption_units)]
    with (
        atomic.atomic_path(metadata_dir / "dropped.parquet") as dropped_tmp,
        atomic.atomic_path(metadata_dir / "filtered.parquet") as out_tmp,
        pq.ParquetWriter(dropped_tmp, DROPPED_SCHEMA, **DROPPED_PARQUET) as dropped_writer,
        pq.ParquetWriter(out_tmp, SCHEMA, **ROWS_PARQUET) as writer,
        _caption_executor(workers, batches) as pool,
    ):
        _copy_normalize_dropped(metadata_dir, dropped_writer)
        # Drops are held per batch and written batch by batch, whatever the number of workers.
        held = _Held()
        exclusions = Exclusions(held, reasons)

        def finish(batch: tuple[pa.Table, list[pa.Table], Future[pa.Array]]) -> int:
            return _finish(*batch, caption_units, exclusions, held, dropped_writer, writer)

        output_rows = 0
        pending: deque[tuple[pa.Table, list[pa.Table], Future[pa.Array]]] = deque()
        offset = 0
        for rows in _batches(source, "filter"):
            code = codes[offset : offset + rows.num_rows]
            offset += rows.num_rows
            for i, unit in enumerate(url_units, start=1):
                if (code == i).any():
                    exclusions.drop(unit.name, rows.filter(pa.array(code == i)))
            if code.any():
                rows = rows.filter(pa.array(code == 0))
            rows = duplicates.apply(rows, exclusions)
            # Batch k's captions are cleaned in a worker while batch k+1 is read.
            captions = rows.column("caption").combine_chunks()
            pending.append((rows, held.take(), pool.submit(clean_captions, captions)))
            if len(pending) > workers:
                output_rows += finish(pending.popleft())
        while pending:
            output_rows += finish(pending.popleft())
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
        "dropped": {reason: exclusions.counts[reason] for reason in reasons},
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


def _url_pass(
    source: pq.ParquetFile, units: list[Filter], duplicates: DuplicateUrlFilter
) -> np.ndarray:
    """Per row, reading only row ids and URLs: 0 if the URL filters keep it, else 1 + the
    index of the first unit that drops it. The kept rows are shown to ``duplicates``."""
    codes = []
    for batch in source.iter_batches(batch_size=BATCH_ROWS, columns=["row_id", "url"]):
        rows = pa.Table.from_batches([batch])
        code = np.zeros(rows.num_rows, dtype=np.uint8)
        for i, unit in enumerate(units, start=1):
            keep = unit.keep(rows).to_numpy(zero_copy_only=False)
            code[(code == 0) & ~keep] = i
        duplicates.see(rows.filter(pa.array(code == 0)))
        codes.append(code)
    return np.concatenate(codes) if codes else np.zeros(0, dtype=np.uint8)


def _caption_executor(workers: int, batches: int) -> Executor:
    """Worker processes for caption cleaning, or none when there is a single batch: a spawned
    pool takes about a second to start, and one batch leaves nothing to overlap."""
    if batches <= 1:
        return _Inline()
    return ProcessPoolExecutor(
        max_workers=workers, mp_context=mp.get_context("spawn"), initializer=keep_freed_memory
    )


class _Inline(Executor):
    """An executor that runs each task in this process when it is submitted."""

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        future.set_result(fn(*args, **kwargs))
        return future


class _Held:
    """Where Exclusions puts dropped rows until the batch they belong to is written."""

    def __init__(self) -> None:
        self.tables: list[pa.Table] = []

    def write_table(self, table: pa.Table) -> None:
        self.tables.append(table)

    def take(self) -> list[pa.Table]:
        tables, self.tables = self.tables, []
        return tables


def _finish(
    rows: pa.Table,
    dropped: list[pa.Table],
    cleaned: Future[pa.Array],
    units: list[Filter],
    exclusions: Exclusions,
    held: _Held,
    dropped_writer: pq.ParquetWriter,
    writer: pq.ParquetWriter,
) -> int:
    """Put the cleaned captions in, run the caption filters, write the batch's drops (those
    held from the URL filters first) and survivors."""
    rows = rows.set_column(rows.schema.get_field_index("caption"), "caption", cleaned.result())
    for unit in units:
        rows = unit.apply(rows, exclusions)
    for table in [*dropped, *held.take()]:
        dropped_writer.write_table(table)
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
