"""Byte-reproducible WebDataset shards: the shard contract of ../shared/DESIGN.md.

Every byte of a shard is a function of its samples: members are written in key order with
fixed tar metadata (mtime 0, uid/gid 0, empty owner names, mode 0644, GNU format), so the
same inputs give the same sha256 on any machine, whatever the download was split into.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import mmap
import os
import re
import tarfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from dalle_data.atomic import atomic_path, write_json

KEY = re.compile(r"^[0-9]+$")
TOKEN_DTYPE = np.dtype("<i4")
TAR_FORMAT = tarfile.GNU_FORMAT


class ShardError(ValueError):
    """Samples that break the shard contract (bad key, wrong order, bad tokens)."""


@dataclass(frozen=True)
class Sample:
    """One training example as it goes into a shard."""

    key: str
    jpg: bytes
    txt: str
    meta: dict[str, Any]
    tokens: np.ndarray


def shard_name(dataset: str, index: int) -> str:
    """`<dataset>-NNNNN.tar`, the name DESIGN.md fixes."""
    return f"{dataset}-{index:05d}.tar"


def row_key(row_id: int) -> str:
    """The stable sample key of a source row."""
    return f"{row_id:012d}"


def encode_tokens(tokens: np.ndarray) -> bytes:
    """``np.save`` bytes of 1-D integer token ids as little-endian int32."""
    arr = np.asarray(tokens)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ShardError(
            f"token ids must be a 1-D integer array, got shape {arr.shape} dtype {arr.dtype}: "
            "pass the tokenizer's ids unpadded"
        )
    if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(TOKEN_DTYPE).max):
        raise ShardError(f"token ids out of int32 range ({arr.min()}..{arr.max()})")
    return _npy_header(arr.size) + arr.astype(TOKEN_DTYPE).tobytes()


@functools.lru_cache(maxsize=4096)
def _npy_header(length: int) -> bytes:
    """What ``np.save`` writes before the data of ``length`` int32 ids (it depends only on
    the length); ``np.save`` per caption was a tenth of finalize's time."""
    buf = io.BytesIO()
    np.save(buf, np.zeros(length, dtype=TOKEN_DTYPE), allow_pickle=False)
    return buf.getvalue()[: buf.tell() - length * TOKEN_DTYPE.itemsize]


