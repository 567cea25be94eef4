"""The dataset card: accounting table, failure reasons, and byte-stable PNGs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from dalle_data.formats.manifest import BUILD_RECORD, INDEX, write_manifest
from dalle_data.formats.webdataset import Sample, row_key, write_shards
from dalle_data.pipeline.dataset_card import _histogram, write_card
from tests.test_download import image_bytes

TOKENIZER = {"kind": "simple", "vocab_size": 49408, "fingerprint": "a" * 64, "spec": "simple"}


def make_shards(shards_dir: Path) -> None:
    samples = [
        Sample(
            row_key(i),
            image_bytes("RGB", (64 + i, 64), "JPEG", i),
            f"caption {'word ' * i}",
            {"row_id": i},
            np.arange(i + 1, dtype=np.int32),
        )
        for i in range(6)
    ]
    shards = write_shards(samples, shards_dir, dataset="demo", shard_size=4)
    counts = {
        "input_rows": 10,
        "dropped": {"blocklist": 1},
        "failed": {"http_404": 2, "other:weird": 1},
        "written": 6,
    }
    write_manifest(
        shards_dir,
        dataset="demo",
        tokenizer=TOKENIZER,
        image_size=64,
        shards=shards,
        counts=counts,
        provenance={"normalize": {"sources": [{"sha256": "b" * 64}]}},
    )
    index = {
        "row_id": list(range(6)),
        "caption_words": [i + 1 for i in range(6)],
        "original_width": [100 + i for i in range(6)],
        "original_height": [80] * 6,
    }
    pq.write_table(pa.table(index), shards_dir / INDEX)


def test_card_contents_and_stable_bytes(tmp_path: Path) -> None:
    make_shards(tmp_path / "a")
    make_shards(tmp_path / "b")
    card = write_card(tmp_path / "a").read_text()
    write_card(tmp_path / "b")
    assert "# demo: 6 image-text samples in 2 shards" in card
    for line in (
        "| input rows | 10 |",
        "| dropped: blocklist | 1 |",
        "| failed: http_404 | 2 |",
        "| **written** | **6** |",
        "| http_404 | 2 | no | the server answered 404 Not Found |",
        "| other:weird | 1 | no | other img2dataset error (see failures.parquet) |",
        "b" * 64,
        "![contact sheet](contact_sheet.png)",
    ):
        assert line in card
    for name in ("README.md", "contact_sheet.png", "caption_lengths.png", "image_sizes.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    sheet = Image.open(tmp_path / "a" / "contact_sheet.png")
    assert sheet.format == "PNG" and sheet.size[0] > 400
    assert "Software" not in sheet.info


def test_card_shows_retry_rounds_from_the_build_record(tmp_path: Path) -> None:
    make_shards(tmp_path)
    assert "## Retry rounds" not in write_card(tmp_path).read_text()
    rounds = {
        "rounds": [
            {"round": 1, "parts": 2, "rows": 40, "recovered": {"http_429": 30}, "wait_seconds": 60},
            {"round": 2, "parts": 1, "rows": 10, "recovered": {}, "wait_seconds": 12.5},
        ],
        "recovered": {"http_429": 30},
        "still_retryable": 10,
    }
    (tmp_path / BUILD_RECORD).write_text(json.dumps({"retry_rounds": rounds}))
    card = write_card(tmp_path).read_text()
    assert "| 1 | 2 | 40 | 60.0 | http_429: 30 |" in card
    assert "| 2 | 1 | 10 | 12.5 | none |" in card
    assert "Recovered in all: 30; still retryable: 10." in card


def test_histograms_draw_bars_only_for_data(tmp_path: Path) -> None:
    bar = (0x4C, 0x72, 0xB0)
    for name, values in (("empty", []), ("one", [480] * 3), ("many", list(range(3, 90)))):
        _histogram(np.asarray(values, dtype=np.int64), "x", name, tmp_path / f"{name}.png")
        image = Image.open(tmp_path / f"{name}.png").convert("RGB")
        colours = {c for _, c in image.getcolors(maxcolors=1 << 16)}
        assert (bar in colours) == bool(values), name
