"""Tiny shards for the training tests: coloured squares with short token captions."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
from PIL import Image

from dalle_data.formats.webdataset import Sample, write_shards

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
    out_dir: Path,
    n: int,
    shard_size: int,
    *,
    dataset: str = "tiny",
    size: int = 48,
    corrupt: int = 0,
) -> list[dict]:
    """Shards of ``n`` tiny samples in ``out_dir``, the first ``corrupt`` of them with bytes
    no decoder reads as their image; returns write_shards' records."""
    made = samples(n, size=size)
    made[:corrupt] = [dataclasses.replace(s, jpg=b"not a jpeg") for s in made[:corrupt]]
    return write_shards(made, out_dir, dataset=dataset, shard_size=shard_size)


TINY_PRESET = """\
vae:
  class: DiscreteVAE
  params: {image_size: 32, num_tokens: 32, codebook_dim: 32, num_layers: 3, hidden_dim: 16}
  train: {steps: 4, batch_size: 8, learning_rate: 0.001}
dalle: {dim: 32, depth: 1, heads: 2, dim_head: 16, text_seq_len: 8, attn_types: [full]}
"""


def write_tokenizer(path: Path, vocab_size: int = 32) -> str:
    """A word-level Hugging Face tokenizer.json over the tiny captions; returns its spec."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[PAD]", "a", *COLOURS, "square", "circle"]
    words += [f"w{i}" for i in range(vocab_size - len(words))]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[PAD]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return f"hug:{path}"


def write_dataset(
    root: Path,
    n: int,
    shard_size: int,
    *,
    dataset: str = "tiny",
    image_size: int = 32,
    tokenizer: str | None = None,
    corrupt: int = 0,
    split: str | None = None,
) -> Path:
    """``<root>/<dataset>/shards`` with shards and a manifest, as finalize would leave them.

    ``split="eval"``: the held-out split instead, ``<root>/<dataset>/eval`` with
    ``<dataset>-eval-NNNNN.tar`` shards and ``"split": "eval"`` in its manifest.
    """
    import json

    from dalle_data.formats import tokenizers
    from dalle_data.formats.manifest import MANIFEST, write_manifest

    spec = tokenizer or write_tokenizer(root / "tokenizer.json")
    held_out = split == "eval"
    shards_dir = root / dataset / ("eval" if held_out else "shards")
    prefix = f"{dataset}-eval" if held_out else dataset
    records = write_tiny_shards(shards_dir, n, shard_size, dataset=prefix, corrupt=corrupt)
    write_manifest(
        shards_dir,
        dataset=dataset,
        tokenizer=tokenizers.load(spec).record(),
        image_size=image_size,
        shards=records,
        counts={"input_rows": n, "dropped": {}, "failed": {}, "written": n},
    )
    if split is not None:
        manifest = json.loads((shards_dir / MANIFEST).read_text(encoding="utf-8"))
        (shards_dir / MANIFEST).write_text(json.dumps({**manifest, "split": split}, indent=2))
    return shards_dir


def write_preset(path: Path, text: str = TINY_PRESET) -> Path:
    path.write_text(text, encoding="utf-8")
    return path
