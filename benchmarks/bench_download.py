"""Download throughput: `snakemake --cores 2 cc12m_shards` (all stages) vs plain img2dataset.

Two image sets, each served under N distinct URLs by a threaded server on 127.0.0.1 in this
process: N 640x480 JPEGs (64 distinct bodies), and M large photos like cc12m's (1600x1200 to
2400x1600, 1/f-spectrum colour fields at quality 90: 128 distinct bodies). Plain
img2dataset: 2 processes x 32 threads, 256 px, keep_ratio, webdataset output. The pipeline:
fetch + normalize + filter + plan + download (2 processes x 32 threads) + finalize (copy jpg
bytes, tokenize, shards, manifest, card) + verify. images/s = images written / wall seconds
of the whole command; a second pipeline run with `stage_server: false` starts every stage
as a process of its own. Goals (issue 20): ratio >= 1.0 on the 640x480 set, >= 2.0 on the
photos. Plain img2dataset runs before and after the pipeline and its rate is the mean of the
two, so a change in the machine's load during the run weighs on both sides alike. The
per-stage table comes from the `benchmark:` files Snakemake writes for each rule.

The floor: a tight loop over the same N bodies in 2 processes that only decodes (DCT-scaled
when the JPEG is at least twice the target), resizes (area) and encodes (quality 95) with
OpenCV, the fastest path here, timed right before and after each pipeline run; the
pipeline's rate is reported as a fraction of its mean rate (goal >= 0.6; both use the same
2 cores, so the fraction is also per core). Quality: PSNR of every
stored image against a full decode + area resize of its source (img2dataset's own resize
without the JPEG encode), for the pipeline and, for scale, plain img2dataset.

A third pipeline run sends 10% of the URLs to a second host (127.0.0.2) that answers 429
with `Retry-After: R` to every request in the R seconds after its first one: those rows
come in a retry round, and the run's time is set against the bound those waits impose.

Run from the repo root:
.venv/bin/python benchmarks/bench_download.py [--images 6000] [--photos 2000] [--retry-after 20]
"""

from __future__ import annotations

import argparse
import http.server
import io
import json
import multiprocessing
import os
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from common import write_result

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DISTINCT = 64  # distinct JPEG bodies, served under N distinct URLs
PHOTO_SIZES = [(1600, 1200), (2048, 1536), (1200, 1600), (2400, 1600)]
IMAGE_SIZE = 256
# albumentations looks for a newer version online at import unless told not to; offline,
# that waits about 3 s for a timeout in every process. Plain img2dataset (a child of this
# process) is spared it, as it would be on a machine with a network.
os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"


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


def photos(n: int = 128) -> list[bytes]:
    """``n`` large photo-like JPEGs: 1/f-spectrum colour fields (natural images' statistics)."""
    rng = np.random.default_rng(1)
    out = []
    for i in range(n):
        w, h = PHOTO_SIZES[i % len(PHOTO_SIZES)]
        img = np.zeros((h, w, 3), np.float32)
        for octave in range(1, 10):
            cells = 2**octave
            field = rng.normal(size=(cells + 1, cells + 1, 3)).astype(np.float32)
            img += cv2.resize(field, (w, h), interpolation=cv2.INTER_CUBIC) * (96 / 2**octave)
        img = np.clip(img * 1.5 + 128, 0, 255).astype(np.uint8)
        out.append(cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes())
    return out


_FLOOR_BODIES: list[bytes] = []


def _floor_init(bodies: list[bytes]) -> None:
    _FLOOR_BODIES[:] = bodies
    cv2.setNumThreads(1)


