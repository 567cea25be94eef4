"""Download throughput: `snakemake --cores 2 cc12m_shards` (all stages) vs plain img2dataset.

Both runs fetch the same N 640x480 JPEGs from a threaded server on 127.0.0.1 in this
process, in the same benchmark run. Plain img2dataset: 2 processes x 32 threads, 256 px,
keep_ratio, webdataset output. The pipeline: fetch + normalize + filter + plan + download
(2 processes x 32 threads) + finalize (copy jpg bytes, tokenize, shards, manifest, card) +
verify. images/s = images written / wall seconds of the whole command. Goal: ratio >= 0.85.

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


def pipeline(source_url: str, work: Path) -> tuple[float, int]:
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
    manifest = json.loads((work / "data" / "cc12m" / "shards" / "manifest.json").read_text())
    return seconds, manifest["counts"]["written"]


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
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "plain_run").mkdir()
        (work / "pipe_run").mkdir()
        plain_s, plain_n = plain_img2dataset(urls, work / "plain_run")
        pipe_s, pipe_n = pipeline(f"{base}/cc12m.tsv", work / "pipe_run")
    server.shutdown()
    plain_rate, pipe_rate = plain_n / plain_s, pipe_n / pipe_s
    ratio = pipe_rate / plain_rate
    command = f".venv/bin/python benchmarks/bench_download.py --images {args.images}"
    text = f"""### Download: `snakemake cc12m_shards` vs plain img2dataset

| run | images written | wall s | images/s |
|---|---:|---:|---:|
| plain img2dataset (2 x 32, 256 px, wds) | {plain_n} | {plain_s:.1f} | {plain_rate:.1f} |
| `snakemake --cores 2 cc12m_shards` (all stages) | {pipe_n} | {pipe_s:.1f} | {pipe_rate:.1f} |
| **ratio** (goal >= 0.85) | | | **{ratio:.2f}** |

Command: `{command}` ({os.cpu_count()} CPUs). {args.images} URLs of 640x480 JPEGs
({DISTINCT} distinct bodies) from a threaded server on 127.0.0.1 in the benchmark process,
same list for both runs, in one run. The pipeline time covers every stage (fetch, normalize,
filter, plan, download, finalize with tokenization, shards, manifest and card, verify with
re-tokenization); finalize copies img2dataset's JPEG bytes without decoding them again.
"""
    write_result("download", text)


if __name__ == "__main__":
    main()
