"""One download part through img2dataset, in a process of its own.

A finished part is renamed into place (``downloaded/part-NNNNN/``) only after every
img2dataset shard in it has its ``_stats.json``; an interrupted part resumes from its
``.partial`` folder, where img2dataset's incremental mode skips the shards that finished.
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from dalle_data.atomic import atomic_path, write_json
from dalle_data.compat import img2dataset_fetch, img2dataset_forkserver, may_fork
from dalle_data.pipeline.dedup import perceptual_hash
from dalle_data.pipeline.download_plan import DownloadError
from dalle_data.pipeline.download_results import PHASH_COLUMN
from dalle_data.pipeline.hosts import Fetch, host_order, user_agent
from dalle_data.pipeline.malloc import set_tunables

# Pillow refuses images above 2 x 89,478,485 px and warns above 89,478,485 (its
# MAX_IMAGE_PIXELS); img2dataset decodes with OpenCV, whose own limit (2**30 px) would let a
# 20000 x 20000 PNG allocate gigabytes. OpenCV reads this variable once, when cv2 loads, so it
# is set before img2dataset (and cv2) are imported here and in the worker processes it spawns.
MAX_IMAGE_PIXELS = 89_478_485
os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] = str(MAX_IMAGE_PIXELS)

# glibc hands a freed block of more than 128 KiB straight back to the kernel and moves that
# limit as it goes. img2dataset's workers decode every image into a fresh 1-30 MB buffer, and
# with the defaults many of those become an mmap/munmap pair whose pages the kernel zeroes
# again: 2-3x the system time and ~15% more wall time on 6,000 images (measured on 2 cores
# with benchmarks/bench_download.py's images). Fixed limits keep such buffers in the heap.
# Other C libraries ignore the variable; a GLIBC_TUNABLES the user set wins.
GLIBC_TUNABLES = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=134217728"

# Not *.json: img2dataset takes every JSON file in its output folder for a shard's stats.
PARAMS = "dalle_data.params"
# The params key saying how img2dataset's input was ordered: it decides which rows share
# an img2dataset shard, never what is downloaded, so it stays out of the manifest.
INPUT_ORDER = "input_order"
# Rows that pay for starting one more img2dataset worker process (a retry round of a few
# failed rows, the bundled sample, a small folder).
ROWS_PER_WORKER = 200
MAX_SAMPLES_PER_SHARD = 10_000


@dataclass(frozen=True)
class DownloadSettings:
    """The img2dataset options dalle-data sets from config (``download.*``, ``image_size``)."""

    image_size: int
    processes: int = 1
    thread_count: int = 32
    timeout: float = 10
    retries: int = 0
    min_image_size: int = 64
    max_aspect_ratio: float = 3.0
    distributor: str = "multiprocessing"
    user_agent_token: str = "dalle-data"
    # A URL or e-mail address for the User-Agent, so a host can reach whoever crawls it.
    contact: str | None = None
    # None: no limit. Holds across every thread and process of one download job.
    max_requests_per_second_per_host: float | None = None
    # Later rounds for rows that failed for a reason that can pass (failures.RETRYABLE),
    # after the server's Retry-After (at most retry_after_max seconds), else after
    # retry_backoff * 2**(round - 1) seconds with jitter.
    retry_rounds: int = 2
    retry_after_max: float = 300.0
    retry_backoff: float = 5.0
    # pyspark only: the cluster to run on (None: local[processes]) and extra Spark settings.
    spark_master: str | None = None
    spark_conf: tuple[tuple[str, str], ...] = ()

    def output_affecting(self) -> dict[str, Any]:
        """Settings that change what lands in a part (a resumed part must share them)."""
        return {
            "image_size": self.image_size,
            "resize_mode": "keep_ratio",
            "encode": "jpg quality 95",
            "min_image_size": self.min_image_size,
            "max_aspect_ratio": self.max_aspect_ratio,
            "max_image_pixels": MAX_IMAGE_PIXELS,
            # compat.for_img2dataset: large JPEGs are decoded at 1/2-1/8 scale
            "jpeg_decode": "dct-scaled",
        }


@contextlib.contextmanager
def spark_session(settings: DownloadSettings) -> Iterator[None]:
    """For ``distributor: pyspark``, a Spark session on ``spark_master`` for img2dataset.

    img2dataset's pyspark distributor uses the active session when there is one, else a
    local one with 16 GB of driver memory; creating it here lets config point the download
    at a real cluster (``spark://...``, ``yarn``, ``k8s://...``) with its own settings.
    """
    if settings.distributor != "pyspark":
        yield
        return
    from pyspark.sql import SparkSession

    master = settings.spark_master or f"local[{settings.processes}]"
    builder = SparkSession.builder.appName("dalle-data download").master(master)
    for key, value in settings.spark_conf:
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    try:
        yield
    finally:
        spark.stop()


def download_part(
    part: Path, out_dir: Path, settings: DownloadSettings, *, scratch: Path | None = None
) -> dict[str, Any]:
    """Run img2dataset on one part parquet into ``out_dir`` (renamed into place when complete).

    A finished ``out_dir`` of the same rows and settings is kept as it is. ``scratch`` holds
    the job's host schedules and rate-ordered inputs (a temporary folder when None).
    """
    rows = pq.read_metadata(part).num_rows
    partial = out_dir.with_name(out_dir.name + ".partial")
    params_path = partial / PARAMS
    processes = _workers(rows, settings.processes)
    per_shard = max(1, min(MAX_SAMPLES_PER_SHARD, math.ceil(rows / processes)))
    expected = math.ceil(rows / per_shard)
    rate = settings.max_requests_per_second_per_host
    # A resumed part must cut its rows into the same img2dataset shards as the first attempt.
    params = {
        "part": part.name,
        "rows": rows,
        "samples_per_shard": per_shard,
        INPUT_ORDER: "host_rate" if rate else "row",
        **settings.output_affecting(),
    }
    if _finished(out_dir, params):
        return _stats(out_dir, part)
    if partial.exists() and (
        not params_path.is_file() or json.loads(params_path.read_text()) != params
    ):
        shutil.rmtree(partial)  # left by a run with other settings: its shards do not apply
    partial.mkdir(parents=True, exist_ok=True)
    write_json(params_path, params)
    with contextlib.ExitStack() as stack:
        if scratch is None:
            scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dalle-data-")))
        _run_part(
            part, partial, settings, scratch, rows=rows, per_shard=per_shard, processes=processes
        )
    done = sorted(partial.glob("*_stats.json"))
    if len(done) != expected:
        raise DownloadError(
            f"img2dataset finished {len(done)} of {expected} shards of {part} (see the log): "
            "rerun the download; finished shards in "
            f"{partial} are reused"
        )
    shutil.rmtree(partial / "_tmp", ignore_errors=True)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(partial, out_dir)
    return _stats(out_dir, part)


def _workers(rows: int, processes: int) -> int:
    """img2dataset worker processes for ``rows``: at most one per ROWS_PER_WORKER rows, since
    each costs ~1.5 s of CPU to start (imports) and a few rows download in a blink."""
    return max(1, min(processes, math.ceil(rows / ROWS_PER_WORKER)))


def _finished(out_dir: Path, params: dict[str, Any]) -> bool:
    """Whether ``out_dir`` holds every row of the part with the same output-affecting
    settings, however its rows were cut into img2dataset shards (processes, rate limit)."""
    path = out_dir / PARAMS
    if not path.is_file():
        return False
    saved = json.loads(path.read_text())
    cut = ("samples_per_shard", INPUT_ORDER)
    same = {k: v for k, v in saved.items() if k not in cut} == {
        k: v for k, v in params.items() if k not in cut
    }
    shards = math.ceil(saved["rows"] / saved["samples_per_shard"])
    return same and len(list(out_dir.glob("*_stats.json"))) == shards


def _stats(out_dir: Path, part: Path) -> dict[str, Any]:
    stats: Counter[str] = Counter()
    for path in sorted(out_dir.glob("*_stats.json")):
        record = json.loads(path.read_text())
        stats["count"] += record["count"]
        stats["successes"] += record["successes"]
    return {"part": part.name, "rows": pq.read_metadata(part).num_rows, **stats}


def _run_part(
    part: Path,
    partial: Path,
    settings: DownloadSettings,
    scratch: Path,
    *,
    rows: int,
    per_shard: int,
    processes: int,
) -> None:
    """img2dataset on ``part`` into ``partial``, its requests paced per host when limited."""
    rate = settings.max_requests_per_second_per_host
    url_list = part
    if rate:
        # Rows of a busy host go to the back rather than hold every thread while they wait.
        table = pq.read_table(part)
        order = host_order(table.column("url").to_pylist(), math.ceil(rows / per_shard))
        url_list = scratch / "inputs" / part.name
        url_list.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(url_list) as tmp:
            pq.write_table(table.take(order), tmp)
    fetch = Fetch(
        user_agent=user_agent(settings.user_agent_token, settings.contact),
        max_requests_per_second=rate,
        hosts_dir=str(scratch / "hosts"),
    )
    options = dict(
        url_list=str(url_list),
        input_format="parquet",
        url_col="url",
        save_additional_columns=["row_id", "license"],
        output_folder=str(partial),
        output_format="webdataset",
        image_size=settings.image_size,
        resize_mode="keep_ratio",
        # Small images are upscaled too: every stored image has the configured shorter side,
        # which DALLE-pytorch's crop expects; min_image_size refuses the truly tiny ones.
        resize_only_if_bigger=False,
        encode_format="jpg",
        encode_quality=95,
        min_image_size=settings.min_image_size,
        max_aspect_ratio=settings.max_aspect_ratio,
        timeout=settings.timeout,
        retries=settings.retries,
        processes_count=processes,
        thread_count=settings.thread_count,
        number_sample_per_shard=per_shard,
        distributor=settings.distributor,
        user_agent_token=settings.user_agent_token,
        extract_exif=False,
        compute_hash="sha256",
        enable_wandb=False,
        incremental_mode="incremental",
    )
    # A fork where this process is as good a parent as a new interpreter (compat.may_fork):
    # a stage forked from the stage server has img2dataset imported, and so has its fork.
    context = multiprocessing.get_context("fork" if may_fork() else "spawn")
    runner = context.Process(  # type: ignore[attr-defined]
        target=_run_img2dataset, args=(options, settings, fetch), name=f"img2dataset {part.name}"
    )
    with _environment(GLIBC_TUNABLES=os.environ.get("GLIBC_TUNABLES", GLIBC_TUNABLES)):
        runner.start()
    runner.join()
    if runner.exitcode != 0:
        raise DownloadError(
            f"img2dataset exited with code {runner.exitcode} on {part} (see the log): "
            f"rerun the download; finished shards in {partial} are reused"
        )


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    """Set environment variables for the processes started inside; then restore the caller's."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value


def _run_img2dataset(options: dict[str, Any], settings: DownloadSettings, fetch: Fetch) -> None:
    """img2dataset in a process of its own, without torch and wandb (compat.for_img2dataset),
    fetching with ``fetch`` and recording each written image's perceptual hash (finalize's
    dedup needs it; the worker has the image in memory, finalize would read it back).

    Its own process, so the caller's process (a test, a notebook) keeps torch and wandb.
    """
    # A forked runner started with the caller's allocator, not GLIBC_TUNABLES's; its forks
    # (img2dataset's processes) inherit what it sets.
    set_tunables(os.environ.get("GLIBC_TUNABLES", ""))
    with (
        img2dataset_forkserver(),
        spark_session(settings),
        img2dataset_fetch(fetch, (PHASH_COLUMN, perceptual_hash)),
    ):
        import img2dataset

        img2dataset.download(**options)
