"""The dataset card ``shards/README.md``: provenance, accounting and pictures of the data.

Everything here is derived from ``manifest.json``, ``index.parquet`` (per-sample caption
length and original size, written by finalize so the card never re-reads every image),
the first shard (for the contact sheet), for the download's retry rounds (run facts)
``build.json``, and, for the duplicates section, both shard sets' ``failures.parquet``
(which key each duplicate matched) and ``duplicate_examples.parquet`` (a few pairs with
both images) and the eval split's manifest. The PNGs are drawn with Pillow in a few tens
of milliseconds (matplotlib's import and layout took about two seconds of every build) and
carry no metadata, so the same shards give the same pictures.
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
from dalle_data.formats.manifest import (
    BUILD_RECORD,
    EXAMPLES,
    FAILURES,
    INDEX,
    SPLIT_DIRS,
    read_manifest,
)
from dalle_data.formats.webdataset import read_shard
from dalle_data.pipeline.failures import RETRYABLE, meaning

CARD = "README.md"
CONTACT_SHEET = "contact_sheet.png"
CAPTION_LENGTHS = "caption_lengths.png"
IMAGE_SIZES = "image_sizes.png"
DUPLICATES = "duplicates.png"
SHEET_SAMPLES = 16
DUPLICATE_MEANINGS = {
    "duplicate_image": "repeats an earlier kept key of the same split",
    "eval_duplicate": "a training row showing an image of the eval split",
}


def write_card(shards_dir: Path) -> Path:
    """Write ``README.md`` and its three PNGs beside the shards; return the card's path."""
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
    folders = _split_folders(shards_dir)
    _duplicate_pairs(folders, shards_dir / DUPLICATES)
    build_path = shards_dir / BUILD_RECORD
    build = json.loads(build_path.read_text(encoding="utf-8")) if build_path.is_file() else {}
    path = shards_dir / CARD
    with atomic_open(path, "w", encoding="utf-8") as fh:
        fh.write(_markdown(manifest, build.get("retry_rounds")) + _duplicates_markdown(folders))
    return path


def _split_folders(shards_dir: Path) -> dict[str, Path]:
    """The dataset's shard sets that exist: ``train`` (this folder) and ``eval`` beside it."""
    folders = {"train": shards_dir}
    eval_dir = shards_dir.parent / SPLIT_DIRS["eval"]
    if (eval_dir / "manifest.json").is_file():
        folders["eval"] = eval_dir
    return folders


def _duplicates_markdown(folders: dict[str, Path]) -> str:
    """Eval split size, and exact and near duplicates removed, per split and reason."""
    lines = ["## Held-out split and duplicates", ""]
    if "eval" in folders:
        held = read_manifest(folders["eval"])
        lines += [
            f"The eval split `../eval/` holds {held['counts']['written']} samples in "
            f"{len(held['shards'])} shards (manifest `split: eval`; of "
            f"{held['counts']['input_rows']} rows held out); no training row shows one of "
            "its images. `train-extend` refuses it; `dalle-data evaluate` scores on it.",
            "",
        ]
    rule = read_manifest(folders["train"]).get("provenance", {}).get("dedup", {})
    if rule:
        compared = (
            f"pHash `{rule['hash']}` within Hamming distance {rule['max_distance']}"
            if rule.get("max_distance") is not None
            else "sha256 of the source bytes (exact copies only)"
        )
        against = ", ".join(rule.get("against", {})) or "no other dataset"
        lines += [f"Images were compared by {compared}, against {against}.", ""]
    lines += [
        "| split | reason | exact copies | near duplicates | meaning |",
        "|---|---|---:|---:|---|",
    ]
    for split, folder in folders.items():
        path = folder / FAILURES
        if not path.is_file():
            continue
        table = pq.read_table(path).to_pydict()
        counts: dict[str, list[int]] = {}
        for reason, exact in zip(table["reason"], table.get("exact", []), strict=False):
            if exact is not None:
                counts.setdefault(reason, [0, 0])[0 if exact else 1] += 1
        for reason, (exact, near) in sorted(counts.items()):
            meaning = DUPLICATE_MEANINGS.get(
                reason, f"shows an image of {reason.removeprefix('duplicate_of_')}"
            )
            lines.append(f"| {split} | {reason} | {exact} | {near} | {meaning} |")
    lines += [
        "",
        "Each duplicate, with the key it matched, is in `failures.parquet`. Some pairs "
        "(removed image left, the image it matched right):",
        "",
        f"![duplicate pairs]({DUPLICATES})",
        "",
    ]
    return "\n".join(lines)


