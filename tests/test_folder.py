"""The folder source format: images with same-named .txt captions, walked in path order."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from dalle_data.pipeline.fetch import fetch
from dalle_data.pipeline.sources import Options, SourceError, SourceFile, folder


def make_folder(root: Path) -> None:
    (root / "a" / "deep").mkdir(parents=True)
    (root / "a" / "cat.jpg").write_bytes(b"jpg")
    (root / "a" / "cat.txt").write_text("a cat\n\n  the same cat  \n")
    (root / "a" / "deep" / "dog.PNG").write_bytes(b"png")
    (root / "a" / "deep" / "dog.txt").write_bytes("\ufeffa dog\r\n".encode())
    (root / "b.jpeg").write_bytes(b"jpeg")  # missing_caption
    (root / "orphan.txt").write_text("nobody\n")  # orphan_caption
    (root / "latin.webp").write_bytes(b"webp")
    (root / "latin.txt").write_bytes(b"caf\xe9\n")  # invalid_utf8
    (root / "empty.jpg").write_bytes(b"jpg")
    (root / "empty.txt").write_text("\n")  # a row with an empty caption: the filter's
    (root / "README.md").write_text("not a row")


def run(root: Path, **kw: str) -> tuple[pa.Table, pa.Table, int]:
    chunks = list(folder.read([SourceFile(root, 2)], Options(**kw)))  # type: ignore[arg-type]
    rows = pa.concat_tables([c.rows for c in chunks])
    dropped = pa.concat_tables([c.dropped for c in chunks])
    n = sum(c.input_rows for c in chunks)
    assert n == rows.num_rows + dropped.num_rows
    return rows, dropped, n


@pytest.mark.parametrize(("lines", "captions"), [("first", 1), ("each", 2)])
def test_folder_rows_in_path_order_with_every_problem_counted(
    tmp_path: Path, lines: str, captions: int
) -> None:
    root = tmp_path / "my photos"
    make_folder(root)
    rows, dropped, n = run(root, caption_lines=lines)
    assert n == 5 + captions
    # Folder by folder (a folder's files, then its subfolders), each sorted by name.
    expected = ["", "a cat", "the same cat"][: 1 + captions] + ["a dog"]
    assert rows.column("caption").to_pylist() == expected
    urls = rows.column("url").to_pylist()
    assert urls[1] == (root / "a" / "cat.jpg").as_uri() and "%20" in urls[1]
    if captions == 2:
        assert urls[2] == urls[1] + "#2"
    # b.jpeg is row 1, empty.jpg row 2, latin.webp 3, orphan.txt 4, a/cat.jpg 5.
    assert rows.column("row_id").to_pylist()[:2] == [2_000_000_002, 2_000_000_005]
    reasons = dict(zip(*dropped.select(["reason", "url"]).to_pydict().values(), strict=True))
    assert reasons == {
        "missing_caption": (root / "b.jpeg").as_uri(),
        "orphan_caption": (root / "orphan.txt").as_uri(),
        "invalid_utf8": (root / "latin.webp").as_uri(),
    }


def test_folder_errors_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="not a folder"):
        run(tmp_path / "nothing")
    with pytest.raises(SourceError, match="first or each"):
        run(tmp_path, caption_lines="all")


def test_fetch_links_a_folder_and_its_hash_follows_its_files(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    make_folder(root)
    record = fetch([str(root)], tmp_path / "raw")
    entry = record["files"][0]
    assert (tmp_path / "raw" / "photos").resolve() == root and entry["linked"]
    assert entry["bytes"] == sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    (root / "a" / "cat.txt").write_text("another cat\n")
    again = fetch([str(root)], tmp_path / "raw")["files"][0]
    assert again["sha256"] != entry["sha256"]
    assert json.loads((tmp_path / "raw" / "fetch.json").read_text())["files"][0] == again
