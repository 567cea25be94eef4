"""Tiny DALLE-pytorch models and checkpoint files, built in the test (nothing downloaded).

Sizes keep a model build under a second on one core: a 32 px DiscreteVAE (64 image
tokens), a 2-layer DALLE with dim 32 and 8 text tokens, and a taming VQGAN whose
32x downsampling gives DALLE's fixed 256 px the same 64 tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml

from dalle_data.compat import import_dalle_pytorch

dalle_pytorch = import_dalle_pytorch()

TINY_VAE_PARAMS: dict[str, Any] = {
    "image_size": 32,
    "num_layers": 2,
    "num_tokens": 32,
    "codebook_dim": 16,
    "hidden_dim": 16,
}

LPIPS_LOSS = "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator"
DUMMY_LOSS = "taming.modules.losses.vqperceptual.DummyLoss"


def tiny_hparams(**overrides: Any) -> dict[str, Any]:
    """``hparams`` with exactly the keys DALLE-pytorch 1.6.6's train_dalle.py writes."""
    hparams = {
        "num_text_tokens": 64,
        "text_seq_len": 8,
        "dim": 32,
        "depth": 2,
        "heads": 2,
        "dim_head": 16,
        "reversible": False,
        "loss_img_weight": 7,
        "attn_types": ("full",),
        "ff_dropout": 0.0,
        "attn_dropout": 0.0,
        "stable": False,
        "shift_tokens": True,
        "rotary_emb": True,
        "shared_attn_ids": None,
        "shared_ff_ids": None,
        "share_input_output_emb": False,
    }
    hparams.update(overrides)
    return hparams


def tiny_dalle(hparams: dict[str, Any], vae: torch.nn.Module | None = None, seed: int = 0) -> Any:
    """A DALLE with seeded random weights (a DiscreteVAE from TINY_VAE_PARAMS by default)."""
    torch.manual_seed(seed)
    vae = vae if vae is not None else dalle_pytorch.DiscreteVAE(**TINY_VAE_PARAMS)
    return dalle_pytorch.DALLE(vae=vae, **hparams)


