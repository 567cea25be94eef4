"""The finalize stage: downloaded parts -> byte-reproducible shards, manifest, side tables.

Images are copied byte for byte from img2dataset's tars; captions come from the planned
parts and are tokenized in batches; every planned row ends up written or counted.

Two shard sets come out: the training shards (``shards/``) and the held-out eval split
(``eval/``, rows chosen by pipeline/holdout.py). Before either is written, every downloaded
image is hashed (pipeline/dedup.py) and the duplicates are decided: copies of images in the
``dedup_against`` datasets (``duplicate_of_<name>``), repeats within a split
(``duplicate_image``) and training rows that show an eval image (``eval_duplicate``).
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dalle_data.atomic import atomic_path, write_json
from dalle_data.formats.manifest import (
    BUILD_RECORD,
    EXAMPLES,
    FAILURES,
    INDEX,
    SPLIT_DIRS,
    write_manifest,
)
from dalle_data.formats.manifest import EVAL_SPLIT as EVAL
from dalle_data.formats.manifest import TRAIN_SPLIT as TRAIN
from dalle_data.formats.webdataset import (
    Sample,
    ShardError,
    row_key,
    sample_layouts,
    shard_name,
    tar_members,
    write_shards,
)
from dalle_data.pipeline import dedup
from dalle_data.pipeline.filters import url_hashes
from dalle_data.pipeline.holdout import Holdout, eval_mask

TOKENIZE_BATCH = 1024
# Duplicate pairs per reason kept with both images for the dataset card (near ones first).
EXAMPLES_PER_REASON = 3
# Rows a hashing process must have to pay for its start (~1 s; hashing runs ~1,000 rows/s
# on 256 px images: benchmarks/bench_dedup.py).
ROWS_PER_HASH_PROCESS = 5_000
_INDEX_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),
        ("row_id", pa.int64()),
        ("sha256", pa.string()),
        ("phash", pa.uint64()),
        ("caption_words", pa.int32()),
        ("original_width", pa.int32()),
        ("original_height", pa.int32()),
    ],
    metadata={"perceptual_hash": dedup.HASH_NAME},
)
_FAILURE_SCHEMA = pa.schema(
    [
        ("row_id", pa.int64()),
        ("url", pa.string()),
        ("reason", pa.string()),
        ("error", pa.string()),
        # Duplicates only: the sample this row's image matched, and how closely.
        ("matched_dataset", pa.string()),
        ("matched_split", pa.string()),
        ("matched_key", pa.string()),
        ("distance", pa.int32()),
        ("exact", pa.bool_()),
    ]
)
_EXAMPLE_SCHEMA = pa.schema(
    [
        ("reason", pa.string()),
        ("key", pa.string()),
        ("matched_dataset", pa.string()),
        ("matched_split", pa.string()),
        ("matched_key", pa.string()),
        ("distance", pa.int32()),
        ("exact", pa.bool_()),
        ("jpg", pa.binary()),
        ("matched_jpg", pa.binary()),
    ]
)
# Keys of the metadata stage records that are run facts, not inputs: kept out of the manifest.
_RUN_FACT = re.compile(r"time|second|duration|elapsed|host|version|started|finished|rate")


@dataclass(frozen=True)
class DedupOptions:
    """How duplicate images are found.

    ``max_distance``: Hamming distance of pHashes at or below which two images are the
    same picture; None compares exact copies only (sha256 of the source bytes), for
    datasets whose distinct pictures a greyscale hash cannot tell apart. ``against``:
    ``(name, dataset folder)`` of built datasets whose shards and eval split this one
    must not repeat.
    """

    max_distance: int | None = 3
    against: tuple[tuple[str, Path], ...] = ()

    def record(self, references: list[dedup.Images]) -> dict[str, Any]:
        return {
            "hash": dedup.HASH_NAME if self.max_distance is not None else "sha256",
            "max_distance": self.max_distance,
            "against": {ref.dataset: ref.manifests for ref in references},
        }


def finalize(
    ds_dir: Path,
    *,
    dataset: str,
    tokenizer_spec: str,
    image_size: int,
    shard_size: int,
    holdout: Holdout | None = None,
    dedup_options: DedupOptions | None = None,
) -> dict[str, Any]:
    """Downloaded parts -> ``shards/`` and ``eval/`` shard sets, each with ``manifest.json``,
    ``index.parquet``, ``failures.parquet`` and ``duplicate_examples.parquet``.

    Images are copied byte for byte from img2dataset's tars; captions come from the planned
    parts and are tokenized in batches. Every planned row ends up written or counted (a
    failure reason, a duplicate reason, or, in the training manifest, ``eval_split``), and
    a manifest refuses to be written if its books do not close. Returns the training
    manifest.
    """
    from dalle_data.formats import tokenizers
    from dalle_data.pipeline.download_plan import read_plan

    started = time.time()
    holdout = holdout or Holdout()
    dedup_options = dedup_options or DedupOptions()
    ds_dir = Path(ds_dir)
    plan_dir = ds_dir / "download"
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
    settings = _part_settings(ds_dir, plan, image_size)
    rounds = _rounds(ds_dir, plan)
    refused = pq.read_table(plan_dir / "refused.parquet")
    planned = np.concatenate(
        [_part_rows(ds_dir, part).column("row_id").to_numpy() for part in plan["parts"]]
        + [refused.column("row_id").to_numpy()]
    )
    eval_rows = set(planned[eval_mask(planned, holdout)].tolist())
    hashing = time.perf_counter()
    downloads = _Downloads(ds_dir)
    images = _hash_images(downloads, plan, eval_rows, dataset)
    hashing = time.perf_counter() - hashing
    searching = time.perf_counter()
    references = [dedup.read_images(name, Path(folder)) for name, folder in dedup_options.against]
    drops = dedup.decide(images, references, dedup_options.max_distance)
    searching = time.perf_counter() - searching
    build = _Build(
        ds_dir=ds_dir,
        dataset=dataset,
        plan=plan,
        tokenizer=tokenizers.load(tokenizer_spec),
        shard_size=shard_size,
        eval_rows=eval_rows,
        images=images,
        drops=drops,
        references={ref.dataset: ref for ref in references},
        downloads=downloads,
    )
    provenance = {
        "normalize": _inputs_only(normalize),
        "filter": _inputs_only(filtered),
        "download": settings,
        "shard_size": shard_size,
        "holdout": holdout.record(),
        "dedup": dedup_options.record(references),
    }
    against = [name for name, _ in dedup_options.against]
    for split in (EVAL, TRAIN):
        counts = _write_split(build, split, refused)
        zeros = dict.fromkeys(dedup.reasons(against, split), 0)
        if split == EVAL:
            counts["input_rows"] = len(eval_rows)
            counts["dropped"] = _merge(zeros, counts["dropped"])
        else:
            counts["input_rows"] = normalize["input_rows"]
            counts["dropped"] = _merge(
                normalize["dropped"],
                filtered["dropped"],
                {"eval_split": len(eval_rows)},
                zeros,
                counts["dropped"],
            )
        manifest = _write_split_manifest(build, split, counts, image_size, provenance)
    downloads.close()
    write_json(
        ds_dir / SPLIT_DIRS[TRAIN] / BUILD_RECORD,
        _build_record(started, plan, manifest["counts"]["written"], rounds)
        | {
            "hash_seconds": round(hashing, 3),
            "hashed_images": int(images.keys.size),
            "dedup_search_seconds": round(searching, 3),
        },
    )
    return manifest


@dataclass
class _Build:
    """What finalize decided before writing: the split of every row and its duplicates."""

    ds_dir: Path
    dataset: str
    plan: dict[str, Any]
    tokenizer: Any
    shard_size: int
    eval_rows: set[int]
    images: dedup.Images
    drops: dict[int, dedup.Drop]
    references: dict[str, dedup.Images]
    downloads: _Downloads

    def out_dir(self, split: str) -> Path:
        return self.ds_dir / SPLIT_DIRS[split]

    def shard_prefix(self, split: str) -> str:
        """Shards are ``<dataset>-NNNNN.tar``; the eval split's ``<dataset>-eval-NNNNN.tar``."""
        return self.dataset if split == TRAIN else f"{self.dataset}-{EVAL}"

    def in_split(self, row_id: int, split: str) -> bool:
        return (row_id in self.eval_rows) == (split == EVAL)


