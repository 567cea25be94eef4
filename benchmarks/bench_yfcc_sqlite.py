"""YFCC100M as the public SQLite database: does ``dalle-data normalize`` stream it in bounded
memory, and how long would the real 100M-row, ~65 GB file take here?

Generates (once, cached under benchmarks/work/) a database with the public file's table and
23 columns, real-looking rows (URL-encoded titles and descriptions, tags, Flickr URLs,
licenses, ~1 % videos) and no index on ``photoid`` (the worst case: SQLite sorts in
temporary files). Runs ``dalle-data fetch`` + ``normalize`` as a subprocess, as the
Snakemake rule does, and measures wall time and peak RSS. Baseline in the same run: the same
rows as the 25-column TSV through the same command.

    .venv/bin/python benchmarks/bench_yfcc_sqlite.py                 # 2,000,000 rows
    .venv/bin/python benchmarks/bench_yfcc_sqlite.py --rows 100000   # a quick run
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from common import write_result

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "benchmarks" / "work"
FULL_ROWS = 99_206_564  # rows of yfcc100m_dataset (photos and videos)
FULL_BYTES = 65 * 10**9
COLUMNS = [
    "photoid", "uid", "unickname", "datetaken", "dateuploaded", "capturedevice", "title",
    "description", "usertags", "machinetags", "longitude", "latitude", "accuracy", "pageurl",
    "downloadurl", "licensename", "licenseurl", "serverid", "farmid", "secret",
    "secretoriginal", "ext", "marker",
]  # fmt: skip
WORDS = [
    "sunset", "beach", "city", "street", "tree", "river", "mountain", "dog", "cat", "car",
    "house", "garden", "flower", "sky", "old", "new", "red", "blue", "green", "wedding", "party",
    "family", "trip", "summer", "winter", "snow", "lake", "bridge", "church", "market", "night",
    "light", "portrait", "friends", "festival", "museum", "train", "station", "park", "road",
]  # fmt: skip
LICENSES = [
    ("Attribution-NonCommercial-ShareAlike License", "http://creativecommons.org/licenses/by-nc-sa/2.0/"),
    ("Attribution License", "http://creativecommons.org/licenses/by/2.0/"),
    ("Attribution-NonCommercial License", "http://creativecommons.org/licenses/by-nc/2.0/"),
    ("All Rights Reserved", ""),
]  # fmt: skip


def _text(rng: random.Random, low: int, high: int) -> str:
    words = rng.choices(WORDS, k=rng.randint(low, high))
    return "+".join(words).replace("beach", "%3Cb%3Ebeach%3C%2Fb%3E")


def _row(rng: random.Random, photoid: int) -> tuple:
    secret = f"{rng.getrandbits(40):010x}"
    farm = f"http://farm{rng.randint(1, 9)}.staticflickr.com/{rng.randint(1, 9999)}"
    lic, url = rng.choice(LICENSES)
    return (
        photoid, f"{rng.randint(1, 99999)}@N0{rng.randint(0, 8)}", "nick",
        "2010-06-01 12:00:00.0", "1275393600", "Canon+EOS+5D", _text(rng, 1, 6),
        _text(rng, 0, 25) if rng.random() < 0.6 else "", ",".join(rng.choices(WORDS, k=5)), "",
        f"{rng.uniform(-180, 180):.6f}", f"{rng.uniform(-90, 90):.6f}", 16,
        f"http://www.flickr.com/photos/nick/{photoid}/",
        f"{farm}/{photoid}_{secret}.jpg",
        lic, url, 1234, 2, secret, secret[::-1], "jpg", 1 if rng.random() < 0.01 else 0,
    )  # fmt: skip


def generate(rows: int) -> tuple[Path, Path]:
    """The database and the same rows as a TSV (photo ids shuffled, as insertion order)."""
    WORK.mkdir(parents=True, exist_ok=True)
    database, tsv = WORK / f"yfcc-{rows}.sql", WORK / f"yfcc-{rows}.tsv"
    if database.exists() and tsv.exists():
        return database, tsv
    rng = random.Random(0)
    ids = rng.sample(range(10**6, 10**10), rows)
    tmp, tsv_tmp = WORK / f"yfcc-{rows}.sql.tmp", WORK / f"yfcc-{rows}.tsv.tmp"
    tmp.unlink(missing_ok=True)
    db = sqlite3.connect(tmp)
    db.execute(f"CREATE TABLE yfcc100m_dataset ({', '.join(COLUMNS)})")
    with tsv_tmp.open("w") as out:
        for start in range(0, rows, 100_000):
            batch = [_row(rng, pid) for pid in ids[start : start + 100_000]]
            db.executemany(f"INSERT INTO yfcc100m_dataset VALUES ({', '.join('?' * 23)})", batch)
            for i, row in enumerate(batch, start):
                fields = [str(i), str(row[0]), "hash", *map(str, row[1:])]
                out.write("\t".join(fields) + "\n")
    db.commit()
    db.close()
    tmp.rename(database)
    tsv_tmp.rename(tsv)
    return database, tsv


def run(source: Path, out: Path) -> dict:
    """fetch + normalize in a child process; its wall time and peak RSS."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    dalle_data = [sys.executable, "-m", "dalle_data.cli"]
    subprocess.run(
        [*dalle_data, "fetch", "--source", str(source), "--raw-dir", str(out / "raw")],
        check=True, env=env, capture_output=True,
    )  # fmt: skip
    # A fresh parent per run: RUSAGE_CHILDREN's maxrss is the largest child it ever waited for.
    measure = (
        "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, "
        "capture_output=True); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    start = time.perf_counter()
    peak_kib = subprocess.run(
        [sys.executable, "-c", measure, *dalle_data, "normalize", "--format", "yfcc",
         "--raw-dir", str(out / "raw"), "--metadata-dir", str(out / "meta")],
        check=True, env=env, capture_output=True, text=True,
    ).stdout  # fmt: skip
    wall = time.perf_counter() - start
    record = json.loads((out / "meta" / "normalize.json").read_text())
    return {"wall": wall, "rss_gib": int(peak_kib) / 2**20, "record": record}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=2_000_000)
    args = parser.parse_args()
    start = time.perf_counter()
    database, tsv = generate(args.rows)
    print(f"generated {args.rows:,} rows in {time.perf_counter() - start:.0f} s", flush=True)
    results = {}
    for name, source in (("TSV", tsv), ("SQLite", database)):
        out = WORK / f"yfcc-run-{name}"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        results[name] = run(source, out)
    sql, text = results["SQLite"], results["TSV"]
    assert sql["record"]["output_rows"] == text["record"]["output_rows"]
    size = database.stat().st_size
    rate = args.rows / sql["wall"]
    full_hours = FULL_ROWS / rate / 3600
    lines = [
        "## YFCC100M as the public SQLite database (normalize)",
        "",
        f"{args.rows:,} generated rows ({size / 2**30:.2f} GiB database, no index on photoid: "
        "SQLite sorts in temporary files). `dalle-data normalize` as a subprocess; baseline: "
        "the same rows as the 25-column TSV in the same run.",
        "",
        "| source | wall | rows/s | peak RSS | rows kept |",
        "|---|---|---|---|---|",
    ]
    for name, result in results.items():
        lines.append(
            f"| {name} | {result['wall']:.1f} s | {args.rows / result['wall']:,.0f} | "
            f"{result['rss_gib']:.2f} GiB | {result['record']['output_rows']:,} |"
        )
    lines += [
        "",
        f"SQLite/TSV wall-time ratio: {sql['wall'] / text['wall']:.2f}. Extrapolated to the "
        f"real table ({FULL_ROWS:,} rows, ~{FULL_BYTES / 1e9:.0f} GB) at this rate: "
        f"~{full_hours:.1f} h on this machine; peak RSS does not grow with the table "
        f"(batches of 50,000 rows). Load average at the end: {os.getloadavg()[0]:.1f}.",
    ]
    write_result("yfcc_sqlite", "\n".join(lines))


if __name__ == "__main__":
    main()
