"""Download throughput: `snakemake --cores 2 cc12m_shards` (all stages) vs plain img2dataset.

Both runs fetch the same N 640x480 JPEGs from a threaded server on 127.0.0.1 in this
process, in the same benchmark run. Plain img2dataset: 2 processes x 32 threads, 256 px,
keep_ratio, webdataset output. The pipeline: fetch + normalize + filter + plan + download
(2 processes x 32 threads) + finalize (copy jpg bytes, tokenize, shards, manifest, card) +
verify. images/s = images finalized / wall seconds of the whole command. Goal: ratio >= 0.85.
The N URLs serve 64 distinct bodies, so finalize drops all but 64 as duplicate_image (each
one downloaded, hashed and compared all the same): images finalized = written + duplicates,
in the training shards and the eval split. The perceptual hashing's own cost (a reduced
JPEG decode per image) comes from finalize's build.json.
Plain img2dataset runs before and after the pipeline and its rate is the mean of the two,
so a change in the machine's load during the run weighs on both sides alike. The per-stage
table comes from the `benchmark:` files Snakemake writes for each rule.

Run from the repo root: .venv/bin/python benchmarks/bench_download.py [--images 6000]
"""

from __future__ import annotations

import argparse
import http.server
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from common import write_result

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DISTINCT = 64  # distinct JPEG bodies, served under N distinct URLs


def jpegs() -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(DISTINCT):
        base = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
        image = Image.fromarray(base).resize((640, 480), Image.BILINEAR)
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def serve(bodies: dict[str, bytes]) -> http.server.ThreadingHTTPServer:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            body = bodies.get(self.path)
            self.send_response(200 if body is not None else 404)
            body = body if body is not None else b"not found"
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def plain_img2dataset(urls: list[str], work: Path) -> tuple[float, int]:
    table = pa.table({"url": urls, "caption": [f"photo {i}" for i in range(len(urls))]})
    pq.write_table(table, work / "urls.parquet")
    code = (
        "import img2dataset; img2dataset.download(url_list='urls.parquet', input_format='parquet',"
        " url_col='url', caption_col='caption', output_folder='plain', output_format='webdataset',"
        " image_size=256, resize_mode='keep_ratio', processes_count=2, thread_count=32,"
        f" number_sample_per_shard={max(1, -(-len(urls) // 2))}, enable_wandb=False)"
    )
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=work, check=True, capture_output=True)
    seconds = time.perf_counter() - start
    written = sum(pq.read_metadata(p).num_rows for p in (work / "plain").glob("*.parquet"))
    ok = sum(
        pq.read_table(p, columns=["status"]).column("status").to_pylist().count("success")
        for p in (work / "plain").glob("*.parquet")
    )
    assert written == len(urls)
    return seconds, ok


def pipeline(
    source_url: str, work: Path
) -> tuple[float, int, dict[str, tuple[float, float, float]], dict[str, float]]:
    extra = work / "extra.yaml"
    extra.write_text(
        f"output_dir: {work / 'data'}\n"
        "download:\n  processes: 2\n  thread_count: 32\n  rows_per_part: 100000\n"
        f"datasets:\n  cc12m:\n    format: cc12m\n    source: {source_url}\n"
    )
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "WANDB_MODE": "disabled"}
    command = [str(BIN / "snakemake"), "--cores", "2", "cc12m_shards", "--configfile", str(extra)]
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"snakemake failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    ds_dir = work / "data" / "cc12m"
    finalized = 0
    for split in ("shards", "eval"):
        counts = json.loads((ds_dir / split / "manifest.json").read_text())["counts"]
        duplicates = (n for k, n in counts["dropped"].items() if "duplicate" in k)
        finalized += counts["written"] + sum(duplicates)
    record = json.loads((ds_dir / "shards" / "build.json").read_text())
    return seconds, finalized, stage_seconds(ds_dir), record


def import_seconds(module: str) -> float:
    """Wall seconds a fresh interpreter takes to import ``module``, less its own start-up."""

    def run(code: str) -> float:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
        return time.perf_counter() - start

    return run(f"import {module}") - run("pass")


def stage_seconds(ds_dir: Path) -> dict[str, tuple[float, float, float]]:
    """Per rule: wall and CPU seconds of its command and when it ended (Snakemake's
    benchmark TSVs, each written as its rule ends), in the order the rules ended."""
    stages = {}
    for path in sorted((ds_dir / "benchmarks").rglob("*.tsv"), key=lambda p: p.stat().st_mtime):
        header, values = path.read_text().splitlines()[:2]
        row = dict(zip(header.split("\t"), values.split("\t"), strict=True))
        cpu = float(row["cpu_time"]) if row["cpu_time"] not in ("", "NA", "-") else float("nan")
        name = path.relative_to(ds_dir / "benchmarks").with_suffix("").as_posix()
        stages[name] = (float(row["s"]), cpu, path.stat().st_mtime)
    return stages