def sample_members(sample: Sample) -> list[tuple[str, bytes]]:
    """The four members of a sample, fields sorted by name as the contract says."""
    meta = json.dumps(sample.meta, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    fields = {
        "jpg": sample.jpg,
        "json": meta.encode("utf-8"),
        "tok.npy": encode_tokens(sample.tokens),
        "txt": sample.txt.encode("utf-8"),
    }
    return [(f"{sample.key}.{ext}", fields[ext]) for ext in sorted(fields)]


def _tar_header(name: str, size: int) -> bytes:
    """The header ``tarfile`` writes for a member with the shard contract's fixed metadata."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info.tobuf(tarfile.GNU_FORMAT, tarfile.ENCODING, "surrogateescape")


_BLOCK = tarfile.BLOCKSIZE
_NAME, _SIZE, _CHKSUM = slice(0, 100), slice(124, 136), slice(148, 156)
_TEMPLATE = _tar_header("", 0)
# The header checksum is the byte sum with its own field read as spaces: the template's sum
# without its name and size fields, plus those of each member.
_TEMPLATE_SUM = sum(_TEMPLATE) - sum(_TEMPLATE[_CHKSUM]) + 8 * ord(" ") - sum(_TEMPLATE[_SIZE])


class _TarWriter:
    """Writes what ``tarfile`` (GNU format) writes for these members, hashing as it goes.

    Headers come from one template (a name and a size patched in, the checksum recomputed):
    ``TarInfo.tobuf`` per member cost a third of finalize's time. Names that need more
    than a plain header (over 100 bytes) and huge members take ``tobuf``.
    """

    def __init__(self, fh: Any) -> None:
        self.fh = fh
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def _write(self, data: bytes) -> None:
        self.fh.write(data)
        self.sha256.update(data)
        self.bytes += len(data)

    def add(self, name: str, data: bytes) -> None:
        raw = name.encode(tarfile.ENCODING, "surrogateescape")
        size = len(data)
        if len(raw) > 100 or size >= 8**11:
            header = _tar_header(name, size)
        else:
            fields = bytearray(_TEMPLATE)
            fields[: len(raw)] = raw
            fields[_SIZE] = b"%011o\0" % size
            checksum = _TEMPLATE_SUM + sum(raw) + sum(fields[_SIZE])
            fields[_CHKSUM] = b"%06o\0 " % checksum
            header = bytes(fields)
        self._write(header)
        self._write(data)
        if size % _BLOCK:
            self._write(bytes(_BLOCK - size % _BLOCK))

    def close(self) -> None:
        """The end-of-archive blocks, then zeros to a whole record, as ``tarfile`` does."""
        self._write(bytes(2 * _BLOCK))
        if self.bytes % tarfile.RECORDSIZE:
            self._write(bytes(tarfile.RECORDSIZE - self.bytes % tarfile.RECORDSIZE))


def _ordered(samples: Iterable[Sample]) -> Iterator[Sample]:
    """Yield samples, refusing keys that are not digits or not strictly increasing."""
    previous: str | None = None
    for sample in samples:
        if not KEY.match(sample.key):
            raise ShardError(f"sample key {sample.key!r} is not digits only: use row_key(row_id)")
        if previous is not None and sample.key <= previous:
            raise ShardError(
                f"sample key {sample.key!r} follows {previous!r}: samples must come sorted "
                "by key without duplicates"
            )
        previous = sample.key
        yield sample


def write_shards(
    samples: Iterable[Sample], out_dir: Path, *, dataset: str, shard_size: int
) -> list[dict[str, Any]]:
    """Write ``samples`` (sorted by key) as ``<dataset>-NNNNN.tar`` shards of ``shard_size``.

    Each shard appears atomically under its final name; shards of ``dataset`` left in
    ``out_dir`` by an earlier, larger build are removed. Returns one
    ``{name, sha256, samples, bytes}`` record per shard, in order.
    """
    if shard_size < 1:
        raise ShardError(f"shard_size must be at least 1, got {shard_size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    iterator = _ordered(samples)
    progress = tqdm(desc=f"shards {dataset}", unit=" samples", mininterval=2.0)
    with progress:
        while True:
            batch_iter = _take(iterator, shard_size)
            first = next(batch_iter, None)
            if first is None:
                break
            name = shard_name(dataset, len(records))
            count = 0
            # No fsync per shard (about 0.1 s each): the manifest, written durably after the
            # shards, holds their sha256s, so `verify` finds a shard a power loss damaged.
            with atomic_path(out_dir / name, durable=False) as tmp, open(tmp, "wb") as fh:
                tar = _TarWriter(fh)
                for sample in _chain(first, batch_iter):
                    for member, data in sample_members(sample):
                        tar.add(member, data)
                    count += 1
                    progress.update()
                tar.close()
            records.append(
                {
                    "name": name,
                    "sha256": tar.sha256.hexdigest(),
                    "samples": count,
                    "bytes": tar.bytes,
                }
            )
    _remove_stale(out_dir, dataset, {r["name"] for r in records})
    return records


def _take(iterator: Iterator[Sample], n: int) -> Iterator[Sample]:
    for _ in range(n):
        item = next(iterator, None)
        if item is None:
            return
        yield item


def _chain(first: Sample, rest: Iterator[Sample]) -> Iterator[Sample]:
    yield first
    yield from rest


def _remove_stale(out_dir: Path, dataset: str, keep: set[str]) -> None:
    pattern = re.compile(rf"^{re.escape(dataset)}-[0-9]{{5}}\.tar$")
    for path in out_dir.iterdir():
        if pattern.match(path.name) and path.name not in keep:
            path.unlink()


def tar_members(path: Path) -> list[tuple[str, int, int]]:
    """``(name, data offset, size)`` of every regular file in a tar, in archive order.

    Reads only the headers, about 15x faster than iterating a ``TarFile``. Plain ustar/GNU
    file and directory headers are read here, with the ``path``/``size`` of a PAX record
    before them (img2dataset's tars carry one per member, for a fractional mtime); anything
    else (long GNU names, sparse files, a bad checksum, a truncated member) goes through
    ``tarfile``, errors included.
    """
    with open(path, "rb") as fh:
        if os.fstat(fh.fileno()).st_size == 0:
            return _tarfile_members(path)
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            members = _plain_members(buf)
    return members if members is not None else _tarfile_members(path)


def _plain_members(buf: mmap.mmap) -> list[tuple[str, int, int]] | None:
    """:func:`tar_members` of a mapped tar, or None where tarfile must decide."""
    members: list[tuple[str, int, int]] = []
    pax: dict[str, str] = {}
    end, offset = len(buf), 0
    while offset < end:
        header = buf[offset : offset + _BLOCK]
        if len(header) < _BLOCK:
            return None
        if not any(header):
            break
        size = _header_size(header)
        if size is None:
            return None
        kind, data = header[156], offset + _BLOCK
        if kind == ord("x"):
            records = None if pax else _pax_records(buf[data : data + size])
            if records is None:
                return None
            pax = records
        else:
            name = header[_NAME].split(b"\0", 1)[0].decode(tarfile.ENCODING, "surrogateescape")
            name = pax.get("path", name)
            if not pax.get("size", "0").isdigit():
                return None
            size = int(pax.get("size", size))
            pax = {}
            if kind != ord("5"):
                members.append((name, data, size))
        offset = data + -(-size // _BLOCK) * _BLOCK
    return members if offset <= end else None


def _header_size(header: bytes) -> int | None:
    """The size field of a file, directory or PAX header with a valid checksum, else None."""
    if header[156] not in b"05x\0" or (header[257:263] == b"ustar\0" and header[345] != 0):
        return None
    try:
        size = int(header[_SIZE].split(b"\0", 1)[0].strip() or b"0", 8)
        stored = int(header[_CHKSUM].split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        return None
    checksum = sum(header) - sum(header[_CHKSUM]) + 8 * ord(" ")
    return size if checksum == stored else None


_PAX_RECORD = re.compile(rb"(\d+) ([^=]+)=")


def _pax_records(data: bytes) -> dict[str, str] | None:
    """The ``key=value`` records of a PAX header as tarfile reads them; None for sparse
    files, another charset or a malformed record (left to tarfile)."""
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data) and data[pos] != 0:
        match = _PAX_RECORD.match(data, pos)
        end = pos + int(match.group(1)) if match else pos
        if match is None or end > len(data) or end <= match.end() or data[end - 1] != 0x0A:
            return None
        try:
            records[match.group(2).decode()] = data[match.end() : end - 1].decode()
        except UnicodeDecodeError:
            return None
        pos = end
    if "hdrcharset" in records or any(k.startswith("GNU.sparse") for k in records):
        return None
    return records


def _tarfile_members(path: Path) -> list[tuple[str, int, int]]:
    with tarfile.open(path, "r:") as tar:
        return [(m.name, m.offset_data, m.size) for m in tar if m.isfile()]


# A sample's key and, per field (``jpg``, ``tok.npy``, ...), where its bytes lie: (offset, size).
SampleLayout = tuple[str, dict[str, tuple[int, int]]]


def sample_layouts(path: Path) -> list[SampleLayout]:
    """The samples of a shard from its tar headers alone: members grouped by key, in order."""
    samples: list[SampleLayout] = []
    for name, offset, size in tar_members(path):
        key, _, ext = name.partition(".")
        if not samples or samples[-1][0] != key:
            samples.append((key, {}))
        samples[-1][1][ext] = (offset, size)
    return samples


def read_shard(path: Path) -> Iterator[dict[str, bytes]]:
    """Yield the samples of one shard as ``{"__key__": key, ext: bytes, ...}`` dicts."""
    with open(path, "rb") as fh:
        for key, fields in sample_layouts(path):
            sample: dict[str, Any] = {"__key__": key}
            for ext, (offset, size) in fields.items():
                fh.seek(offset)
                sample[ext] = fh.read(size)
            yield sample


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
    from dalle_data import tokenizers
    from dalle_data.download import read_plan
    from dalle_data.manifest import write_manifest

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
    write_json(out_dir / BUILD_RECORD, _build_record(started, plan, written))
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
    from dalle_data.download import PARAMS, DownloadError

    seen: dict[str, Any] | None = None
    for part in plan["parts"]:
        path = ds_dir / "downloaded" / part["name"] / PARAMS
        if not path.is_file():
            raise DownloadError(
                f"{path.parent} is not a finished download part: run the download stage"
            )
        params = json.loads(path.read_text())
        settings = {
            k: v for k, v in params.items() if k not in ("part", "rows", "samples_per_shard")
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
    from dalle_data.download import read_part_results

    for part in plan["parts"]:
        part_dir = ds_dir / "downloaded" / part["name"]
        results = read_part_results(part_dir)
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
                    meta = {
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


def _build_record(started: float, plan: dict[str, Any], written: int) -> dict[str, Any]:
    """Run facts (time, host, versions) kept out of the manifest so it stays reproducible."""
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
    }
