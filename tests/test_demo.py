"""The offline demo (`snakemake all`) end to end, on a reduced training config.

The full demo trains for minutes to reach its quality figure; here the same rules run
on 300 of the sample's rows, with a VAE trained for a few steps, one epoch of DALLE and
one sample prompt; the test checks that every output exists, is lineage-named, and that
the summary prints the measured figure.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
NAME = "2L_32HD_4H_128I_16T_sample_1E"


@pytest.mark.slow
def test_demo_builds_a_lineage_named_checkpoint_with_card_and_quality(tmp_path: Path) -> None:
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    preset = tmp_path / "configs/models/tiny.yaml"
    text = preset.read_text().replace("steps: 400", "steps: 20")
    preset.write_text(text)
    reduced = tmp_path / "reduced.yaml"
    overrides = {
        "datasets": {"sample": {"max_rows": 300}},
        "train": {"epochs": 1, "save_every_n_steps": 1000, "prompts": ["a red circle"]},
    }
    reduced.write_text(yaml.safe_dump(overrides))
    snakemake = Path(sys.executable).parent / "snakemake"
    command = [
        str(snakemake), "all", "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path),
        "--cores", "2", "--profile", str(REPO / "configs/profiles/local"),
        "--configfile", str(tmp_path / "configs/config.yaml"), str(reduced),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    folder = tmp_path / "data/models/custom" / NAME
    files = (f"{NAME}.pt", "lineage.json", "README.md", "samples.png", "quality.json")
    for name in (*files, "colours.png"):
        assert (folder / name).is_file(), name
    quality = json.loads((folder / "quality.json").read_text())
    assert quality["images"] == 48 and quality["chance"] == round(1 / 6, 4)
    card = (folder / "README.md").read_text()
    assert f"{quality['accuracy']:.2f}" in card and "![colour evaluation](colours.png)" in card
    summary = subprocess.run(
        [
            sys.executable,
            "-m",
            "dalle_data.demo.summary",
            "data",
            "configs/config.yaml",
            str(reduced),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert summary.returncode == 0, summary.stderr
    assert f"data/models/custom/{NAME}/{NAME}.pt" in summary.stdout
    assert "colour accuracy" in summary.stdout
    # published into the collection, whose front page the summary names
    collection = tmp_path / "data/collection"
    index = json.loads((collection / "index.json").read_text())
    assert [e["path"] for e in index["checkpoints"]] == [f"custom/{NAME}/{NAME}.pt"]
    assert (collection / "custom" / NAME / f"{NAME}.pt").read_bytes() == (
        folder / f"{NAME}.pt"
    ).read_bytes()
    assert (collection / "lineage.png").is_file() and NAME in (collection / "README.md").read_text()
    assert "collection: data/collection/README.md" in summary.stdout
    assert "dalle-data serve data/collection" in summary.stdout.splitlines()[-1]
