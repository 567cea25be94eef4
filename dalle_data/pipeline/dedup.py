"""Exact and near-duplicate images: a 64-bit perceptual hash and an index that finds every
pair within a Hamming distance without comparing all pairs.

The hash is imagehash's pHash (greyscale 32x32, 2-D DCT, the 8x8 lowest frequencies against
their median) computed on a reduced decode: Pillow's draft mode lets libjpeg decode a JPEG
at 1/2 to 1/8 scale (at least 64 px), Lanczos takes it to 32x32, and the DCT runs in
integers, so the bits depend only on the decoded pixels, never on a BLAS build.

The search is multi-index hashing. Pigeonhole: two 64-bit hashes at distance <= d, cut into
d + 1 bands, agree exactly on at least one band. So only pairs sharing a band value are
candidates (found by sorting on that band), and each candidate is checked with a popcount:
the work is the number of pairs sharing a band, about n**2 * (d + 1) / 2**(64 / (d + 1)) on
uniform hashes, instead of n**2 / 2.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dalle_data.formats.manifest import EVAL_SPLIT, TRAIN_SPLIT
from dalle_data.formats.webdataset import row_key

HASH_NAME = "phash-dct8-of-32x32-grey"
# Candidate pairs checked per numpy step: bounds memory (about 40 bytes a pair) whatever n.
PAIR_CHUNK = 1 << 22
_SIDE = 32
_LOW = 8


def _dct_rows() -> np.ndarray:
    """The first 8 rows of the 32-point DCT-II, scaled by 2**12 and rounded to integers."""
    k = np.arange(_LOW)[:, None]
    i = np.arange(_SIDE)[None, :]
    return np.rint(np.cos(np.pi * (2 * i + 1) * k / (2 * _SIDE)) * 4096).astype(np.int64)


_DCT = _dct_rows()


def perceptual_hash(image: bytes) -> int:
    """The 64-bit pHash of an encoded image (bit 63 = the lowest frequency)."""
    from PIL import Image

    with Image.open(io.BytesIO(image)) as im:
        im.draft("L", (2 * _SIDE, 2 * _SIDE))
        grey = im.convert("L").resize((_SIDE, _SIDE), Image.Resampling.LANCZOS)
    return phash_bits(np.asarray(grey, dtype=np.int64))


def phash_bits(pixels: np.ndarray) -> int:
    """pHash of 32x32 greyscale pixels: low DCT coefficients above their median, as bits."""
    coefficients = (_DCT @ pixels @ _DCT.T).ravel()
    bits = coefficients > np.median(coefficients)
    return int(np.packbits(bits).view(">u8")[0])


def sha64(sha256_hex: str) -> int:
    """The first 64 bits of a hex sha256: the hash of exact copies (same source bytes)."""
    return int(sha256_hex[:16], 16)


def bands(max_distance: int) -> list[tuple[int, int]]:
    """``(shift, width)`` of the ``max_distance + 1`` bands the 64 bits are cut into."""
    if not 0 <= max_distance < 64:
        raise ValueError(f"max_distance {max_distance} is out of range: use 0 to 63")
    count = max_distance + 1
    widths = [64 // count + (1 if i < 64 % count else 0) for i in range(count)]
    shifts = np.cumsum([0, *widths[:-1]]).tolist()
    return list(zip(shifts, widths, strict=True))


def _band(hashes: np.ndarray, shift: int, width: int) -> np.ndarray:
    mask = np.uint64((1 << width) - 1)
    return (hashes >> np.uint64(shift)) & mask


def _expand(firsts: np.ndarray, counts: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(source, target)`` pairs, source ``s`` paired with ``firsts[s] + 0 .. counts[s]-1``,
    in chunks of about PAIR_CHUNK pairs."""
    sources = np.flatnonzero(counts)
    if not sources.size:
        return
    ends = np.cumsum(counts[sources])
    start = 0
    while start < sources.size:
        base = ends[start - 1] if start else 0
        stop = max(int(np.searchsorted(ends, base + PAIR_CHUNK, side="right")), start + 1)
        block = sources[start:stop]
        n = counts[block]
        left = np.repeat(block, n)
        offsets = np.arange(left.size) - np.repeat(np.cumsum(n) - n, n)
        yield left, np.repeat(firsts[block], n) + offsets
        start = stop


