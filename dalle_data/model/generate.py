"""Images from a DALLE checkpoint: a grid per prompt list, as DALLE-pytorch's generate.py does."""

from __future__ import annotations

from collections.abc import Sequence
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
def sample_image_codes(dalle: Any, text: torch.Tensor, *, top_k: float = 0.9) -> torch.Tensor:
    """(len(text), image_seq_len) image token ids, the ones ``dalle.generate_images`` samples.

    DALLE-pytorch 1.6.6's ``generate_images`` drops its ``use_cache`` when ``cond_scale`` is
    1 (``forward_with_cond_scale`` does not pass the cache on), so each of its steps runs
    the whole sequence through the transformer and projects every position onto the whole
    vocabulary, to keep only the last. This loop calls the same ``DALLE.forward`` with its
    own key/value cache: after the first step only the new token goes through the
    transformer and only its logits are computed. Sampling is DALLE-pytorch's own
    ``top_k`` and ``gumbel_sample`` on the same (batch, total_tokens) logits, so the random
    stream and, for a given seed, the tokens are the same as ``generate_images``'s.

    Models with sparse, axial or conv-like layers run without the cache (as slowly as
    DALLE-pytorch): its ``NonCached`` wrapper stores every such layer's inputs under the
    same key (None), so a second one would read the first one's.
    """
    from dalle_data.compat import import_dalle_pytorch

    dalle_pytorch = import_dalle_pytorch()
    sampling, non_cached = dalle_pytorch.dalle_pytorch, dalle_pytorch.transformer.NonCached
    cacheable = not any(isinstance(module, non_cached) for module in dalle.modules())
    text = text[:, : dalle.text_seq_len]
    codes = text[:, :0]
    cache: dict[str, Any] | None = {} if cacheable else None
    for _ in range(dalle.image_seq_len):
        logits = dalle(text, codes, cache=cache)[:, -1, :]
        sample = sampling.gumbel_sample(sampling.top_k(logits, thres=top_k), dim=-1)
        codes = torch.cat((codes, (sample - dalle.num_text_tokens)[:, None]), dim=-1)
    return codes


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
    """(len(text) * num_images, 3, H, W) images in [0, 1], prompt-major, reproducible by seed.

    The images are those of DALLE-pytorch's ``dalle.generate_images(chunk,
    filter_thres=top_k)`` on the same chunks after ``torch.manual_seed(seed)``, token for
    token (see :func:`sample_image_codes`), many times faster on a CPU.
    """
    device = next(dalle.parameters()).device
    rows = text.repeat_interleave(num_images, dim=0).to(device)
    torch.manual_seed(seed)
    out = []
    was_training = dalle.training
    dalle.eval()
    vae = cast(Any, dalle.vae)  # dalle_pytorch is unannotated
    for start in range(0, len(rows), batch_size):
        codes = sample_image_codes(dalle, rows[start : start + batch_size], top_k=top_k)
        out.append(to_unit_range(dalle, vae.decode(codes)).cpu())
    dalle.train(was_training)
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