def _write_split(build: _Build, split: str, refused: pa.Table) -> dict[str, Any]:
    """One shard set with its index, failures and duplicate examples; returns its counts."""
    out_dir = build.out_dir(split)
    out_dir.mkdir(parents=True, exist_ok=True)
    failed: Counter[str] = Counter()
    duplicates: Counter[str] = Counter()
    mine = pa.array([build.in_split(r, split) for r in refused.column("row_id").to_pylist()])
    refused = refused.filter(mine) if len(mine) else refused
    if refused.num_rows:
        failed["file_url_refused"] = refused.num_rows
    with (
        atomic_path(out_dir / FAILURES) as tmp,
        _RowGroups(tmp, _FAILURE_SCHEMA) as failures,
        atomic_path(out_dir / INDEX) as index_tmp,
        _RowGroups(index_tmp, _INDEX_SCHEMA) as index,
    ):
        failures.write_table(
            pa.Table.from_pylist(
                [
                    {
                        "row_id": row["row_id"],
                        "url": row["url"],
                        "reason": "file_url_refused",
                        "error": "not an http(s) URL and allow_file_urls is false",
                    }
                    for row in refused.select(["row_id", "url"]).to_pylist()
                ],
                schema=_FAILURE_SCHEMA,
            )
        )
        samples = _samples(build, split, failed, duplicates, failures, index)
        shards = write_shards(
            samples, out_dir, dataset=build.shard_prefix(split), shard_size=build.shard_size
        )
    _write_examples(build, split)
    return {
        "dropped": dict(duplicates),
        "failed": dict(failed),
        "written": sum(s["samples"] for s in shards),
        "shards": shards,
    }


