"""A bounded local cache of remote shards: training reads a bucket at local-disk speed.

A shard is fetched whole (one GET stream, no range reads while training), its sha256 checked
against the manifest on arrival, and only then given its name in the cache: files are named
by content (``<sha256>.tar``), so a file under a cache name is always a verified shard, two
URLs of the same shard share one copy, and several processes (loader workers, ranks on one
node) can share a cache folder. While a consumer trains on one shard, the next ``prefetch``
shards of its own plan download in background threads; the plan (``loader.epoch_plan``)
gives each rank and worker its own shards, so a rank fetches only the shards it reads.
When the cache would outgrow ``max_bytes``, the least recently used shards (by mtime,
touched on every use) are deleted, never one this process is about to read.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from dalle_data import locations
from dalle_data.atomic import atomic_path
from dalle_data.errors import DalleDataError
from dalle_data.formats.manifest import MANIFEST
from dalle_data.hashing import sha256_bytes

INCOMING = ".incoming"
DEFAULT_SIZE = "20GB"
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?)(i?)b?\s*$", re.IGNORECASE)


class CacheError(DalleDataError):
    """A remote shard that could not be fetched, or arrived with the wrong bytes."""


def default_dir() -> Path:
    """``$XDG_CACHE_HOME/dalle-data/shards`` (``~/.cache/dalle-data/shards``)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dalle-data" / "shards"


def parse_size(text: str) -> int:
    """Bytes in ``"500MB"``, ``"20GB"``, ``"1.5GiB"``, ``"1000000"`` (kB = 1000, KiB = 1024)."""
    match = _SIZE.match(str(text))
    if not match:
        raise CacheError(f"cache size {text!r} is not a size: write e.g. 500MB, 20GB or 1.5TiB")
    number, unit, binary = match.groups()
    power = "kmgt".find(unit.lower()) + 1 if unit else 0
    return int(float(number) * (1024 if binary else 1000) ** power)


@dataclass(frozen=True)
class CacheSpec:
    """Where remote shards are kept, how many bytes at most, how many fetched ahead."""

    directory: Path
    max_bytes: int
    prefetch: int = 2


@dataclass(frozen=True)
class RemoteShard:
    """What the cache needs of a shard: where it is, and its manifest sha256 and size."""

    location: str
    sha256: str
    bytes: int


@dataclass
class CacheStats:
    """What one fetcher did (for benchmarks and logs)."""

    hits: int = 0
    fetched: int = 0
    fetched_bytes: int = 0
    corrupt: list[str] = field(default_factory=list)
    evicted: int = 0