def _dedupe(
    i: np.ndarray, j: np.ndarray, d: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs found through several bands, once each, sorted by (i, j)."""
    _, first = np.unique(i.astype(np.int64) * n + j, return_index=True)
    return (i[first], j[first], d[first])


def near_pairs(hashes: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair ``i < j`` with ``popcount(hashes[i] ^ hashes[j]) <= max_distance``:
    ``(i, j, distance)`` sorted by ``(i, j)``."""
    h = np.ascontiguousarray(hashes, dtype=np.uint64)
    a, b, distance = _band_join(h, h, max_distance, same=True)
    return _dedupe(np.minimum(a, b), np.maximum(a, b), distance, h.size)


def cross_pairs(
    queries: np.ndarray, reference: np.ndarray, max_distance: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every ``(query, reference)`` pair within ``max_distance``: ``(qi, ri, distance)``."""
    q = np.ascontiguousarray(queries, dtype=np.uint64)
    r = np.ascontiguousarray(reference, dtype=np.uint64)
    return _dedupe(*_band_join(q, r, max_distance, same=False), max(r.size, 1))


def _band_join(
    q: np.ndarray, r: np.ndarray, max_distance: int, *, same: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs ``(query, reference, distance)`` within ``max_distance`` that share a band,
    once per band they share. ``same`` (``q is r``): each unordered pair, not itself."""
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for shift, width in bands(max_distance):
        ref_key = _band(r, shift, width)
        order = np.argsort(ref_key, kind="stable")
        sorted_key, sorted_r = ref_key[order], r[order]
        if same:
            # Each sorted position pairs with the later members of its group only.
            source, lo = sorted_r, np.arange(1, r.size + 1)
            hi = np.searchsorted(sorted_key, sorted_key, side="right")
        else:
            query_key = _band(q, shift, width)
            source = q
            lo = np.searchsorted(sorted_key, query_key, side="left")
            hi = np.searchsorted(sorted_key, query_key, side="right")
        for left, right in _expand(lo, hi - lo):
            distance = np.bitwise_count(source[left] ^ sorted_r[right])
            near = distance <= max_distance
            query = order[left[near]] if same else left[near]
            found.append((query, order[right[near]], distance[near]))
    return _concat(found)


def _concat(
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not found:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0, dtype=np.uint8)
    return tuple(np.concatenate([f[k] for f in found]) for k in range(3))  # type: ignore[return-value]


@dataclass(frozen=True)
class Matches:
    """Per query position: the index of the element it duplicates (-1: none) and the distance."""

    index: np.ndarray
    distance: np.ndarray


def first_kept(hashes: np.ndarray, max_distance: int) -> Matches:
    """Greedy dedup of ``hashes`` in the order given: an element is dropped when it is within
    ``max_distance`` of an earlier element that was kept (the closest such, then the
    earliest); the kept elements hold no pair within the distance.

    Identical hashes are collapsed first, so a thousand copies of one picture cost one
    search, and only hashes with a near neighbour go through the sequential pass.
    """
    h = np.asarray(hashes, dtype=np.uint64)
    index = np.full(h.size, -1, dtype=np.int64)
    distance = np.zeros(h.size, dtype=np.uint8)
    if not h.size:
        return Matches(index, distance)
    unique, first, inverse = np.unique(h, return_index=True, return_inverse=True)
    inverse = inverse.ravel()
    index[:] = first[inverse]
    if max_distance > 0 and unique.size > 1:
        _near_unique(unique, first, inverse, max_distance, index, distance)
    index[index == np.arange(h.size)] = -1
    return Matches(index, distance)


def _near_unique(
    unique: np.ndarray,
    first: np.ndarray,
    inverse: np.ndarray,
    max_distance: int,
    index: np.ndarray,
    distance: np.ndarray,
) -> None:
    """The sequential part of :func:`first_kept`, over the unique hashes that have a near
    neighbour: each, at its first occurrence, is kept unless an earlier kept one is near;
    later copies of a dropped one take the closest kept one before them."""
    ui, uj, ud = near_pairs(unique, max_distance)
    a, b = np.concatenate([ui, uj]), np.concatenate([uj, ui])
    dist = np.concatenate([ud, ud])
    order = np.lexsort((first[b], dist, a))
    a, b, dist = a[order], b[order], dist[order]
    lo = np.searchsorted(a, np.arange(unique.size), side="left")
    hi = np.searchsorted(a, np.arange(unique.size), side="right")
    kept = np.ones(unique.size, dtype=bool)

    def closest(u: int, before: int) -> tuple[int, int] | None:
        """The closest (then earliest) kept neighbour of ``u`` first seen before ``before``."""
        for k in range(lo[u], hi[u]):
            v = int(b[k])
            if kept[v] and first[v] < before:
                return int(first[v]), int(dist[k])
        return None

    near = np.flatnonzero(hi > lo)
    for u in near[np.argsort(first[near])].tolist():
        match = closest(u, int(first[u]))
        if match is not None:
            kept[u] = False
            index[first[u]], distance[first[u]] = match
    copies = np.flatnonzero(~kept[inverse] & (np.arange(inverse.size) != first[inverse]))
    for position in copies.tolist():
        match = closest(int(inverse[position]), position)
        if match is not None:
            index[position], distance[position] = match


def nearest(queries: np.ndarray, reference: np.ndarray, max_distance: int) -> Matches:
    """Per query: the reference element within ``max_distance`` (closest, then earliest)."""
    qi, ri, dist = cross_pairs(queries, reference, max_distance)
    index = np.full(len(queries), -1, dtype=np.int64)
    distance = np.zeros(len(queries), dtype=np.uint8)
    if qi.size:
        order = np.lexsort((ri, dist, qi))
        qi, ri, dist = qi[order], ri[order], dist[order]
        best = np.r_[True, qi[1:] != qi[:-1]]
        index[qi[best]], distance[qi[best]] = ri[best], dist[best]
    return Matches(index, distance)


DUPLICATE_IMAGE = "duplicate_image"
EVAL_DUPLICATE = "eval_duplicate"


def duplicate_of(dataset: str) -> str:
    """The drop reason of a row whose image is in ``dataset`` (``dedup_against``)."""
    return f"duplicate_of_{dataset}"


def reasons(against: list[str], split: str) -> list[str]:
    """The duplicate reasons a split's manifest lists (zeros included)."""
    own = [DUPLICATE_IMAGE] if split == EVAL_SPLIT else [DUPLICATE_IMAGE, EVAL_DUPLICATE]
    return own + [duplicate_of(name) for name in against]


@dataclass(frozen=True)
class Images:
    """One dataset's images in key order: key (row id), split, pHash, first 64 bits of the
    sha256 of the source bytes, and (for the dataset being built) its download part."""

    dataset: str
    keys: np.ndarray
    is_eval: np.ndarray
    phash: np.ndarray
    sha64: np.ndarray
    part: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))
    # The dataset being built: one id per source image (its URL without a #fragment), shared
    # by the rows a folder dataset makes of one picture, one per caption line (empty = none).
    source: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.uint64))
    # Built datasets only: the folder and the manifest sha256 of each split.
    folders: dict[str, Path] = field(default_factory=dict)
    manifests: dict[str, str] = field(default_factory=dict)

    def hashes(self, max_distance: int | None) -> np.ndarray:
        return self.sha64 if max_distance is None else self.phash


