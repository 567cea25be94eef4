"""Taming VQGAN files as published (Lightning checkpoints, VQModel and GumbelVQ configs) and
early-2021 DALLE files with the VAE pickled inside: built here, loaded without their code."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from dalle_data.cli import app
from dalle_data.errors import CheckpointError, DalleDataWarning
from dalle_data.model import vqgan
from dalle_data.model.checkpoint import build_dalle, load_checkpoint, summary
from tests.helpers import models, pickles

runner = CliRunner()
LIGHTNING = "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"


@pytest.fixture(scope="module", params=[False, True], ids=["VQModel", "GumbelVQ"])
def lightning(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A Lightning VQGAN checkpoint with hostile objects in callbacks and hyper_parameters,
    beside its published-style config (LPIPS loss, ckpt_path, image_key)."""
    gumbel = request.param
    folder = tmp_path_factory.mktemp("lightning")
    model = models.tiny_vqgan(seed=4, gumbel=gumbel)
    marker = folder / "pwned"
    payloads = pickles.payloads(marker)
    state = model.state_dict()
    # Published files carry the LPIPS/discriminator weights too; DALLE never uses them.
    state["loss.discriminator.main.0.weight"] = torch.ones(4, 3, 4, 4)
    path = folder / "last.ckpt"
    pickles.write_lightning_vqgan(
        path, state, extra=payloads["posix.system"], hparams=payloads["subprocess.Popen"]
    )
    config = folder / "model.yaml"
    config.write_text(yaml.safe_dump(models.tiny_vqgan_config(gumbel=gumbel)), encoding="utf-8")
    return {"path": path, "config": config, "model": model, "marker": marker, "gumbel": gumbel}


def test_lightning_checkpoint_loads_without_lightning_and_runs_nothing(lightning: dict) -> None:
    with (
        pickles.absent("pytorch_lightning", "taming"),
        pytest.warns(DalleDataWarning) as warned,
    ):
        state, facts = vqgan.load_weights(lightning["path"])
    assert not lightning["marker"].exists()
    message = str(warned[0].message)
    assert message.endswith(f"none of their code ran): posix.system, {LIGHTNING}, subprocess.Popen")
    assert facts == {"epoch": 12, "global_step": 345678, "pytorch-lightning_version": "1.0.8"}
    for key, tensor in lightning["model"].state_dict().items():
        assert torch.equal(state[key], tensor)


def test_dalle_builds_on_a_published_lightning_vqgan(lightning: dict) -> None:
    with pytest.warns(DalleDataWarning):
        vae = vqgan.build_vae(lightning["path"], lightning["config"])
    assert not lightning["marker"].exists()
    assert type(vae.model).__name__ == ("GumbelVQ" if lightning["gumbel"] else "VQModel")
    assert vae.is_gumbel is lightning["gumbel"]
    assert type(vae.model.loss).__name__ == "DummyLoss"
    for key, tensor in lightning["model"].state_dict().items():
        assert torch.equal(vae.model.state_dict()[key], tensor)
    image = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    codes = vae.get_codebook_indices(image)
    assert codes.shape == (1, 64) and int(codes.max()) < 32
    dalle = models.tiny_dalle(models.tiny_hparams(), vae=vae)
    assert dalle.image_seq_len == 64
    assert models.logits(dalle).shape[1] == 8 + 64


@pytest.mark.parametrize("as_json", [False, True])
def test_inspect_a_vqgan_file_and_its_config(lightning: dict, as_json: bool) -> None:
    for path in (lightning["path"], lightning["config"]):
        result = runner.invoke(app, ["inspect", str(path), *(["--json"] if as_json else [])])
        assert result.exit_code == 0, result.output
        if as_json:
            import json

            info = json.loads(result.stdout)
            assert (info["codebook_size"], info["downsampling"]) == (32, 32)
            assert info["image_tokens_at_256px"] == 64
            continue
        lines = dict(line.split(None, 1) for line in result.stdout.splitlines())
        model = "GumbelVQ" if lightning["gumbel"] else "VQModel"
        assert lines["file"].endswith(f"(taming {model})")
        assert lines["codebook"] == "32 codes of dimension 8"
        assert lines["downsampling"] == "f32"
        assert lines["image"] == "tokens  64 at 256 px (8x8)"
    assert (
        "lightning     pytorch-lightning 1.0.8, epoch 12, step 345678"
        in runner.invoke(app, ["inspect", str(lightning["path"])]).stdout
    )


