"""The finalize stage: downloaded parts -> byte-reproducible shards, manifest, side tables.

Images are copied byte for byte from img2dataset's tars; captions come from the planned
parts and are tokenized in batches; every planned row ends up written or counted.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from dalle_data.atomic import atomic_path, write_json
from dalle_data.formats.webdataset import Sample, ShardError, row_key, tar_members, write_shards

FAILURES = "failures.parquet"
INDEX = "index.parquet"
BUILD_RECORD = "build.json"
TOKENIZE_BATCH = 1024
_INDEX_SCHEMA = pa.schema(
    [
        ("row_id", pa.int64()),
        ("caption_words", pa.int32()),
        ("original_width", pa.int32()),
        ("original_height", pa.int32()),
    ]
)
_FAILURE_SCHEMA = pa.schema(
    [("row_id", pa.int64()), ("url", pa.string()), ("reason", pa.string()), ("error", pa.string())]
)
# Keys of the metadata stage records that are run facts, not inputs: kept out of the manifest.
_RUN_FACT = re.compile(r"time|second|duration|elapsed|host|version|started|finished|rate")


def finalize(
    ds_dir: Path, *, dataset: str, tokenizer_spec: str, image_size: int, shard_size: int
) -> dict[str, Any]:
    """Downloaded parts -> ``<dataset>-NNNNN.tar`` + ``manifest.json`` + ``failures.parquet``.

    Images are copied byte for byte from img2dataset's tars (no second decode); captions
    come from the planned parts and are tokenized in batches. Every planned row ends up
    written or counted under a failure reason, and the manifest refuses to be written
    if the books do not close.
    """
    from dalle_data.formats import tokenizers
    from dalle_data.formats.manifest import write_manifest
    from dalle_data.pipeline.download import read_plan

    started = time.time()
    ds_dir = Path(ds_dir)
    plan_dir, out_dir = ds_dir / "download", ds_dir / "shards"
    normalize = _read_record(ds_dir / "metadata" / "normalize.json")
    filtered = _read_record(ds_dir / "metadata" / "filter.json")
    plan = read_plan(plan_dir)
    if not (
        normalize["output_rows"] == filtered["input_rows"]
        and filtered["output_rows"] == plan["input_rows"]
    ):
        raise ShardError(
            f"stage records disagree in {ds_dir}: normalize wrote {normalize['output_rows']} rows, "
            f"filter read {filtered['input_rows']} and wrote {filtered['output_rows']}, the "
            f"download plan holds {plan['input_rows']}: rerun the pipeline to refresh them"
        )
    tokenizer = tokenizers.load(tokenizer_spec)
    settings = _part_settings(ds_dir, plan, image_size)
    rounds = _rounds(ds_dir, plan)
    failed: Counter[str] = Counter(plan["refused"])
    out_dir.mkdir(parents=True, exist_ok=True)
    with (
        atomic_path(out_dir / FAILURES) as tmp,
        _RowGroups(tmp, _FAILURE_SCHEMA) as failures,
        atomic_path(out_dir / INDEX) as index_tmp,
        _RowGroups(index_tmp, _INDEX_SCHEMA) as index,
    ):
        refused = pq.read_table(plan_dir / "refused.parquet")
        failures.write_table(
            pa.table(
                {
                    "row_id": refused.column("row_id"),
                    "url": refused.column("url"),
                    "reason": pa.array(["file_url_refused"] * refused.num_rows, pa.string()),
                    "error": pa.array(
                        ["not an http(s) URL and allow_file_urls is false"] * refused.num_rows,
                        pa.string(),
                    ),
                },
                schema=_FAILURE_SCHEMA,
            )
        )
        samples = _samples(ds_dir, plan, tokenizer, failed, failures, index)
        shards = write_shards(samples, out_dir, dataset=dataset, shard_size=shard_size)
    written = sum(s["samples"] for s in shards)
    counts = {
        "input_rows": normalize["input_rows"],
        "dropped": _merge(normalize["dropped"], filtered["dropped"]),
        "failed": dict(failed),
        "written": written,
    }
    provenance = {
        "normalize": _inputs_only(normalize),
        "filter": _inputs_only(filtered),
        "download": settings,
        "shard_size": shard_size,
    }
    manifest = write_manifest(
        out_dir,
        dataset=dataset,
        tokenizer=tokenizer.record(),
        image_size=image_size,
        shards=shards,
        counts=counts,
        provenance=provenance,
    )
    write_json(out_dir / BUILD_RECORD, _build_record(started, plan, written, rounds))
    return manifest


def _read_record(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ShardError(f"{path} does not exist: run the metadata stages first") from None
    missing = [k for k in ("input_rows", "dropped", "output_rows") if k not in record]
    if missing:
        raise ShardError(f"{path} lacks {', '.join(missing)}: rerun the stage that writes it")
    return record


def _merge(*dropped: dict[str, int]) -> dict[str, int]:
    total: Counter[str] = Counter()
    for counts in dropped:
        total.update(counts)
    return dict(sorted(total.items()))


def _inputs_only(record: dict[str, Any]) -> dict[str, Any]:
    counts = ("input_rows", "dropped", "output_rows")
    return {k: v for k, v in record.items() if k not in counts and not _RUN_FACT.search(k)}


def _part_settings(ds_dir: Path, plan: dict[str, Any], image_size: int) -> dict[str, Any]:
    """The output-affecting download settings, which every part must share."""
    from dalle_data.pipeline.download import INPUT_ORDER, PARAMS, DownloadError

    seen: dict[str, Any] | None = None
    for part in plan["parts"]:
        path = ds_dir / "downloaded" / part["name"] / PARAMS
        if not path.is_file():
            raise DownloadError(
                f"{path.parent} is not a finished download part: run the download stage"
            )
        params = json.loads(path.read_text())
        settings = {
            k: v
            for k, v in params.items()
            if k not in ("part", "rows", "samples_per_shard", INPUT_ORDER)
        }
        if seen is not None and settings != seen:
            raise DownloadError(
                f"{path.parent} was downloaded with {settings}, other parts with {seen}: "
                "delete downloaded/ and download again with one configuration"
            )
        seen = settings
    if seen is not None and seen["image_size"] != image_size:
        raise DownloadError(
            f"parts in {ds_dir / 'downloaded'} hold {seen['image_size']} px images but image_size "
            f"is {image_size}: delete downloaded/ and download again"
        )
    return seen or {"image_size": image_size}


def _samples(
    ds_dir: Path,
    plan: dict[str, Any],
    tokenizer: Any,
    failed: Counter[str],
    failures: _RowGroups,
    index: _RowGroups,
) -> Iterator[Sample]:
    """Samples of every planned row that downloaded, in row order.

    Failures are counted and logged to ``failures``; each sample's caption length and
    original size go to ``index`` for the dataset card.
    """
    from dalle_data.pipeline.retry import read_results

    for part in plan["parts"]:
        part_dir = ds_dir / "downloaded" / part["name"]
        results = read_results(part_dir)
        rows = pq.read_table(ds_dir / "download" / "parts" / f"{part['name']}.parquet")
        lost: list[dict[str, Any]] = []
        with _TarIndex(part_dir) as images:
            for batch in rows.to_batches(TOKENIZE_BATCH):
                good: list[tuple[dict[str, Any], Any, bytes]] = []
                for row in batch.to_pylist():
                    result = results.get(row["row_id"])
                    jpg = (
                        images.read(result.shard, result.key)
                        if result and result.ok and result.shard and result.key
                        else None
                    )
                    if jpg is None:
                        reason = _missing_reason(result)
                        failed[reason] += 1
                        error = result.error if result else "no status recorded by img2dataset"
                        lost.append(
                            {
                                "row_id": row["row_id"],
                                "url": row["url"],
                                "reason": reason,
                                "error": error,
                            }
                        )
                        continue
                    good.append((row, result, jpg))
                tokens = tokenizer.encode_batch([row["caption"] for row, _, _ in good])
                index.write_table(
                    pa.table(
                        {
                            "row_id": [row["row_id"] for row, _, _ in good],
                            "caption_words": [len(row["caption"].split()) for row, _, _ in good],
                            "original_width": [result.original_width for _, result, _ in good],
                            "original_height": [result.original_height for _, result, _ in good],
                        },
                        schema=_INDEX_SCHEMA,
                    )
                )
                for (row, result, jpg), ids in zip(good, tokens, strict=True):
                    # A table source's kept columns; the standard keys win a name clash.
                    meta = json.loads(row["extra"]) if row.get("extra") else {}
                    meta |= {
                        "caption": row["caption"],
                        "license": row["license"],
                        "original_height": result.original_height,
                        "original_width": result.original_width,
                        "row_id": row["row_id"],
                        "sha256": result.sha256,
                        "url": row["url"],
                    }
                    yield Sample(row_key(row["row_id"]), jpg, row["caption"], meta, ids)
        failures.write_table(pa.Table.from_pylist(lost, schema=_FAILURE_SCHEMA))


def _missing_reason(result: Any) -> str:
    if result is None:
        return "other:not_recorded"
    return result.reason if not result.ok else "other:image_missing_from_tar"


class _RowGroups:
    """A parquet writer whose row groups have a fixed size, whatever the write calls were.

    Parts hand over rows in part-sized pieces; cutting row groups at fixed row counts keeps
    the file's bytes independent of ``rows_per_part``.
    """

    ROWS = 65_536

    def __init__(self, path: Path, schema: pa.Schema) -> None:
        self.writer = pq.ParquetWriter(path, schema)
        self.schema = schema
        self.pending: list[pa.Table] = []
        self.rows = 0

    def __enter__(self) -> _RowGroups:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.rows:
            self.writer.write_table(pa.concat_tables(self.pending))
        self.writer.close()

    def write_table(self, table: pa.Table) -> None:
        self.pending.append(table)
        self.rows += table.num_rows
        while self.rows >= self.ROWS:
            merged = pa.concat_tables(self.pending)
            self.writer.write_table(merged.slice(0, self.ROWS))
            rest = merged.slice(self.ROWS)
            self.pending, self.rows = [rest], rest.num_rows


class _TarIndex:
    """Random access to the images in a part's img2dataset tars without unpacking them."""

    def __init__(self, part_dir: Path) -> None:
        self.part_dir = part_dir
        self.index: dict[str, dict[str, tuple[int, int]]] = {}
        self.handles: dict[str, Any] = {}

    def __enter__(self) -> _TarIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles.values():
            handle.close()

    def read(self, shard: str, key: str) -> bytes | None:
        if shard not in self.index:
            path = self.part_dir / shard
            if not path.is_file():
                return None
            self.index[shard] = {
                name: (offset, size)
                for name, offset, size in tar_members(path)
                if name.endswith(".jpg")
            }
            self.handles[shard] = open(path, "rb")  # noqa: SIM115 (closed in __exit__)
        entry = self.index[shard].get(f"{key}.jpg")
        if entry is None:
            return None
        handle = self.handles[shard]
        handle.seek(entry[0])
        return handle.read(entry[1])


