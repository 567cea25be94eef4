"""Tiny shards for the training tests: coloured squares with short token captions."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from dalle_data.shards import Sample, write_shards

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def jpeg(colour: tuple[int, int, int], size: int = 48) -> bytes:
    """A white square JPEG with a centred block of ``colour``."""
    img = Image.new("RGB", (size, size), (255, 255, 255))
    q = size // 4
    img.paste(colour, (q, q, size - q, size - q))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def samples(n: int, *, size: int = 48, first_key: int = 0) -> list[Sample]:
    """``n`` samples; the caption of sample i has i % 7 + 1 tokens so padding is exercised."""
    names = list(COLOURS)
    out = []
    for i in range(n):
        name = names[i % len(names)]
        tokens = np.array([1 + i % len(names)] + [10 + j for j in range(i % 7)], dtype=np.int32)
        out.append(
            Sample(
                key=f"{first_key + i:012d}",
                jpg=jpeg(COLOURS[name], size),
                txt=f"a {name} square",
                meta={"url": f"file:///{i}.jpg", "row_id": first_key + i},
                tokens=tokens,
            )
        )
    return out


def write_tiny_shards(
    out_dir: Path, n: int, shard_size: int, *, dataset: str = "tiny", size: int = 48
) -> list[dict]:
    """Shards of ``n`` tiny samples in ``out_dir``; returns write_shards' records."""
    return write_shards(samples(n, size=size), out_dir, dataset=dataset, shard_size=shard_size)