@dataclass(frozen=True)
class Drop:
    """Why a row is not written: the sample its image matched and how closely."""

    reason: str
    matched_dataset: str
    matched_split: str
    matched_key: str
    distance: int
    exact: bool

    def columns(self) -> dict[str, object]:
        return {
            "matched_dataset": self.matched_dataset,
            "matched_split": self.matched_split,
            "matched_key": self.matched_key,
            "distance": self.distance,
            "exact": self.exact,
        }

    def failure(self) -> dict[str, object]:
        """The row's entry in failures.parquet."""
        kind = "exact copy" if self.exact else f"near duplicate (Hamming {self.distance})"
        where = f"{self.matched_dataset} {self.matched_split} key {self.matched_key}"
        return {"reason": self.reason, "error": f"{kind} of {where}", **self.columns()}


def decide(own: Images, references: list[Images], max_distance: int | None) -> dict[int, Drop]:
    """Which of ``own``'s rows are duplicates, by row id, in this order of precedence:

    1. ``duplicate_of_<name>``: the image is in a ``dedup_against`` dataset (either split);
    2. ``duplicate_image`` within the eval split (a later key repeating a kept earlier one);
    3. ``eval_duplicate``: a training row showing an image of the eval split (kept rows);
    4. ``duplicate_image`` within the training split.

    ``max_distance`` None compares exact copies only (same source sha256).
    """
    hashes = own.hashes(max_distance)
    distance = max_distance or 0
    alive = np.ones(own.keys.size, dtype=bool)
    drops: dict[int, Drop] = {}

    def drop(rows: np.ndarray, matches: Matches, reason: str, ref: Images) -> None:
        hit = matches.index >= 0
        for row, target, gap in zip(
            rows[hit].tolist(),
            matches.index[hit].tolist(),
            matches.distance[hit].tolist(),
            strict=True,
        ):
            drops[int(own.keys[row])] = Drop(
                reason=reason,
                matched_dataset=ref.dataset,
                matched_split=EVAL_SPLIT if ref.is_eval[target] else TRAIN_SPLIT,
                matched_key=row_key(int(ref.keys[target])),
                distance=int(gap),
                exact=bool(own.sha64[row] == ref.sha64[target]),
            )
        alive[rows[hit]] = False

    for ref in references:
        rows = np.flatnonzero(alive)
        drop(
            rows,
            nearest(hashes[rows], ref.hashes(max_distance), distance),
            duplicate_of(ref.dataset),
            ref,
        )
    eval_rows = np.flatnonzero(alive & own.is_eval)
    within = _other_sources(own, _positions(first_kept(hashes[eval_rows], distance), eval_rows))
    drop(eval_rows, within, DUPLICATE_IMAGE, own)
    kept_eval = eval_rows[within.index < 0]
    train_rows = np.flatnonzero(alive & ~own.is_eval)
    against_eval = nearest(hashes[train_rows], hashes[kept_eval], distance)
    drop(train_rows, _positions(against_eval, kept_eval), EVAL_DUPLICATE, own)
    train_rows = np.flatnonzero(alive & ~own.is_eval)
    within = _other_sources(own, _positions(first_kept(hashes[train_rows], distance), train_rows))
    drop(train_rows, within, DUPLICATE_IMAGE, own)
    return drops


