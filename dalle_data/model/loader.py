"""Training batches from dalle-data shards, fast and exactly reproducible.

Why not train_dalle.py's webdataset pipeline: captions are already tokenized in the
shards (``<key>.tok.npy``), so the loader only pads or truncates them; a shard's tar
headers are read once and each sample's image and tokens read by offset; JPEGs are decoded
with PIL's draft mode (DCT scaling) straight to the size the crop needs; batches are
collated as uint8 numpy arrays and pickled whole between processes (4x less traffic than
float tensors, and no shared-memory handshake per tensor).

The order of an epoch is a pure function of ``(seed, epoch)``: shards and the samples
inside each shard are permuted, then split between *consumers* (one per DDP rank and
loader worker): whole shards when they divide evenly among the consumers or there are
many per consumer, else samples by global index modulo the number of consumers. Every
consumer gets the same number of batches, so DDP ranks stay in step and no sample is
seen twice in an epoch.
The random crop of a sample is a function of ``(seed, epoch, shard, index)``, so a run
resumed at step k sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import io
import math
import os
import re
import tarfile
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dalle_data import locations
from dalle_data.errors import DalleDataError
from dalle_data.formats.webdataset import SampleLayout, sample_layouts
from dalle_data.model.shard_cache import CacheSpec, RemoteShard, ShardFetcher

# Whole shards go to consumers when they divide evenly, or when there are this many per
# consumer (the uneven remainder then costs at most a small share of the epoch).
SHARDS_PER_CONSUMER = 8
# A sample is addressed by (index into LoaderSpec.shards, position in that shard's tar).
SampleRef = tuple[int, int]
# RandomResizedCrop's tries at an area that fits; a crop takes one more draw each for left, top.
CROP_TRIES = 10
CROP_DRAWS = CROP_TRIES + 2
_CROP_STREAM = 0x63726F70  # "crop": crop draws are a stream apart from the sample order's
_TOKENS_HEADER = re.compile(
    rb"\{'descr': '<i4', 'fortran_order': False, 'shape': \((\d+),\), \} *\n"
)


class LoaderError(DalleDataError):
    """A shard that cannot be read, or a dataset too small for the requested batches."""


@dataclass(frozen=True)
class ShardRef:
    """One shard (a local path or a URL) and what its manifest records of it.

    ``sha256`` and ``bytes`` are needed for a remote shard: the cache checks them on arrival.
    """

    path: Path | str
    samples: int
    sha256: str = ""
    bytes: int = 0


@dataclass(frozen=True)
class LoaderSpec:
    """Everything that decides which samples a rank sees, in which order, and how."""

    shards: tuple[ShardRef, ...]
    batch_size: int
    image_size: int
    text_seq_len: int
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    num_workers: int = 0
    skip_corrupt: bool = False
    resize_ratio: float = 0.75
    cache: CacheSpec | None = None

    @property
    def workers(self) -> int:
        """Loader processes per rank; 0 workers means the main process reads (counts 1)."""
        return max(1, self.num_workers)

    @property
    def consumers(self) -> int:
        return self.world_size * self.workers


@dataclass
class Batch:
    """One training batch: ``text`` (B, text_seq_len) int64, ``image`` (B, H, W, 3) uint8."""

    text: torch.Tensor
    image: torch.Tensor
    skipped: int
    keys: list[str]

    def image_float(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Images as DALLE-pytorch wants them: (B, 3, H, W) floats in [0, 1]."""
        return self.image.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)


