"""Taming VQGAN files as published: configs and weights, read without downloads or code.

DALLE-pytorch 1.6.6's ``VQGanVAE`` takes a taming config (``VQModel`` or ``GumbelVQ``) and
a weights file. Published weights are PyTorch Lightning checkpoints (``state_dict`` beside
``callbacks``, ``optimizer_states``...), which ``torch.load(weights_only=True)`` refuses;
published configs name an LPIPS loss (building it downloads VGG16) and a ``ckpt_path`` on
the trainer's machine. Here the weights come through :mod:`safe_pickle` (only the
``state_dict`` tensors are used), the config is checked (every ``target`` must be a taming
class DALLE-pytorch uses: a config names code it imports), its loss becomes DummyLoss, and
the weights are loaded strictly (VQGanVAE's own ``strict=False`` would hide a mismatch).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from dalle_data.errors import CheckpointError
from dalle_data.model import safe_pickle

if TYPE_CHECKING:
    import torch
    from omegaconf import DictConfig
    from torch import nn

VQGAN_CACHE = Path("~/.cache/dalle").expanduser()
VQGAN_DEFAULTS = ("vqgan.1024.model.ckpt", "vqgan.1024.config.yml")
DALLE_IMAGE_SIZE = 256  # VQGanVAE.image_size: DALLE-pytorch always feeds a VQGAN 256 px
_DUMMY_LOSS = "taming.modules.losses.vqperceptual.DummyLoss"
_MODELS = ("taming.models.vqgan.VQModel", "taming.models.vqgan.GumbelVQ")
# Every class a supported config may name (the loss is replaced before building).
_TARGETS = frozenset({*_MODELS, _DUMMY_LOSS, "taming.lr_scheduler.LambdaWarmUpCosineScheduler"})
_CONFIG_SUFFIXES = (".yaml", ".yml")


def vqgan_files(
    model_path: str | os.PathLike[str] | None, config_path: str | os.PathLike[str] | None
) -> tuple[Path, Path]:
    """The given weights and config, or the pair DALLE-pytorch caches in ~/.cache/dalle."""
    if (model_path is None) != (config_path is None):
        raise CheckpointError(
            "pass both --vqgan-model-path and --vqgan-config-path (a VQGAN needs its "
            "weights and its taming config), or neither to use ~/.cache/dalle"
        )
    if model_path is not None and config_path is not None:
        return Path(model_path), Path(config_path)
    model, config = (VQGAN_CACHE / name for name in VQGAN_DEFAULTS)
    if not (model.is_file() and config.is_file()):
        raise CheckpointError(
            "this checkpoint uses a VQGAN (taming) VAE and dalle-data never downloads one: "
            f"pass --vqgan-model-path and --vqgan-config-path, or place {model} and {config} "
            "there"
        )
    return model, config


def load_weights(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A VQGAN file's ``state_dict`` (tensors only) and its Lightning facts, if any."""
    return weights_from(safe_pickle.load(path, what="VQGAN model").obj, Path(path))


