"""The bundled offline source: deterministic captioned shape pictures in cc12m's format.

Every picture is one large shape of one of six saturated colours on a plain grey-scale
background, so "the dominant non-background colour" of a generated image can be checked
against ``COLOURS``. A few deliberately bad entries (a missing file, a non-image, a
duplicate URL) and a copy of a picture under another name (dropped as duplicate_image)
let the demo show the accounting end to end.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from dalle_data import atomic

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 180),
    "orange": (245, 130, 20),
}
# Unsaturated, so no background can be mistaken for a shape colour.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "light grey": (200, 200, 200),
    "dark grey": (70, 70, 70),
    "black": (0, 0, 0),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
TEMPLATES: tuple[str, ...] = (
    "a {colour} {shape} on a {background} background",
    "a {colour} {shape} against a {background} background",
    "a picture of a {colour} {shape} on {background}",
)
# Picture i shows COMBOS[i % len(COMBOS)]: every combination equally often.
COMBOS: list[tuple[str, str, str]] = [
    (c, s, b) for c in COLOURS for s in SHAPES for b in BACKGROUNDS
]
SIZE = 96
JPEG_QUALITY = 95
SEED = 1234


# Fraction of the box a shape fills: a circle pi/4, a triangle 1/2, a square all of it.
_FILL = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}


def draw(colour: str, shape: str, background: str, rng: random.Random) -> Image.Image:
    """One picture: a shape covering 28-42% of the image, at a jittered size and place."""
    image = Image.new("RGB", (SIZE, SIZE), BACKGROUNDS[background])
    pen = ImageDraw.Draw(image)
    coverage = rng.uniform(0.28, 0.42)
    side = round(SIZE * math.sqrt(coverage / _FILL[shape]))
    x0 = rng.randint(2, SIZE - side - 2)
    y0 = rng.randint(2, SIZE - side - 2)
    fill = COLOURS[colour]
    if shape == "circle":
        pen.ellipse((x0, y0, x0 + side - 1, y0 + side - 1), fill=fill)
    elif shape == "square":
        pen.rectangle((x0, y0, x0 + side - 1, y0 + side - 1), fill=fill)
    else:
        pen.polygon([(x0 + side / 2, y0), (x0, y0 + side), (x0 + side, y0 + side)], fill=fill)
    return image


def make_sample(out_dir: Path, *, count: int = 2000) -> dict[str, Any]:
    """Write ``out_dir/images/*.jpg`` and ``out_dir/sample.tsv`` (url<TAB>caption).

    URLs are relative ``file:`` URLs when ``out_dir`` is relative (resolved from the working
    directory, where Snakemake runs img2dataset), so shards do not depend on the checkout's
    location; an absolute ``out_dir`` gives absolute ``file://`` URLs.
    """
    images = out_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    prefix = _url_prefix(images)
    lines = []
    for i in range(count):
        rng = random.Random(SEED * 1_000_003 + i)
        colour, shape, background = COMBOS[i % len(COMBOS)]
        name = f"{i:05d}.jpg"
        # Images are written in place: sample.tsv, written last and atomically, is what
        # marks the sample complete.
        draw(colour, shape, background, rng).save(
            images / name, format="JPEG", quality=JPEG_QUALITY, subsampling=0
        )
        template = TEMPLATES[rng.randrange(len(TEMPLATES))]
        caption = template.format(colour=colour, shape=shape, background=background)
        lines.append(f"{prefix}{name}\t{caption}")
    # The same picture under another URL: only its bytes show it is a duplicate.
    copy = f"copy-{1:05d}.jpg"
    (images / copy).write_bytes((images / f"{1:05d}.jpg").read_bytes())
    lines.append(f"{prefix}{copy}\t{lines[1].split(chr(9), 1)[1]}")
    # The bad entries: a file that does not exist, text bytes named .jpg, a repeated URL.
    (images / "not-an-image.jpg").write_bytes(b"this is text, not a JPEG\n")
    lines.append(f"{prefix}missing.jpg\ta blue circle that was never drawn")
    lines.append(f"{prefix}not-an-image.jpg\ta red square on a white background")
    lines.append(f"{prefix}{0:05d}.jpg\tthe same picture listed twice")
    with atomic.atomic_open(out_dir / "sample.tsv", "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    return {"rows": len(lines), "images": count, "bad_entries": 3, "copies": 1}


def _url_prefix(images: Path) -> str:
    if images.is_absolute():
        return images.as_uri() + "/"
    return "file:" + "/".join(images.parts) + "/"
