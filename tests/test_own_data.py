"""Any dataset end to end: `snakemake <name>_shards` on a LAION-style parquet, a headerless
csv, a jsonl with broken lines and a folder of photos, each with exact counts per reason,
built twice into byte-identical shards: once with the stage server, once with every stage
in a process of its own. One Snakemake run builds all four datasets.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.helpers.http import LocalServer, Route, serve
from tests.test_download import image_bytes

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DATASETS = ("laion", "sheet", "lines", "photos")
CONFIG = """
image_size: 64
shard_size: 2
download:
  processes: 1
  thread_count: 4
  timeout: 5
"""


def laion_parquet(path: Path, server: LocalServer) -> dict[str, Any]:
    """A LAION-style parquet (URL, TEXT, WIDTH, HEIGHT, LICENSE, similarity) with nulls,
    non-http URLs, a duplicate URL, a huge caption and low or missing similarity."""
    img = [server.url(f"/laion/{i}.jpg") for i in range(3)]
    rows = [
        (img[0], "a photo of a red thing", 0.35),
        (img[1], "a photo of a blue thing", 0.5),
        (None, "a photo without a URL", 0.9),  # url_scheme
        ("ftp://example.com/x.jpg", "an ftp photo", 0.9),  # url_scheme
        (img[0], "the same URL again", 0.9),  # duplicate_url
        (server.url("/laion/c.jpg"), "a photo of a green thing", 0.1),  # min_values
        (server.url("/laion/d.jpg"), "a photo without similarity", None),  # min_values
        (server.url("/laion/a.jpg"), None, 0.9),  # empty_caption
        (server.url("/laion/b.jpg"), "word " * 300, 0.9),  # caption_length
        (img[2], "a photo of a green square", 0.31),
        (server.url("/laion/gone.jpg"), "a photo that is gone", 0.9),  # http_404
    ]
    table = pa.table(
        {
            "URL": [r[0] for r in rows],
            "TEXT": [r[1] for r in rows],
            "WIDTH": pa.array([90 + i for i in range(len(rows))], pa.int64()),
            "HEIGHT": pa.array([70.0] * len(rows), pa.float64()),
            "LICENSE": ["?"] * len(rows),
            "NSFW": ["UNLIKELY"] * len(rows),
            "similarity": pa.array([r[2] for r in rows], pa.float64()),
        }
    )
    pq.write_table(table, path, row_group_size=4)
    return {
        "input_rows": 11,
        "dropped": {
            "caption_length": 1,
            "duplicate_url": 1,
            "empty_caption": 1,
            "min_values": 2,
            "url_scheme": 2,
        },
        "failed": {"http_404": 1},
        "written": 3,
    }


def headerless_csv(path: Path, server: LocalServer) -> dict[str, Any]:
    """A spreadsheet export: byte-order mark, CRLF, quoted fields, rows of the wrong width."""
    lines = [
        f'\ufeff{server.url("/sheet/0.jpg")},"a red, round thing"',
        f'{server.url("/sheet/1.jpg")},"a ""quoted"" blue thing"',
        "only one field",  # malformed_row
        f"{server.url('/sheet/2.jpg')},a,three fields",  # malformed_row
        f"{server.url('/sheet/2.jpg')},a green thing",
    ]
    path.write_bytes("\r\n".join(lines).encode() + b"\r\n")
    return {"input_rows": 5, "dropped": {"malformed_row": 2}, "failed": {}, "written": 3}


def broken_jsonl(path: Path, server: LocalServer) -> dict[str, Any]:
    """Gzipped jsonl with a broken line, a blank line and a line that is not an object."""
    lines = [
        json.dumps({"image": server.url("/lines/0.jpg"), "text": "a yellow thing", "id": 7}),
        '{"image": "http://127.0.0.1/x.jpg", "text": "cut off',  # invalid_json
        json.dumps({"image": server.url("/lines/1.jpg"), "text": "a purple thing", "id": 9}),
        "",  # blank_line
        "[1, 2]",  # invalid_json
        json.dumps({"image": server.url("/lines/2.jpg"), "text": "no id"}),  # bad_id
    ]
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode(), mtime=0))
    return {
        "input_rows": 6,
        "dropped": {"bad_id": 1, "blank_line": 1, "invalid_json": 2},
        "failed": {},
        "written": 2,
    }


def photo_folder(root: Path) -> dict[str, Any]:
    """DALLE-pytorch's layout: images with same-named .txt captions, in subfolders, plus an
    image without caption, an orphan caption, an unreadable image and an unrelated file."""
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    (root / "a" / "cat.jpg").write_bytes(image_bytes("RGB", (80, 70), "JPEG", 1))
    (root / "a" / "cat.txt").write_text("a cat on a mat\n\nthe same cat\n")
    (root / "a" / "dog.png").write_bytes(image_bytes("RGB", (70, 80), "PNG", 2))
    (root / "a" / "dog.txt").write_bytes("\ufeffa dog in the snow\r\n".encode())
    (root / "b" / "bird.jpg").write_bytes(image_bytes("RGB", (75, 75), "JPEG", 3))  # no caption
    (root / "b" / "lonely.txt").write_text("an orphan caption\n")
    (root / "b" / "broken.jpg").write_bytes(b"not an image at all")
    (root / "b" / "broken.txt").write_text("a picture that cannot be read\n")
    (root / "notes.md").write_text("not a row\n")
    return {
        "input_rows": 6,  # cat (2 lines), dog, bird, lonely, broken
        "dropped": {"missing_caption": 1, "orphan_caption": 1},
        "failed": {"decode_error": 1},  # broken.jpg, counted by the download
        "written": 3,
    }


def build(workdir: Path, out: Path, *, targets: list[str], config: tuple[str, ...] = ()) -> None:
    proc = subprocess.run(
        [str(BIN / "snakemake"), *targets, "--cores", "2"]
        + ["--configfile", str(workdir / "own.yaml"), "--config", f"output_dir={out}", *config],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]


def shard_files(shards: Path) -> dict[str, bytes]:
    names = sorted(p.name for p in shards.glob("*.tar")) + ["manifest.json", "index.parquet"]
    return {n: (shards / n).read_bytes() for n in names}


@pytest.mark.slow
def test_own_datasets_build_with_exact_counts_and_identical_bytes(tmp_path: Path) -> None:
    routes = {}
    for name in ("laion", "sheet", "lines"):
        for i in range(3):
            routes[f"/{name}/{i}.jpg"] = Route(image_bytes("RGB", (90, 70 + i), "JPEG", i))
    with serve(routes) as server:
        expected = {
            "laion": laion_parquet(tmp_path / "laion.parquet", server),
            "sheet": headerless_csv(tmp_path / "sheet.csv", server),
            "lines": broken_jsonl(tmp_path / "captions.jsonl.gz", server),
            "photos": photo_folder(tmp_path / "my photos"),
        }
        server.routes["/laion.parquet"] = Route((tmp_path / "laion.parquet").read_bytes())
        (tmp_path / "own.yaml").write_text(
            CONFIG
            + f"""datasets:
  laion:
    format: table
    source: {server.url("/laion.parquet")}
    url_column: URL
    caption_column: TEXT
    width_column: WIDTH
    height_column: HEIGHT
    license_column: LICENSE
    keep_columns: [similarity, NSFW]
    min_values: {{similarity: 0.3}}
  sheet:
    format: table
    source: {tmp_path / "sheet.csv"}
    header: false
    url_column: 0
    caption_column: 1
  lines:
    format: table
    source: {(tmp_path / "captions.jsonl.gz").as_uri()}
    url_column: image
    caption_column: text
    id_column: id
  photos:
    format: folder
    source: "{tmp_path / "my photos"}"
    caption_lines: each