def train_dalle_dict(dalle: Any, hparams: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The dict train_dalle.py saves for a DiscreteVAE model, with a real Adam state."""
    opt = torch.optim.Adam([p for p in dalle.parameters() if p.requires_grad], lr=1e-3)
    text, codes = sample_inputs(dalle)
    dalle(text, codes, return_loss=True).backward()
    opt.step()
    return {
        "hparams": hparams,
        "vae_params": dict(TINY_VAE_PARAMS),
        "epoch": 3,
        "version": "1.6.6",
        "vae_class_name": "DiscreteVAE",
        "weights": dalle.state_dict(),
        "opt_state": opt.state_dict(),
        "scheduler_state": None,
        **extra,
    }


def sample_inputs(dalle: Any, batch: int = 2, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random text ids and image codebook ids shaped for ``dalle``."""
    gen = torch.Generator().manual_seed(seed)
    text = torch.randint(
        1, dalle.num_text_tokens - dalle.text_seq_len, (batch, dalle.text_seq_len), generator=gen
    )
    codes = torch.randint(0, dalle.num_image_tokens, (batch, dalle.image_seq_len), generator=gen)
    return text, codes


@torch.no_grad()
def logits(dalle: Any, seed: int = 1) -> torch.Tensor:
    """Eval-mode logits of ``dalle`` on fixed random inputs."""
    dalle.eval()
    text, codes = sample_inputs(dalle, seed=seed)
    return dalle(text, codes)


def legacy_weights(dalle: Any) -> dict[str, torch.Tensor]:
    """``dalle``'s weights as a 2021 DALLE-pytorch would have named them.

    Axial position keys were ``weights_0``/``weights_1``, and the CachedAs/NonCached
    wrappers (added in 2022) did not exist: their ``.fn`` level is removed from every key
    below one, found from the module tree rather than from a key pattern.
    """
    from dalle_pytorch.transformer import CachedAs, NonCached

    wrappers = sorted(
        (name for name, mod in dalle.named_modules() if isinstance(mod, CachedAs | NonCached)),
        key=len,
        reverse=True,  # innermost first, so outer names still match after each removal
    )
    weights = {}
    for key, tensor in dalle.state_dict().items():
        for name in wrappers:
            if key.startswith(f"{name}.fn."):
                key = f"{name}.{key.removeprefix(f'{name}.fn.')}"
        weights[key.replace("image_pos_emb.weights.", "image_pos_emb.weights_")] = tensor
    return weights


def legacy_hparams(**overrides: Any) -> dict[str, Any]:
    """2021 train_dalle.py hparams: no shift_tokens/rotary_emb, a sparse layer."""
    hparams = tiny_hparams(attn_types=("full", "sparse"), **overrides)
    del hparams["shift_tokens"], hparams["rotary_emb"]
    for key in ("stable", "shared_attn_ids", "shared_ff_ids", "share_input_output_emb"):
        del hparams[key]
    return hparams


def write_legacy_checkpoint(path: Path, **hparams: Any) -> Any:
    """A 2021-format DiscreteVAE checkpoint file; returns the model it was saved from.

    That model has absolute position embeddings, no token shift and full attention in
    every layer: what a 2021 model with a sparse layer becomes without DeepSpeed.
    ``hparams`` go to both (``reversible=True`` for a reversible model).
    """
    dalle = tiny_dalle(tiny_hparams(rotary_emb=False, shift_tokens=False, **hparams), seed=7)
    torch.save(
        {
            "hparams": legacy_hparams(**hparams),
            "vae_params": dict(TINY_VAE_PARAMS),
            "weights": legacy_weights(dalle),
        },
        path,
    )
    return dalle


def write_late_2021_checkpoint(path: Path) -> Any:
    """A late-2021 file: shift_tokens and rotary_emb in hparams, no cache wrappers yet."""
    hparams = tiny_hparams()
    dalle = tiny_dalle(hparams, seed=9)
    weights = legacy_weights(dalle)
    torch.save({"hparams": hparams, "vae_params": dict(TINY_VAE_PARAMS), "weights": weights}, path)
    return dalle


GUMBEL_SCHEDULER = {
    "target": "taming.lr_scheduler.LambdaWarmUpCosineScheduler",
    "params": {
        "warm_up_steps": 0,
        "max_decay_steps": 1000001,
        "lr_start": 0.9,
        "lr_max": 0.9,
        "lr_min": 1.0e-06,
    },
}


def tiny_vqgan_config(loss_target: str = LPIPS_LOSS, gumbel: bool = False) -> dict[str, Any]:
    """A taming VQModel (or GumbelVQ) config shaped like the published ones.

    With the default LPIPS loss, building it would download VGG16; ``ckpt_path`` points at
    the trainer's machine and ``image_key`` is set, as in the published files.
    """
    loss: dict[str, Any] = {"target": loss_target}
    if loss_target == LPIPS_LOSS:
        loss["params"] = {"disc_conditional": False, "disc_in_channels": 3, "disc_start": 10000}
    extra: dict[str, Any] = {"ckpt_path": "/trainer/logs/2020-11-09/checkpoints/last.ckpt"}
    if gumbel:
        extra |= {"kl_weight": 1.0e-08, "temperature_scheduler_config": GUMBEL_SCHEDULER}
    return {
        "model": {
            "base_learning_rate": 4.5e-06,
            "target": f"taming.models.vqgan.{'GumbelVQ' if gumbel else 'VQModel'}",
            "params": {
                **extra,
                "image_key": "image",
                "embed_dim": 8,
                "n_embed": 32,
                "ddconfig": {
                    "double_z": False,
                    "z_channels": 8,
                    "resolution": 32,
                    "in_channels": 3,
                    "out_ch": 3,
                    "ch": 32,
                    "ch_mult": [1, 1, 1, 1, 1, 1],
                    "num_res_blocks": 1,
                    # VQGanVAE reads its downsampling factor as resolution / attn_resolutions[0]
                    "attn_resolutions": [1],
                    "dropout": 0.0,
                },
                "lossconfig": loss,
            },
        }
    }


def tiny_vqgan(seed: int = 3, gumbel: bool = False) -> Any:
    """The taming model a tiny config describes, with seeded random weights."""
    from taming.models.vqgan import GumbelVQ, VQModel

    params = tiny_vqgan_config(DUMMY_LOSS)["model"]["params"]
    torch.manual_seed(seed)
    kwargs = {"temperature_scheduler_config": GUMBEL_SCHEDULER} if gumbel else {}
    return (GumbelVQ if gumbel else VQModel)(
        ddconfig=params["ddconfig"],
        lossconfig={"target": DUMMY_LOSS},
        n_embed=params["n_embed"],
        embed_dim=params["embed_dim"],
        **kwargs,
    )


def write_tiny_vqgan(
    folder: Path, loss_target: str = LPIPS_LOSS, seed: int = 3, gumbel: bool = False
) -> tuple[Path, Path]:
    """A taming VQGAN saved as ``{"state_dict": ...}`` beside its YAML; returns both paths."""
    folder.mkdir(parents=True, exist_ok=True)
    model = tiny_vqgan(seed, gumbel)
    model_path, config_path = folder / "vqgan.ckpt", folder / "vqgan.yaml"
    torch.save({"state_dict": model.state_dict()}, model_path)
    config = tiny_vqgan_config(loss_target, gumbel)
    if loss_target == DUMMY_LOSS:  # a local copy plain DALLE-pytorch can build
        del config["model"]["params"]["ckpt_path"]
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return model_path, config_path


def write_legacy_vqgan_checkpoint(path: Path, folder: Path) -> Any:
    """A 2021-format taming checkpoint whose weights include ``vae.model.loss.*`` keys.

    Returns the model it was saved from, built by plain DALLE-pytorch from a DummyLoss
    copy of the VQGAN. The loss keys mimic what VQLPIPSWithDiscriminator puts in a state
    dict; DALLE never uses them.
    """
    model_path, config_path = write_tiny_vqgan(folder / "dummy-loss", loss_target=DUMMY_LOSS)
    vae = dalle_pytorch.VQGanVAE(str(model_path), str(config_path))
    dalle = tiny_dalle(tiny_hparams(rotary_emb=False, shift_tokens=False), vae=vae, seed=11)
    weights = legacy_weights(dalle)
    gen = torch.Generator().manual_seed(5)
    weights["vae.model.loss.discriminator.main.0.weight"] = torch.randn(64, 3, 4, 4, generator=gen)
    weights["vae.model.loss.perceptual_loss.net.slice1.0.weight"] = torch.randn(
        64, 3, 3, 3, generator=gen
    )
    torch.save({"hparams": legacy_hparams(), "vae_params": None, "weights": weights}, path)
    return dalle
