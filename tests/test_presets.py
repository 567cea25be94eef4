"""init: fresh parents from presets, with the shards' vocabulary and a trained DiscreteVAE."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dalle_data.cli import app
from dalle_data.model import checkpoint as ckpt_io
from dalle_data.model.init import PresetError, init_parent, preset_family, preset_name
from tests.helpers.tiny import TINY_PRESET, write_dataset, write_preset

REPO = Path(__file__).resolve().parent.parent


def test_shipped_presets_name_their_architecture() -> None:
    assert preset_name(REPO / "configs/models/tiny.yaml") == "2L_32HD_4H_128I_16T"
    assert preset_family(REPO / "configs/models/tiny.yaml") == "custom"
    assert preset_name(REPO / "configs/models/taming-12L.yaml") == "12L_64HD_8H_512I_128T"
    assert preset_family(REPO / "configs/models/taming-12L.yaml") == "taming"


def test_naming_a_run_from_a_preset_does_not_import_torch() -> None:
    """Snakemake evaluates the train rule's output name at every start, `snakemake --unlock`
    and a shards-only target included: from a preset that must cost no torch import (~1.5 s)."""
    import subprocess
    import sys

    code = (
        "import sys; from pathlib import Path\n"
        "from dalle_data.model.output_name import planned_output\n"
        "out = planned_output(Path('data/models/tiny.pt'), 'cc12m', 1, Path('models'))\n"
        "assert out.parts[:2] == ('models', 'custom'), out\n"
        "print('torch' in sys.modules)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "False"


def test_init_builds_a_fresh_parent_from_the_shards(tmp_path: Path) -> None:
    shards = write_dataset(tmp_path, 32, 16)
    preset = write_preset(tmp_path / "tiny.yaml")
    result = CliRunner().invoke(
        app,
        ["init", "--preset", str(preset), "--shards", str(shards), "-o", str(tmp_path / "p.pt")],
    )
    assert result.exit_code == 0, result.output
    ckpt = ckpt_io.load_checkpoint(tmp_path / "p.pt")
    assert ckpt["hparams"]["num_text_tokens"] == 32  # the manifest's tokenizer
    assert ckpt["lineage"]["segments"] == "" and ckpt["lineage"]["name"] == "1L_16HD_2H_32I_8T"
    assert ckpt["vae_class_name"] == "DiscreteVAE" and ckpt["epoch"] == 0
    assert ckpt_io.summary(ckpt)["name"] == "1L_16HD_2H_32I_8T"
    # the VAE was trained: its weights differ from an untrained VAE with the same seed
    untrained = tmp_path / "untrained.yaml"
    write_preset(untrained, TINY_PRESET.replace("steps: 4", "steps: 0"))
    init_parent(untrained, tmp_path / "u.pt", shards=[shards])
    fresh = ckpt_io.load_checkpoint(tmp_path / "u.pt")["weights"]
    key = "vae.codebook.weight"
    assert not torch.equal(ckpt["weights"][key], fresh[key])
    ckpt_io.build_dalle(ckpt)


def test_init_errors_are_clear(tmp_path: Path) -> None:
    preset = write_preset(tmp_path / "tiny.yaml")
    with pytest.raises(PresetError, match="pass --shards"):
        init_parent(preset, tmp_path / "p.pt")
    bad = write_preset(tmp_path / "bad.yaml", TINY_PRESET.replace("DiscreteVAE", "FancyVAE"))
    result = CliRunner().invoke(
        app, ["init", "--preset", str(bad), "--tokenizer", "simple", "-o", str(tmp_path / "x.pt")]
    )
    assert result.exit_code == 1 and "vae.class is 'FancyVAE'" in result.output