def _floor_chunk(indices: list[int]) -> int:
    """Decode (DCT-scaled where it can be), area-resize and encode bodies; the count done."""
    reduced = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4}
    reduced[8] = cv2.IMREAD_REDUCED_COLOR_8
    done = 0
    for i in indices:
        body = _FLOOR_BODIES[i % len(_FLOOR_BODIES)]
        with Image.open(io.BytesIO(body)) as header:
            width, height = header.size
        scale = next((s for s in (8, 4, 2) if -(-min(width, height) // s) > IMAGE_SIZE), 1)
        buf = np.frombuffer(body, np.uint8)
        flags = reduced[scale] | cv2.IMREAD_IGNORE_ORIENTATION if scale > 1 else cv2.IMREAD_COLOR
        img = cv2.imdecode(buf, flags)
        h, w = img.shape[:2]
        f = IMAGE_SIZE / min(h, w)
        img = cv2.resize(img, (round(w * f), round(h * f)), interpolation=cv2.INTER_AREA)
        done += len(cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])[1]) > 0
    return done


def floor_rate(distinct: list[bytes], n: int, processes: int = 2) -> tuple[float, int]:
    """Seconds and images of the tight decode + resize + encode loop over the ``n`` URLs' bodies.

    Spawned workers (a fork of this threaded, OpenCV-using process can deadlock) get the
    distinct bodies once, before the clock starts; each then works through its share.
    """
    context = multiprocessing.get_context("spawn")
    with context.Pool(processes, initializer=_floor_init, initargs=(distinct,)) as pool:
        pool.map(_floor_chunk, [[0]] * processes)  # workers up and warm
        start = time.perf_counter()
        done = sum(pool.map(_floor_chunk, [list(range(i, n, processes)) for i in range(processes)]))
        seconds = time.perf_counter() - start
    return seconds, done


def reference(body: bytes) -> np.ndarray:
    """Full decode + area resize to a 256 px shorter side: img2dataset's resize, unencoded."""
    import albumentations as A

    img = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_UNCHANGED)
    resize = A.SmallestMaxSize(max_size=IMAGE_SIZE, interpolation=cv2.INTER_AREA, p=1.0)
    return resize(image=img)["image"]


def psnr_of_tars(
    tars: list[Path], bodies: dict[str, bytes], base: str
) -> tuple[float, float, dict[str, bytes]]:
    """Minimum and mean PSNR (dB) of every stored .jpg against ``reference`` of its source,
    and the stored .jpg bytes by URL."""
    refs: dict[int, np.ndarray] = {}
    values = []
    stored = {}
    for path in tars:
        with tarfile.open(path) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for name, member in members.items():
                if not name.endswith(".json"):
                    continue
                url = json.loads(tar.extractfile(member).read())["url"]  # type: ignore[union-attr]
                jpg = tar.extractfile(members[name[: -len(".json")] + ".jpg"]).read()  # type: ignore[union-attr]
                stored[url] = jpg
                body = bodies[url.removeprefix(base)]
                ref = refs.setdefault(id(body), reference(body))
                ours = cv2.imdecode(np.frombuffer(jpg, np.uint8), cv2.IMREAD_UNCHANGED)
                mse = float(np.mean((ours.astype(np.float64) - ref) ** 2))
                values.append(10 * np.log10(255**2 / mse) if mse else float("inf"))
    return min(values), float(np.mean(values)), stored


# Each timed run follows the same command on this many URLs, untimed: this VM reclaims idle
# file pages within minutes, and a cold start reads the code back from a shared disk.
WARM_URLS = 32


