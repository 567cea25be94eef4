"""finalize's held-out split and duplicates, through img2dataset and a local server: planted
exact copies, re-encodes and resizes, an eval image in the training list and a copy of
another dataset's image each land under their reason, and two builds give the same bytes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dalle_data.formats.manifest import read_manifest, verify
from dalle_data.formats.webdataset import read_shard, row_key
from dalle_data.pipeline import finalize as finalize_module
from dalle_data.pipeline.dataset_card import DUPLICATES, write_card
from dalle_data.pipeline.download_results import PHASH_COLUMN
from dalle_data.pipeline.finalize import DedupOptions
from dalle_data.pipeline.holdout import Holdout, eval_mask
from tests.helpers.http import LocalServer, Route, serve
from tests.test_dedup import jpeg, photo
from tests.test_download import IMAGE_SIZE, build, write_metadata

HOLDOUT = Holdout(fraction=0.3, max_rows=2)
DISTINCT = list(range(100, 170, 10))
# Row ids of the first dataset and what each row's URL serves.
FIRST = {
    10: "p0",
    20: "p1",
    30: "p0 bytes again",  # exact copy under another URL
    40: "p1 at quality 60",  # re-encoded
    50: "p1 at 90% size",  # resized
    **{row: f"p{row}" for row in DISTINCT},
    999: "eval picture re-encoded",
}
EXPECTED_TRAIN = {
    30: ("duplicate_image", 10, True),
    40: ("duplicate_image", 20, False),
    50: ("duplicate_image", 20, False),
    999: ("eval_duplicate", 120, False),
}


def first_routes() -> dict[str, Route]:
    pictures = {row: photo(row) for row in [0, 1, *DISTINCT]}
    p1 = pictures[1]
    served = {
        10: jpeg(pictures[0]),
        20: jpeg(p1),
        30: jpeg(pictures[0]),
        40: jpeg(p1, quality=60),
        50: jpeg(p1.resize((p1.width * 9 // 10, p1.height * 9 // 10), Image.Resampling.BICUBIC)),
        **{row: jpeg(pictures[row]) for row in DISTINCT},
        999: jpeg(pictures[120], quality=70),
    }
    # The second eval row repeats the first: a duplicate inside the eval split.
    served[160] = served[120]
    return {f"/first/{row}.jpg": Route(data) for row, data in served.items()}


def second_routes() -> dict[str, Route]:
    return {
        "/second/1.jpg": Route(jpeg(photo(130), quality=80)),  # a training image of first
        "/second/2.jpg": Route(jpeg(photo(500))),
        "/second/3.jpg": Route(jpeg(photo(120).resize((150, 120)), quality=85)),  # eval of first
    }


def rows(server: LocalServer, name: str, ids: list[int]) -> list[dict]:
    return [
        {"row_id": row, "url": server.url(f"/{name}/{row}.jpg"), "caption": f"picture {row}"}
        for row in ids
    ]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dedup")
    first, again, second = root / "first", root / "again", root / "second"
    with serve({**first_routes(), **second_routes()}) as server:
        write_metadata(first, rows(server, "first", sorted(FIRST)), {"empty": 2})
        write_metadata(second, rows(server, "second", [1, 2, 3]), {})
        build(first, rows_per_part=20, dataset="first", holdout=HOLDOUT)
        build(
            second,
            rows_per_part=10,
            dataset="second",
            holdout=Holdout(fraction=0.0),
            dedup_options=DedupOptions(against=(("first", first),)),
        )
    # The same download as an older download stage left it, without the pHash its workers
    # record: finalized again, hashed here in two worker processes (a slice each).
    shutil.copytree(first, again, ignore=shutil.ignore_patterns("shards", "eval"))
    recorded = list((again / "downloaded").rglob("*.parquet"))
    assert recorded and all(PHASH_COLUMN in pq.read_schema(p).names for p in recorded)
    for path in recorded:
        pq.write_table(pq.read_table(path).drop_columns([PHASH_COLUMN]), path)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(finalize_module, "ROWS_PER_HASH_PROCESS", 1)
        finalize_module.finalize(
            again,
            dataset="first",
            tokenizer_spec="simple",
            image_size=IMAGE_SIZE,
            shard_size=4,
            holdout=HOLDOUT,
        )
    return {"first": first, "again": again, "second": second}


def failures(folder: Path) -> dict[int, dict]:
    return {r["row_id"]: r for r in pq.read_table(folder / "failures.parquet").to_pylist()}


def keys(folder: Path) -> list[str]:
    return [s["__key__"] for p in sorted(folder.glob("*.tar")) for s in read_shard(p)]


def test_eval_split_is_its_own_shard_set(built: dict[str, Path]) -> None:
    assert eval_mask(np.array(sorted(FIRST)), HOLDOUT).nonzero()[0].size == 2
    eval_dir, shards = built["first"] / "eval", built["first"] / "shards"
    held = read_manifest(eval_dir)
    assert held["split"] == "eval" and read_manifest(shards)["split"] == "train"
    assert [s["name"] for s in held["shards"]] == ["first-eval-00000.tar"]
    assert held["counts"] == {
        "input_rows": 2,
        "dropped": {"duplicate_image": 1},
        "failed": {},
        "written": 1,
    }
    assert keys(eval_dir) == [row_key(120)]
    assert failures(eval_dir)[160]["matched_key"] == row_key(120)
    assert not set(keys(shards)) & {row_key(120), row_key(160)}
    verify(eval_dir)
    verify(shards)


def test_duplicates_land_under_their_reason(built: dict[str, Path]) -> None:
    shards = built["first"] / "shards"
    manifest = read_manifest(shards)
    counts = manifest["counts"]
    assert counts["dropped"] == {
        "duplicate_image": 3,
        "empty": 2,
        "eval_duplicate": 1,
        "eval_split": 2,
    }
    assert counts["input_rows"] == len(FIRST) + 2
    assert counts["written"] == len(FIRST) - 2 - 4
    logged = failures(shards)
    for row, (reason, matched, exact) in EXPECTED_TRAIN.items():
        entry = logged[row]
        assert (entry["reason"], entry["matched_key"], entry["exact"]) == (
            reason,
            row_key(matched),
            exact,
        )
        assert entry["matched_dataset"] == "first"
        assert (entry["distance"] == 0) if exact else (0 <= entry["distance"] <= 3)
    assert logged[999]["matched_split"] == "eval"
    written = set(keys(shards))
    assert written == {row_key(r) for r in FIRST if r not in EXPECTED_TRAIN and r not in (120, 160)}
    index = pq.read_table(shards / "index.parquet").to_pydict()
    assert index["key"] == sorted(written)
    assert set(index["shard"]) == {s["name"] for s in manifest["shards"]}
    assert all(len(sha) == 64 for sha in index["sha256"])


def test_across_datasets(built: dict[str, Path]) -> None:
    second = built["second"] / "shards"
    counts = read_manifest(second)["counts"]
    assert counts["dropped"]["duplicate_of_first"] == 2
    assert counts["written"] == 1
    logged = failures(second)
    assert (logged[1]["matched_key"], logged[1]["matched_split"]) == (row_key(130), "train")
    assert (logged[3]["matched_key"], logged[3]["matched_split"]) == (row_key(120), "eval")
    against = read_manifest(second)["provenance"]["dedup"]["against"]["first"]
    assert set(against) == {"train", "eval"}


def test_two_builds_are_byte_identical(built: dict[str, Path]) -> None:
    """One from the pHashes the download workers recorded, one hashing in finalize."""
    for folder in ("shards", "eval"):
        a, b = built["first"] / folder, built["again"] / folder
        names = sorted(p.name for p in a.iterdir() if p.name != "build.json")
        assert names == sorted(p.name for p in b.iterdir() if p.name != "build.json")
        for name in names:
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_card_shows_duplicates_and_eval_size(built: dict[str, Path]) -> None:
    shards = built["first"] / "shards"
    card = write_card(shards).read_text()
    assert "The eval split `../eval/` holds 1 samples" in card
    assert "| train | duplicate_image | 1 | 2 |" in card
    assert "| train | eval_duplicate | 0 | 1 |" in card
    assert "| eval | duplicate_image | 1 | 0 |" in card
    with Image.open(shards / DUPLICATES) as picture:
        assert picture.height > 4 * 128
    examples = pq.read_table(shards / "duplicate_examples.parquet").to_pylist()
    assert all(e["jpg"] and e["matched_jpg"] for e in examples)
    provenance = json.loads((shards / "manifest.json").read_text())["provenance"]
    assert provenance["holdout"]["max_rows"] == 2


def test_train_extend_refuses_an_eval_split(built: dict[str, Path]) -> None:
    from dalle_data.errors import TrainError
    from dalle_data.model.train import load_shard_set

    with pytest.raises(TrainError, match="held-out eval split"):
        load_shard_set([built["first"] / "eval"], skip_corrupt=False)
