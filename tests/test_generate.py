"""generate: a grid PNG from a checkpoint; the colour-accuracy classifier."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from dalle_data.cli import app
from dalle_data.demo.colours import dominant_colour
from dalle_data.model.generate import generate_images, sample_image_codes, to_unit_range
from dalle_data.model.init import init_parent
from tests.helpers.models import tiny_dalle, tiny_hparams
from tests.helpers.tiny import write_dataset, write_preset

PALETTE = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def test_generate_writes_one_row_per_prompt(tmp_path: Path) -> None:
    shards = write_dataset(tmp_path, 16, 16)
    parent = init_parent(write_preset(tmp_path / "p.yaml"), tmp_path / "p.pt", shards=[shards])
    out = tmp_path / "grid.png"
    args = ["generate", str(parent), "a red square", "a blue square", "--num-images", "3"]
    result = CliRunner().invoke(app, [*args, "-o", str(out), "--seed", "1"])
    assert result.exit_code == 0, result.output
    with Image.open(out) as grid:
        # make_grid: 2 px padding around 32 px images, then x4 so tiles are >= 128 px
        assert grid.size == (4 * (3 * 34 + 2), 4 * (2 * 34 + 2))
    again = tmp_path / "again.png"
    CliRunner().invoke(app, [*args, "-o", str(again), "--seed", "1"])
    assert out.read_bytes() == again.read_bytes()
    bad = CliRunner().invoke(app, [*args, "--top-k", "1.5"])
    assert bad.exit_code == 1 and "--top-k" in bad.output


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # rotary positions and token shift, as train_dalle.py builds today
        {"num_text_tokens": 49408, "depth": 1},  # DALLE-pytorch's default CLIP vocabulary
        {"rotary_emb": False, "shift_tokens": False, "reversible": True},  # a 2021 model
        {"attn_types": ("full", "axial_row"), "optimize_for_inference": True, "stable": True},
        {"attn_types": ("conv_like", "axial_col")},  # layers without a key/value cache
    ],
    ids=["rotary-shift", "clip-vocab", "legacy-reversible", "axial-masked-stable", "sparse"],
)
def test_sampling_gives_dalle_pytorchs_tokens_for_the_same_seed(overrides: dict) -> None:
    dalle = tiny_dalle(tiny_hparams(**overrides), seed=4).eval()
    text = torch.randint(1, 60, (3, dalle.text_seq_len), generator=torch.Generator().manual_seed(5))
    text[0, 5:] = 0  # a short prompt, padded as the loader pads it
    sampled: list[torch.Tensor] = []
    decode = dalle.vae.decode
    dalle.vae.decode = lambda codes: sampled.append(codes) or decode(codes)
    for top_k in (0.9, 0.5):
        torch.manual_seed(11)
        reference = dalle.generate_images(text, filter_thres=top_k)
        torch.manual_seed(11)
        ours = sample_image_codes(dalle, text, top_k=top_k)
        assert torch.equal(ours, sampled[-1]) and ours.shape == (3, dalle.image_seq_len)
        dalle.train()
        images = generate_images(dalle, text, num_images=1, seed=11, top_k=top_k, batch_size=2)
        assert dalle.training  # the caller's mode is restored
        ours_first_chunk = sampled[-2]
        torch.manual_seed(11)
        reference = dalle.generate_images(text[:2], filter_thres=top_k)
        assert torch.equal(ours_first_chunk, sampled[-1])  # same chunks, same random stream
        assert torch.equal(images[:2], to_unit_range(dalle, reference))
        assert images.shape == (3, 3, 32, 32)


def test_evaluate_colours_scores_every_image_and_saves_them_for_a_person(tmp_path: Path) -> None:
    shards = write_dataset(tmp_path, 16, 16)
    parent = init_parent(write_preset(tmp_path / "p.yaml"), tmp_path / "p.pt", shards=[shards])
    grid, figures = tmp_path / "colours.png", tmp_path / "quality.json"
    args = ["evaluate-colours", str(parent), "--per-colour", "2", "--grid", str(grid)]
    args += ["-o", str(figures)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    quality = json.loads(figures.read_text())
    assert quality["images"] == 12 and sum(quality["per_colour"].values()) == quality["correct"]
    assert quality["grid"] == "colours.png"
    with Image.open(grid) as picture:  # 6 colours x 2 images of 32 px, enlarged x4
        assert picture.size == (4 * (2 * 34 + 2), 4 * (6 * 34 + 2))


def test_dominant_colour_ignores_the_background() -> None:
    image = np.full((32, 32, 3), 250, np.uint8)
    image[10:20, 10:20] = (200, 40, 40)
    assert dominant_colour(image, PALETTE) == "red"
    image[:] = 10  # a black background with a blue disc-ish block
    image[8:24, 8:24] = (40, 40, 200)
    assert dominant_colour(image, PALETTE) == "blue"
    assert dominant_colour(np.full((32, 32, 3), 128, np.uint8), PALETTE) is None