def _rounds(ds_dir: Path, plan: dict[str, Any]) -> dict[str, Any]:
    """The retry rounds of every part, from the records the download stage wrote."""
    from dalle_data.pipeline.download import DownloadError
    from dalle_data.pipeline.retry import record_path, summarize

    records = []
    for part in plan["parts"]:
        path = record_path(ds_dir / "downloaded" / part["name"])
        if not path.is_file():
            raise DownloadError(f"{path} does not exist: run the download stage for its part")
        records.append(json.loads(path.read_text(encoding="utf-8")))
    return summarize(records)


def _build_record(
    started: float, plan: dict[str, Any], written: int, rounds: dict[str, Any]
) -> dict[str, Any]:
    """Run facts (time, host, versions, retry rounds) kept out of the manifest so it stays
    reproducible."""
    import platform
    from importlib.metadata import version

    seconds = time.time() - started
    return {
        "finished_unix": time.time(),
        "finalize_seconds": round(seconds, 3),
        "samples_per_second": round(written / seconds, 1) if seconds else None,
        "hostname": platform.node(),
        "python": platform.python_version(),
        "versions": {p: version(p) for p in ("img2dataset", "numpy", "pyarrow", "dalle-pytorch")},
        "rows_per_part": plan["rows_per_part"],
        "parts": len(plan["parts"]),
        "retry_rounds": rounds,
    }
