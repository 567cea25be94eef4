"""``dalle-data init``: a fresh parent checkpoint from a model preset in ``configs/models/``.

A preset names the VAE (a DiscreteVAE trained here on the shards, or a VQGAN from local
files) and the DALLE hyperparameters; the text vocabulary comes from the shards' manifest
(or ``--tokenizer``), so the parent fits the data it will be extended on. A fresh parent
has no lineage: its name is the architecture alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from dalle_data.errors import DalleDataError
from dalle_data.formats.manifest import read_manifest
from dalle_data.model import lineage as lin

if TYPE_CHECKING:
    import torch

    from dalle_data.model.loader import ShardRef

VAE_CLASSES = ("DiscreteVAE", "VQGanVAE")
DALLE_KEYS = {
    "dim", "depth", "heads", "dim_head", "text_seq_len", "reversible", "attn_dropout",
    "ff_dropout", "attn_types", "loss_img_weight", "stable", "sandwich_norm",
    "shift_tokens", "rotary_emb", "shared_attn_ids", "shared_ff_ids",
    "share_input_output_emb",
}  # fmt: skip
# DALLE-pytorch 1.6.6's defaults, written out: a checkpoint without shift_tokens and
# rotary_emb reads as a 2021 one (both False), and the card shows every value.
DALLE_DEFAULTS = {
    "heads": 8, "dim_head": 64, "text_seq_len": 256, "reversible": False,
    "attn_types": ("full",), "loss_img_weight": 7, "shift_tokens": True, "rotary_emb": True,
}  # fmt: skip


class PresetError(DalleDataError):
    """A preset file or init option the user must fix."""


def load_preset(path: Path) -> dict[str, Any]:
    """Read and check a preset: ``vae.class``, ``vae.params``, ``vae.train``, ``dalle``."""
    path = Path(path)
    try:
        preset = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise PresetError(
            f"preset {path} does not exist: see configs/models/ for presets"
        ) from None
    vae = preset.get("vae") or {}
    if vae.get("class") not in VAE_CLASSES:
        raise PresetError(
            f"preset {path}: vae.class is {vae.get('class')!r}; use one of {', '.join(VAE_CLASSES)}"
        )
    dalle = preset.get("dalle") or {}
    unknown = sorted(set(dalle) - DALLE_KEYS)
    if unknown or not {"dim", "depth"} <= set(dalle):
        raise PresetError(
            f"preset {path}: dalle needs dim and depth and takes only DALLE-pytorch "
            f"arguments ({', '.join(sorted(DALLE_KEYS))}); unknown: {', '.join(unknown) or '-'}"
        )
    return preset


def preset_hparams(preset: dict[str, Any], num_text_tokens: int) -> dict[str, Any]:
    """The DALLE ``hparams`` a parent built from ``preset`` carries."""
    hparams = {"num_text_tokens": num_text_tokens, **DALLE_DEFAULTS, **preset["dalle"]}
    hparams["attn_types"] = tuple(hparams["attn_types"])
    return hparams


def preset_name(preset_path: Path, num_text_tokens: int = 1) -> str:
    """The name of a fresh parent from this preset: its architecture, no lineage."""
    hparams = preset_hparams(load_preset(preset_path), num_text_tokens)
    return str(lin.Architecture.from_hparams(hparams))


def preset_family(preset_path: Path) -> str:
    """taming or custom, from the preset's VAE class."""
    return lin.family(load_preset(preset_path)["vae"]["class"])


def _shard_refs(dirs: Sequence[Path]) -> tuple[tuple[ShardRef, ...], dict[str, Any], int]:
    from dalle_data.model.loader import ShardRef

    refs: list[ShardRef] = []
    tokenizer: dict[str, Any] = {}
    image_size = 0
    for d in dirs:
        manifest = read_manifest(Path(d))
        tokenizer = tokenizer or dict(manifest["tokenizer"])
        image_size = min(image_size or manifest["image_size"], manifest["image_size"])
        refs += [ShardRef(Path(d) / s["name"], s["samples"]) for s in manifest["shards"]]
    return tuple(refs), tokenizer, image_size