def _write_split_manifest(
    build: _Build,
    split: str,
    counts: dict[str, Any],
    image_size: int,
    provenance: dict[str, Any],
) -> dict[str, Any]:
    return write_manifest(
        build.out_dir(split),
        dataset=build.dataset,
        split=split,
        tokenizer=build.tokenizer.record(),
        image_size=image_size,
        shards=counts["shards"],
        counts={k: counts[k] for k in ("input_rows", "dropped", "failed", "written")},
        provenance=provenance,
    )


def _part_rows(ds_dir: Path, part: dict[str, Any]) -> pa.Table:
    return pq.read_table(ds_dir / "download" / "parts" / f"{part['name']}.parquet")


def _hash_images(
    downloads: _Downloads, plan: dict[str, Any], eval_rows: set[int], dataset: str
) -> dedup.Images:
    """pHash and sha256 of every downloaded image. The download stage recorded both; the
    images of parts downloaded before it recorded the pHash are hashed here, in parallel
    processes when there are enough: each takes a part, or a slice of one when there are
    fewer parts than cores."""
    import multiprocessing as mp

    from dalle_data.pipeline.retry import records_phash

    names = [p["name"] for p in plan["parts"]]
    unhashed = sum(
        p["rows"]
        for p in plan["parts"]
        if not records_phash(downloads.ds_dir / "downloaded" / p["name"])
    )
    processes = min(len(os.sched_getaffinity(0)), math.ceil(unhashed / ROWS_PER_HASH_PROCESS))
    if processes > 1:
        slices = math.ceil(processes / max(len(names), 1))
        jobs = [
            (downloads.ds_dir / "downloaded" / name, i, k, slices)
            for i, name in enumerate(names)
            for k in range(slices)
        ]
        with ProcessPoolExecutor(processes, mp_context=mp.get_context("spawn")) as pool:
            hashed = list(pool.map(_hash_slice, *zip(*jobs, strict=True)))
    else:
        hashed = []
        for i, name in enumerate(names):
            results, images = downloads.part(name)
            hashed.append(_hash_rows(sorted(results.items()), images, i))
    row_id, part, phash, sha = (
        np.concatenate([h[k] for h in hashed]) if hashed else np.zeros(0, dtype)
        for k, dtype in enumerate((np.int64, np.int32, np.uint64, np.uint64))
    )
    order = np.argsort(row_id, kind="stable")
    row_id = row_id[order]
    return dedup.Images(
        dataset=dataset,
        keys=row_id,
        is_eval=np.isin(row_id, np.fromiter(eval_rows, np.int64, len(eval_rows))),
        phash=phash[order],
        sha64=sha[order],
        part=part[order],
        source=_source_ids(downloads.ds_dir, plan, row_id),
    )


def _source_ids(ds_dir: Path, plan: dict[str, Any], row_ids: np.ndarray) -> np.ndarray:
    """Per row (sorted ``row_ids``), a hash of its URL without the #fragment: the rows a
    folder dataset makes of one picture (``caption_lines: each``) share it."""
    tables = [_part_rows(ds_dir, part).select(["row_id", "url"]) for part in plan["parts"]]
    if not tables:
        return np.zeros(0, dtype=np.uint64)
    rows = pa.concat_tables(tables)
    ids = rows.column("row_id").to_numpy()
    order = np.argsort(ids, kind="stable")
    at = order[np.searchsorted(ids[order], row_ids)]
    urls = pc.take(rows.column("url"), pa.array(at))
    bare = pc.replace_substring_regex(urls, pattern="#.*$", replacement="", max_replacements=1)
    return url_hashes(bare)