class ShardFetcher:
    """Fetches one consumer's shards in the order it reads them, ``prefetch`` ahead.

    ``order`` lists the shards (keys of ``shards``) in the order of first use; ``get`` blocks
    until that shard is local and verified, and starts the fetches of the next ones. With
    ``skip_corrupt`` a shard that cannot be fetched or fails its check reads as None (its
    samples are then skipped and counted by the loader).
    """

    def __init__(
        self,
        spec: CacheSpec,
        shards: dict[int, RemoteShard],
        order: Sequence[int],
        *,
        skip_corrupt: bool = False,
    ) -> None:
        self.spec = spec
        self.shards = shards
        self.order = list(order)
        self.position = {shard: i for i, shard in enumerate(self.order)}
        self.skip_corrupt = skip_corrupt
        self.stats = CacheStats()
        self._futures: dict[int, Future[Path | None]] = {}
        self._lock = threading.Lock()
        self._incoming = 0  # bytes of downloads under way (not yet in a listing)
        self._pool = ThreadPoolExecutor(max(1, spec.prefetch), thread_name_prefix="shard-fetch")
        largest = max((s.bytes for s in shards.values()), default=0)
        if spec.max_bytes < (spec.prefetch + 2) * largest:
            raise CacheError(
                f"--cache-size {spec.max_bytes} bytes cannot hold the shard being read, the one "
                f"before it and {spec.prefetch} fetched ahead ({largest} bytes each): give at "
                f"least {(spec.prefetch + 2) * largest} bytes per loader process"
            )
        spec.directory.mkdir(parents=True, exist_ok=True)
        _remove_abandoned(spec.directory / INCOMING)

    def get(self, shard: int) -> Path | None:
        """The local path of ``shard`` (fetched and verified), or None if skipped as corrupt."""
        at = self.position.get(shard)
        if at is None:  # not in the plan given: fetch it alone
            at = len(self.order)
            self.order.append(shard)
            self.position[shard] = at
        for ahead in self.order[at : at + 1 + self.spec.prefetch]:
            if ahead not in self._futures:
                self._futures[ahead] = self._pool.submit(self._ensure, ahead)
        for done in [s for s in self._futures if self.position[s] < at]:
            del self._futures[done]  # read already: no longer protected from eviction
        path = self._futures[shard].result()
        if path is not None:
            _touch(path)
        return path

    def close(self) -> None:
        """Stop fetching ahead (downloads under way finish into the cache)."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _ensure(self, shard: int) -> Path | None:
        ref = self.shards[shard]
        target = self.spec.directory / f"{ref.sha256}.tar"
        if _size(target) == ref.bytes:
            with self._lock:
                self.stats.hits += 1
            return target
        self._make_room(ref.bytes)
        incoming = self.spec.directory / INCOMING / f"{ref.sha256}.{os.getpid()}.tar"
        try:
            digest = locations.download(ref.location, incoming)
            if digest != ref.sha256:
                incoming.unlink(missing_ok=True)
                self._refuse(
                    ref,
                    f"arrived with sha256 {digest}, the manifest says {ref.sha256} (the object "
                    "is corrupt or was replaced)",
                )
                return None
            os.replace(incoming, target)
        except (OSError, locations.LocationError) as err:
            self._refuse(ref, f"could not be fetched ({err})")
            return None
        finally:
            with self._lock:
                self._incoming -= ref.bytes
        with self._lock:
            self.stats.fetched += 1
            self.stats.fetched_bytes += ref.bytes
        return target

    def _refuse(self, ref: RemoteShard, why: str) -> None:
        """Raise, or with skip_corrupt count the shard as skipped."""
        if not self.skip_corrupt:
            raise CacheError(
                f"shard {ref.location} {why}: rebuild and re-upload it, or pass "
                "--skip-corrupt to skip it (its samples are counted as skipped)"
            )
        with self._lock:
            self.stats.corrupt.append(ref.location)

    def _make_room(self, need: int) -> None:
        """Delete least recently used shards until ``need`` more bytes, and those of the
        downloads under way, fit under the limit; then count ``need`` as under way."""
        with self._lock:
            self._incoming += need
            keep = {f"{self.shards[s].sha256}.tar" for s in self._futures}
            files = []
            for path in self.spec.directory.glob("*.tar"):
                try:
                    st = path.stat()
                except FileNotFoundError:  # evicted by another process just now
                    continue
                files.append((st.st_mtime_ns, st.st_size, path))
            total = sum(size for _, size, _ in files)
            for _, size, path in sorted(files):
                if total + self._incoming <= self.spec.max_bytes:
                    break
                if path.name in keep:
                    continue
                path.unlink(missing_ok=True)
                total -= size
                self.stats.evicted += 1


def _remove_abandoned(incoming: Path) -> None:
    """Delete partial downloads (``<sha256>.<pid>.tar``) whose process is gone: a loader
    killed mid-fetch leaves one, and nothing else would ever read or remove it."""
    for path in incoming.glob("*.*.tar"):
        pid = path.suffixes[-2][1:] if len(path.suffixes) >= 2 else ""
        if pid.isdigit() and not _alive(int(pid)):
            path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


def _touch(path: Path) -> None:
    """Mark a shard used now (the LRU order); gone already is fine, the reader has it open."""
    with contextlib.suppress(FileNotFoundError):
        os.utime(path)


def local_folder(location: Path | str, cache_dir: Path | None = None) -> Path:
    """A shard folder (manifest.json and its shards) on local disk, for readers that read
    every shard (evaluation): ``location`` itself when local; for a URL, a copy below
    ``<cache_dir>/folders/``, each shard fetched whole and sha256-checked on arrival (one
    already there at its size is kept), the manifest written last."""
    target = locations.normalize(location)
    if isinstance(target, Path):
        return target
    root = (cache_dir or default_dir()) / "folders" / sha256_bytes(target.encode())[:16]
    raw = locations.read_bytes(locations.join(target, MANIFEST))
    for shard in json.loads(raw)["shards"]:
        path = root / shard["name"]
        if _size(path) == shard["bytes"]:
            continue
        url = locations.join(target, shard["name"])
        digest = locations.download(url, path)
        if digest != shard["sha256"]:
            path.unlink()
            raise CacheError(
                f"shard {url} arrived with sha256 {digest}, the manifest says "
                f"{shard['sha256']}: rebuild and re-upload it"
            )
    with atomic_path(root / MANIFEST) as tmp:
        tmp.write_bytes(raw)
    return root
