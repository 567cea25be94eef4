"""The download and shard rules under Snakemake: kill -9 mid-build, resume, same bytes.

The build here runs the repository's pipelines/{common,download,shards}.smk (metadata is
written by the test, as the metadata stages would); the full chain from a cc12m TSV runs
in test_end_to_end below.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.http import Route, serve, stall
from tests.test_download import build, image_bytes, write_metadata

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SNAKEFILE = f"""
configfile: "{REPO}/configs/config.yaml"


include: "{REPO}/pipelines/common.smk"
include: "{REPO}/pipelines/download.smk"
include: "{REPO}/pipelines/shards.smk"


rule target:
    input:
        built("cc12m"),
"""
CONFIG = """
output_dir: data
image_size: 64
shard_size: 4
download:
  processes: 1
  thread_count: 8
  timeout: 5
  rows_per_part: 6
  retry_rounds: 0
"""
RESULTS = [
    "manifest.json",
    "README.md",
    "contact_sheet.png",
    "caption_lengths.png",
    "image_sizes.png",
    "duplicates.png",
]


def snakemake(workdir: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [str(BIN / "snakemake"), "-s", "Snakefile", "--configfile", "extra.yaml", *args],
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def finished(proc: subprocess.Popen) -> str:
    return finished_with(proc, 0)


def finished_with(proc: subprocess.Popen, returncode: int) -> str:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == returncode, out[-3000:]
    return out


def shard_bytes(shards: Path) -> dict[str, bytes]:
    names = (
        sorted(p.name for p in shards.glob("cc12m-*.tar"))
        + RESULTS
        + ["failures.parquet", "index.parquet", "duplicate_examples.parquet"]
    )
    return {name: (shards / name).read_bytes() for name in names}


@pytest.mark.slow
def test_kill9_resume_gives_same_bytes_as_other_split(tmp_path: Path) -> None:
    routes = {f"/{i}.jpg": Route(image_bytes("RGB", (80 + i, 70), "JPEG", i)) for i in range(10)}
    routes["/stall.jpg"] = Route(handler=stall(8))
    with serve(routes) as server:
        # Two parts of 6 rows; the second starts with a URL that stalls past the timeout.
        paths = [f"/{i}.jpg" for i in range(5)] + ["/missing.jpg", "/stall.jpg"]
        paths += [f"/{i}.jpg" for i in range(5, 10)]
        rows = [
            {"row_id": 10 * i + 3, "url": server.url(p), "caption": f"photo {i} of a thing"}
            for i, p in enumerate(paths)
        ]
        work = tmp_path / "work"
        write_metadata(work / "data" / "cc12m", rows, {"too_short": 2})
        (work / "Snakefile").write_text(SNAKEFILE)
        (work / "extra.yaml").write_text(CONFIG)
        downloaded = work / "data" / "cc12m" / "downloaded"

        # First attempt: one job at a time; kill -9 the whole process group once one part
        # has finished while the other (one of them holds the stalled URL) is downloading.
        proc = snakemake(work, "--cores", "1", "target")
        deadline = time.monotonic() + 300
        while not (list(downloaded.glob("part-?????")) and list(downloaded.glob("*.partial"))):
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "the build never reached its second part"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        (done,) = downloaded.glob("part-?????")
        (partial,) = downloaded.glob("*.partial")
        assert not (downloaded / partial.name.removesuffix(".partial")).exists()
        first_part = (done / "00000.tar").stat().st_mtime_ns

        finished(snakemake(work, "--unlock"))
        finished(snakemake(work, "--cores", "2", "target"))
        assert (done / "00000.tar").stat().st_mtime_ns == first_part  # reused, not redone
        assert sorted(p.name for p in downloaded.iterdir()) == [
            "part-00000",
            "part-00000.json",
            "part-00001",
            "part-00001.json",
        ]
        resumed = shard_bytes(work / "data" / "cc12m" / "shards")
        assert (work / "data" / "cc12m" / "shards" / "verify.json").is_file()

        # An uninterrupted build of the same rows, split into a single part.
        other = tmp_path / "other" / "cc12m"
        shutil.copytree(work / "data" / "cc12m" / "metadata", other / "metadata")
        build(other, rows_per_part=100, dataset="cc12m", tokenizer="simple", retry_rounds=0)
        from dalle_data.pipeline.dataset_card import write_card

        write_card(other / "shards")
    assert shard_bytes(other / "shards") == resumed
    assert len([n for n in resumed if n.endswith(".tar")]) == 3  # 10 samples, 4 per shard


@pytest.mark.slow
def test_end_to_end_cc12m_shards(tmp_path: Path) -> None:
    """`snakemake cc12m_shards` from a cc12m TSV on 127.0.0.1 to a verified manifest."""
    routes = {f"/img/{i}.jpg": Route(image_bytes("RGB", (90, 70 + i), "JPEG", i)) for i in range(6)}
    with serve(routes) as server:
        lines = [f"{server.url(f'/img/{i}.jpg')}\ta photo of thing {i}" for i in range(6)]
        lines += [
            f"{server.url('/img/gone.jpg')}\ta missing photo",
            f"{server.url('/img/0.jpg')}\t",
        ]
        server.routes["/cc12m.tsv"] = Route("\n".join(lines).encode() + b"\n")
        (tmp_path / "extra.yaml").write_text(
            CONFIG.replace("output_dir: data", f"output_dir: {tmp_path / 'data'}")
            + f"datasets:\n  cc12m:\n    format: cc12m\n    source: {server.url('/cc12m.tsv')}\n"
        )
        proc = subprocess.run(
            [str(BIN / "snakemake"), "cc12m_shards", "--cores", "2"]
            + ["--configfile", str(tmp_path / "extra.yaml")],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    from dalle_data.formats.manifest import read_manifest

    shards = tmp_path / "data" / "cc12m" / "shards"
    manifest = read_manifest(shards)
    counts = manifest["counts"]
    assert counts["input_rows"] == 8 and counts["written"] == 6
    assert counts["failed"] == {"http_404": 1}
    assert sum(counts["dropped"].values()) == 1  # the empty caption
    assert (shards / "verify.json").is_file() and (shards / "README.md").is_file()


def test_unlock_after_kill9_in_a_copy_of_the_repository(tmp_path: Path) -> None:
    """What Snakemake tells people after a kill -9, run where they run it: the project root
    (every tracked file), `snakemake --unlock` with no other argument, then with a target
    and --configfile."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout: no tracked files to copy")
    root = tmp_path / "repo"
    for name in filter(None, listed.stdout.decode().split("\0")):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, root / name)

    def run(*args: str) -> subprocess.Popen:
        return subprocess.Popen(
            [str(BIN / "snakemake"), *args],
            cwd=root,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )

    proc = run("--cores", "1", "sample_shards")
    locks = root / ".snakemake" / "locks"
    deadline = time.monotonic() + 300
    while not list(locks.glob("*.lock")):
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "snakemake never locked the folder"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    locked = run("--cores", "1", "sample_shards")
    assert "--unlock" in finished_with(locked, 1)  # Snakemake says how to recover
    assert "Unlocked working directory" in finished(run("--unlock"))
    assert not list(locks.glob("*.lock"))
    out = finished(run("--unlock", "sample_shards", "--configfile", "configs/config.yaml"))
    assert "Unlocked working directory" in out
