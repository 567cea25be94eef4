"""The training loader reading shards from a bucket through the cache vs from local disk.

Run from the repo root: ``.venv/bin/python benchmarks/bench_storage.py``. Writes
benchmarks/results/storage.md. Anchor: the same loader (same shards, seed, batch size and
workers) reading the shards from local disk. The bucket is moto's S3 server on 127.0.0.1
(started here, as the tests do), so "cold" measures the cache's own overhead (whole-shard
GETs, sha256 on arrival, prefetch) without a real network; "warm" is the second epoch,
every shard already in the cache. Runs are interleaved (local, cold, warm) so all three see
the same load on a shared machine; medians are reported.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_train import IMAGE_PX, SHARD_SIZE, TEXT_SEQ_LEN, bench_shards  # noqa: E402

import dalle_data.compat  # noqa: E402,F401
from dalle_data import locations  # noqa: E402
from dalle_data.model import loader  # noqa: E402
from dalle_data.model.loader import LoaderSpec  # noqa: E402
from dalle_data.model.shard_cache import CacheSpec  # noqa: E402
from dalle_data.model.train import load_shard_set  # noqa: E402
from tests.helpers.s3 import moto_server  # noqa: E402

from common import write_result  # noqa: E402


def epoch_rate(spec: LoaderSpec, epoch: int) -> float:
    """Samples/s of one epoch of ``spec`` (worker start-up included)."""
    start = time.perf_counter()
    n = sum(len(b.keys) for b in loader.batches(spec, epoch))
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp, moto_server() as s3:
        root = Path(tmp)
        shards_dir, _ = bench_shards(root, args.samples)
        url = f"s3://{s3.bucket()}/bench/shards"
        locations.put_tree(shards_dir, url)
        options = {
            "batch_size": args.batch_size,
            "image_size": IMAGE_PX,
            "text_seq_len": TEXT_SEQ_LEN,
            "num_workers": args.workers,
        }
        local = LoaderSpec(
            shards=load_shard_set([shards_dir], skip_corrupt=False).shards, **options
        )
        remote_shards = load_shard_set([url], skip_corrupt=False).shards
        shard_bytes = sum(s.bytes for s in remote_shards)
        epoch_rate(local, 0)  # untimed: imports, page cache
        rates: dict[str, list[float]] = {"local": [], "cold": [], "warm": []}
        for run in range(args.repeats):
            cache = CacheSpec(root / f"cache-{run}", max_bytes=2 * shard_bytes)
            remote = LoaderSpec(shards=remote_shards, cache=cache, **options)
            rates["local"].append(epoch_rate(local, 1))
            rates["cold"].append(epoch_rate(remote, 0))
            rates["warm"].append(epoch_rate(remote, 1))
    end_load = os.getloadavg()[0]
    med = {k: statistics.median(v) for k, v in rates.items()}
    rows = [
        f"| local disk (anchor) | {med['local']:.0f} | 1.00 | |",
        f"| bucket, first epoch (cold cache) | {med['cold']:.0f} | "
        f"**{med['cold'] / med['local']:.2f}** | "
        f"{min(c / r for c, r in zip(rates['cold'], rates['local'], strict=True)):.2f}-"
        f"{max(c / r for c, r in zip(rates['cold'], rates['local'], strict=True)):.2f} |",
        f"| bucket, second epoch (warm cache) | {med['warm']:.0f} | "
        f"**{med['warm'] / med['local']:.2f}** | "
        f"{min(w / r for w, r in zip(rates['warm'], rates['local'], strict=True)):.2f}-"
        f"{max(w / r for w, r in zip(rates['warm'], rates['local'], strict=True)):.2f} |",
    ]
    command = (
        f".venv/bin/python benchmarks/bench_storage.py --samples {args.samples} "
        f"--repeats {args.repeats} --batch-size {args.batch_size} --workers {args.workers}"
    )
    markdown = f"""### Training loader: shards from a bucket through the cache vs local disk

{args.samples} samples of 96 px JPEGs in {len(remote_shards)} shards of {SHARD_SIZE}
({shard_bytes / 2**20:.1f} MiB), cropped to {IMAGE_PX} px, batch {args.batch_size},
{args.workers} loader worker(s). The bucket is moto's S3 server on 127.0.0.1 (no real
network: the cold figure is the cache's own cost, whole-shard GETs, sha256 on arrival and
prefetch, not a cloud link's). Samples/s of one epoch, worker start-up included, median of
{args.repeats} interleaved runs (each cold run starts from an empty cache).

| source | samples/s | ratio to local | per-run ratios |
|---|---:|---:|---:|
{chr(10).join(rows)}

Goal: warm >= 0.9x local.
Command: `{command}` (2 CPUs shared with other work; load average {load:.2f} at the start,
{end_load:.2f} at the end).
"""
    write_result("storage", markdown)


if __name__ == "__main__":
    main()
