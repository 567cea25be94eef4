"""Remote shards through the local cache: same batches as local disk, checked on arrival,
prefetched, evicted least recently used, fetched only by the rank that reads them."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from dalle_data import locations
from dalle_data.model import loader
from dalle_data.model.loader import LoaderSpec, ShardRef
from dalle_data.model.shard_cache import (
    INCOMING,
    CacheError,
    CacheSpec,
    RemoteShard,
    ShardFetcher,
    parse_size,
)
from dalle_data.model.train import load_shard_set
from tests.helpers.http import Route, serve
from tests.helpers.tiny import write_dataset

OPTIONS = {"batch_size": 4, "image_size": 32, "text_seq_len": 5, "seed": 3}


@pytest.fixture(scope="module")
def local_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48 tiny samples in 6 shards of 8, with a manifest."""
    return write_dataset(tmp_path_factory.mktemp("cache"), 48, 8, dataset="tiny")


@pytest.fixture
def remote_shards(local_shards: Path, bucket: str) -> str:
    url = f"{bucket}/tiny/shards"
    locations.put_tree(local_shards, url)
    return url


def spec_for(shards: tuple[ShardRef, ...], cache: Path | None = None, **kw) -> LoaderSpec:
    caching = CacheSpec(cache, 10**9) if cache else None
    return LoaderSpec(shards=shards, cache=caching, **(OPTIONS | kw))


def batches(spec: LoaderSpec, epoch: int) -> list[tuple[list[str], bytes, bytes]]:
    return [
        (b.keys, b.text.numpy().tobytes(), b.image.numpy().tobytes())
        for b in loader.batches(spec, epoch)
    ]


def cached(cache: Path) -> set[str]:
    return {p.name for p in cache.glob("*.tar")}


def test_parse_size() -> None:
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("1.5GiB") == int(1.5 * 2**30)
    assert parse_size("2048") == 2048
    with pytest.raises(CacheError, match="not a size"):
        parse_size("lots")


def test_bucket_batches_equal_local_ones_cold_and_warm(
    local_shards: Path, remote_shards: str, tmp_path: Path
) -> None:
    local = spec_for(load_shard_set([local_shards], skip_corrupt=False).shards)
    remote_set = load_shard_set([remote_shards], skip_corrupt=False)
    assert all(str(s.path).startswith("s3://") for s in remote_set.shards)
    assert (
        remote_set.manifest_sha256
        == load_shard_set([local_shards], skip_corrupt=False).manifest_sha256
    )
    remote = spec_for(remote_set.shards, tmp_path / "cache")
    for epoch in (0, 1):  # cold, then every shard from the cache
        assert batches(remote, epoch) == batches(local, epoch)
    manifest = locations.read_bytes(f"{remote_shards}/manifest.json").decode()
    assert cached(tmp_path / "cache") == {f"{s.sha256}.tar" for s in remote_set.shards}
    assert all(s.sha256 in manifest for s in remote_set.shards)


def test_http_shards_read_the_same(local_shards: Path, tmp_path: Path) -> None:
    routes = {f"/d/{p.name}": Route(body=p.read_bytes()) for p in local_shards.iterdir()}
    with serve(routes) as server:
        shards = load_shard_set([server.url("/d")], skip_corrupt=False).shards
        remote = spec_for(shards, tmp_path / "cache", num_workers=1)
        local = spec_for(load_shard_set([local_shards], skip_corrupt=False).shards)
        assert batches(remote, 0) == batches(local, 0)


def test_a_corrupt_object_is_refused_or_skipped_and_counted(
    local_shards: Path, remote_shards: str, tmp_path: Path
) -> None:
    shards = load_shard_set([remote_shards], skip_corrupt=False).shards
    bad = shards[2]
    original = locations.read_bytes(bad.path)
    altered = bytearray(original)
    altered[-2000] ^= 0xFF  # same size: only the sha256 on arrival can tell
    locations.write_bytes(bad.path, bytes(altered))
    assert load_shard_set([remote_shards], skip_corrupt=True).corrupt == ()  # sizes match
    with pytest.raises(CacheError, match=r"sha256 .* the manifest says"):
        batches(spec_for(shards, tmp_path / "strict"), 0)
    assert f"{bad.sha256}.tar" not in cached(tmp_path / "strict")
    lenient = spec_for(shards, tmp_path / "lenient", skip_corrupt=True)
    got = list(loader.batches(lenient, 0))
    assert sum(b.skipped for b in got) == bad.samples
    assert sum(len(b.keys) for b in got) == 48 - bad.samples
    assert f"{bad.sha256}.tar" not in cached(tmp_path / "lenient")


