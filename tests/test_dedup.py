"""Perceptual hash and multi-index near-duplicate search: equal to brute force, and robust to
re-encoding and slight resizes."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from dalle_data.formats.webdataset import row_key
from dalle_data.pipeline.dedup import (
    Images,
    bands,
    cross_pairs,
    decide,
    first_kept,
    near_pairs,
    nearest,
    perceptual_hash,
    phash_bits,
)


def photo(seed: int, size: tuple[int, int] = (160, 128)) -> Image.Image:
    """A photo-like picture: colour noise with a 1/f spectrum, like natural images."""
    rng = np.random.default_rng(seed)
    w, h = size
    f = np.hypot(np.fft.fftfreq(h)[:, None], np.fft.rfftfreq(w)[None, :])
    f[0, 0] = 1
    channels = []
    for _ in range(3):
        spectrum = (rng.normal(size=f.shape) + 1j * rng.normal(size=f.shape)) / f
        x = np.fft.irfft2(spectrum, s=(h, w))
        channels.append((x - x.mean()) / x.std())
    pixels = np.clip(np.stack(channels, -1) * 50 + 128, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def jpeg(image: Image.Image, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def planted(seed: int, n: int, copies: int, max_distance: int) -> np.ndarray:
    """Uniform 64-bit hashes, ``copies`` of them replaced by near copies of others."""
    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, 2**64, n, dtype=np.uint64)
    for _ in range(copies):
        src, dst = rng.integers(0, n, 2)
        flips = rng.choice(64, size=rng.integers(0, max_distance + 2), replace=False)
        hashes[dst] = hashes[src] ^ np.bitwise_or.reduce(np.uint64(1) << flips.astype(np.uint64))
    return hashes


def distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.bitwise_count(a[:, None] ^ b[None, :])


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(0, 300),
    copies=st.integers(0, 60),
    max_distance=st.integers(0, 8),
)
def test_near_pairs_and_greedy_equal_brute_force(
    seed: int, n: int, copies: int, max_distance: int
) -> None:
    hashes = planted(seed, n, copies if n else 0, max_distance)
    d = distances(hashes, hashes)
    i, j = np.nonzero(np.triu(d <= max_distance, 1))
    found_i, found_j, found_d = near_pairs(hashes, max_distance)
    assert found_i.tolist() == i.tolist() and found_j.tolist() == j.tolist()
    assert found_d.tolist() == d[i, j].tolist()

    kept: list[int] = []
    expected = []
    for x in range(n):
        earlier = [y for y in kept if d[x, y] <= max_distance]
        expected.append(min(earlier, key=lambda y: (d[x, y], y)) if earlier else -1)
        if not earlier:
            kept.append(x)
    assert first_kept(hashes, max_distance).index.tolist() == expected


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(0, 200), max_distance=st.integers(0, 8))
def test_cross_pairs_and_nearest_equal_brute_force(seed: int, n: int, max_distance: int) -> None:
    both = planted(seed, 2 * n, n, max_distance)
    queries, reference = both[:n], both[n:]
    d = distances(queries, reference)
    qi, ri = np.nonzero(d <= max_distance)
    found_q, found_r, _ = cross_pairs(queries, reference, max_distance)
    found = sorted(zip(found_q.tolist(), found_r.tolist(), strict=True))
    assert found == sorted(zip(qi.tolist(), ri.tolist(), strict=True))
    best = nearest(queries, reference, max_distance)
    for q in range(n):
        hits = np.flatnonzero(d[q] <= max_distance)
        want = min(hits.tolist(), key=lambda r: (d[q, r], r)) if hits.size else -1
        assert best.index[q] == want


def test_bands_cover_every_bit_once() -> None:
    for max_distance in range(16):
        cut = bands(max_distance)
        assert len(cut) == max_distance + 1
        assert sum(width for _, width in cut) == 64
        assert [shift for shift, _ in cut] == np.cumsum([0] + [w for _, w in cut[:-1]]).tolist()
    with pytest.raises(ValueError, match="out of range"):
        bands(64)


def test_phash_is_imagehash_phash_of_the_reduced_image() -> None:
    imagehash = pytest.importorskip("imagehash")
    for seed in range(20):
        grey = photo(seed).convert("L").resize((32, 32), Image.Resampling.LANCZOS)
        ours = phash_bits(np.asarray(grey, dtype=np.int64))
        assert ours == int(str(imagehash.phash(grey)), 16)


def test_phash_survives_reencoding_and_slight_resizes_but_tells_pictures_apart() -> None:
    pictures = [photo(seed) for seed in range(12)]
    hashes = np.array([perceptual_hash(jpeg(p)) for p in pictures], dtype=np.uint64)
    for picture, h in zip(pictures, hashes.tolist(), strict=True):
        w, ht = picture.size
        variants = [
            jpeg(picture, quality=50),
            jpeg(picture.resize((w * 9 // 10, ht * 9 // 10), Image.Resampling.BICUBIC), 80),
            jpeg(picture.resize((w * 5 // 4, ht * 5 // 4), Image.Resampling.BICUBIC), 80),
        ]
        for variant in variants:
            assert int(np.bitwise_count(np.uint64(perceptual_hash(variant) ^ h))) <= 3
    d = distances(hashes, hashes)
    assert d[np.triu_indices(len(hashes), 1)].min() > 10


def test_caption_lines_of_one_picture_stay_within_a_split_but_not_across_splits() -> None:
    """A folder dataset lists a picture once per caption line: within a split those rows
    are one source image, not copies; a training row of an eval picture is still dropped."""
    same, other = 0x0F0F, 0xF0F0
    own = Images(
        dataset="photos",
        keys=np.array([1, 2, 3, 4, 5], dtype=np.int64),
        is_eval=np.array([False, False, False, True, False]),
        phash=np.array([same, same, same, other, other], dtype=np.uint64),
        sha64=np.array([7, 7, 7, 9, 9], dtype=np.uint64),
        source=np.array([100, 100, 200, 300, 300], dtype=np.uint64),
    )
    drops = decide(own, [], 0)
    # 2 shares 1's source: kept; 3 is the same picture from another file: a duplicate;
    # 5 shares the eval row 4's source, but a training row must not show an eval picture.
    assert {key: drop.reason for key, drop in drops.items()} == {
        3: "duplicate_image",
        5: "eval_duplicate",
    }
    assert drops[3].matched_key == row_key(1)