@pytest.mark.parametrize(
    ("ch_mult", "attn", "n_embed", "gumbel", "expected"),
    [
        ([1, 1, 2, 2, 4], [16], 1024, False, ("1,024 codes", "f16", "256 at 256 px (16x16)")),
        ([1, 1, 2, 2, 4], [16], 16384, False, ("16,384 codes", "f16", "256 at 256 px")),
        ([1, 1, 2, 4], [32], 8192, True, ("8,192 codes", "f8", "1,024 at 256 px (32x32)")),
    ],
    ids=["imagenet-f16-1024", "imagenet-f16-16384", "gumbel-f8-8192"],
)
def test_inspect_published_configs(
    tmp_path: Path, ch_mult: list, attn: list, n_embed: int, gumbel: bool, expected: tuple
) -> None:
    config = models.tiny_vqgan_config(gumbel=gumbel)
    params = config["model"]["params"]
    params["n_embed"], params["embed_dim"] = n_embed, 256
    params["ddconfig"] |= {"resolution": 256, "ch_mult": ch_mult, "attn_resolutions": attn}
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    out = runner.invoke(app, ["inspect", str(path)]).stdout
    for text in expected:
        assert text in out


def test_a_config_naming_other_code_is_refused(tmp_path: Path) -> None:
    config = models.tiny_vqgan_config(gumbel=True)
    config["model"]["params"]["temperature_scheduler_config"]["target"] = "os.system"
    path = tmp_path / "evil.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    with pytest.raises(
        CheckpointError, match="temperature_scheduler_config.target names 'os.system'"
    ):
        vqgan.load_config(path)
    config["model"]["target"] = "taming.models.cond_transformer.Net2NetTransformer"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    with pytest.raises(CheckpointError, match="is not a VQGAN DALLE-pytorch 1.6.6 uses"):
        vqgan.load_config(path)


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path: Path, lightning: dict) -> None:
    config = models.tiny_vqgan_config(gumbel=not lightning["gumbel"])
    path = tmp_path / "other.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    with (
        pytest.warns(DalleDataWarning),
        pytest.raises(CheckpointError, match="does not fit config"),
    ):
        vqgan.build_vae(lightning["path"], path)


def test_a_config_that_is_not_yaml(tmp_path: Path) -> None:
    path = tmp_path / "model.yaml"
    path.write_bytes(b"\x00\xff{{ not: [yaml")
    result = runner.invoke(app, ["inspect", str(path)])
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: VQGAN config {path} is not a taming config")


# --- early-2021 DALLE files: the VAE module pickled inside hparams ---------------------------


@pytest.mark.filterwarnings("ignore:.*'sparse' layers")
def test_early_2021_discrete_vae_file(tmp_path: Path) -> None:
    dalle = models.tiny_dalle(models.tiny_hparams(rotary_emb=False, shift_tokens=False), seed=21)
    path = tmp_path / "2L_16HD_2H_32I_8T_cc12m_1E.pt"
    marker = tmp_path / "pwned"
    pickles.write_early_2021_dalle(
        path,
        dalle,
        "dalle_pytorch.dalle_pytorch.DiscreteVAE",
        dict(models.TINY_VAE_PARAMS),
    )
    with pickles.absent("dalle_pytorch"), pytest.warns(DalleDataWarning, match="DiscreteVAE"):
        ckpt = load_checkpoint(path)
    assert "vae" not in ckpt["hparams"] and ckpt["vae_class_name"] == "DiscreteVAE"
    assert summary(ckpt, file_name=path.name)["name"] == "2L_16HD_2H_32I_8T_cc12m_1E"
    assert torch.equal(models.logits(build_dalle(ckpt)), models.logits(dalle))
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:.*'sparse' layers")
def test_early_2021_vqgan_file_rebuilds_from_the_given_vqgan(tmp_path: Path) -> None:
    model_path, config_path = models.write_tiny_vqgan(tmp_path / "vqgan")
    vae = vqgan.build_vae(model_path, config_path)
    dalle = models.tiny_dalle(models.tiny_hparams(rotary_emb=False, shift_tokens=False), vae, 5)
    marker = tmp_path / "pwned"
    path = tmp_path / "dalle.pt"
    pickles.write_early_2021_dalle(path, dalle, "dalle_pytorch.vae.VQGanVAE1024", None, extra=None)
    with pytest.warns(DalleDataWarning, match="dalle_pytorch.vae.VQGanVAE1024"):
        ckpt = load_checkpoint(path)
    assert ckpt["vae_class_name"] == "VQGanVAE"
    assert summary(ckpt)["family"] == "taming"
    rebuilt = build_dalle(ckpt, vqgan_model_path=model_path, vqgan_config_path=config_path)
    assert torch.equal(models.logits(rebuilt), models.logits(dalle))
    assert not marker.exists()


def test_early_2021_file_with_an_unknown_object_as_vae(tmp_path: Path) -> None:
    path = tmp_path / "dalle.pt"
    marker = tmp_path / "pwned"
    torch.save(
        {
            "hparams": {"vae": pickles.payloads(marker)["builtins.eval"]},
            "vae_params": None,
            "weights": {},
        },
        path,
    )
    with (
        pytest.warns(DalleDataWarning),
        pytest.raises(CheckpointError, match=r"hparams\['vae'\] holds a builtins.eval, not a VAE"),
    ):
        load_checkpoint(path)
    assert not marker.exists()