def serve(
    bodies: dict[str, bytes], host: str = "127.0.0.1", refuse_for: float = 0
) -> http.server.ThreadingHTTPServer:
    """Serve ``bodies``; with ``refuse_for``, answer 429 (Retry-After: what is left) to every
    request in the ``refuse_for`` seconds after the first one."""
    first: list[float] = []
    lock = threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            with lock:
                first[:] = first or [time.time()]
                left = first[0] + refuse_for - time.time()
            if left > 0:
                self.send_response(429)
                self.send_header("Retry-After", str(int(left) + 1))
                body = b"slow down"
            else:
                body = bodies.get(self.path)
                self.send_response(200 if body is not None else 404)
                body = body if body is not None else b"not found"
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = http.server.ThreadingHTTPServer((host, 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def tsv(urls: list[str]) -> bytes:
    """A cc12m-format metadata file of ``urls``."""
    return "".join(f"{u}\tphoto number {i}\n" for i, u in enumerate(urls)).encode()


def run_timed(
    command: list[str], **kwargs: Any
) -> tuple[subprocess.CompletedProcess, float, float]:
    """``command``'s wall seconds, and the CPU seconds this process spent meanwhile: its image
    server's threads, which share the machine's cores with the command."""
    cpu, start = time.process_time(), time.perf_counter()
    proc = subprocess.run(command, **kwargs)
    return proc, time.perf_counter() - start, time.process_time() - cpu


def plain_img2dataset(urls: list[str], work: Path) -> tuple[float, int, float]:
    table = pa.table({"url": urls, "caption": [f"photo {i}" for i in range(len(urls))]})
    pq.write_table(table, work / "urls.parquet")
    code = (
        "import img2dataset; img2dataset.download(url_list='urls.parquet', input_format='parquet',"
        " url_col='url', caption_col='caption', output_folder='plain', output_format='webdataset',"
        " image_size=256, resize_mode='keep_ratio', processes_count=2, thread_count=32,"
        f" number_sample_per_shard={max(1, -(-len(urls) // 2))}, enable_wandb=False)"
    )
    _, seconds, host_cpu = run_timed(
        [sys.executable, "-c", code], cwd=work, check=True, capture_output=True
    )
    written = sum(pq.read_metadata(p).num_rows for p in (work / "plain").glob("*.parquet"))
    ok = sum(
        pq.read_table(p, columns=["status"]).column("status").to_pylist().count("success")
        for p in (work / "plain").glob("*.parquet")
    )
    assert written == len(urls)
    return seconds, ok, host_cpu


def pipeline(
    source_url: str, work: Path, retry_rounds: int = 2, stage_server: bool = True
) -> tuple[float, int, dict[str, tuple[float, float, float]], float]:
    extra = work / "extra.yaml"
    extra.write_text(
        f"output_dir: {work / 'data'}\nstage_server: {str(stage_server).lower()}\n"
        "download:\n  processes: 2\n  thread_count: 32\n  rows_per_part: 100000\n"
        f"  retry_after_max: 600\n  retry_rounds: {retry_rounds}\n"
        f"datasets:\n  cc12m:\n    format: cc12m\n    source: {source_url}\n"
    )
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "WANDB_MODE": "disabled"}
    command = [str(BIN / "snakemake"), "--cores", "2", "cc12m_shards", "--configfile", str(extra)]
    proc, seconds, host_cpu = run_timed(command, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"snakemake failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    ds_dir = work / "data" / "cc12m"
    return seconds, finalized(ds_dir), stage_seconds(ds_dir), host_cpu


def finalized(ds_dir: Path) -> int:
    """Images finalize took in: written plus duplicates, over the shards and the eval split.
    The URLs serve few distinct bodies, so all but those are dropped as duplicate_image;
    each was downloaded, hashed (a reduced decode: finalize's build.json says how long) and
    compared all the same."""
    total = 0
    for split in ("shards", "eval"):
        counts = json.loads((ds_dir / split / "manifest.json").read_text())["counts"]
        total += counts["written"] + sum(
            n for k, n in counts["dropped"].items() if "duplicate" in k
        )
    return total


def import_seconds(module: str) -> float:
    """Wall seconds a fresh interpreter takes to import ``module``, less its own start-up."""

    def run(code: str) -> float:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
        return time.perf_counter() - start

    return run(f"import {module}") - run("pass")


def snakemake_start_seconds(path: Path | None = None, runs: int = 3) -> float:
    """Mean wall seconds of ``snakemake --version`` (its imports and plugin discovery), with
    ``path`` on PYTHONPATH."""
    env = {**os.environ, "PYTHONPATH": str(path)} if path else None
    total = 0.0
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([BIN / "snakemake", "--version"], check=True, capture_output=True, env=env)
        total += time.perf_counter() - start
    return total / runs


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


def run_set(
    title: str,
    distinct: list[bytes],
    n: int,
    what: str,
    goal: float,
    retry_after: int | None,
    repeats: int,
) -> str:
    """Plain img2dataset and the pipeline in turn, the floor and PSNR on one image set; with
    ``retry_after``, also the pipeline with 10% of the URLs on a host answering 429."""
    bodies = {f"/img/{i}.jpg": distinct[i % len(distinct)] for i in range(n)}
    server = serve(bodies)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    paths = list(bodies)
    urls = [base + path for path in paths]
    bodies["/cc12m.tsv"] = tsv(urls)
    # The same images, every tenth URL on a host that refuses for retry_after seconds.
    busy = serve(bodies, host="127.0.0.2", refuse_for=retry_after or 0)
    busy_base = f"http://127.0.0.2:{busy.server_address[1]}"
    bodies["/pushed.tsv"] = tsv(
        [(busy_base if i % 10 == 0 else base) + path for i, path in enumerate(paths)]
    )
    bodies["/warm.tsv"] = tsv(urls[:WARM_URLS])
    loads = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folders = iter(range(10**6))

        def folder(kind: str) -> Path:
            path = work / f"{kind}{next(folders)}"
            path.mkdir()
            return path

        # Each timed run follows the same command on WARM_URLS of the URLs, untimed.
        def plain_run() -> None:
            plain_img2dataset(urls[:WARM_URLS], folder("warm"))
            plain_dirs.append(folder("plain"))
            plain_runs.append(plain_img2dataset(urls, plain_dirs[-1]))

        def pipe_run(source: str = "cc12m.tsv", **options: Any) -> tuple[Any, Path]:
            pipeline(f"{base}/warm.tsv", folder("warm"))
            path = folder("pipeline")
            return pipeline(f"{base}/{source}", path, **options), path

        # Plain, then (floor, pipeline, floor, plain) `repeats` times: each pipeline run
        # between two plain ones and right between two floor loops, so the machine's drift
        # weighs on both sides of the ratio and of the fraction alike.
        plain_runs: list[tuple[float, int, float]] = []
        plain_dirs: list[Path] = []
        pipe_runs = []
        floor_runs: list[tuple[float, int]] = []
        plain_run()
        for _ in range(repeats):
            floor_runs.append(floor_rate(distinct, n))
            pipe_runs.append(pipe_run())
            floor_runs.append(floor_rate(distinct, n))
            plain_run()
        # The same build with every stage in a process of its own (no stage server): its
        # benchmark files also give each stage's own CPU time.
        (alone_s, alone_n, alone_stages, _), _ = pipe_run(stage_server=False)
        if retry_after is not None:  # the same build without the retry machinery
            no_retry, _ = pipe_run(retry_rounds=0)
        (pipe_s, pipe_n, stages, pipe_host), first = pipe_runs[0]
        shards = sorted((first / "data" / "cc12m" / "shards").glob("*.tar"))
        pipe_psnr = psnr_of_tars(shards, bodies, base)
        plain_psnr = psnr_of_tars(sorted((plain_dirs[-1] / "plain").glob("*.tar")), bodies, base)
        if retry_after is not None:
            pushed, pushed_dir = pipe_run("pushed.tsv")
            build = json.loads((pushed_dir / "data/cc12m/shards/build.json").read_text())
    server.shutdown()
    busy.shutdown()
    loads.append(os.getloadavg()[0])
    same = sum(plain_psnr[2].get(url) == jpg for url, jpg in pipe_psnr[2].items())
    plain_s = sum(r[0] for r in plain_runs) / len(plain_runs)
    plain_rates = [count / wall for wall, count, _ in plain_runs]
    pipe_rates = [run[1] / run[0] for run, _ in pipe_runs]
    plain_rate = sum(plain_rates) / len(plain_rates)
    pipe_rate = sum(pipe_rates) / len(pipe_rates)
    floor_rates = [count / wall for wall, count in floor_runs]
    floor = sum(floor_rates) / len(floor_rates)
    floor_n, floor_s = floor_runs[0][1], floor_runs[0][1] / floor
    ratio = pipe_rate / plain_rate
    # Each pipeline run against the mean of the plain runs just before and after it.
    run_ratios = [
        rate / ((plain_rates[k] + plain_rates[k + 1]) / 2) for k, rate in enumerate(pipe_rates)
    ]
    # ... and against the floor loops just before and after it.
    run_fractions = [
        rate / ((floor_rates[2 * k] + floor_rates[2 * k + 1]) / 2)
        for k, rate in enumerate(pipe_rates)
    ]
    rules = busy_seconds(stages)
    not_download = pipe_s - sum(
        w for name, (w, _, _) in stages.items() if name.startswith("download/")
    )
    stage_rows = "\n".join(
        f"| {name} | {wall:.2f} | {alone_stages[name][0]:.2f} | {alone_stages[name][1]:.2f} |"
        for name, (wall, _, _) in stages.items()
    )
    alone_rules = busy_seconds(alone_stages)
    alone_not_download = alone_s - sum(
        w for name, (w, _, _) in alone_stages.items() if name.startswith("download/")
    )
    summary = [
        (
            "Snakemake itself (start-up, DAG, job bookkeeping): total - time any rule ran",
            pipe_s - rules,
            alone_s - alone_rules,
        ),
        ("everything but the download: total - download rules", not_download, alone_not_download),
        ("the whole run", pipe_s, alone_s),
    ]
    summary_rows = (
        "\n".join(
            f"| {label} | {seconds:.2f} | {alone:.2f} | |" for label, seconds, alone in summary
        )
        + f"\n| for comparison: plain img2dataset, mean of its runs | {plain_s:.2f} | | |"
    )
    runs = [
        (
            "floor: decode (DCT-scaled) + area resize + encode, 2 processes, no I/O, "
            f"mean of {len(floor_runs)} runs",
            floor_n,
            floor_s,
        ),
    ]
    for k, (wall, count, _) in enumerate(plain_runs):
        runs.append((f"plain img2dataset (2 x 32, 256 px, wds), run {k + 1}", count, wall))
        if k < len(pipe_runs):
            (wall, count, _, _), _ = pipe_runs[k]
            runs.append(
                (f"`snakemake --cores 2 cc12m_shards` (all stages), run {k + 1}", count, wall)
            )
    runs.append(("same, `stage_server: false` (each stage a process of its own)", alone_n, alone_s))
    if retry_after is not None:
        runs.append(("same, `retry_rounds: 0` (no retry machinery)", no_retry[1], no_retry[0]))
    run_rows = "\n".join(
        f"| {label} | {count} | {wall:.1f} | {count / wall:.1f} | {count / wall / floor:.2f} |"
        for label, count, wall in runs
    )
    retry_text = ""
    if retry_after is not None:
        pushed_s, pushed_n, pushed_stages, _ = pushed
        rounds = build["retry_rounds"]
        waited = sum(r["wait_seconds"] for r in rounds["rounds"])
        pushed_download = sum(
            w for name, (w, _, _) in pushed_stages.items() if name.startswith("download/")
        )
        retry_text = f"""
The same URLs with every tenth on a second host (127.0.0.2) that answers 429 with
`Retry-After` for {retry_after} s after its first request: {pushed_n} images in
**{pushed_s:.1f} s** ({pushed_n / pushed_s:.1f} images/s). {len(rounds["rounds"])} retry
round(s) recovered {rounds["recovered"]}, {rounds["still_retryable"]} still retryable; the
rounds waited {waited:.1f} s in all (the Retry-After the host sent, counted from the end of
the round that met it). No build can have those rows before {retry_after} s after the
host's first answer, so the no-failure run plus that refusal, {pipe_s:.1f} + {retry_after} =
{pipe_s + retry_after:.1f} s, bounds the run from below; it took
{pushed_s - pipe_s - retry_after:+.1f} s more (a retry round's img2dataset start-up and the
rows it fetches); its download rule {pushed_download:.1f} s.
"""
    return f"""#### {title}

{n} URLs of {what}, same list for every run. Load average {loads[0]:.2f} at the start,
{loads[1]:.2f} at the end ({os.cpu_count()} CPUs; other work on the machine inflates every number).

| run | images written | wall s | images/s | fraction of the floor |
|---|---:|---:|---:|---:|
{run_rows}
| **ratio**, mean pipeline rate to mean plain rate (goal >= {goal:.1f}) | | | **{ratio:.2f}** | |
| mean pipeline rate as a fraction of the floor | | | | **{pipe_rate / floor:.2f}** |
| goal for the pipeline's fraction of the floor | | | | >= 0.6 |

Each pipeline run against the mean of the plain runs before and after it:
{", ".join(f"{r:.2f}" for r in run_ratios)}; as a fraction of the mean of the floor loops
just before and after it: {", ".join(f"{r:.2f}" for r in run_fractions)} (the floor loops:
{", ".join(f"{wall:.1f}" for wall, _ in floor_runs)} s).

The floor loop reads its images from memory; the pipeline and plain img2dataset fetch them
from an HTTP server in the benchmark's own process, on the same {os.cpu_count()} cores. That
server used {pipe_host:.1f} s of CPU during the first pipeline run, {pipe_host / pipe_s:.2f} of one
core (plain img2dataset's runs: {", ".join(f"{r[2]:.1f}" for r in plain_runs)} s).

Quality, PSNR of each stored image against a full decode + area resize of its source
(min / mean over {pipe_n} images): pipeline {pipe_psnr[0]:.1f} / {pipe_psnr[1]:.1f} dB
(goal >= 38), plain img2dataset {plain_psnr[0]:.1f} / {plain_psnr[1]:.1f} dB (its JPEG
encode alone). {same} of the pipeline's {pipe_n} images are byte for byte plain img2dataset's
(those too small for a DCT-scaled decode: a shorter side under 2 x 256 + 1 px).
{retry_text}

Where the first pipeline run's time goes (each rule's command, from Snakemake's `benchmark:`
files).
With the stage server a stage is a fork of a process that already imported its libraries;
Snakemake's benchmark then measures only the job's client process in CPU, so CPU time is
given from the run where each stage is a process of its own:

| stage | wall s | wall s, `stage_server: false` | its CPU s |
|---|---:|---:|---:|
{stage_rows}
{summary_rows}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=6000, help="URLs of the 640x480 set")
    parser.add_argument("--photos", type=int, default=2000, help="URLs of the large-photo set")
    parser.add_argument("--retry-after", type=int, default=20, help="the 429 host's refusal, s")
    parser.add_argument(
        "--repeats", type=int, default=2, help="pipeline runs per set, each between plain runs"
    )
    args = parser.parse_args()
    sections = [
        run_set(
            "640x480 JPEGs",
            jpegs(),
            args.images,
            f"640x480 JPEGs ({DISTINCT} distinct bodies)",
            1.0,
            args.retry_after,
            args.repeats,
        ),
        run_set(
            "Large photos",
            photos(),
            args.photos,
            "photo-like JPEGs of 1600x1200, 2048x1536, 1200x1600 and 2400x1600 "
            "(128 distinct bodies)",
            2.0,
            None,
            args.repeats,
        ),
    ]
    # What the Snakefile imports of dalle_data at every start (config and the train rule's
    # lineage name; torch-free since naming.py).
    snakefile_import = import_seconds("dalle_data.config, dalle_data.model.output_name")
    snakemake_start = snakemake_start_seconds()
    slurm_start = snakemake_start_seconds(BIN.parent / "slurm")  # where `make setup` puts it
    command = (
        f".venv/bin/python benchmarks/bench_download.py --images {args.images} "
        f"--photos {args.photos} --retry-after {args.retry_after} --repeats {args.repeats}"
    )
    text = f"""### Download: `snakemake cc12m_shards` vs plain img2dataset, and the floor

Command: `{command}`. Each set in one run: plain img2dataset and the pipeline in turn,
plain first and last ({args.repeats} pipeline runs, each between two plain runs: this
machine's speed drifts by a fifth within minutes), the ratio that of their mean rates; and
the floor loop on the same bodies right before and after each pipeline run, the fraction
that of their mean rates. The pipeline time
covers every stage (fetch, normalize, filter, plan, download, finalize with tokenization,
shards, manifest and card, verify with re-tokenization); finalize copies img2dataset's JPEG
bytes, the download workers having recorded each image's perceptual hash as they wrote it
(images counted: written + duplicates); card and verify run side by side. The
`retry_rounds: 0` run shows what the retry machinery costs when nothing fails, and the
`stage_server: false` run what the stage server saves (dalle_data/stage_server.py: every
stage but the download's img2dataset processes is a fork of one server per Snakemake run,
started as Snakemake reads the Snakefile, that imported pandas, pyarrow, typer, img2dataset
and dalle_data once; each stage tells its client its exit status itself). Each timed run
follows the same command on {WARM_URLS} of the URLs, untimed, so every run reads its code from
the page cache (this VM reclaims idle file pages within minutes). The Snakefile's
dalle_data imports (config, model.output_name) take {snakefile_import:.2f} s, timed alone.
Snakemake's own start-up (`snakemake --version`, its imports and plugin discovery; mean of
3): {snakemake_start:.2f} s as `make setup` leaves the venv, {slurm_start:.2f} s with the
slurm executor plugin on its path: Snakemake imports every installed executor plugin at
each start and this one imports pandas, so `make setup` installs it in `.venv/slurm`, off
the path (Makefile; a cluster installs `.[slurm]`).

{sections[0]}
{sections[1]}
The download rule runs the same img2dataset call with these differences that make it
faster than plain img2dataset (dalle_data/pipeline/download.py, dalle_data/compat.py):
- its Resizer decodes a JPEG at 1/2, 1/4 or 1/8 of its size (libjpeg's DCT scaling,
  OpenCV's reduced-read flags) when that still leaves the shorter side above 256 px and
  every filter gives the same answer, instead of decoding every pixel and throwing most away;
- its worker and logger processes fork from one forkserver that imported img2dataset and
  albumentations once, where plain img2dataset spawns each as a new interpreter that imports
  them again (about 2 s of CPU each on this machine); with the stage server, which imported
  them before the run's first stage, the download's runner and that forkserver are forks
  too, so img2dataset's workers start about 0.2 s after the download stage instead of
  about 1.2 s;
- no process imports torch, which webdataset imports when it can, or wandb, which
  img2dataset imports even with enable_wandb=False (about 3 s of start-up each);
- glibc's malloc keeps the decoded images' buffers in the heap instead of an mmap/munmap
  pair each (a third to a half of the system time);
- it fetches each URL with its own function (dalle_data/pipeline/hosts.py: the same GET,
  over one kept-alive connection per host and download thread instead of urllib's
  connection per image, with the failure's reason and Retry-After kept);
- less Python per image in each worker's one resizing thread, which every fetch thread
  contends with for the GIL: the resize transform is built once per size instead of for
  every image (pydantic-validated, 0.1 ms), and the tars' members carry a whole-second
  mtime, so tarfile writes no pax header before each (1 KB and 30 us a member;
  webdataset stamps members with a float time).
"""
    write_result("download", text)


if __name__ == "__main__":
    main()