def _other_sources(own: Images, matches: Matches) -> Matches:
    """Within a split, the rows of one source image (one per caption line) are not copies of
    each other; across splits they are (the eval_duplicate step keeps them apart)."""
    if own.source.size == 0:
        return matches
    hit = np.flatnonzero(matches.index >= 0)
    same = own.source[hit] == own.source[matches.index[hit]]
    index = matches.index.copy()
    index[hit[same]] = -1
    return Matches(index, matches.distance)


def _positions(matches: Matches, rows: np.ndarray) -> Matches:
    """Matches into a subset ``rows`` turned into matches into the whole table."""
    index = np.full(matches.index.size, -1, dtype=np.int64)
    hit = matches.index >= 0
    index[hit] = rows[matches.index[hit]]
    return Matches(index, matches.distance)


def read_images(dataset: str, folder: Path) -> Images:
    """A built dataset's images (training shards and eval split) from its index.parquet files."""
    import pyarrow.parquet as pq

    from dalle_data.errors import DalleDataError
    from dalle_data.hashing import sha256_file

    parts = []
    folders: dict[str, Path] = {}
    manifests: dict[str, str] = {}
    for split, sub in ((TRAIN_SPLIT, "shards"), (EVAL_SPLIT, "eval")):
        path = folder / sub / "index.parquet"
        try:
            table = pq.read_table(path)
        except FileNotFoundError:
            raise DalleDataError(
                f"{path} does not exist: build dataset {dataset!r} first (its shards and eval "
                "split), or remove it from dedup_against"
            ) from None
        recorded = (table.schema.metadata or {}).get(b"perceptual_hash", b"").decode()
        if recorded != HASH_NAME or "phash" not in table.column_names:
            raise DalleDataError(
                f"{path} holds no {HASH_NAME} hashes (it says {recorded or 'none'}): rebuild "
                f"dataset {dataset!r} with this version of dalle-data"
            )
        folders[split] = path.parent
        manifests[split] = sha256_file(path.parent / "manifest.json")
        parts.append(
            (
                table.column("row_id").to_numpy(),
                np.full(table.num_rows, split == EVAL_SPLIT),
                table.column("phash").to_numpy(),
                np.fromiter((sha64(s) for s in table.column("sha256").to_pylist()), np.uint64),
            )
        )
    keys, is_eval, phash, sha = (np.concatenate([p[k] for p in parts]) for k in range(4))
    order = np.argsort(keys, kind="stable")
    return Images(
        dataset=dataset,
        keys=keys[order],
        is_eval=is_eval[order],
        phash=phash[order].astype(np.uint64),
        sha64=sha[order],
        folders=folders,
        manifests=manifests,
    )
