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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from dalle_data.atomic import atomic_path
from dalle_data.errors import DalleDataError

KEY = re.compile(r"^[0-9]+$")
TOKEN_DTYPE = np.dtype("<i4")
TAR_FORMAT = tarfile.GNU_FORMAT


class ShardError(DalleDataError):
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
