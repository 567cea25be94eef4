"""``dalle-data inspect`` through typer's CliRunner, on checkpoint files built here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dalle_data.cli import app
from dalle_data.model.checkpoint import save_checkpoint
from tests.helpers import models

runner = CliRunner()


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """A dalle-data checkpoint with a two-dataset lineage, and its transformer size."""
    hparams = models.tiny_hparams()
    dalle = models.tiny_dalle(hparams)
    ckpt = models.train_dalle_dict(dalle, hparams)
    path = tmp_path_factory.mktemp("inspect") / "model.pt"
    save_checkpoint(
        path,
        hparams=hparams,
        vae_params=ckpt["vae_params"],
        vae_class_name="DiscreteVAE",
        weights=ckpt["weights"],
        epoch=1,
        opt_state=ckpt["opt_state"],
        scheduler_state=None,
        lineage={"segments": "cc12m-2E_wit-0.5E", "history": []},
        tokenizer={"kind": "simple"},
    )
    params = sum(p.numel() for n, p in dalle.named_parameters() if not n.startswith("vae."))
    return path, params


def test_inspect_prints_every_fact(saved: tuple[Path, int]) -> None:
    path, params = saved
    result = runner.invoke(app, ["inspect", str(path)])
    assert result.exit_code == 0, result.output
    lines = dict(line.split(None, 1) for line in result.stdout.splitlines())
    assert lines == {
        "name": "2L_16HD_2H_32I_8T_cc12m-2E_wit-0.5E",
        "architecture": "2L_16HD_2H_32I_8T (depth 2, dim_head 16, heads 2, dim 32, text_seq_len 8)",
        "vae": "custom (DiscreteVAE)",
        "lineage": "cc12m-2E_wit-0.5E (from the lineage key)",
        "epochs": "2.5 (epoch counter 1)",
        "parameters": f"{params:,} (+ 14,227 in the VAE)",
        "dalle-pytorch": "1.6.6",
    }


def test_inspect_json(saved: tuple[Path, int]) -> None:
    path, params = saved
    result = runner.invoke(app, ["inspect", str(path), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["name"] == "2L_16HD_2H_32I_8T_cc12m-2E_wit-0.5E"
    assert info["family"] == "custom"
    assert info["parameters"] == params
    assert info["epochs"] == "2.5"
    assert info["hparams"] == {"depth": 2, "dim_head": 16, "heads": 2, "dim": 32, "text_seq_len": 8}


@pytest.mark.filterwarnings("ignore:.*'sparse' layers")
def test_inspect_legacy_file_takes_lineage_from_its_name(tmp_path: Path) -> None:
    # A DALLE-models file whose name's architecture is wrong: hparams win.
    path = tmp_path / "16L_64HD_8H_512I_128T_cc12m-1E_wit-0.25E.pt"
    models.write_legacy_checkpoint(path)
    result = runner.invoke(app, ["inspect", str(path)])
    assert result.exit_code == 0, result.output
    assert "name          2L_16HD_2H_32I_8T_cc12m-1E_wit-0.25E\n" in result.stdout
    assert "(from the file name)" in result.stdout
    assert "unknown (legacy file, no version key)" in result.stdout


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"garbage", "is not a readable torch file: it is a text file"),
        (b"\x80\x02garbage", "is not a readable torch file: UnpicklingError"),
        (None, "does not exist"),
    ],
)
def test_inspect_bad_file_is_one_clear_error(
    tmp_path: Path, content: bytes | None, message: str
) -> None:
    path = tmp_path / "bad.pt"
    if content is not None:
        path.write_bytes(content)
    result = runner.invoke(app, ["inspect", str(path)])
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.startswith(f"error: checkpoint {path} ")
    assert message in result.stderr
    assert "Traceback" not in result.output


def test_inspect_loads_pickled_code_as_data_with_a_one_line_warning(
    tmp_path: Path, saved: tuple[Path, int]
) -> None:
    path = tmp_path / "evil.pt"
    marker = tmp_path / "pwned"

    class Boom:
        def __reduce__(self) -> tuple:
            return (open, (str(marker), "w"))

    torch.save({**torch.load(saved[0]), "x": Boom()}, path)
    result = runner.invoke(app, ["inspect", str(path)])
    assert result.exit_code == 0, result.output
    assert result.stderr == (
        f"warning: checkpoint {path} names 1 classes or functions that were not loaded "
        "(kept as inert data, none of their code ran): io.open\n"
    )
    assert result.stdout.startswith("name          2L_16HD_2H_32I_8T_cc12m-2E_wit-0.5E\n")
    assert not marker.exists()


def test_help_lists_inspect() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "inspect" in result.stdout
