"""Memory benchmark: a 10M-row LAION-style parquet through the `table` format.

Generates (once, cached under benchmarks/work/) a parquet shaped like a LAION-2B part (URL,
TEXT, WIDTH, HEIGHT, LICENSE, NSFW, similarity, punsafe; 1M-row row groups), then runs
``dalle-data normalize --format table`` (keeping ``similarity`` in each sample's .json) and
``dalle-data filter --min-value similarity=0.3`` as subprocesses, measuring wall time and
peak RSS of each. The anchor, in the same run: img2dataset's own parquet reader, which
loads the file's needed columns whole (``pq.read_table(file, columns=...)``).

    .venv/bin/python benchmarks/bench_table.py                # 10,000,000 rows
    .venv/bin/python benchmarks/bench_table.py --rows 500000  # a quick run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from bench_metadata import WORDS, timed

from common import write_result

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "benchmarks" / "work"
ROWS = 10_000_000
ROW_GROUP = 1 << 20
COLUMNS = ["URL", "TEXT", "WIDTH", "HEIGHT", "LICENSE", "similarity"]


def generate(path: Path, rows: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    words = np.array(WORDS)
    pool = pa.array([" ".join(rng.choice(words, rng.integers(5, 35))) for _ in range(50_000)])
    tmp = path.with_suffix(".part")
    with pq.ParquetWriter(tmp, _schema()) as writer:
        for start in range(0, rows, ROW_GROUP):
            n = min(ROW_GROUP, rows - start)
            ids = np.arange(start, start + n)
            urls = [f"https://img{i % 97}.example.com/{i * 2654435761 % 2**32:x}.jpg" for i in ids]
            similarity = rng.normal(0.32, 0.04, n)
            writer.write_table(
                pa.table(
                    {
                        "SAMPLE_ID": ids,
                        "URL": urls,
                        "TEXT": pool.take(rng.integers(0, len(pool), n)),
                        "HEIGHT": rng.integers(64, 2048, n),
                        "WIDTH": rng.integers(64, 2048, n),
                        "LICENSE": pa.array(np.where(rng.random(n) < 0.9, "?", "cc-by")),
                        "NSFW": pa.array(np.where(rng.random(n) < 0.95, "UNLIKELY", "NSFW")),
                        "similarity": similarity,
                        "punsafe": rng.random(n),
                    },
                    schema=_schema(),
                )
            )
    os.replace(tmp, path)


def _schema() -> pa.Schema:
    return pa.schema(
        [
            ("SAMPLE_ID", pa.int64()),
            ("URL", pa.string()),
            ("TEXT", pa.string()),
            ("HEIGHT", pa.int64()),
            ("WIDTH", pa.int64()),
            ("LICENSE", pa.string()),
            ("NSFW", pa.string()),
            ("similarity", pa.float64()),
            ("punsafe", pa.float64()),
        ]
    )


def normalize_command(rows: int, name: str) -> list[str]:
    """Generate (cached) and fetch a source of ``rows`` rows; the normalize command for it."""
    WORK.mkdir(parents=True, exist_ok=True)
    source = WORK / f"laion-{rows}.parquet"
    if not source.exists():
        print(f"generating {source} ({rows} rows) ...", file=sys.stderr)
        generate(source, rows)
    out = WORK / "out-table" / name
    shutil.rmtree(out, ignore_errors=True)
    cli = str(Path(sys.executable).parent / "dalle-data")
    subprocess.run(
        [cli, "fetch", "--source", str(source), "--raw-dir", str(out / "raw")],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    command = [cli, "normalize", "--format", "table", "--raw-dir", str(out / "raw")]
    command += ["--metadata-dir", str(out / "metadata"), "--url-column", "URL"]
    command += ["--caption-column", "TEXT", "--width-column", "WIDTH", "--height-column"]
    command += ["HEIGHT", "--license-column", "LICENSE", "--keep-column", "similarity"]
    return command + ["--value-column", "similarity"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=ROWS)
    args = parser.parse_args()

    load = os.getloadavg()[0]
    # A tenth of the rows first (getrusage's peak only grows): the same memory shows that
    # it does not depend on the file's length.
    small_rows = args.rows // 10
    _, small_rss = timed(normalize_command(small_rows, "small"))
    norm_wall, norm_rss = timed(normalize_command(args.rows, "laion"))
    source = WORK / f"laion-{args.rows}.parquet"
    meta = WORK / "out-table" / "laion" / "metadata"
    cli = str(Path(sys.executable).parent / "dalle-data")
    filt_wall, filt_rss = timed(
        [cli, "filter", "--metadata-dir", str(meta), "--min-value", "similarity=0.3"]
    )
    # The anchor runs last: getrusage's peak covers every child so far.
    read_all = f"import pyarrow.parquet as pq; pq.read_table({str(source)!r}, columns={COLUMNS})"
    anchor_wall, anchor_rss = timed([sys.executable, "-c", read_all])
    record = json.loads((meta / "filter.json").read_text())
    command = ".venv/bin/python benchmarks/bench_table.py"
    if args.rows != ROWS:
        command += f" --rows {args.rows}"
    lines = [
        "### Table format: a LAION-style parquet, bounded memory",
        "",
        f"Source: {args.rows:,} rows, {source.stat().st_size / 1e9:.2f} GB parquet (LAION-2B "
        f"part columns, {ROW_GROUP:,}-row row groups); {record['output_rows']:,} rows reach "
        f"filtered.parquet (min_values similarity 0.3 dropped "
        f"{record['dropped']['min_values']:,}). Machine: {os.cpu_count()} cores.",
        "",
        "| run | wall (s) | peak RSS, process tree (GiB) | rows/s |",
        "|---|---:|---:|---:|",
        f"| anchor: img2dataset's reader, `pq.read_table` of the {len(COLUMNS)} columns | "
        f"{anchor_wall:.1f} | {anchor_rss:.2f} | {args.rows / anchor_wall:,.0f} |",
        f"| `dalle-data normalize --format table` (+ similarity kept as JSON) | {norm_wall:.1f} "
        f"| {norm_rss:.2f} | {args.rows / norm_wall:,.0f} |",
        f"| `dalle-data filter --min-value similarity=0.3` | {filt_wall:.1f} | {filt_rss:.2f} "
        f"| {args.rows / filt_wall:,.0f} |",
        f"| normalize of a tenth of the rows ({small_rows:,}) | | {small_rss:.2f} | |",
        f"| **normalize peak RSS / anchor** | | **{norm_rss / anchor_rss:.2f}** | |",
        "",
        f"Command: `{command}`. Measured: wall time of each subprocess and the peak resident "
        "memory of its process tree (/proc sampled every 0.2 s, and getrusage). normalize "
        "streams 65,536-row batches, so its memory is one row group's columns, not the file's; "
        f"load average of the machine when it started: {load:.2f}.",
        "",
    ]
    write_result("table", "\n".join(lines))


if __name__ == "__main__":
    main()
