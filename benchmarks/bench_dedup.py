"""Near-duplicate search at scale: multi-index hashing vs all pairs, and the hash's decode.

Search: N uniform 64-bit hashes with 1% of them replaced by planted near copies of others
(1 to max_distance bits flipped). dalle_data.pipeline.dedup.near_pairs must report every
planted pair and no pair farther apart than the distance (that it finds exactly the pairs
all-pairs finds is the property test in tests/test_dedup.py). Goal: N = 2,000,000 in
<= 60 s and <= 2 GiB peak (resident memory of this process, ru_maxrss) on 2 cores. Anchor:
an all-pairs numpy scan (XOR + popcount, blockwise) on a 10,000-hash sample of the same data,
scaled by (N / 10,000)**2, the cost the index avoids.

Hash: 256 px JPEGs (what img2dataset stores at image_size 256) hashed per image with the
reduced decode (Pillow draft mode) vs a full decode; one process.

Run from the repo root: .venv/bin/python benchmarks/bench_dedup.py [--hashes 2000000]
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dalle_data.pipeline.dedup import first_kept, near_pairs, perceptual_hash, phash_bits  # noqa: E402

from common import write_result  # noqa: E402

SAMPLE = 10_000


def planted(n: int, fraction: float, max_distance: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, 2**64, n, dtype=np.uint64)
    count = int(n * fraction)
    targets = rng.choice(n, size=2 * count, replace=False)
    src, dst = targets[:count], targets[count:]
    flips = np.zeros(count, dtype=np.uint64)
    bits = rng.integers(1, max_distance + 1, count)
    for k in range(max_distance):
        position = rng.integers(0, 64, count).astype(np.uint64)
        flips ^= np.where(k < bits, np.uint64(1) << position, np.uint64(0))
    hashes[dst] = hashes[src] ^ flips
    return hashes, np.minimum(src, dst), np.maximum(src, dst)


def all_pairs_seconds(hashes: np.ndarray, max_distance: int) -> float:
    start = time.perf_counter()
    block = 1024
    found = 0
    for i in range(0, hashes.size, block):
        d = np.bitwise_count(hashes[i : i + block, None] ^ hashes[None, :])
        found += int((d <= max_distance).sum())
    return time.perf_counter() - start


def decode_costs(count: int) -> tuple[float, float]:
    """ms per image: pHash from a draft-mode decode, and from a full decode."""
    rng = np.random.default_rng(1)
    jpegs = []
    for _ in range(count):
        base = rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)
        image = Image.fromarray(base).resize((256, 256), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=95)
        jpegs.append(buf.getvalue())

    def full(data: bytes) -> int:
        with Image.open(io.BytesIO(data)) as im:
            grey = im.convert("L").resize((32, 32), Image.Resampling.LANCZOS)
        return phash_bits(np.asarray(grey, dtype=np.int64))

    timings = []
    for fn in (perceptual_hash, full):
        start = time.perf_counter()
        for data in jpegs:
            fn(data)
        timings.append(1000 * (time.perf_counter() - start) / count)
    return timings[0], timings[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hashes", type=int, default=2_000_000)
    parser.add_argument("--max-distance", type=int, default=3)
    parser.add_argument("--images", type=int, default=2000)
    args = parser.parse_args()
    load_start = os.getloadavg()[0]
    hashes, src, dst = planted(args.hashes, 0.01, args.max_distance)
    start = time.perf_counter()
    i, j, d = near_pairs(hashes, args.max_distance)
    search_s = time.perf_counter() - start
    start = time.perf_counter()
    kept = first_kept(hashes, args.max_distance)
    greedy_s = time.perf_counter() - start
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    found = set(zip(i.tolist(), j.tolist(), strict=True))
    planted_pairs = set(zip(src.tolist(), dst.tolist(), strict=True))
    missing = len(planted_pairs - found)
    wrong = int((np.bitwise_count(hashes[i] ^ hashes[j]) > args.max_distance).sum())
    if missing or wrong:
        raise SystemExit(f"{missing} planted pairs missed, {wrong} reported pairs too far apart")
    sample_s = all_pairs_seconds(hashes[:SAMPLE], args.max_distance)
    all_pairs_s = sample_s * (args.hashes / SAMPLE) ** 2
    draft_ms, full_ms = decode_costs(args.images)
    load_end = os.getloadavg()[0]
    dropped = int((kept.index >= 0).sum())
    n, d = f"{args.hashes:,}", args.max_distance
    rows = [
        (f"`near_pairs`, max_distance {d} ({d + 1} bands)", n, f"{search_s:.1f}"),
        ("`first_kept` (greedy dedup in key order, with its own search)", n, f"{greedy_s:.1f}"),
        ("all pairs (numpy XOR + popcount), sample, timed", f"{SAMPLE:,}", f"{sample_s:.1f}"),
        (f"all pairs scaled to N (x (N / {SAMPLE:,})^2)", n, f"{all_pairs_s:,.0f}"),
        ("**ratio** all pairs / multi-index", "", f"**{all_pairs_s / search_s:,.0f}**"),
    ]
    table = "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows)
    text = f"""### Near-duplicate search: multi-index hashing vs all pairs

| step | hashes | seconds |
|---|---:|---:|
{table}

Planted: {len(planted_pairs):,} near copies (1% of N, 1 to {args.max_distance} bits
flipped); found {len(found):,} pairs within distance {args.max_distance}: every planted
pair, none farther apart than the distance. `first_kept` dropped {dropped:,}. Peak memory
of the process (ru_maxrss, hashes and index included): {peak_gib:.2f} GiB
(goal: <= 60 s and <= 2 GiB for 2M hashes on 2 cores). The search is one process.

Hashing cost per image (256 x 256 JPEG, quality 95, one process, {args.images} images):
reduced decode (draft mode, >= 64 px) + pHash {draft_ms:.2f} ms; full decode + pHash
{full_ms:.2f} ms. The download workers hash each image as they write it (finalize
only hashes parts downloaded before they did, in parallel processes over the parts).

Command: `.venv/bin/python benchmarks/bench_dedup.py --hashes {args.hashes}` ({os.cpu_count()}
CPUs; load average {load_start:.2f} at the start, {load_end:.2f} at the end: other work on
the machine inflates every number).
"""
    write_result("dedup", text)


if __name__ == "__main__":
    main()
