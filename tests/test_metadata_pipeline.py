"""The metadata rules through real Snakemake: sample_source, fetch, normalize, filter.

A wrapper Snakefile includes only pipelines/common.smk and pipelines/metadata.smk (with the
repository's config.yaml and its schema validation), so this tests the metadata rules
whatever state the later stages are in.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from tests.test_sources import write_cc12m, write_wit, write_yfcc

REPO = Path(__file__).resolve().parent.parent
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")
DATASETS = ("cc12m", "wit", "yfcc", "sample")


def _snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SNAKEMAKE, *args, "--cores", "2", "--configfile", "test.yaml"],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "Snakefile").write_text(
        f'configfile: "{REPO}/configs/config.yaml"\n'
        f'include: "{REPO}/pipelines/common.smk"\n'
        f'include: "{REPO}/pipelines/metadata.smk"\n'
    )
    return tmp_path


def _read(path: Path) -> dict:  # type: ignore[type-arg]
    return json.loads(path.read_text())


@pytest.mark.slow
def test_rules_build_every_dataset_with_exact_accounting(workdir: Path) -> None:
    src = workdir / "src"
    src.mkdir()
    cc12m_drops = write_cc12m(src / "cc12m-a.tsv")
    write_cc12m(src / "cc12m-b.tsv")  # the same URLs again: duplicates across files
    write_wit(src / "wit-0.tsv.gz")
    wit_drops = write_wit(src / "wit-1.tsv.gz")
    yfcc_drops = write_yfcc(src / "yfcc100m_dataset.bz2", src / "subset.tsv")
    config = {
        "output_dir": "out",
        "filters": {"min_words": 1, "max_words": 50},
        "datasets": {
            "cc12m": {"format": "cc12m", "source": ["src/cc12m-a.tsv", "src/cc12m-b.tsv"]},
            "wit": {
                "format": "wit",
                "source": ["src/wit-0.tsv.gz", "src/wit-1.tsv.gz"],
                "wit_files": [1],
            },
            "yfcc": {
                "format": "yfcc",
                "source": "src/yfcc100m_dataset.bz2",
                "subset": "src/subset.tsv",
            },
            "sample": {
                "format": "cc12m",
                "source": "src/sample/sample.tsv",
                "allow_file_urls": False,
            },
        },
    }
    (workdir / "test.yaml").write_text(yaml.safe_dump(config))
    targets = [f"out/{ds}/metadata/filtered.parquet" for ds in DATASETS]
    result = _snakemake(workdir, *targets)
    assert result.returncode == 0, result.stderr[-3000:]

    expected = {
        "cc12m": ({k: 2 * v for k, v in cc12m_drops.items()}, {"duplicate_url": 3}, 3),
        "wit": (wit_drops, {}, 4),
        "yfcc": (yfcc_drops, {}, 2),
        # The sample's file: URLs are refused unless the dataset allows them.
        "sample": ({}, {"url_scheme": 2004}, 0),
    }
    for ds, (norm_drops, filter_drops, output_rows) in expected.items():
        meta = workdir / "out" / ds / "metadata"
        norm, filt = _read(meta / "normalize.json"), _read(meta / "filter.json")
        assert norm["dropped"] == norm_drops, ds
        assert norm["input_rows"] == sum(norm["dropped"].values()) + norm["output_rows"]
        assert filt["input_rows"] == norm["output_rows"]
        assert {k: v for k, v in filt["dropped"].items() if v} == filter_drops, ds
        assert filt["input_rows"] == sum(filt["dropped"].values()) + filt["output_rows"]
        assert filt["output_rows"] == output_rows, ds
        rows = pq.read_table(meta / "filtered.parquet")
        assert rows.num_rows == output_rows
        assert rows.column("row_id").to_pylist() == sorted(rows.column("row_id").to_pylist())
        dropped = pq.read_table(meta / "dropped.parquet")
        assert dropped.num_rows == sum(norm["dropped"].values()) + sum(filt["dropped"].values())
        assert (workdir / "out" / ds / "logs/filter.log").exists()
        assert (workdir / "out" / ds / "benchmarks/normalize.tsv").exists()

    wit_raw = _read(workdir / "out/wit/raw/fetch.json")
    assert [f["name"] for f in wit_raw["files"]] == ["wit-1.tsv.gz"]  # wit_files: [1]
    wit_ids = pq.read_table(workdir / "out/wit/metadata/filtered.parquet")["row_id"]
    assert wit_ids.to_pylist() == [1_000_000_001, 1_000_000_002, 1_000_000_003, 1_000_000_004]
    assert pq.read_table(workdir / "out/yfcc/metadata/filtered.parquet")["row_id"].to_pylist() == [
        50,
        900,
    ]

    assert _snakemake(workdir, "-n", *targets).stdout.count("Nothing to be done") == 1

    # Allowing file URLs for the sample reruns only its filter.
    config["datasets"]["sample"]["allow_file_urls"] = True
    (workdir / "test.yaml").write_text(yaml.safe_dump(config))
    result = _snakemake(workdir, "out/sample/metadata/filtered.parquet")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rule filter:" in result.stderr and "rule normalize:" not in result.stderr
    filt = _read(workdir / "out/sample/metadata/filter.json")
    assert {k: v for k, v in filt["dropped"].items() if v} == {"duplicate_url": 1}
    assert filt["output_rows"] == 2003  # 2000 pictures, a copy of one, two bad entries


def test_bad_dataset_name_fails_before_any_work(workdir: Path) -> None:
    config = {"datasets": {"cc-12m": {"format": "cc12m", "source": "x.tsv"}}}
    (workdir / "test.yaml").write_text(yaml.safe_dump(config))
    result = _snakemake(workdir, "-n", "out/cc-12m/metadata/filtered.parquet")
    assert result.returncode != 0
    assert "dataset name 'cc-12m' is invalid" in result.stdout + result.stderr
    assert not (workdir / "data").exists()
