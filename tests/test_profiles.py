"""Snakemake profiles: what the slurm profile would submit, and the local defaults."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


# `make setup` installs the slurm executor plugin here, off the venv's path (Makefile).
SLURM_PLUGIN = Path(sys.executable).parent.parent / "slurm"


def snakemake(*args: str, path: Path | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "snakemake", *args]
    env = {**os.environ, "PYTHONPATH": str(path)} if path else None
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


def jobs_by_rule(dry_run_output: str) -> dict[str, list[str]]:
    """Split a dry run's text into each job's block, keyed by rule name."""
    blocks: dict[str, list[str]] = {}
    for block in re.split(r"\n(?=\[[^\]]+\]\n(?:local)?rule )", dry_run_output):
        match = re.search(r"^(?:local)?rule (\w+):", block, re.M)
        if match:
            blocks.setdefault(match.group(1), []).append(block)
    return blocks


@pytest.mark.slow
def test_slurm_profile_submits_download_parts_with_their_resources(tmp_path):
    if not (SLURM_PLUGIN / "snakemake_executor_plugin_slurm").is_dir():
        pytest.importorskip("snakemake_executor_plugin_slurm")  # installed the usual way
    source = tmp_path / "cc12m.tsv"
    # URLs are never fetched: the test stops at a dry run after the metadata stages.
    source.write_text(
        "".join(f"http://127.0.0.1:9/{i}.jpg\ta caption number {i}\n" for i in range(25))
    )
    extra = tmp_path / "extra.yaml"
    extra.write_text(
        yaml.safe_dump(
            {
                "output_dir": str(tmp_path / "out"),
                "download": {"rows_per_part": 10},
                "datasets": {"cc12m": {"format": "cc12m", "source": str(source)}},
            }
        )
    )
    plan = tmp_path / "out" / "cc12m" / "download" / "plan.json"
    local = snakemake(
        "--cores", "2", "--profile", "configs/profiles/local", str(plan), "--configfile", str(extra)
    )
    assert local.returncode == 0, local.stderr[-3000:]

    profile = ("--profile", "configs/profiles/slurm")
    dry = snakemake(*profile, "-n", "cc12m_shards", "--configfile", str(extra), path=SLURM_PLUGIN)
    assert dry.returncode == 0, dry.stderr[-3000:]
    out = dry.stdout + dry.stderr
    jobs = jobs_by_rule(out)
    assert len(jobs["download"]) == 3  # 25 rows in parts of 10
    for block in jobs["download"]:
        assert re.search(r"threads: 16\b", block), block
        resources = re.search(r"resources: (.*)", block).group(1)
        assert "mem_mb=16000" in resources and "runtime=720" in resources and "http=1" in resources
    assert "mem_mb=16000" in jobs["finalize"][0] and "runtime=360" in jobs["finalize"][0]
    assert {"fetch", "normalize", "filter", "plan_download"}.isdisjoint(jobs)  # already built


def test_slurm_profile_names_only_rules_that_exist():
    profile = yaml.safe_load((ROOT / "configs/profiles/slurm/config.yaml").read_text())
    rules = set()
    for smk in (ROOT / "pipelines").glob("*.smk"):
        rules |= set(re.findall(r"^(?:rule|checkpoint) (\w+):", smk.read_text(), re.M))
    assert set(profile["set-threads"]) <= rules
    assert set(profile["set-resources"]) <= rules
    assert profile["executor"] == "slurm"


def test_local_profile_resumes_interrupted_runs():
    profile = yaml.safe_load((ROOT / "configs/profiles/local/config.yaml").read_text())
    assert profile["rerun-incomplete"] is True
