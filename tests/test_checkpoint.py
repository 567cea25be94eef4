"""Checkpoint I/O against real DALLE-pytorch 1.6.6 models built here (tiny, seeded)."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch

from dalle_data.errors import DalleDataWarning
from dalle_data.model import checkpoint, vqgan
from dalle_data.model.checkpoint import (
    CheckpointError,
    build_dalle,
    load_checkpoint,
    save_checkpoint,
    summary,
)
from dalle_data.model.lineage import family
from tests.helpers import models

TRAIN_DALLE_KEYS = [
    "hparams",
    "vae_params",
    "epoch",
    "version",
    "vae_class_name",
    "weights",
    "opt_state",
    "scheduler_state",
]


@pytest.fixture(scope="module")
def modern() -> tuple[torch.nn.Module, dict]:
    """A current-format model and the dict train_dalle.py would save for it."""
    dalle = models.tiny_dalle(models.tiny_hparams())
    return dalle, models.train_dalle_dict(dalle, models.tiny_hparams())


@pytest.fixture(scope="module")
def vqgan_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny VQGAN whose config names the LPIPS loss (building that would download VGG16)."""
    return models.write_tiny_vqgan(tmp_path_factory.mktemp("vqgan"))


class Boom:
    """Unpickling this would create the file named in ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


def test_pickled_code_loads_as_data_and_never_runs(tmp_path: Path, modern: tuple) -> None:
    dalle, saved = modern
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({**saved, "extra": Boom(marker)}, path)
    with pytest.warns(DalleDataWarning, match=r"checkpoint .*evil.pt names 1 .* ran\): io.open"):
        ckpt = load_checkpoint(path)
    assert not marker.exists()
    assert torch.equal(models.logits(build_dalle(ckpt)), models.logits(dalle))


def test_pickled_code_in_hparams_is_refused_by_name_and_never_runs(
    tmp_path: Path, modern: tuple
) -> None:
    _, saved = modern
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({**saved, "hparams": {**saved["hparams"], "dim": Boom(marker)}}, path)
    with (
        pytest.warns(DalleDataWarning),
        pytest.raises(CheckpointError, match=r"hparams\['dim'\] holds a pickled io.open object"),
    ):
        load_checkpoint(path)
    assert not marker.exists()


def test_a_plain_pickle_is_not_a_torch_file(tmp_path: Path) -> None:
    path = tmp_path / "plain.pt"
    path.write_bytes(pickle.dumps({"hparams": {}, "vae_params": None, "weights": {}}, protocol=2))
    with pytest.raises(CheckpointError, match="a pickle without torch's magic number"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is empty"),
        (b"definitely not a checkpoint", "it is a text file"),
        (b"PK\x03\x04truncated zip", "is damaged \\(File is not a zip file\\)"),
    ],
)
def test_unreadable_files(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ([1, 2], "holds a list, not a DALLE-pytorch checkpoint dict"),
        ({"weights": {}}, "it has no hparams, vae_params"),
        ({"hparams": {}, "vae_params": None}, "it has no weights"),
        ({"hparams": [], "vae_params": None, "weights": {}}, "hparams is a list"),
        (
            {"hparams": {}, "vae_params": None, "weights": "To get a working standard checkpoint"},
            "DeepSpeed auxiliary file",
        ),
    ],
)
def test_wrong_contents(tmp_path: Path, obj: object, message: str) -> None:
    path = tmp_path / "wrong.pt"
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_current_format_loads_unchanged_and_rebuilds(tmp_path: Path, modern: tuple) -> None:
    dalle, saved = modern
    path = tmp_path / "modern.pt"
    torch.save(saved, path)
    ckpt = load_checkpoint(path)
    assert ckpt["hparams"] == saved["hparams"]
    assert ckpt["weights"].keys() == saved["weights"].keys()
    assert torch.equal(models.logits(build_dalle(ckpt)), models.logits(dalle))


def test_legacy_checkpoint_is_upgraded_and_gives_the_same_logits(tmp_path: Path) -> None:
    path = tmp_path / "legacy.pt"
    original = models.write_legacy_checkpoint(path)
    with pytest.warns(UserWarning, match="'sparse' layers; they run as 'full' attention"):
        ckpt = load_checkpoint(path)
    assert ckpt["hparams"]["shift_tokens"] is False
    assert ckpt["hparams"]["rotary_emb"] is False
    assert ckpt["hparams"]["attn_types"] == ("full", "full")
    assert ckpt["vae_class_name"] == "DiscreteVAE"
    assert "image_pos_emb.weights.0" in ckpt["weights"]
    assert not any("weights_" in key for key in ckpt["weights"])
    assert torch.equal(models.logits(build_dalle(ckpt)), models.logits(original))


@pytest.mark.filterwarnings("ignore:.*'sparse' layers")
def test_legacy_reversible_checkpoint_gives_the_same_logits(tmp_path: Path) -> None:
    path = tmp_path / "legacy-reversible.pt"
    original = models.write_legacy_checkpoint(path, reversible=True)
    assert any(".f.net.fn.fn.to_qkv." in key for key in torch.load(path)["weights"])
    rebuilt = build_dalle(load_checkpoint(path))
    assert torch.equal(models.logits(rebuilt), models.logits(original))


def test_late_2021_layout_with_token_shift_gives_the_same_logits(tmp_path: Path) -> None:
    path = tmp_path / "late-2021.pt"
    original = models.write_late_2021_checkpoint(path)
    weights = torch.load(path)["weights"]
    assert "transformer.layers.layers.0.0.fn.fn.fn.to_qkv.weight" in weights  # not 5 levels
    assert torch.equal(models.logits(build_dalle(load_checkpoint(path))), models.logits(original))


@pytest.mark.filterwarnings("ignore:.*'sparse' layers")
def test_legacy_vqgan_checkpoint_drops_loss_weights_and_never_downloads(
    tmp_path: Path, vqgan_files: tuple[Path, Path]
) -> None:
    path = tmp_path / "legacy-taming.pt"
    original = models.write_legacy_vqgan_checkpoint(path, tmp_path)
    ckpt = load_checkpoint(path)
    assert ckpt["vae_class_name"] == "VQGanVAE"
    assert not any(key.startswith("vae.model.loss.") for key in ckpt["weights"])
    model_path, config_path = vqgan_files
    rebuilt = build_dalle(ckpt, vqgan_model_path=model_path, vqgan_config_path=config_path)
    assert type(rebuilt.vae.model.loss).__name__ == "DummyLoss"
    assert torch.equal(models.logits(rebuilt), models.logits(original))
    assert summary(ckpt)["family"] == "taming"


def test_vqgan_from_the_default_cache(
    tmp_path: Path, vqgan_files: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setattr(vqgan, "VQGAN_CACHE", cache)
    ckpt = {"vae_class_name": "VQGanVAE", "vae_params": None, "weights": {}}
    with pytest.raises(CheckpointError, match="pass --vqgan-model-path and --vqgan-config-path"):
        checkpoint.build_vae(ckpt)
    cache.mkdir()
    shutil.copy(vqgan_files[0], cache / "vqgan.1024.model.ckpt")
    shutil.copy(vqgan_files[1], cache / "vqgan.1024.config.yml")
    assert checkpoint.build_vae(ckpt).num_tokens == 32


def test_vqgan_needs_both_paths(vqgan_files: tuple[Path, Path]) -> None:
    ckpt = {"vae_class_name": "VQGanVAE", "vae_params": None, "weights": {}}
    with pytest.raises(CheckpointError, match="pass both"):
        checkpoint.build_vae(ckpt, vqgan_model_path=vqgan_files[0])


def test_openai_vae_is_refused() -> None:
    ckpt = {"vae_class_name": "OpenAIDiscreteVAE", "vae_params": None, "weights": {}}
    with pytest.raises(CheckpointError, match=r"torch<1.11 and downloads"):
        build_dalle({**ckpt, "hparams": models.tiny_hparams()})


@pytest.mark.filterwarnings("ignore:.*'sparse' layers")
def test_legacy_openai_vae_is_recognised_from_its_weights(tmp_path: Path) -> None:
    path = tmp_path / "openai.pt"
    weights = {"vae.enc.blocks.input.w": torch.zeros(1), "to_logits.1.weight": torch.zeros(2, 3)}
    torch.save({"hparams": models.legacy_hparams(), "vae_params": None, "weights": weights}, path)
    ckpt = load_checkpoint(path)
    assert ckpt["vae_class_name"] == "OpenAIDiscreteVAE"
    assert summary(ckpt)["family"] == "openai"


def test_family() -> None:
    assert family("VQGanVAE") == "taming"
    assert family("OpenAIDiscreteVAE") == "openai"
    assert family("DiscreteVAE") == "custom"
    with pytest.raises(CheckpointError, match="unknown VAE class 'VQGanVAE1024'"):
        family("VQGanVAE1024")


def test_weights_of_another_architecture_are_refused(modern: tuple) -> None:
    _, saved = modern
    ckpt = {**saved, "hparams": models.tiny_hparams(depth=3)}
    with pytest.raises(CheckpointError, match="hparams describe: 13 missing") as err:
        build_dalle(ckpt)
    assert "(first: transformer.layers.layers.2.0.scale," in str(err.value)
    ckpt = {**saved, "hparams": models.tiny_hparams(dim=48, dim_head=24)}
    with pytest.raises(CheckpointError, match=r"scale is \(1, 1, 32\), the model has \(1, 1, 48\)"):
        build_dalle(ckpt)


def test_unknown_hparam_is_a_clear_error(modern: tuple) -> None:
    _, saved = modern
    with pytest.raises(CheckpointError, match="hparams do not fit"):
        build_dalle({**saved, "hparams": {**saved["hparams"], "warp_drive": True}})
    with pytest.raises(CheckpointError, match='attention type "mlp" is not valid'):
        build_dalle({**saved, "hparams": {**saved["hparams"], "attn_types": ("mlp",)}})


def _save(path: Path, saved: dict, **overrides: object) -> None:
    kwargs = {
        key: saved[key]
        for key in TRAIN_DALLE_KEYS
        if key not in ("version", "vae_class_name") or key in overrides
    }
    kwargs.update(
        vae_class_name="DiscreteVAE",
        lineage={"segments": "sample_1E", "history": [{"dataset": "sample", "epochs": "1"}]},
        tokenizer={"kind": "simple", "vocab_size": 49408},
    )
    kwargs.update(overrides)
    save_checkpoint(path, **kwargs)  # type: ignore[arg-type]


def test_saved_file_loads_in_plain_dalle_pytorch_like_generate_py(
    tmp_path: Path, modern: tuple
) -> None:
    dalle, saved = modern
    path = tmp_path / "out" / "model.pt"
    _save(path, saved)
    # What DALLE-pytorch 1.6.6's generate.py does with --dalle_path.
    import dalle_pytorch

    load_obj = torch.load(str(path))
    assert list(load_obj) == [*TRAIN_DALLE_KEYS, "lineage", "tokenizer"]
    dalle_params, vae_params, weights = (
        load_obj.pop("hparams"),
        load_obj.pop("vae_params"),
        load_obj.pop("weights"),
    )
    assert load_obj.pop("vae_class_name") == "DiscreteVAE"
    assert load_obj.pop("version") == "1.6.6"
    rebuilt = dalle_pytorch.DALLE(vae=dalle_pytorch.DiscreteVAE(**vae_params), **dalle_params)
    rebuilt.load_state_dict(weights)  # strict, as generate.py does
    assert torch.equal(models.logits(rebuilt), models.logits(dalle))
    assert load_obj["epoch"] == 3
    assert load_obj["opt_state"]["state"].keys() == saved["opt_state"]["state"].keys()
    # ... anyone reads it back with weights_only=True, and so does dalle-data.
    assert torch.load(path, weights_only=True)["lineage"]["segments"] == "sample_1E"
    assert load_checkpoint(path)["lineage"]["segments"] == "sample_1E"
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]


def test_save_refuses_values_that_need_pickled_code(tmp_path: Path, modern: tuple) -> None:
    from decimal import Decimal

    _, saved = modern
    path = tmp_path / "model.pt"
    with pytest.raises(
        CheckpointError, match=r"lineage\['history'\]\[0\]\['epochs'\] is a Decimal"
    ):
        _save(path, saved, lineage={"segments": "sample_1E", "history": [{"epochs": Decimal(1)}]})
    assert not path.exists()


def test_save_refuses_an_invalid_lineage(tmp_path: Path, modern: tuple) -> None:
    _, saved = modern
    with pytest.raises(CheckpointError, match="lineage\\['segments'\\] 'sample-1E' is invalid"):
        _save(tmp_path / "model.pt", saved, lineage={"segments": "sample-1E"})


def test_save_refuses_objects_in_optimizer_state(tmp_path: Path, modern: tuple) -> None:
    _, saved = modern
    with pytest.raises(CheckpointError, match=r"opt_state\['hook'\] is a function"):
        _save(tmp_path / "model.pt", saved, opt_state={"hook": lambda: None})


def test_interrupted_save_leaves_the_previous_file_and_no_temp_file(
    tmp_path: Path, modern: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, saved = modern
    path = tmp_path / "model.pt"
    path.write_bytes(b"previous")

    def disk_full(obj: object, target: Path) -> None:
        Path(target).write_bytes(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        _save(path, saved)
    assert path.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_summary(tmp_path: Path, modern: tuple) -> None:
    dalle, saved = modern
    path = tmp_path / "model.pt"
    _save(path, saved, lineage={"segments": "cc12m-2E_wit-0.5E"})
    info = summary(load_checkpoint(path))
    transformer_params = sum(
        p.numel() for name, p in dalle.named_parameters() if not name.startswith("vae.")
    )
    assert info["parameters"] == transformer_params
    assert info["vae_parameters"] == sum(p.numel() for p in dalle.vae.parameters())
    assert info["name"] == "2L_16HD_2H_32I_8T_cc12m-2E_wit-0.5E"
    assert info["architecture"] == "2L_16HD_2H_32I_8T"
    assert info["family"] == "custom"
    assert info["lineage"] == "cc12m-2E_wit-0.5E"
    assert info["epochs"] == "2.5"
    assert info["epoch"] == 3
    assert info["dalle_pytorch_version"] == "1.6.6"


def test_summary_takes_lineage_from_a_parsable_file_name_when_the_key_is_absent(
    modern: tuple,
) -> None:
    _, saved = modern
    # The file name's architecture (wrong here) is ignored; hparams decide.
    info = summary(saved, file_name="taming/12L_64HD_8H_512I_128T_cc12m_1E.pt")
    assert info["name"] == "2L_16HD_2H_32I_8T_cc12m_1E"
    assert info["lineage_source"] == "the file name"
    info = summary(saved, file_name="dalle.pt")
    assert info["name"] == "2L_16HD_2H_32I_8T"
    assert info["lineage"] == ""
