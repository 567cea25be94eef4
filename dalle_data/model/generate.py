"""Images from a DALLE checkpoint: a grid per prompt list, as DALLE-pytorch's generate.py does."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from dalle_data.atomic import atomic_path
from dalle_data.errors import DalleDataError
from dalle_data.formats import tokenizers
from dalle_data.model.checkpoint import model_int
from dalle_data.model.loader import pad_tokens


class GenerateError(DalleDataError):
    """A prompt, tokenizer or output the user must fix."""


def checkpoint_tokenizer(ckpt: dict[str, Any], spec: str | None = None) -> tokenizers.Tokenizer:
    """The tokenizer a checkpoint was trained with: ``spec``, else the one it records.

    Checkpoints without a record (DALLE-models, train_dalle.py) used DALLE-pytorch's
    default CLIP BPE when ``num_text_tokens`` is its 49408.
    """
    recorded = ckpt.get("tokenizer") or {}
    vocab = ckpt["hparams"].get("num_text_tokens")
    chosen = spec or recorded.get("spec") or ("simple" if vocab == 49408 else None)
    if chosen is None:
        raise GenerateError(
            f"the checkpoint records no tokenizer and its vocabulary ({vocab} tokens) is not "
            "DALLE-pytorch's default: pass --tokenizer hug:<tokenizer.json> or yttm:<model>"
        )
    tokenizer = tokenizers.load(chosen)
    if vocab is not None and tokenizer.vocab_size != vocab:
        raise GenerateError(
            f"tokenizer {chosen!r} has {tokenizer.vocab_size} tokens but the model was built "
            f"for {vocab}: pass the tokenizer it was trained with (--tokenizer)"
        )
    return tokenizer


def encode_prompts(
    tokenizer: tokenizers.Tokenizer, prompts: Sequence[str], text_seq_len: int
) -> torch.Tensor:
    """(len(prompts), text_seq_len) ids, padded and truncated like the training loader."""
    if not prompts or any(not p.strip() for p in prompts):
        raise GenerateError("every prompt must be non-empty text")
    return torch.from_numpy(pad_tokens(tokenizer.encode_batch(list(prompts)), text_seq_len))


def to_unit_range(dalle: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """VAE output in [0, 1]: DiscreteVAE decodes into its normalized space, the others do not."""
    from dalle_data.compat import import_dalle_pytorch

    vae = dalle.vae
    if isinstance(vae, import_dalle_pytorch().DiscreteVAE) and vae.normalization is not None:
        means, stds = (torch.tensor(t, device=images.device) for t in vae.normalization)
        images = images * stds.view(1, -1, 1, 1) + means.view(1, -1, 1, 1)
    return images.clamp(0.0, 1.0)


@torch.no_grad()
def generate_images(
    dalle: torch.nn.Module,
    text: torch.Tensor,
    *,
    num_images: int,
    seed: int,
    top_k: float = 0.9,
    batch_size: int = 64,
) -> torch.Tensor:
    """(len(text) * num_images, 3, H, W) images in [0, 1], prompt-major, reproducible by seed."""
    device = next(dalle.parameters()).device
    rows = text.repeat_interleave(num_images, dim=0).to(device)
    torch.manual_seed(seed)
    out = []
    dalle.eval()
    # dalle_pytorch is unannotated; torch types the method as a Tensor | Module attribute.
    generate = cast(Callable[..., torch.Tensor], dalle.generate_images)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        images = generate(chunk, filter_thres=top_k, use_cache=True)
        out.append(to_unit_range(dalle, images).cpu())
    return torch.cat(out)


def save_grid(images: torch.Tensor, path: Path, *, nrow: int) -> Path:
    """Write ``images`` as one PNG grid, ``nrow`` images per row, atomically.

    Tiles smaller than 128 px (a CPU demo model makes 16 px pictures) are enlarged with
    nearest-neighbour sampling so a person can see them; the pixels stay the model's own.
    """
    from PIL import Image
    from torchvision.utils import make_grid

    grid = make_grid(images, nrow=nrow, padding=2, pad_value=1.0)
    array = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    picture = Image.fromarray(array)
    scale = -(-128 // images.shape[-1])
    if scale > 1:
        picture = picture.resize(
            (picture.width * scale, picture.height * scale), Image.Resampling.NEAREST
        )
    with atomic_path(path) as tmp:
        picture.save(tmp, format="PNG")
    return Path(path)


def generate_grid(
    checkpoint: Path,
    prompts: Sequence[str],
    output: Path,
    *,
    num_images: int = 4,
    seed: int = 0,
    top_k: float = 0.9,
    tokenizer: str | None = None,
    vqgan_model_path: Path | None = None,
    vqgan_config_path: Path | None = None,
) -> Path:
    """Load ``checkpoint`` and write a grid: one row of ``num_images`` per prompt."""
    from dalle_data.model import checkpoint as ckpt_io

    if num_images < 1:
        raise GenerateError(f"--num-images must be at least 1, got {num_images}")
    if not 0.0 < top_k < 1.0:
        raise GenerateError(f"--top-k is the kept fraction of logits, in (0, 1); got {top_k}")
    ckpt = ckpt_io.load_checkpoint(checkpoint)
    dalle = ckpt_io.build_dalle(
        ckpt, vqgan_model_path=vqgan_model_path, vqgan_config_path=vqgan_config_path
    )
    if torch.cuda.is_available():
        dalle = dalle.cuda()
    text_seq_len = model_int(dalle, "text_seq_len")
    text = encode_prompts(checkpoint_tokenizer(ckpt, tokenizer), prompts, text_seq_len)
    images = generate_images(dalle, text, num_images=num_images, seed=seed, top_k=top_k)
    return save_grid(images, output, nrow=num_images)
