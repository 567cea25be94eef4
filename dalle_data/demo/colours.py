"""A measured quality figure for models trained on the sample: does "a red circle" come out red?

For each palette colour, generate a fixed number of images for ``"a <colour> circle"``
(all counted, none re-drawn), take the image border's dominant colour as background,
and classify the remaining pixels by their nearest palette colour; the majority is the
image's colour. Accuracy is the share of images whose colour is the prompted one
(chance: 1 / number of colours).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dalle_data.model.checkpoint import model_int
from dalle_data.model.generate import encode_prompts, generate_images, save_grid

PROMPT = "a {colour} circle"
BORDER = 3
# Pixels closer than this (RGB Euclidean) to the background belong to it (JPEG noise, blur).
BACKGROUND_DISTANCE = 60.0


def background_colour(image: np.ndarray) -> np.ndarray:
    """The dominant colour of the image border (mean of its most common 32-level bin)."""
    border = np.concatenate(
        [
            image[:BORDER].reshape(-1, 3),
            image[-BORDER:].reshape(-1, 3),
            image[:, :BORDER].reshape(-1, 3),
            image[:, -BORDER:].reshape(-1, 3),
        ]
    ).astype(np.int64)
    bins = border // 32
    codes = bins[:, 0] * 64 + bins[:, 1] * 8 + bins[:, 2]
    top = np.bincount(codes).argmax()
    return border[codes == top].mean(axis=0)


def dominant_colour(image: np.ndarray, palette: Mapping[str, tuple[int, int, int]]) -> str | None:
    """The palette colour most non-background pixels are nearest to; None if all background."""
    pixels = image.reshape(-1, 3).astype(np.float64)
    background = background_colour(image)
    foreground = pixels[np.linalg.norm(pixels - background, axis=1) > BACKGROUND_DISTANCE]
    if len(foreground) == 0:
        return None
    names = list(palette)
    colours = np.array([palette[n] for n in names], dtype=np.float64)
    nearest = np.linalg.norm(foreground[:, None, :] - colours[None], axis=2).argmin(axis=1)
    return names[int(np.bincount(nearest, minlength=len(names)).argmax())]


def colour_accuracy(
    dalle: torch.nn.Module,
    tokenizer: Any,
    palette: Mapping[str, tuple[int, int, int]],
    *,
    per_colour: int = 8,
    seed: int = 0,
    grid: Path | None = None,
) -> dict[str, Any]:
    """Generate ``per_colour`` images per palette colour and score them (see module doc).

    With ``grid``, the scored images are also saved there, one row per colour, so the
    figure can be checked by eye.
    """
    names = list(palette)
    prompts = [PROMPT.format(colour=name) for name in names]
    text = encode_prompts(tokenizer, prompts, model_int(dalle, "text_seq_len"))
    images = generate_images(dalle, text, num_images=per_colour, seed=seed)
    arrays = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    predicted = [dominant_colour(a, palette) for a in arrays]
    per_name = {
        name: sum(p == name for p in predicted[i * per_colour : (i + 1) * per_colour])
        for i, name in enumerate(names)
    }
    total = len(predicted)
    if grid is not None:
        save_grid(images, grid, nrow=per_colour)
    return {
        "metric": "colour accuracy",
        "prompt": PROMPT,
        "images": total,
        "correct": sum(per_name.values()),
        "accuracy": round(sum(per_name.values()) / total, 4),
        "chance": round(1 / len(names), 4),
        "per_colour": per_name,
        "seed": seed,
        **({"grid": Path(grid).name} if grid is not None else {}),
    }


def colour_quality(dalle: Any, tokenizer: Any, folder: Path, *, seed: int = 0) -> dict[str, Any]:
    """train-extend's quality hook for the demo: colour accuracy, its grid and quality.json."""
    from dalle_data.atomic import write_json
    from dalle_data.pipeline.sources.sample import COLOURS

    grid = folder / "colours.png"
    quality = colour_accuracy(dalle, tokenizer, dict(COLOURS), seed=seed, grid=grid)
    write_json(folder / "quality.json", quality)
    return quality
