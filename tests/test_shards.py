"""The shard writer: contract layout, fixed tar metadata, byte reproducibility, bad input."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from dalle_data.formats.webdataset import (
    Sample,
    ShardError,
    encode_tokens,
    read_shard,
    row_key,
    sample_members,
    tar_members,
    write_shards,
)


def make_samples(n: int, start: int = 0) -> list[Sample]:
    return [
        Sample(
            key=row_key(start + i * 7),
            jpg=bytes([i % 256]) * (100 + i),
            txt=f"caption number {i} é",
            meta={"url": f"http://x/{i}.jpg", "row_id": start + i * 7},
            tokens=np.arange(i % 5 + 1, dtype=np.int64),
        )
        for i in range(n)
    ]


def test_layout_and_tar_metadata(tmp_path: Path) -> None:
    records = write_shards(make_samples(5), tmp_path, dataset="demo", shard_size=2)
    assert [r["name"] for r in records] == ["demo-00000.tar", "demo-00001.tar", "demo-00002.tar"]
    assert [r["samples"] for r in records] == [2, 2, 1]
    with tarfile.open(tmp_path / "demo-00000.tar") as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == [
        f"{row_key(k)}.{ext}" for k in (0, 7) for ext in ("jpg", "json", "tok.npy", "txt")
    ]
    for m in members:
        assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o644)
    first = next(read_shard(tmp_path / "demo-00001.tar"))
    assert first["__key__"] == row_key(14)
    assert first["txt"].decode() == "caption number 2 é"
    assert json.loads(first["json"]) == {"row_id": 14, "url": "http://x/2.jpg"}
    tokens = np.load(io.BytesIO(first["tok.npy"]))
    assert tokens.dtype == np.dtype("<i4") and tokens.tolist() == [0, 1, 2]
    assert records[0]["bytes"] == (tmp_path / "demo-00000.tar").stat().st_size


def test_same_samples_same_bytes_and_stale_shards_removed(tmp_path: Path) -> None:
    a = write_shards(make_samples(7), tmp_path / "a", dataset="demo", shard_size=3)
    b = write_shards(make_samples(7), tmp_path / "b", dataset="demo", shard_size=3)
    assert a == b
    for r in a:
        assert (tmp_path / "a" / r["name"]).read_bytes() == (
            tmp_path / "b" / r["name"]
        ).read_bytes()
    (tmp_path / "a" / "other-00000.tar").write_bytes(b"not ours")
    smaller = write_shards(make_samples(2), tmp_path / "a", dataset="demo", shard_size=3)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "demo-00000.tar",
        "other-00000.tar",
    ]
    assert smaller[0]["samples"] == 2


@pytest.mark.parametrize(
    ("keys", "message"),
    [(["000000000002", "000000000001"], "must come sorted"), (["12a"], "not digits only")],
)
def test_refuses_bad_keys(tmp_path: Path, keys: list[str], message: str) -> None:
    samples = [Sample(k, b"x", "t", {}, np.zeros(1, dtype=np.int32)) for k in keys]
    with pytest.raises(ShardError, match=message):
        write_shards(samples, tmp_path, dataset="demo", shard_size=10)
    assert not any(p.name.endswith(".tar") for p in tmp_path.iterdir())


def test_refuses_bad_tokens(tmp_path: Path) -> None:
    bad = Sample(row_key(1), b"x", "t", {}, np.zeros((2, 2), dtype=np.int32))
    with pytest.raises(ShardError, match="1-D integer"):
        write_shards([bad], tmp_path, dataset="demo", shard_size=10)


def tarfile_shard(samples: list[Sample], path: Path) -> None:
    """The shard contract written with tarfile itself: the reference for the fast writer."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for sample in samples:
            for name, data in sample_members(sample):
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))


def test_shard_bytes_are_what_tarfile_writes(tmp_path: Path) -> None:
    samples = make_samples(6)
    # A 110-digit key: its member names need GNU long-name headers.
    samples.append(Sample("9" * 110, b"\xff" * 513, "long", {}, np.arange(3)))
    records = write_shards(samples, tmp_path / "fast", dataset="demo", shard_size=4)
    for record, chunk in zip(records, (samples[:4], samples[4:]), strict=True):
        tarfile_shard(chunk, tmp_path / "reference.tar")
        written = (tmp_path / "fast" / record["name"]).read_bytes()
        assert written == (tmp_path / "reference.tar").read_bytes()
        assert record["sha256"] == hashlib.sha256(written).hexdigest()
        assert record["bytes"] == len(written)


def tarfile_listing(path: Path) -> list[tuple[str, int, int]]:
    with tarfile.open(path, "r:") as tar:
        return [(m.name, m.offset_data, m.size) for m in tar if m.isfile()]


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT, tarfile.PAX_FORMAT])
def test_tar_members_lists_what_tarfile_lists(tmp_path: Path, fmt: int) -> None:
    path = tmp_path / "any.tar"
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in [
            ("a.jpg", b"1" * 700),
            ("dir", None),
            ("dir/b.txt", b""),
            ("é.txt", b"2"),
        ]:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                info.mtime = 1.5  # PAX: a record per member, as img2dataset's tars have
                tar.addfile(info, io.BytesIO(data))
    assert tar_members(path) == tarfile_listing(path)
    assert [m[0] for m in tar_members(path)] == ["a.jpg", "dir/b.txt", "é.txt"]


def test_tar_members_reads_webdataset_tars(tmp_path: Path) -> None:
    """img2dataset writes its shards with webdataset's TarWriter."""
    import webdataset

    path = tmp_path / "wds.tar"
    with webdataset.TarWriter(str(path)) as sink:
        for i in range(3):
            sink.write({"__key__": f"{i:09d}", "jpg": b"x" * (600 * i), "json": b"{}"})
    assert tar_members(path) == tarfile_listing(path)
    assert len(tar_members(path)) == 6


def test_tar_members_leaves_damaged_tars_to_tarfile(tmp_path: Path) -> None:
    write_shards(make_samples(3), tmp_path, dataset="demo", shard_size=3)
    shard = (tmp_path / "demo-00000.tar").read_bytes()
    damaged = {
        "cut_in_data": shard[:600],
        "cut_in_padding": shard[:1000],
        "cut_in_header": shard[:1100],
        "bad_first_header": b"X" + shard[1:],
        # tarfile ends the listing quietly at a bad header after the first.
        "bad_second_header": shard[:1024] + b"X" + shard[1025:],
    }
    for name, data in damaged.items():
        path = tmp_path / f"{name}.tar"
        path.write_bytes(data)
        try:
            expected: object = tarfile_listing(path)
        except tarfile.ReadError as err:
            expected = str(err)
        try:
            got: object = tar_members(path)
        except tarfile.ReadError as err:
            got = str(err)
        assert got == expected, name
    assert [m[0] for m in tar_members(tmp_path / "bad_second_header.tar")] == ["000000000000.jpg"]


def test_encoded_tokens_are_what_np_save_writes() -> None:
    rng = np.random.default_rng(0)
    for length in (0, 1, 9, 10, 99, 100, 999, 1000, 12345):
        ids = rng.integers(0, 2**31 - 1, length, dtype=np.int64)
        expected = io.BytesIO()
        np.save(expected, ids.astype("<i4"), allow_pickle=False)
        assert encode_tokens(ids) == expected.getvalue(), length
        assert np.load(io.BytesIO(encode_tokens(ids))).tolist() == ids.tolist()