def _duplicate_pairs(folders: dict[str, Path], path: Path) -> None:
    """The example pairs of every split side by side, each beside what it matched."""
    from PIL import Image, ImageDraw, ImageOps

    pairs = []
    for split, folder in folders.items():
        examples = folder / EXAMPLES
        if examples.is_file():
            pairs += [(split, row) for row in pq.read_table(examples).to_pylist()]
    cell, margin, text_height, width = 128, 8, 30, 2 * 128 + 3 * 8 + 260
    height = 32 + max(1, len(pairs)) * (cell + margin)
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((width // 2, 8), "duplicates removed", fill="black", font=_font(16), anchor="mt")
    font = _font(11)
    for i, (split, row) in enumerate(pairs):
        y = 32 + i * (cell + margin)
        for column, data in enumerate((row["jpg"], row["matched_jpg"])):
            if data:
                image = ImageOps.contain(Image.open(io.BytesIO(data)).convert("RGB"), (cell, cell))
                sheet.paste(image, (margin + column * (cell + margin), y))
        kind = "exact copy" if row["exact"] else f"Hamming {row['distance']}"
        text = (
            f"{split} {row['key']}\n{row['reason']} ({kind})\nof {row['matched_dataset']} "
            f"{row['matched_split']}\n{row['matched_key']}"
        )
        draw.multiline_text(
            (2 * (cell + margin) + margin, y + text_height), text, fill="black", font=font
        )
    if not pairs:
        draw.text(
            (width // 2, height // 2 + 10), "none found", fill="black", font=font, anchor="mm"
        )
    _save(sheet, path)


def _markdown(manifest: dict[str, Any], rounds: dict[str, Any] | None) -> str:
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
            "Each failed row, with img2dataset's raw message, is in `failures.parquet`. "
            "Rows failed for a reason marked *retryable* may still come: rerun the download "
            "(`snakemake --forcerun download ...`) and only they are fetched again.",
            "",
            "| reason | rows | retryable | meaning |",
            "|---|---:|---|---|",
        ]
        lines += [
            f"| {k} | {v} | {'yes' if k in RETRYABLE else 'no'} | {meaning(k)} |"
            for k, v in counts["failed"].items()
        ]
        lines.append("")
    lines += _rounds_section(rounds)
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


def _rounds_section(rounds: dict[str, Any] | None) -> list[str]:
    """The download's retry rounds (run facts from build.json): what each round recovered."""
    if not rounds or not rounds["rounds"]:
        return []
    lines = [
        "## Retry rounds",
        "",
        "Rows that failed for a reason that can pass were fetched again after the wait the "
        "server asked for (Retry-After) or an exponential backoff. Recovered images sit in "
        "the shards exactly where a first-time answer would have put them.",
        "",
        "| round | parts | rows tried again | longest wait (s) | recovered |",
        "|---:|---:|---:|---:|---|",
    ]
    for r in rounds["rounds"]:
        recovered = ", ".join(f"{k}: {v}" for k, v in r["recovered"].items()) or "none"
        lines.append(
            f"| {r['round']} | {r['parts']} | {r['rows']} | {r['wait_seconds']:.1f} | {recovered} |"
        )
    total = sum(rounds["recovered"].values())
    lines += ["", f"Recovered in all: {total}; still retryable: {rounds['still_retryable']}.", ""]
    return lines


def _font(size: int) -> Any:
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def _save(image: Any, path: Path) -> None:
    """As PNG with zlib's level 3: a photo contact sheet takes a fifth of the default level's
    time (0.06 s against 0.26 s for 840x1040 px, the card's longest step) for 13% more bytes."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", compress_level=3)


def _contact_sheet(shards_dir: Path, manifest: dict[str, Any], path: Path) -> None:
    """The first samples as thumbnails, each over its caption (at most three lines)."""
    from PIL import Image, ImageDraw

    samples = []
    for shard in manifest["shards"]:
        for sample in read_shard(shards_dir / shard["name"]):
            samples.append(sample)
            if len(samples) == SHEET_SAMPLES:
                break
        if len(samples) == SHEET_SAMPLES:
            break
    cols, cell, text_height, margin, title_height = 4, 200, 44, 8, 32
    rows = max(1, -(-len(samples) // cols))
    size = (cols * (cell + margin) + margin, title_height + rows * (cell + text_height + margin))
    sheet = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(sheet)
    title = f"{manifest['dataset']}: first {len(samples)} samples"
    draw.text((size[0] // 2, 8), title, fill="black", font=_font(16), anchor="mt")
    font = _font(11)
    for i, sample in enumerate(samples):
        x = margin + (i % cols) * (cell + margin)
        y = title_height + (i // cols) * (cell + text_height + margin)
        image = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
        image.thumbnail((cell, cell))
        sheet.paste(image, (x + (cell - image.width) // 2, y + cell - image.height))
        caption = textwrap.shorten(sample["txt"].decode("utf-8"), 100)
        for line, text in enumerate(textwrap.wrap(caption, 34)[:3]):
            draw.text((x, y + cell + 2 + 13 * line), text, fill="black", font=font)
    if not samples:
        draw.text((size[0] // 2, size[1] // 2), "no samples", fill="black", font=font, anchor="mm")
    _save(sheet, path)


def _histogram(values: np.ndarray, xlabel: str, title: str, path: Path) -> None:
    """A bar histogram (up to 50 bins) with its count and value range marked on the axes."""
    from PIL import Image, ImageDraw

    width, height = 480, 300
    x0, y0, x1, y1 = 64, 36, width - 20, height - 50
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = _font(12)
    draw.text((width // 2, 10), f"{title} (n={values.size})", fill="black", font=font, anchor="mt")
    if values.size:
        counts, edges = np.histogram(values, bins=min(50, len(np.unique(values))))
        peak = int(counts.max())
        scale_x = (x1 - x0) / (edges[-1] - edges[0])
        for count, low, high in zip(counts.tolist(), edges[:-1], edges[1:], strict=True):
            if count:
                top = y1 - count / peak * (y1 - y0)
                left, right = x0 + (low - edges[0]) * scale_x, x0 + (high - edges[0]) * scale_x
                draw.rectangle((left, top, right, y1), fill="#4c72b0", outline="white")
        for value in (edges[0], (edges[0] + edges[-1]) / 2, edges[-1]):
            x = x0 + (value - edges[0]) * scale_x
            draw.line((x, y1, x, y1 + 4), fill="black")
            draw.text((x, y1 + 6), f"{value:.4g}", fill="black", font=font, anchor="mt")
        for count in sorted({0, peak // 2, peak}):
            y = y1 - count / peak * (y1 - y0)
            draw.line((x0 - 4, y, x0, y), fill="black")
            draw.text((x0 - 6, y), str(count), fill="black", font=font, anchor="rm")
    draw.line((x0, y0, x0, y1, x1, y1), fill="black")
    draw.text(((x0 + x1) // 2, height - 8), xlabel, fill="black", font=font, anchor="mb")
    label = Image.new("RGB", (80, 16), "white")
    ImageDraw.Draw(label).text((40, 8), "samples", fill="black", font=font, anchor="mm")
    image.paste(label.rotate(90, expand=True), (4, (y0 + y1) // 2 - 40))
    _save(image, path)
