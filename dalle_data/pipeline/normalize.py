"""raw/ -> metadata/normalized.parquet: stream a source through its format adapter.

Writes ``normalized.parquet`` (the common schema, sorted by row_id), the rows the adapter
dropped to ``normalize_dropped.parquet`` (filter merges them into dropped.parquet) and
``normalize.json`` with the accounting: ``input_rows = sum(dropped) + output_rows``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from dalle_data import atomic
from dalle_data.hashing import sha256_bytes
from dalle_data.pipeline.sources import (
    DROPPED_PARQUET,
    DROPPED_SCHEMA,
    ROWS_PARQUET,
    SCHEMA,
    Options,
    SourceError,
    SourceFile,
    adapter,
)

# Rows per bucket when a source's row ids come out of order (YFCC photo ids) and the
# output has to be sorted in pieces that fit in memory.
SORT_BUCKET_ROWS = 4_000_000


def source_files(raw_dir: Path) -> tuple[list[SourceFile], Path | None, list[dict[str, Any]]]:
    """The fetched source files (by source index), the subset file, and fetch.json's entries."""
    record_path = raw_dir / "fetch.json"
    if not record_path.exists():
        raise SourceError(f"{record_path} does not exist: run `dalle-data fetch` first")
    entries = json.loads(record_path.read_text())["files"]
    files = [
        SourceFile(path=raw_dir / e["name"], index=e["index"])
        for e in sorted(entries, key=lambda e: e["index"])
        if e["role"] == "source"
    ]
    subset = next((raw_dir / e["name"] for e in entries if e["role"] == "subset"), None)
    return files, subset, entries


def normalize(
    fmt: str, raw_dir: Path, metadata_dir: Path, options: Options | None = None
) -> dict[str, Any]:
    """Normalize every fetched source file of one dataset; returns the normalize.json record."""
    start = time.perf_counter()
    read = adapter(fmt)
    files, subset, entries = source_files(raw_dir)
    options = dataclasses.replace(options or Options(), subset=subset)
    input_rows = 0
    dropped: Counter[str] = Counter()
    output_rows = 0
    in_order = True
    last_id = -1
    metadata_dir.mkdir(parents=True, exist_ok=True)
    with (
        atomic.atomic_path(metadata_dir / "normalized.parquet") as out_tmp,
        atomic.atomic_path(metadata_dir / "normalize_dropped.parquet") as dropped_tmp,
    ):
        unsorted = out_tmp.with_name(out_tmp.name + ".unsorted")
        try:
            with (
                pq.ParquetWriter(unsorted, SCHEMA, **ROWS_PARQUET) as writer,
                pq.ParquetWriter(dropped_tmp, DROPPED_SCHEMA, **DROPPED_PARQUET) as dropped_writer,
                tqdm(desc=f"normalize {fmt}", unit="rows", unit_scale=True) as bar,
            ):
                for chunk in read(files, options):
                    input_rows += chunk.input_rows
                    bar.update(chunk.input_rows)
                    if chunk.dropped.num_rows:
                        dropped_writer.write_table(chunk.dropped)
                        counts = chunk.dropped.column("reason").value_counts().to_pylist()
                        dropped.update({c["values"]: c["counts"] for c in counts})
                    if chunk.rows.num_rows:
                        ids = chunk.rows.column("row_id").to_numpy()
                        in_order = (
                            in_order and ids[0] > last_id and bool(np.all(ids[1:] > ids[:-1]))
                        )
                        last_id = max(last_id, int(ids.max()))
                        writer.write_table(chunk.rows)
                        output_rows += chunk.rows.num_rows
            _sort_by_row_id(unsorted, out_tmp, already_sorted=in_order)
        finally:
            unsorted.unlink(missing_ok=True)
    # The subset file is cited by its sha256 in `sources`, not by its machine-dependent path.
    options_record = {"format": fmt} | {k: v for k, v in options.record().items() if k != "subset"}
    record = {
        "format": fmt,
        "input_rows": input_rows,
        "dropped": dict(sorted(dropped.items())),
        "output_rows": output_rows,
        "sources": [
            {k: e[k] for k in ("name", "index", "role", "sha256", "bytes")} for e in entries
        ],
        "options": options_record,
        "options_sha256": sha256_bytes(json.dumps(options_record, sort_keys=True).encode()),
        "seconds": round(time.perf_counter() - start, 3),
    }
    atomic.write_json(metadata_dir / "normalize.json", record)
    return record


def _sort_by_row_id(unsorted: Path, out: Path, *, already_sorted: bool) -> None:
    """Move ``unsorted`` to ``out`` sorted by row_id, a bucket of row ids at a time.

    Refuses duplicate row ids: they would give two samples the same shard key.
    """
    if already_sorted:
        unsorted.replace(out)
        return
    source = pq.ParquetFile(unsorted)
    ids = np.sort(source.read(columns=["row_id"]).column(0).to_numpy())
    repeated = ids[1:][ids[1:] == ids[:-1]]
    if len(repeated):
        raise SourceError(
            f"the source holds row id {int(repeated[0])} more than once "
            f"({len(repeated)} repeats): remove the duplicate lines from the source file"
        )
    buckets = max(1, math.ceil(len(ids) / SORT_BUCKET_ROWS))
    bounds = [int(ids[min(len(ids) - 1, i * SORT_BUCKET_ROWS)]) for i in range(buckets)]
    bounds.append(int(ids[-1]) + 1)
    del ids
    with pq.ParquetWriter(out, SCHEMA, **ROWS_PARQUET) as writer:
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            parts = []
            for batch in source.iter_batches(batch_size=1 << 18):
                rid = batch.column("row_id")
                mask = pc.and_(pc.greater_equal(rid, lo), pc.less(rid, hi))
                parts.append(batch.filter(mask))
            table = pa.Table.from_batches(parts, schema=SCHEMA).sort_by("row_id")
            writer.write_table(table)
