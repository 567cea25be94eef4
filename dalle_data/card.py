"""The dataset card ``shards/README.md``: provenance, accounting and pictures of the data.

Everything here is derived from ``manifest.json``, ``index.parquet`` (per-sample caption
length and original size, written by finalize so the card never re-reads every image) and
the first shard (for the contact sheet). PNGs are written with fixed metadata, so the same
shards give the same card bytes.
"""

from __future__ import annotations

import io
import json
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from dalle_data.atomic import atomic_open, atomic_path
from dalle_data.manifest import read_manifest
from dalle_data.shards import INDEX, read_shard

CARD = "README.md"
CONTACT_SHEET = "contact_sheet.png"
CAPTION_LENGTHS = "caption_lengths.png"
IMAGE_SIZES = "image_sizes.png"
SHEET_SAMPLES = 16

REASONS = {
    "http_404": "the server answered 404 Not Found",
    "http_5xx": "the server answered a 5xx error",
    "timeout": "no complete answer within download.timeout seconds",
    "connection_error": "connection refused, reset or closed early",
    "too_many_redirects": "a redirect loop",
    "decode_error": "the bytes are not a decodable image (HTML, text, empty, truncated, junk)",
    "image_too_small": "shorter side below download.min_image_size",
    "aspect_ratio": "long side / short side above download.max_aspect_ratio",
    "decompression_bomb": "more than 89,478,485 pixels (Pillow's limit), refused before decoding",
    "x_robots_tag_opt_out": "the server's X-Robots-Tag opts the image out of AI use (noai, ...)",
    "file_url_refused": "not an http(s) URL, and the dataset does not allow file URLs",
}


def write_card(shards_dir: Path) -> Path:
    """Write ``README.md`` and its three PNGs beside the shards; return the card's path."""
    import matplotlib

    matplotlib.use("Agg")
    shards_dir = Path(shards_dir)
    manifest = read_manifest(shards_dir)
    index_path = shards_dir / INDEX
    index = pq.read_table(index_path).to_pydict() if index_path.is_file() else {}
    _contact_sheet(shards_dir, manifest, shards_dir / CONTACT_SHEET)
    _histogram(
        np.asarray(index.get("caption_words", []), dtype=np.int64),
        "caption length (words)",
        f"{manifest['dataset']}: caption lengths",
        shards_dir / CAPTION_LENGTHS,
    )
    sides = np.asarray(
        [
            min(w, h)
            for w, h in zip(
                index.get("original_width", []), index.get("original_height", []), strict=True
            )
        ],
        dtype=np.int64,
    )
    _histogram(
        sides,
        "original shorter side (px)",
        f"{manifest['dataset']}: image sizes",
        shards_dir / IMAGE_SIZES,
    )
    path = shards_dir / CARD
    with atomic_open(path, "w", encoding="utf-8") as fh:
        fh.write(_markdown(manifest))
    return path


def _markdown(manifest: dict[str, Any]) -> str:
    counts = manifest["counts"]
    tok = manifest["tokenizer"]
    shards = len(manifest["shards"])
    lines = [
        f"# {manifest['dataset']}: {counts['written']} image-text samples in {shards} shards",
        "",
        "WebDataset shards built by dalle-data. Each sample holds `<key>.jpg` (the image "
        f"resized by img2dataset so its shorter side is {manifest['image_size']} px, JPEG), "
        "`<key>.txt` (the cleaned caption), `<key>.tok.npy` (its token ids) and `<key>.json` "
        "(url, source row_id, "
        "original width/height, license, caption, and `sha256`: the sha256 of the image bytes as "
        "downloaded, before resizing, as img2dataset computed it; the stored jpg is img2dataset's "
        "re-encoding). Keys are the source row ids, zero-padded to 12 digits.",
        "",
        f"Tokenizer: `{tok.get('spec', tok['kind'])}` ({tok['kind']}, "
        f"vocabulary {tok['vocab_size']}, fingerprint `{tok['fingerprint'][:16]}`).",
        "",
        "## Accounting",
        "",
        "Every source row is either dropped by a metadata rule, failed at download, or written:",
        "",
        "| | rows |",
        "|---|---:|",
        f"| input rows | {counts['input_rows']} |",
    ]
    lines += [f"| dropped: {k} | {v} |" for k, v in counts["dropped"].items()]
    lines += [f"| failed: {k} | {v} |" for k, v in counts["failed"].items()]
    lines += [f"| **written** | **{counts['written']}** |", ""]
    if counts["failed"]:
        lines += [
            "## Download failures",
            "",
            "Each failed row, with img2dataset's raw message, is in `failures.parquet`.",
            "",
            "| reason | rows | meaning |",
            "|---|---:|---|",
        ]
        lines += [
            f"| {k} | {v} | {REASONS.get(k, 'other img2dataset error (see failures.parquet)')} |"
            for k, v in counts["failed"].items()
        ]
        lines.append("")
    lines += [
        "## Samples",
        "",
        f"![contact sheet]({CONTACT_SHEET})",
        "",
        f"![caption lengths]({CAPTION_LENGTHS}) ![image sizes]({IMAGE_SIZES})",
        "",
        "## Built from",
        "",
        "```json",
        json.dumps(manifest.get("provenance", {}), indent=2, sort_keys=True),
        "```",
        "",
        "## Shards",
        "",
        "| shard | samples | bytes | sha256 |",
        "|---|---:|---:|---|",
    ]
    lines += [
        f"| {s['name']} | {s['samples']} | {s['bytes']} | `{s['sha256']}` |"
        for s in manifest["shards"]
    ]
    lines += ["", "Check them with `dalle-data verify <this folder>`.", ""]
    return "\n".join(lines)


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80, metadata={"Software": None})
    plt.close(fig)


def _contact_sheet(shards_dir: Path, manifest: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt
    from PIL import Image

    samples = []
    for shard in manifest["shards"]:
        for sample in read_shard(shards_dir / shard["name"]):
            samples.append(sample)
            if len(samples) == SHEET_SAMPLES:
                break
        if len(samples) == SHEET_SAMPLES:
            break
    cols = 4
    rows = max(1, -(-len(samples) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.6, rows * 3.0), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, sample in zip(axes.flat, samples, strict=False):
        ax.imshow(np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("RGB")))
        caption = sample["txt"].decode("utf-8")
        ax.set_title(textwrap.fill(textwrap.shorten(caption, 70), 28), fontsize=7)
    if not samples:
        axes[0][0].text(0.5, 0.5, "no samples", ha="center")
    fig.suptitle(f"{manifest['dataset']}: first {len(samples)} samples", fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def _histogram(values: np.ndarray, xlabel: str, title: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    if values.size:
        ax.hist(values, bins=min(50, max(1, len(np.unique(values)))), color="#4c72b0")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("samples")
    ax.set_title(f"{title} (n={values.size})", fontsize=10)
    fig.tight_layout()
    _save(fig, path)