def _hash_slice(
    part_dir: Path, part_index: int, slice_index: int, slices: int
) -> tuple[np.ndarray, ...]:
    """:func:`_hash_rows` of slice ``slice_index`` of ``slices`` (contiguous runs of rows,
    so of the tars) of one downloaded part: a worker process's share."""
    from dalle_data.pipeline.retry import read_results

    results = sorted(read_results(part_dir).items())
    mine = results[
        slice_index * len(results) // slices : (slice_index + 1) * len(results) // slices
    ]
    with _TarIndex(part_dir) as images:
        return _hash_rows(mine, images, part_index)


def _hash_rows(
    results: list[tuple[int, Any]], images: _TarIndex, part_index: int
) -> tuple[np.ndarray, ...]:
    """``(row_id, part, phash, sha64)`` of the rows whose image is in the part's tars,
    hashing those the download stage left without a pHash."""
    ids: list[int] = []
    phashes: list[int] = []
    shas: list[int] = []
    for row_id, result in results:
        if not _stored(result):
            continue
        phash = result.phash
        if phash is None:
            jpg = images.read(result.shard, result.key)
            if jpg is None:
                continue
            phash = dedup.perceptual_hash(jpg)
        elif not images.has(result.shard, result.key):
            continue
        if not result.sha256:
            raise ShardError(
                f"img2dataset recorded no sha256 for row {row_id} in {images.part_dir}: "
                "delete the part and download it again"
            )
        ids.append(row_id)
        phashes.append(phash)
        shas.append(dedup.sha64(result.sha256))
    return (
        np.asarray(ids, dtype=np.int64),
        np.full(len(ids), part_index, dtype=np.int32),
        np.asarray(phashes, dtype=np.uint64),
        np.asarray(shas, dtype=np.uint64),
    )


def _stored(result: Any) -> bool:
    """Whether img2dataset reported the row written (its tar may still lack it)."""
    return bool(result and result.ok and result.shard and result.key)


def _image(images: _TarIndex, result: Any) -> bytes | None:
    """The downloaded JPEG of a row img2dataset reported, or None when there is none."""
    return images.read(result.shard, result.key) if _stored(result) else None


def _write_examples(build: _Build, split: str) -> None:
    """A few duplicate pairs of this split with both images, for the dataset card."""
    chosen: dict[str, list[tuple[int, dedup.Drop]]] = {}
    for row_id, drop in sorted(build.drops.items(), key=lambda kv: (kv[1].exact, kv[0])):
        if build.in_split(row_id, split):
            picked = chosen.setdefault(drop.reason, [])
            if len(picked) < EXAMPLES_PER_REASON:
                picked.append((row_id, drop))
    rows = []
    for reason in sorted(chosen):
        for row_id, drop in sorted(chosen[reason]):
            rows.append(
                {
                    "reason": reason,
                    "key": row_key(row_id),
                    **drop.columns(),
                    "jpg": _downloaded_image(build, row_id),
                    "matched_jpg": _matched_image(build, drop),
                }
            )
    with atomic_path(build.out_dir(split) / EXAMPLES) as tmp:
        pq.write_table(pa.Table.from_pylist(rows, schema=_EXAMPLE_SCHEMA), tmp)


def _downloaded_image(build: _Build, row_id: int) -> bytes | None:
    position = int(np.searchsorted(build.images.keys, row_id))
    part = build.plan["parts"][int(build.images.part[position])]
    results, images = build.downloads.part(part["name"])
    return _image(images, results.get(row_id))


