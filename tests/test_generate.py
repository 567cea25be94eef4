"""generate: a grid PNG from a checkpoint; the colour-accuracy classifier."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from dalle_data.cli import app
from dalle_data.demo.colours import dominant_colour
from dalle_data.model.init import init_parent
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