def weights_from(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The ``state_dict`` of a loaded VQGAN file and its Lightning facts (epoch, step, version).

    Accepts ``{"state_dict": ...}`` as DALLE-pytorch expects and whole Lightning
    checkpoints; everything beside the state dict (callbacks, optimizer states) stays unused.
    """
    import torch

    if not isinstance(obj, dict) or not isinstance(obj.get("state_dict"), dict):
        found = ", ".join(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(
            f"VQGAN model {path} has no 'state_dict' dict (found: {found or 'nothing'}); "
            "expected a taming checkpoint saved as {'state_dict': model.state_dict(), ...}"
        )
    state = obj["state_dict"]
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            what = safe_pickle.placeholder_name(value) or type(value).__name__
            raise CheckpointError(
                f"VQGAN model {path}: state_dict[{key!r}] is a {what}, not a tensor"
            )
    facts = {
        key: obj[key]
        for key in ("epoch", "global_step", "pytorch-lightning_version")
        if isinstance(obj.get(key), int | str)
    }
    return dict(state), facts


def load_config(path: str | os.PathLike[str]) -> DictConfig:
    """A taming VQGAN config, checked: a supported model, known targets, the fields DALLE reads."""
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"VQGAN config {path} does not exist or is not a file")
    try:
        config = OmegaConf.load(path)
        model = config.model
        target, params = model.target, model.params
        ddconfig = params.ddconfig
        int(params.n_embed), int(params.embed_dim), int(ddconfig.resolution)
        len(ddconfig.ch_mult)
    except (OmegaConfBaseException, yaml.YAMLError, OSError, ValueError, TypeError) as err:
        reason = " ".join(str(err).split()[:30])
        raise CheckpointError(
            f"VQGAN config {path} is not a taming config with model.target and model.params "
            f"(n_embed, embed_dim, ddconfig): {reason}"
        ) from None
    except AttributeError as err:
        raise CheckpointError(f"VQGAN config {path} is not a taming config: {err}") from None
    if target not in _MODELS:
        raise CheckpointError(
            f"VQGAN config {path}: model.target {target!r} is not a VQGAN DALLE-pytorch 1.6.6 "
            f"uses ({', '.join(_MODELS)})"
        )
    for where, value in _targets(OmegaConf.to_container(model.params), "model.params"):
        if value not in _TARGETS and not where.startswith("model.params.lossconfig"):
            raise CheckpointError(
                f"VQGAN config {path}: {where} names {value!r}; dalle-data builds only "
                f"{', '.join(sorted(_TARGETS))} (a config's targets are code it would import)"
            )
    return cast("DictConfig", config)


def describe(path: str | os.PathLike[str], loaded: Any = None) -> dict[str, Any]:
    """What ``dalle-data inspect`` says about a VQGAN config, or weights (``loaded`` if read)."""
    path = Path(path)
    if path.suffix.lower() in _CONFIG_SUFFIXES:
        model_config = load_config(path).model
        params = model_config.params
        ddconfig = params.ddconfig
        factor = 2 ** (len(ddconfig.ch_mult) - 1)
        info: dict[str, Any] = {
            "file": "VQGAN config",
            "model": str(model_config.target).rpartition(".")[2],
            "codebook_size": int(params.n_embed),
            "embed_dim": int(params.embed_dim),
            "downsampling": factor,
            "dalle_downsampling": _dalle_factor(ddconfig),
        }
    else:
        state, facts = weights_from(loaded, path) if loaded is not None else load_weights(path)
        book = state.get("quantize.embedding.weight")
        model = "VQModel"
        if book is None:
            book, model = state.get("quantize.embed.weight"), "GumbelVQ"
        if book is None or book.dim() != 2:
            raise CheckpointError(
                f"VQGAN model {path} has no codebook (quantize.embedding.weight or "
                "quantize.embed.weight): is it a taming VQGAN?"
            )
        downs = {
            k.split(".")[2] for k in state if k.startswith("encoder.down.") and ".downsample." in k
        }
        info = {
            "file": "VQGAN weights",
            "model": model,
            "codebook_size": int(book.shape[0]),
            "embed_dim": int(book.shape[1]),
            "downsampling": 2 ** len(downs),
            "parameters": sum(t.numel() for k, t in state.items() if not k.startswith("loss.")),
            **facts,
        }
    info["image_tokens_at_256px"] = (DALLE_IMAGE_SIZE // info["downsampling"]) ** 2
    return info


def format_description(info: Mapping[str, Any]) -> str:
    """``describe()`` as aligned text."""
    side = DALLE_IMAGE_SIZE // info["downsampling"]
    rows = [
        ("file", f"{info['file']} (taming {info['model']})"),
        ("codebook", f"{info['codebook_size']:,} codes of dimension {info['embed_dim']}"),
        ("downsampling", f"f{info['downsampling']}"),
        ("image tokens", f"{info['image_tokens_at_256px']:,} at 256 px ({side}x{side})"),
    ]
    dalle = info.get("dalle_downsampling")
    if dalle is not None and dalle != info["downsampling"]:
        rows.append(
            ("warning", f"DALLE-pytorch reads f{dalle} from resolution / attn_resolutions[0]")
        )
    if "parameters" in info:
        rows.append(("parameters", f"{info['parameters']:,} (without the training loss)"))
    if "pytorch-lightning_version" in info:
        rows.append(
            (
                "lightning",
                f"pytorch-lightning {info['pytorch-lightning_version']}, epoch "
                f"{info.get('epoch', '?')}, step {info.get('global_step', '?')}",
            )
        )
    return "\n".join(f"{label:<14}{value}" for label, value in rows)


def is_vqgan_file(path: str | os.PathLike[str], obj: Any = None) -> bool:
    """A config by its suffix, or a loaded object holding ``state_dict`` but no ``weights``."""
    if Path(path).suffix.lower() in _CONFIG_SUFFIXES:
        return True
    return isinstance(obj, dict) and "state_dict" in obj and "weights" not in obj


def build_vae(model_path: Path, config_path: Path) -> nn.Module:
    """DALLE-pytorch's ``VQGanVAE`` from local files, DummyLoss instead of LPIPS, strict weights."""
    from dalle_data.compat import import_dalle_pytorch

    dalle_pytorch = import_dalle_pytorch()
    config = load_config(config_path)
    factor = 2 ** (len(config.model.params.ddconfig.ch_mult) - 1)
    if _dalle_factor(config.model.params.ddconfig) != factor:
        raise CheckpointError(
            f"VQGAN config {config_path}: DALLE-pytorch reads the downsampling factor as "
            f"resolution / attn_resolutions[0] = {_dalle_factor(config.model.params.ddconfig)}, "
            f"but ch_mult gives {factor}; fix attn_resolutions"
        )
    state, _ = load_weights(model_path)
    state = {k: t for k, t in state.items() if not k.startswith("loss.")}
    import torch
    from omegaconf import OmegaConf

    params = config.model.params
    params.lossconfig = {"target": _DUMMY_LOSS}
    # A ckpt_path inside the config points at the trainer's machine; the weights come
    # from the model file instead.
    params.pop("ckpt_path", None)
    with tempfile.TemporaryDirectory(prefix="dalle-data-vqgan-") as tmp:
        patched, empty = Path(tmp) / "config.yaml", Path(tmp) / "empty.ckpt"
        OmegaConf.save(config, patched)
        torch.save({"state_dict": {}}, empty)  # VQGanVAE loads it non-strictly: a no-op
        # VQGanVAE prints where it loaded from; keep stdout clean for --json callers.
        try:
            with contextlib.redirect_stdout(sys.stderr):
                vae = dalle_pytorch.VQGanVAE(str(empty), str(patched))
        except Exception as err:  # noqa: BLE001 (taming raises anything on a bad config)
            raise CheckpointError(
                f"cannot build the VQGAN of {config_path}: {type(err).__name__}: {err}"
            ) from None
    _load_strict(vae.model, state, model_path, config_path)
    return vae


def _load_strict(model: nn.Module, state: dict[str, Any], model_path: Path, config: Path) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    resized = [k for k in state if k in expected and state[k].shape != expected[k].shape]
    if missing or unexpected or resized:
        problems = [
            f"{len(keys)} {what} (first: {', '.join(keys[:3])})"
            for what, keys in (("missing", missing), ("unexpected", unexpected))
            if keys
        ] + [
            f"{k} is {tuple(state[k].shape)}, the config makes {tuple(expected[k].shape)}"
            for k in resized[:3]
        ]
        raise CheckpointError(
            f"VQGAN model {model_path} does not fit config {config}: {'; '.join(problems)}"
        )
    model.load_state_dict(state, strict=True)


def _dalle_factor(ddconfig: Any) -> int | None:
    """The factor DALLE-pytorch computes (``resolution / attn_resolutions[0]``), if it can."""
    attn = list(ddconfig.get("attn_resolutions") or [])
    if not attn or not attn[0]:
        return None
    ratio = int(ddconfig.resolution) / int(attn[0])
    return int(ratio) if ratio >= 1 and math.log2(ratio).is_integer() else None


def _targets(value: Any, where: str) -> list[tuple[str, Any]]:
    """Every ``target`` entry below ``value`` with its dotted location."""
    found = []
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "target":
                found.append((f"{where}.target", item))
            else:
                found += _targets(item, f"{where}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _targets(item, f"{where}[{index}]")
    return found