def _matched_image(build: _Build, drop: dedup.Drop) -> bytes | None:
    if drop.matched_dataset == build.dataset:
        return _downloaded_image(build, int(drop.matched_key))
    folder = build.references[drop.matched_dataset].folders[drop.matched_split]
    index = pq.read_table(folder / INDEX, columns=["key", "shard"]).to_pydict()
    shard = index["shard"][index["key"].index(drop.matched_key)]
    for key, fields in sample_layouts(folder / shard):
        if key == drop.matched_key:
            with open(folder / shard, "rb") as fh:
                fh.seek(fields["jpg"][0])
                return fh.read(fields["jpg"][1])
    return None


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
    from dalle_data.pipeline.download import INPUT_ORDER, PARAMS
    from dalle_data.pipeline.download_plan import DownloadError

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
    build: _Build,
    split: str,
    failed: Counter[str],
    duplicates: Counter[str],
    failures: _RowGroups,
    index: _RowGroups,
) -> Iterator[Sample]:
    """Samples of every planned row of ``split`` that downloaded and is no duplicate, in row
    order.

    Failures and duplicates are counted and logged to ``failures``; each written sample's
    key, shard, hashes, caption length and original size go to ``index``.
    """
    prefix = build.shard_prefix(split)
    written = 0
    for part in build.plan["parts"]:
        results, images = build.downloads.part(part["name"])
        rows = _part_rows(build.ds_dir, part)
        lost: list[dict[str, Any]] = []
        for batch in rows.to_batches(TOKENIZE_BATCH):
            good: list[tuple[dict[str, Any], Any, bytes]] = []
            for row in batch.to_pylist():
                row_id = row["row_id"]
                if not build.in_split(row_id, split):
                    continue
                drop = build.drops.get(row_id)
                if drop is not None:
                    duplicates[drop.reason] += 1
                    lost.append({"row_id": row_id, "url": row["url"], **drop.failure()})
                    continue
                result = results.get(row_id)
                jpg = _image(images, result)
                if jpg is None:
                    reason = _missing_reason(result)
                    failed[reason] += 1
                    error = result.error if result else "no status recorded by img2dataset"
                    lost.append(
                        {"row_id": row_id, "url": row["url"], "reason": reason, "error": error}
                    )
                    continue
                good.append((row, result, jpg))
            if not good:
                continue
            tokens = build.tokenizer.encode_batch([row["caption"] for row, _, _ in good])
            row_ids = np.asarray([row["row_id"] for row, _, _ in good], dtype=np.int64)
            at = np.searchsorted(build.images.keys, row_ids)
            positions = written + np.arange(len(good))
            index.write_table(
                pa.table(
                    {
                        "key": [row_key(r) for r in row_ids.tolist()],
                        "shard": [
                            shard_name(prefix, p) for p in (positions // build.shard_size).tolist()
                        ],
                        "row_id": row_ids,
                        "sha256": [result.sha256 for _, result, _ in good],
                        "phash": build.images.phash[at],
                        "caption_words": [len(row["caption"].split()) for row, _, _ in good],
                        "original_width": [result.original_width for _, result, _ in good],
                        "original_height": [result.original_height for _, result, _ in good],
                    },
                    schema=_INDEX_SCHEMA,
                )
            )
            written += len(good)
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


class _Downloads:
    """The img2dataset results and tar index of the parts finalize read last: both splits and
    the duplicate examples read them again (a part's results are ~200 bytes a row, so only a
    few parts are kept)."""

    KEEP = 2

    def __init__(self, ds_dir: Path) -> None:
        self.ds_dir = ds_dir
        self.parts: dict[str, tuple[dict[int, Any], _TarIndex]] = {}

    def part(self, name: str) -> tuple[dict[int, Any], _TarIndex]:
        from dalle_data.pipeline.retry import read_results

        if name not in self.parts:
            if len(self.parts) >= self.KEEP:
                oldest = next(iter(self.parts))
                self.parts.pop(oldest)[1].close()
            part_dir = self.ds_dir / "downloaded" / name
            self.parts[name] = (read_results(part_dir), _TarIndex(part_dir))
        return self.parts[name]

    def close(self) -> None:
        for _, images in self.parts.values():
            images.close()
        self.parts.clear()


class _TarIndex:
    """Random access to the images in a part's img2dataset tars without unpacking them."""

    def __init__(self, part_dir: Path) -> None:
        self.part_dir = part_dir
        self.index: dict[str, dict[str, tuple[int, int]]] = {}
        self.handles: dict[str, Any] = {}

    def __enter__(self) -> _TarIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for handle in self.handles.values():
            handle.close()
        self.handles.clear()
        self.index.clear()

    def _entry(self, shard: str, key: str) -> tuple[int, int] | None:
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
        return self.index[shard].get(f"{key}.jpg")

    def has(self, shard: str, key: str) -> bool:
        return self._entry(shard, key) is not None

    def read(self, shard: str, key: str) -> bytes | None:
        entry = self._entry(shard, key)
        if entry is None:
            return None
        handle = self.handles[shard]
        handle.seek(entry[0])
        return handle.read(entry[1])


def _rounds(ds_dir: Path, plan: dict[str, Any]) -> dict[str, Any]:
    """The retry rounds of every part, from the records the download stage wrote."""
    from dalle_data.pipeline.download_plan import DownloadError
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