def train_discrete_vae(
    vae: torch.nn.Module, shards: tuple[ShardRef, ...], settings: dict[str, Any]
) -> float:
    """Train ``vae`` on the shards' images as DALLE-pytorch's train_vae.py does; final loss.

    Adam with exponential learning-rate decay and the Gumbel temperature annealed from
    ``temperature_start`` to ``temperature_end`` over the run.
    """
    steps = int(settings.get("steps", 0))
    if steps <= 0:
        return math.nan
    import torch
    from tqdm import tqdm

    from dalle_data.model.checkpoint import model_int
    from dalle_data.model.distributed import limit_cpu_threads
    from dalle_data.model.loader import LoaderSpec, batches, steps_per_epoch

    limit_cpu_threads()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vae.to(device).train()
    seed = int(settings.get("seed", 0))
    torch.manual_seed(seed)
    spec = LoaderSpec(
        shards=shards,
        batch_size=int(settings.get("batch_size", 32)),
        image_size=model_int(vae, "image_size"),
        text_seq_len=1,
        seed=seed,
        num_workers=int(settings.get("num_workers", 0)),
    )
    opt = torch.optim.Adam(vae.parameters(), lr=float(settings.get("learning_rate", 1e-3)))
    decay = float(settings.get("lr_decay", 1.0)) ** (1 / max(1, steps))
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=decay)
    t0 = float(settings.get("temperature_start", 1.0))
    t1 = float(settings.get("temperature_end", 0.5))
    per_epoch, step, loss_value = steps_per_epoch(spec), 0, math.nan
    with tqdm(total=steps, desc="train DiscreteVAE", unit="step", mininterval=1.0) as bar:
        while step < steps:
            for batch in batches(spec, step // per_epoch, step % per_epoch):
                temp = t0 * (t1 / t0) ** (step / max(1, steps - 1))
                loss = vae(batch.image_float(device), return_loss=True, temp=temp)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                loss_value = loss.item()
                bar.set_postfix(loss=f"{loss_value:.4f}", refresh=False)
                bar.update()
                if step >= steps:
                    break
    vae.cpu().eval()
    return loss_value


def init_parent(
    preset_path: Path,
    output: Path,
    *,
    shards: Sequence[Path] = (),
    tokenizer: str | None = None,
    vqgan_model_path: Path | None = None,
    vqgan_config_path: Path | None = None,
    seed: int = 0,
) -> Path:
    """Write a fresh DALLE checkpoint for ``preset_path`` to ``output``."""
    import torch

    from dalle_data.compat import import_dalle_pytorch
    from dalle_data.formats import tokenizers
    from dalle_data.model.checkpoint import build_vae, model_int, save_checkpoint

    preset = load_preset(preset_path)
    refs, recorded, image_size = _shard_refs(shards) if shards else ((), {}, 0)
    if tokenizer is not None:
        recorded = tokenizers.load(tokenizer).record()
    if not recorded:
        raise PresetError(
            "init needs the text vocabulary: pass --shards (the manifest names the tokenizer) "
            "or --tokenizer"
        )
    vae_cfg = preset["vae"]
    vae_class = vae_cfg["class"]
    vae_params = dict(vae_cfg.get("params") or {}) if vae_class == "DiscreteVAE" else None
    torch.manual_seed(seed)
    vae = build_vae(
        {"vae_class_name": vae_class, "vae_params": vae_params},
        vqgan_model_path=vqgan_model_path,
        vqgan_config_path=vqgan_config_path,
    )
    vae_size = model_int(vae, "image_size")
    if refs and image_size < vae_size:
        raise PresetError(
            f"the shards hold {image_size}px images but preset {preset_path} needs "
            f"{vae_size}px: rebuild the shards with a larger image_size"
        )
    vae_loss = math.nan
    if vae_class == "DiscreteVAE" and vae_cfg.get("train"):
        if not refs:
            raise PresetError(
                f"preset {preset_path} trains its DiscreteVAE on the shards: pass --shards DIR"
            )
        vae_loss = train_discrete_vae(vae, refs, {"seed": seed, **vae_cfg["train"]})
    hparams = preset_hparams(preset, int(recorded["vocab_size"]))
    dalle = import_dalle_pytorch().DALLE(vae=vae, **hparams)
    name = str(lin.Architecture.from_hparams(hparams))
    save_checkpoint(
        output,
        hparams=hparams,
        vae_params=vae_params,
        vae_class_name=vae_class,
        weights=dalle.state_dict(),
        epoch=0,
        opt_state=None,
        scheduler_state=None,
        lineage={
            "name": name,
            "family": lin.family(vae_class),
            "segments": "",
            "history": [],
            "init": {
                "preset": Path(preset_path).name,
                "seed": seed,
                "vae_train_loss": None if math.isnan(vae_loss) else round(vae_loss, 5),
            },
        },
        tokenizer=recorded,
    )
    return Path(output)
