"""Byte-reproducible WebDataset shards: the shard contract of ../shared/DESIGN.md.

Every byte of a shard is a function of its samples: members are written in key order with
fixed tar metadata (mtime 0, uid/gid 0, empty owner names, mode 0644, GNU format), so the
same inputs give the same sha256 on any machine, whatever the download was split into.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from dalle_data.atomic import atomic_path
from dalle_data.hashing import sha256_file

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
    buf = io.BytesIO()
    np.save(buf, arr.astype(TOKEN_DTYPE), allow_pickle=False)
    return buf.getvalue()


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


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    tar.addfile(info, io.BytesIO(data))


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
            with (
                atomic_path(out_dir / name) as tmp,
                tarfile.open(tmp, "w", format=TAR_FORMAT) as tar,
            ):
                for sample in _chain(first, batch_iter):
                    for member, data in sample_members(sample):
                        _add_member(tar, member, data)
                    count += 1
                    progress.update()
            path = out_dir / name
            records.append(
                {
                    "name": name,
                    "sha256": sha256_file(path),
                    "samples": count,
                    "bytes": path.stat().st_size,
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


def read_shard(path: Path) -> Iterator[dict[str, bytes]]:
    """Yield the samples of one shard as ``{"__key__": key, ext: bytes, ...}`` dicts."""
    current: dict[str, Any] = {}
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.partition(".")
            if current and current["__key__"] != key:
                yield current
                current = {}
            current["__key__"] = key
            handle = tar.extractfile(member)
            current[ext] = handle.read() if handle is not None else b""
    if current:
        yield current