def epoch_plan(spec: LoaderSpec, epoch: int) -> list[list[list[SampleRef]]]:
    """Per consumer (``rank * workers + worker``), its batches of this epoch, equal in number."""
    rng = np.random.default_rng([spec.seed, epoch])
    order = rng.permutation(len(spec.shards))
    per_shard = [
        [
            (int(s), int(i))
            for i in np.random.default_rng([spec.seed, epoch, int(s)]).permutation(
                spec.shards[s].samples
            )
        ]
        for s in order
    ]
    n = spec.consumers
    if len(spec.shards) % n == 0 or len(spec.shards) >= SHARDS_PER_CONSUMER * n:
        streams = [[ref for shard in per_shard[c::n] for ref in shard] for c in range(n)]
    else:
        flat = [ref for shard in per_shard for ref in shard]
        streams = [flat[c::n] for c in range(n)]
    per_consumer = min(len(stream) for stream in streams) // spec.batch_size
    if per_consumer == 0:
        total = sum(s.samples for s in spec.shards)
        raise LoaderError(
            f"{total} samples in {len(spec.shards)} shards give no full batch of "
            f"{spec.batch_size} to each of {spec.world_size} rank(s) x {spec.workers} "
            "loader worker(s): lower --batch-size or --num-workers, or use more data"
        )
    b = spec.batch_size
    return [[s[i * b : (i + 1) * b] for i in range(per_consumer)] for s in streams]


def steps_per_epoch(spec: LoaderSpec) -> int:
    """Optimizer steps per epoch on every rank (the same on all ranks, any epoch)."""
    return len(epoch_plan(spec, 0)[0]) * spec.workers