def busy_seconds(stages: dict[str, tuple[float, float, float]]) -> float:
    """Seconds during which at least one rule ran (card and verify run side by side)."""
    spans = sorted((end - wall, end) for wall, _, end in stages.values())
    busy, reach = 0.0, float("-inf")
    for start, end in spans:
        if end > reach:
            busy += end - max(start, reach)
            reach = end
    return busy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=6000)
    args = parser.parse_args()
    distinct = jpegs()
    bodies = {f"/img/{i}.jpg": distinct[i % DISTINCT] for i in range(args.images)}
    server = serve(bodies)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    urls = [base + path for path in bodies]
    bodies["/cc12m.tsv"] = "".join(f"{u}\tphoto number {i}\n" for i, u in enumerate(urls)).encode()
    loads = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in ("plain_before", "pipe_run", "plain_after"):
            (work / name).mkdir()
        before_s, plain_n = plain_img2dataset(urls, work / "plain_before")
        pipe_s, pipe_n, stages, record = pipeline(f"{base}/cc12m.tsv", work / "pipe_run")
        after_s, after_n = plain_img2dataset(urls, work / "plain_after")
    server.shutdown()
    loads.append(os.getloadavg()[0])
    # What the Snakefile imports of dalle_data at every start (config and the train rule's
    # lineage name; torch-free since naming.py).
    snakefile_import = import_seconds("dalle_data.config, dalle_data.model.output_name")
    plain_s = (before_s + after_s) / 2
    plain_rate, pipe_rate = (plain_n / before_s + after_n / after_s) / 2, pipe_n / pipe_s
    ratio = pipe_rate / plain_rate
    command = f".venv/bin/python benchmarks/bench_download.py --images {args.images}"
    rules = busy_seconds(stages)
    not_download = pipe_s - sum(
        w for name, (w, _, _) in stages.items() if name.startswith("download/")
    )
    before_rate = plain_n / before_s
    stage_rows = "\n".join(
        f"| {name} | {wall:.2f} | {cpu:.2f} |" for name, (wall, cpu, _) in stages.items()
    )
    summary = [
        (
            "Snakemake itself (start-up, DAG, job bookkeeping): total - time any rule ran",
            pipe_s - rules,
        ),
        (
            "of which: the Snakefile's dalle_data imports (config, model.output_name), timed alone",
            snakefile_import,
        ),
        ("everything but the download: total - download rules", not_download),
        (
            f"of which: perceptual hashing in finalize ({record['hashed_images']} images, "
            f"{1000 * record['hash_seconds'] / max(record['hashed_images'], 1):.2f} ms each: "
            "draft-mode JPEG decode to >= 64 px, 32x32 pHash)",
            record["hash_seconds"],
        ),
        ("of which: duplicate search (multi-index, all images)", record["dedup_search_seconds"]),
        ("for comparison: plain img2dataset, mean of both runs", plain_s),
    ]
    summary_rows = "\n".join(f"| {label} | {seconds:.2f} | |" for label, seconds in summary)
    text = f"""### Download: `snakemake cc12m_shards` vs plain img2dataset

| run | images written (pipeline: finalized) | wall s | images/s |
|---|---:|---:|---:|
| plain img2dataset (2 x 32, 256 px, wds), before | {plain_n} | {before_s:.1f} | {before_rate:.1f} |
| plain img2dataset, after | {after_n} | {after_s:.1f} | {after_n / after_s:.1f} |
| `snakemake --cores 2 cc12m_shards` (all stages) | {pipe_n} | {pipe_s:.1f} | {pipe_rate:.1f} |
| **ratio** to the mean plain rate (goal >= 0.85) | | | **{ratio:.2f}** |

Where the pipeline's time goes (each rule's command, from Snakemake's `benchmark:` files):

| stage | wall s | CPU s |
|---|---:|---:|
{stage_rows}
{summary_rows}

Command: `{command}` ({os.cpu_count()} CPUs; load average {loads[0]:.2f} at the start,
{loads[1]:.2f} at the end: other work on the machine inflates every number). {args.images}
URLs of 640x480 JPEGs ({DISTINCT} distinct bodies) from a threaded server on 127.0.0.1 in
the benchmark process, same list for every run, in one run: plain img2dataset before and
after the pipeline, its rate the mean of the two. The pipeline time covers every stage
(fetch, normalize, filter, plan, download, finalize with tokenization, shards, manifest and
card, verify with re-tokenization); finalize copies img2dataset's JPEG bytes and decodes
each once more, at reduced scale, only for its perceptual hash; card and verify run side by
side.

The download rule runs the same img2dataset call with three differences that make it
faster than plain img2dataset (dalle_data/download.py, dalle_data/compat.py): its
processes (runner, logger, workers) start without torch, which webdataset imports when it
can, and without wandb, which img2dataset imports even with enable_wandb=False (about 3 s
of start-up each, four processes on two cores); glibc's malloc keeps the decoded images'
buffers in the heap instead of an mmap/munmap pair each (a third to a half of the system time); and
albumentations does not look for updates online at import, which plain img2dataset does in
each process.
"""
    write_result("download", text)


if __name__ == "__main__":
    main()
