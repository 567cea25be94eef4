"""The pipeline with a bucket output_dir: shards built to a bucket through Snakemake's
storage plugin are byte-identical to a local build, objects appear only complete, and kill -9
during the upload followed by the same command ends identical. Against moto's S3 and
gcp-storage-emulator's GCS, both on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers.http import Route, serve
from tests.test_build_pipeline import CONFIG, SNAKEFILE, finished, shard_bytes, snakemake
from tests.test_download import image_bytes, write_metadata


@dataclass(frozen=True)
class LocalBuild:
    """The images' metadata rows (served on 127.0.0.1 while the module's tests run) and the
    shards folder a local output_dir gets from them."""

    rows: list[dict[str, object]]
    shards: dict[str, bytes]


@pytest.fixture(scope="module")
def local_build(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBuild]:
    """One local build that every store's bucket build is compared with."""
    routes = {f"/{i}.jpg": Route(image_bytes("RGB", (80 + i, 70), "JPEG", i)) for i in range(10)}
    with serve(routes) as http:
        rows: list[dict[str, object]] = [
            {"row_id": 10 * i + 3, "url": http.url(f"/{i}.jpg"), "caption": f"photo {i}"}
            for i in range(10)
        ]
        work = setup_build(tmp_path_factory.mktemp("local"), rows, "data")
        finished(snakemake(work, "--cores", "2", "target"))
        shards = shard_bytes(work / "data" / "cc12m" / "shards")
        shards["verify.json"] = (work / "data/cc12m/shards/verify.json").read_bytes()
        yield LocalBuild(rows, shards)


def setup_build(work: Path, rows: list[dict[str, object]], output_dir: str) -> Path:
    """A Snakemake folder building the cc12m ``rows`` to ``output_dir``."""
    write_metadata(work / "data" / "cc12m", rows, {"too_short": 2})
    (work / "Snakefile").write_text(SNAKEFILE)
    (work / "extra.yaml").write_text(
        CONFIG.replace("output_dir: data", f"output_dir: {output_dir}")
    )
    return work


@pytest.mark.slow
@pytest.mark.parametrize("store", ["s3", "gcs"])
def test_shards_built_to_a_bucket_equal_a_local_build_even_after_kill_9(
    tmp_path: Path, store: str, local_build: LocalBuild, request: pytest.FixtureRequest
) -> None:
    server = request.getfixturevalue(store)  # tests/helpers/{s3,gcs}.py
    bucket = server.bucket()
    local = local_build.shards
    # Bucket build: kill -9 as soon as the first object of the shards folder is listed.
    work = setup_build(tmp_path, local_build.rows, f"{server.scheme}://{bucket}/run/data")
    prefix = "run/data/cc12m/shards/"
    proc = snakemake(work, "--cores", "2", "target")
    deadline = time.monotonic() + 300
    while not server.keys(bucket, prefix):
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "the upload never started"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    at_kill = server.objects(bucket, prefix)
    # every object listed is whole: exactly the local build's file of that name
    assert at_kill and all(local[name] == body for name, body in at_kill.items())
    finished(snakemake(work, "--unlock"))
    log = finished(snakemake(work, "--cores", "2", "--rerun-incomplete", "target"))
    uploaded = server.objects(bucket, prefix)
    # the bucket holds exactly the shards folder built in work_dir, every byte ...
    staged = work / "data" / "cc12m" / "shards"
    assert uploaded == {p.name: p.read_bytes() for p in staged.iterdir()}
    # ... and, but for build.json (the run's facts: times, host), what a local build gives
    assert {k: v for k, v in uploaded.items() if k != "build.json"} == local
    assert server.unfinished_uploads(bucket) == []
    # the stages before the upload ran locally, in work_dir
    assert (work / "data" / "cc12m" / "downloaded").is_dir()
    # no credential in anything the pipeline wrote or printed
    server.assert_secret_nowhere(bucket, [work], log)