"""
        )
        build(tmp_path, tmp_path / "one", targets=[f"{d}_shards" for d in DATASETS])
        # The second build stops at the shards (the card and verify only read them), and
        # runs each stage in a process of its own instead of a fork of the stage server.
        two = [str(tmp_path / "two" / d / "shards" / "manifest.json") for d in DATASETS]
        build(tmp_path, tmp_path / "two", targets=two, config=("stage_server=false",))

    from dalle_data.formats.manifest import read_manifest

    for name, want in expected.items():
        shards = tmp_path / "one" / name / "shards"
        counts = read_manifest(shards)["counts"]
        assert counts["input_rows"] == want["input_rows"], name
        assert {k: v for k, v in counts["dropped"].items() if v} == want["dropped"], name
        assert counts["failed"] == want["failed"], name
        assert counts["written"] == want["written"], name
        assert (shards / "verify.json").is_file() and (shards / "README.md").is_file()
        assert shard_files(shards) == shard_files(tmp_path / "two" / name / "shards"), name

    meta = _sample_json(tmp_path / "one" / "laion" / "shards")
    assert [m["similarity"] for m in meta] == [0.35, 0.5, 0.31]
    assert {m["NSFW"] for m in meta} == {"UNLIKELY"} and meta[0]["original_width"] == 90
    assert [m["caption"] for m in _sample_json(tmp_path / "one" / "sheet" / "shards")] == [
        "a red, round thing",
        'a "quoted" blue thing',
        "a green thing",
    ]
    assert [m["row_id"] for m in _sample_json(tmp_path / "one" / "lines" / "shards")] == [7, 9]
    photos = _sample_json(tmp_path / "one" / "photos" / "shards")
    assert [m["caption"] for m in photos] == ["a cat on a mat", "the same cat", "a dog in the snow"]
    assert photos[1]["url"].endswith("/my%20photos/a/cat.jpg#2")


def _sample_json(shards: Path) -> list[dict[str, Any]]:
    metas = []
    for tar in sorted(shards.glob("*.tar")):
        with tarfile.open(tar) as fh:
            for member in fh.getmembers():
                if member.name.endswith(".json"):
                    extracted = fh.extractfile(member)
                    assert extracted is not None
                    metas.append(json.loads(extracted.read()))
    return metas