def rank_batches(spec: LoaderSpec, epoch: int) -> list[list[SampleRef]]:
    """This rank's batches in the order its training loop receives them."""
    plan = epoch_plan(spec, epoch)
    nw = spec.workers
    mine = plan[spec.rank * nw : (spec.rank + 1) * nw]
    return [mine[j % nw][j // nw] for j in range(len(mine[0]) * nw)]


def crop_draws(spec: LoaderSpec, epoch: int, shard: int) -> np.ndarray:
    """(samples, CROP_DRAWS) uniforms in [0, 1): the random crops of one shard's samples.

    Row ``i`` belongs to sample ``i`` of the shard whatever consumer reads it, so crops are a
    function of ``(seed, epoch, shard, index)``. One generator per shard: a generator per
    sample cost about 25 us, a tenth of decoding a small JPEG.
    """
    rng = np.random.default_rng([spec.seed, epoch, shard, _CROP_STREAM])
    return rng.random((spec.shards[shard].samples, CROP_DRAWS))


def random_resized_crop_box(
    width: int, height: int, scale: tuple[float, float], draws: Sequence[float]
) -> tuple[int, int, int, int]:
    """(left, top, side, side) of a square crop, as torchvision's RandomResizedCrop picks it.

    Same algorithm (ratio fixed at 1, ten tries, then the central square); ``draws`` is one
    row of :func:`crop_draws`: an area fraction per try, then left and top.
    """
    area = width * height
    low, high = scale
    for u in draws[:CROP_TRIES]:
        side = round(math.sqrt(area * (low + (high - low) * u)))
        if 0 < side <= width and 0 < side <= height:
            left = int(draws[CROP_TRIES] * (width - side + 1))
            top = int(draws[CROP_TRIES + 1] * (height - side + 1))
            return left, top, side, side
    return centre_box(width, height)


def centre_box(width: int, height: int) -> tuple[int, int, int, int]:
    """(left, top, side, side) of the central square: the deterministic crop of evaluation."""
    side = min(width, height)
    return (width - side) // 2, (height - side) // 2, side, side


def decode_crop(
    jpg: bytes, image_size: int, draws: Sequence[float] | None, scale: tuple[float, float]
) -> np.ndarray:
    """Decode, crop and resize one image to (image_size, image_size, 3) uint8.

    ``draws`` (a row of :func:`crop_draws`) pick a random crop; None takes the central square.
    """
    img: Image.Image = Image.open(io.BytesIO(jpg))
    width, height = img.size
    if draws is None:
        left, top, w, h = centre_box(width, height)
    else:
        left, top, w, h = random_resized_crop_box(width, height, scale, draws)
    box: tuple[float, float, float, float] = (left, top, left + w, top + h)
    if img.format == "JPEG" and w >= 2 * image_size:
        # DCT scaling: decode at 1/2, 1/4 or 1/8 size while the crop stays >= image_size.
        factor = w / image_size
        img.draft("RGB", (math.ceil(width / factor), math.ceil(height / factor)))
        sx, sy = img.size[0] / width, img.size[1] / height
        box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
    if img.mode != "RGB":
        img = img.convert("RGB")
    out = img.resize((image_size, image_size), Image.Resampling.BILINEAR, box=box)
    return np.asarray(out, dtype=np.uint8)


def read_tokens(data: bytes) -> np.ndarray:
    """The ids of a ``tok.npy`` member.

    The header ``np.save`` writes for 1-D little-endian int32 (what shards.encode_tokens
    writes) is matched here; np.load parses headers with ``ast.literal_eval`` (~50 us a
    sample) and still reads anything else, errors included.
    """
    if data[:8] == b"\x93NUMPY\x01\x00" and len(data) >= 10:
        start = 10 + int.from_bytes(data[8:10], "little")
        match = _TOKENS_HEADER.fullmatch(data, 10, start)
        if match and len(data) == start + 4 * int(match.group(1)):
            return np.frombuffer(data, dtype="<i4", offset=start)
    return np.load(io.BytesIO(data), allow_pickle=False)


def pad_tokens(tokens: Sequence[np.ndarray], text_seq_len: int) -> np.ndarray:
    """(B, text_seq_len) int64: each caption's ids truncated, zero-padded (0 = DALLE's pad)."""
    out = np.zeros((len(tokens), text_seq_len), dtype=np.int64)
    for row, ids in enumerate(tokens):
        n = min(len(ids), text_seq_len)
        out[row, :n] = ids[:n]
    return out


@dataclass
class _Shard:
    """An open shard: where each sample's image and tokens lie, and this epoch's crops."""

    path: Path | str
    fd: int
    samples: list[SampleLayout]
    draws: np.ndarray

    def read(self, index: int, ext: str) -> bytes:
        offset, size = self.samples[index][1][ext]
        data = os.pread(self.fd, size, offset)
        if len(data) != size:
            raise OSError(f"member {self.samples[index][0]}.{ext} is truncated")
        return data


class _ShardCache:
    """The last few shards opened (member offsets from their tar headers, no member read
    until a batch needs it); a corrupt one reads as None. Remote shards come through the
    ``fetcher``'s local cache."""

    def __init__(
        self, spec: LoaderSpec, epoch: int, fetcher: ShardFetcher | None = None, size: int = 2
    ) -> None:
        self.spec = spec
        self.epoch = epoch
        self.fetcher = fetcher
        self.size = size
        self.items: OrderedDict[int, _Shard | None] = OrderedDict()

    def get(self, shard: int) -> _Shard | None:
        if shard in self.items:
            self.items.move_to_end(shard)
            return self.items[shard]
        path = self.spec.shards[shard].path
        if self.fetcher is not None and locations.is_remote(path):
            fetched = self.fetcher.get(shard)
            if fetched is None:  # skipped as corrupt (--skip-corrupt); its samples are counted
                self.items[shard] = None
                return None
            path = fetched
        item: _Shard | None = None
        try:
            samples = sample_layouts(Path(path))
            fd = os.open(path, os.O_RDONLY)
        except (OSError, tarfile.TarError, EOFError) as err:
            if not self.spec.skip_corrupt:
                raise LoaderError(
                    f"shard {path} is corrupt ({err}): rebuild it (`dalle-data verify` "
                    "names every bad shard) or pass --skip-corrupt to skip it"
                ) from err
        else:
            item = _Shard(path, fd, samples, crop_draws(self.spec, self.epoch, shard))
        self.items[shard] = item
        if len(self.items) > self.size:
            self._close(self.items.popitem(last=False)[1])
        return item

    def close(self) -> None:
        while self.items:
            self._close(self.items.popitem()[1])

    @staticmethod
    def _close(item: _Shard | None) -> None:
        if item is not None:
            os.close(item.fd)


@dataclass
class _Collated:
    """A batch as numpy arrays: pickled whole between processes, where a tensor would
    cost a shared-memory segment and a file-descriptor handshake each."""

    text: np.ndarray
    image: np.ndarray
    skipped: int
    keys: list[str]

    def batch(self) -> Batch:
        return Batch(
            torch.from_numpy(self.text), torch.from_numpy(self.image), self.skipped, self.keys
        )


def load_batch(
    spec: LoaderSpec, epoch: int, refs: Sequence[SampleRef], cache: _ShardCache
) -> _Collated:
    """Read, decode and collate the samples ``refs``; corrupt ones fail or are counted."""
    size = spec.image_size
    images = np.empty((len(refs), size, size, 3), dtype=np.uint8)
    texts: list[np.ndarray] = []
    keys: list[str] = []
    scale = (spec.resize_ratio, 1.0)
    for shard, index in refs:
        item = cache.get(shard)
        try:
            if item is None or index >= len(item.samples):
                raise LoaderError(f"sample {index} missing")
            draws = item.draws[index].tolist()
            images[len(keys)] = decode_crop(item.read(index, "jpg"), size, draws, scale)
            tokens = read_tokens(item.read(index, "tok.npy"))
        except (OSError, ValueError, KeyError, SyntaxError) as err:
            if not spec.skip_corrupt:
                raise LoaderError(
                    f"shard {spec.shards[shard].path}: sample {index} is unreadable "
                    f"({err}): rebuild the shard or pass --skip-corrupt to skip it"
                ) from err
            continue
        texts.append(tokens)
        keys.append(item.samples[index][0])
    return _Collated(
        text=pad_tokens(texts, spec.text_seq_len),
        image=images[: len(keys)],
        skipped=len(refs) - len(keys),
        keys=keys,
    )


class ShardStream(torch.utils.data.IterableDataset[_Collated]):
    """This rank's batches of one epoch from ``start_step`` on, split across loader workers.

    DataLoader (``batch_size=None``) takes one batch from each worker in turn, starting at
    worker 0; worker ``w`` therefore serves the logical worker ``(w + start_step) % nw``,
    which keeps the rank's batch order identical when a run resumes mid-epoch.
    """

    def __init__(self, spec: LoaderSpec, epoch: int, start_step: int = 0) -> None:
        super().__init__()
        self.spec = spec
        self.epoch = epoch
        self.start_step = start_step

    def __iter__(self) -> Iterator[_Collated]:
        info = torch.utils.data.get_worker_info()
        nw = self.spec.workers
        logical = ((info.id if info else 0) + self.start_step) % nw
        plan = epoch_plan(self.spec, self.epoch)[self.spec.rank * nw + logical]
        skip = len(range(logical, self.start_step, nw))
        fetcher = remote_fetcher(self.spec, plan[skip:])
        cache = _ShardCache(self.spec, self.epoch, fetcher)
        try:
            for refs in plan[skip:]:
                yield load_batch(self.spec, self.epoch, refs, cache)
        finally:
            cache.close()
            if fetcher is not None:
                fetcher.close()


def remote_fetcher(spec: LoaderSpec, plan: Sequence[Sequence[SampleRef]]) -> ShardFetcher | None:
    """A fetcher for the remote shards of one consumer's ``plan``, in the order it reads them
    (only those: a rank never fetches another rank's shards); None when all are local."""
    remote = {i: s for i, s in enumerate(spec.shards) if locations.is_remote(s.path)}
    if not remote:
        return None
    if spec.cache is None:
        raise LoaderError(
            f"shard {next(iter(remote.values())).path} is remote: give a cache "
            "(--cache-dir, --cache-size) to stream it through"
        )
    order = [s for s in dict.fromkeys(ref[0] for refs in plan for ref in refs) if s in remote]
    shards = {i: RemoteShard(str(remote[i].path), remote[i].sha256, remote[i].bytes) for i in order}
    return ShardFetcher(spec.cache, shards, order, skip_corrupt=spec.skip_corrupt)


def batches(spec: LoaderSpec, epoch: int, start_step: int = 0) -> Iterator[Batch]:
    """Iterate this rank's batches of ``epoch`` from ``start_step``, with the spec's workers."""
    stream = ShardStream(spec, epoch, start_step)
    collated: Iterable[_Collated] = stream
    if spec.num_workers > 0:
        # With batch_size=None each item goes through default_convert, which leaves a
        # dataclass as it is (its numpy arrays are not turned into tensors in the worker).
        collated = torch.utils.data.DataLoader(
            stream, batch_size=None, num_workers=spec.num_workers, prefetch_factor=4
        )
    for item in collated:
        yield item.batch()
