"""CLIP score: how well images a checkpoint generates for held-out captions match them.

For ``captions`` eval captions spread evenly over the set (manifest order), one image each
is generated with a fixed seed; the score is the mean cosine similarity between each
image's and its caption's open_clip embeddings (the 0-1 quantity behind CLIPScore, without
its 2.5 or 100 factor). The CLIP weights come only from a local file, read without running
pickled code (safetensors, or ``torch.load(weights_only=True)``); nothing is downloaded.
``--clip-model`` names one of open_clip's configs or a config JSON of one's own.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dalle_data.errors import DalleDataError
from dalle_data.formats.webdataset import sample_layouts
from dalle_data.hashing import sha256_file
from dalle_data.model.generate import generate_images
from dalle_data.model.loader import pad_tokens, read_tokens


class ClipError(DalleDataError):
    """A CLIP model name, config or weights file that cannot be used."""


def load_clip(model: str, weights: str | os.PathLike[str]) -> tuple[Any, Any, Any]:
    """(model, image preprocess, tokenizer) of open_clip ``model`` with local ``weights``."""
    import open_clip

    name = model
    if model.endswith(".json"):
        config = Path(model)
        if not config.is_file():
            raise ClipError(f"--clip-model {model} does not exist: pass a config JSON or a name")
        open_clip.add_model_config(config)
        name = config.stem
    if name not in open_clip.list_models():
        raise ClipError(
            f"--clip-model {model!r} is not an open_clip config: pass one of open_clip's "
            "names (e.g. ViT-B-32) or the path of a model config JSON"
        )
    clip, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
    state = _read_weights(Path(weights))
    try:
        clip.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise ClipError(
            f"--clip-weights {weights} do not fit --clip-model {model!r} ({first}): pass the "
            "weights of that model"
        ) from None
    return clip.eval(), preprocess, open_clip.get_tokenizer(name)


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ClipError(f"--clip-weights {path} does not exist (weights are never downloaded)")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except SafetensorError as err:
            raise ClipError(f"--clip-weights {path} is not a safetensors file ({err})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for files it will not load safely
        raise ClipError(
            f"--clip-weights {path} cannot be loaded without running pickled code "
            f"({type(err).__name__}): save the state dict as .safetensors"
        ) from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise ClipError(f"--clip-weights {path} holds no state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def eval_captions(eval_set: Any, count: int) -> list[tuple[str, np.ndarray]]:
    """(caption, token ids) of ``count`` samples spread evenly over the set, in order."""
    wanted = sorted(
        set(np.linspace(0, eval_set.samples - 1, num=min(count, eval_set.samples)).astype(int))
    )
    out: list[tuple[str, np.ndarray]] = []
    first = 0
    for path in eval_set.shards:
        layouts = sample_layouts(path)
        chosen = [i - first for i in wanted if first <= i < first + len(layouts)]
        first += len(layouts)
        with open(path, "rb") as fh:
            for index in chosen:
                fields = layouts[index][1]
                parts = {}
                for ext in ("txt", "tok.npy"):
                    fh.seek(fields[ext][0])
                    parts[ext] = fh.read(fields[ext][1])
                out.append((parts["txt"].decode("utf-8"), read_tokens(parts["tok.npy"])))
    return out


@torch.no_grad()
def clip_score(
    dalle: Any,
    eval_set: Any,
    *,
    model: str,
    weights: str | os.PathLike[str],
    captions: int = 16,
    seed: int = 0,
) -> dict[str, Any]:
    """``{"clip_score": mean cosine similarity, "clip": how it was measured}``."""
    if captions < 1:
        raise ClipError(f"--clip-captions must be at least 1, got {captions}")
    clip, preprocess, tokenizer = load_clip(model, weights)
    picked = eval_captions(eval_set, captions)
    text = torch.from_numpy(pad_tokens([ids for _, ids in picked], dalle.text_seq_len))
    images = generate_images(dalle, text, num_images=1, seed=seed)
    arrays = (images.cpu().permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    pixels = torch.stack([preprocess(Image.fromarray(a)) for a in arrays])
    image_emb = torch.nn.functional.normalize(clip.encode_image(pixels).double(), dim=-1)
    text_emb = torch.nn.functional.normalize(
        clip.encode_text(tokenizer([c for c, _ in picked])).double(), dim=-1
    )
    return {
        "clip_score": float((image_emb * text_emb).sum(dim=-1).mean()),
        "clip": {
            "model": Path(model).stem if model.endswith(".json") else model,
            "weights_sha256": sha256_file(weights),
            "captions": len(picked),
            "seed": seed,
        },
    }