def test_a_missing_object_is_named_before_training(remote_shards: str) -> None:
    shards = load_shard_set([remote_shards], skip_corrupt=False).shards
    locations.remove(shards[1].path)
    from dalle_data.errors import TrainError

    with pytest.raises(TrainError, match=r"tiny-00001.tar is missing"):
        load_shard_set([remote_shards], skip_corrupt=False)
    assert load_shard_set([remote_shards], skip_corrupt=True).corrupt == (str(shards[1].path),)


def test_the_cache_stays_bounded_evicting_least_recently_used(
    remote_shards: str, tmp_path: Path
) -> None:
    shards = load_shard_set([remote_shards], skip_corrupt=False).shards
    largest = max(s.bytes for s in shards)
    cache = tmp_path / "cache"
    spec = dataclasses.replace(
        spec_for(shards), cache=CacheSpec(cache, max_bytes=4 * largest, prefetch=2)
    )
    seen = [key for b in loader.batches(spec, 0) for key in b.keys]
    assert len(seen) == 48
    assert sum(p.stat().st_size for p in cache.glob("*.tar")) <= 4 * largest
    assert len(cached(cache)) == 4
    # the most recently read shards are the ones kept
    order = list(dict.fromkeys(ref[0] for refs in loader.epoch_plan(spec, 0)[0] for ref in refs))
    assert cached(cache) == {f"{shards[i].sha256}.tar" for i in order[-4:]}
    with pytest.raises(CacheError, match="cannot hold"):
        ShardFetcher(
            CacheSpec(cache, max_bytes=largest), {0: RemoteShard("s3://b/x", "0", largest)}, [0]
        )


def test_partial_downloads_of_a_killed_loader_are_removed(tmp_path: Path) -> None:
    """A loader killed mid-fetch leaves ``.incoming/<sha256>.<pid>.tar``; the next fetcher
    on the cache removes it, and leaves a live process's download alone."""
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    incoming = tmp_path / "cache" / INCOMING
    incoming.mkdir(parents=True)
    abandoned = incoming / f"{'a' * 64}.{int(gone.stdout)}.tar"
    live = incoming / f"{'b' * 64}.{os.getpid()}.tar"
    for path in (abandoned, live):
        path.write_bytes(b"half a shard")
    ShardFetcher(CacheSpec(tmp_path / "cache", max_bytes=10**6), {}, []).close()
    assert not abandoned.exists() and live.exists()


def test_the_next_shards_are_fetched_while_one_is_read(remote_shards: str, tmp_path: Path) -> None:
    shards = load_shard_set([remote_shards], skip_corrupt=False).shards
    remote = {i: RemoteShard(str(s.path), s.sha256, s.bytes) for i, s in enumerate(shards)}
    fetcher = ShardFetcher(CacheSpec(tmp_path, 10**9, prefetch=2), remote, [3, 1, 5, 0])
    try:
        assert fetcher.get(3) == tmp_path / f"{shards[3].sha256}.tar"
        scheduled = sorted(fetcher._futures)
        assert scheduled == [1, 3, 5]  # the one read and the two it reads next, not 0 yet
        assert all(fetcher._futures[i].result() is not None for i in scheduled)
    finally:
        fetcher.close()
    assert fetcher.stats.fetched == 3 and fetcher.stats.hits == 0


def test_each_rank_fetches_only_the_shards_it_reads(remote_shards: str, tmp_path: Path) -> None:
    shards = load_shard_set([remote_shards], skip_corrupt=False).shards
    for world, rank in ((2, 0), (2, 1), (3, 2)):
        cache = tmp_path / f"rank{rank}of{world}"
        spec = spec_for(shards, cache, batch_size=2, world_size=world, rank=rank)
        list(loader.batches(spec, 0))
        read = {s for refs in loader.rank_batches(spec, 0) for s, _ in refs}
        assert len(read) == len(shards) // world  # whole shards per rank
        assert cached(cache) == {f"{shards[i].sha256}.tar" for i in read}
