"""Source adapters on small, format-faithful files with the broken lines real files have.

The ``write_*`` builders are also used by tests/test_metadata_pipeline.py.
"""

from __future__ import annotations

import bz2
import gzip
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dalle_data.pipeline.sources import (
    DROPPED_SCHEMA,
    SCHEMA,
    Options,
    SourceError,
    SourceFile,
    cc12m,
    decode_utf8,
    read_blocks,
    sample,
    split_lines,
    wit,
    yfcc,
)

# ---------------------------------------------------------------- builders

CC12M_GOOD = [
    b"https://example.com/a.jpg\ta dog on a beach",
    b"http://example.com/b.png\tTwo  cats &amp; a <PERSON>",
    b"https://example.com/c.jpg\tcaf\xc3\xa9 au lait\r",  # CRLF line end
]
# Each broken kind once, plus a second blank line.
CC12M_BROKEN = {
    "blank_line": [b"", b""],
    "no_tab": [b"just some words without a tab"],
    "extra_columns": [b"https://example.com/d.jpg\tcaption\textra"],
    "invalid_utf8": [b"https://example.com/e.jpg\tbad \xff\xfe bytes"],
}


def write_cc12m(path: Path) -> dict[str, int]:
    """A cc12m file: 3 good lines, 5 broken ones, no final newline; returns expected drops."""
    lines = [
        CC12M_GOOD[0],
        CC12M_BROKEN["blank_line"][0],
        CC12M_GOOD[1],
        CC12M_BROKEN["no_tab"][0],
        CC12M_BROKEN["extra_columns"][0],
        CC12M_BROKEN["invalid_utf8"][0],
        CC12M_BROKEN["blank_line"][1],
        CC12M_GOOD[2],
    ]
    path.write_bytes(b"\n".join(lines))
    return {k: len(v) for k, v in CC12M_BROKEN.items()}


WIT_HEADER = [
    "language",
    "page_url",
    "image_url",
    "page_title",
    "section_title",
    "hierarchical_section_title",
    "caption_reference_description",
    "caption_attribution_description",
    "caption_alt_text_description",
    "mime_type",
    "original_height",
    "original_width",
    "is_main_image",
    "attribution_passes_lang_id",
    "page_changed_recently",
    "context_page_description",
    "context_section_description",
]


def _wit_row(lang: str, url: str, ref: str, attr: str, alt: str, mime: str, h: str = "480") -> str:
    values = [lang, "https://en.wikipedia.org/wiki/X", url, "X", "", "X", ref, attr, alt, mime]
    values += [h, "640", "true", "true", "false", 'a "quoted"\tcontext', "section"]

    def quote(v: str) -> str:
        return '"' + v.replace('"', '""') + '"' if any(c in v for c in '\t"\n') else v

    return "\t".join(quote(v) for v in values)


def write_wit(path: Path) -> dict[str, int]:
    """A gzip WIT file: 4 kept rows, 6 dropped ones; returns expected drops."""
    rows = [
        _wit_row(
            "en", "https://upload.wikimedia.org/a.jpg", "Reference caption", "x", "y", "image/jpeg"
        ),
        _wit_row(
            "en",
            "https://upload.wikimedia.org/b.png",
            "",
            "English: Attribution text",
            "",
            "image/png",
        ),
        _wit_row(
            "en",
            "https://upload.wikimedia.org/c.webp",
            "",
            "English: attr",
            "Alt text",
            "image/webp",
        ),
        _wit_row(
            "en",
            "https://upload.wikimedia.org/d.jpg",
            'Multi\nline "q"\ttab',
            "",
            "",
            "image/jpeg",
            "?",
        ),
        _wit_row("de", "https://upload.wikimedia.org/e.jpg", "Deutsch", "", "", "image/jpeg"),
        _wit_row("fr", "https://upload.wikimedia.org/f.jpg", "Français", "", "", "image/jpeg"),
        _wit_row("en", "https://upload.wikimedia.org/g.svg", "Vector", "", "", "image/svg+xml"),
        _wit_row("en", "https://upload.wikimedia.org/h.gif", "Animated", "", "", "image/gif"),
        _wit_row("en", "https://upload.wikimedia.org/i.jpg", "", "", "", "image/jpeg"),
        "en\tonly three\tfields",
    ]
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write("\t".join(WIT_HEADER) + "\n" + "\n".join(rows) + "\n")
    return {"language": 2, "mime_type": 2, "no_caption": 1, "malformed_row": 1}


def _yfcc_line(pid: object, title: str, desc: str, *, marker: str = "0", cc: bool = True) -> str:
    lic, url = (
        ("Attribution-NonCommercial License", "http://creativecommons.org/licenses/by-nc/2.0/")
        if cc
        else ("All Rights Reserved", "")
    )
    fields = [
        "7", str(pid), "0123abcd", "12345@N00", "nick", "2010-01-01 10:00:00.0", "1262304000",
        "Canon+EOS", title, desc, "beach,sun", "", "", "", "",
        f"http://www.flickr.com/photos/nick/{pid}/",
        f"http://farm4.staticflickr.com/3/{pid}_0123abcd.jpg",
        lic, url, "3", "4", "0123abcd", "abcd0123", "jpg", marker,
    ]  # fmt: skip
    return "\t".join(fields)


def write_yfcc(path: Path, subset: Path | None = None, *, header: bool = True) -> dict[str, int]:
    """A bz2 YFCC metadata file (ids out of order) and optionally its subset list."""
    lines = [
        _yfcc_line(900, "Sunset+at+the+%3Cb%3Ebeach%3C%2Fb%3E", "Took+this+%26amp%3B+that"),
        _yfcc_line(300, "A+video", "moving", marker="1"),
        _yfcc_line(100, "Not+listed", "in+the+subset"),
        _yfcc_line(200, "Rights", "reserved", cc=False),
        _yfcc_line(400, "", ""),
        "only\tthree\tfields",
        "",
        _yfcc_line("x12", "bad", "id"),
        _yfcc_line(50, "Title%21", "Second+photo"),
    ]
    path.write_bytes(bz2.compress(("\n".join(lines) + "\n").encode()))
    if subset is not None:
        rows = [f"{i}\t{pid}\thash" for i, pid in enumerate([900, 300, 200, 400, 50])]
        subset.write_text(("line\tphotoid\thash\n" if header else "") + "\n".join(rows) + "\n")
    expected = {"blank_line": 1, "wrong_column_count": 1, "bad_photo_id": 1, "video": 1}
    expected |= {"license": 1, "no_caption": 1}
    if subset is not None:
        expected["not_in_subset"] = 1
    return expected


YFCC_SQL_COLUMNS = [
    "photoid",
    "uid",
    "unickname",
    "datetaken",
    "dateuploaded",
    "capturedevice",
    "title",
    "description",
    "usertags",
    "machinetags",
    "longitude",
    "latitude",
    "accuracy",
    "pageurl",
    "downloadurl",
    "licensename",
    "licenseurl",
    "serverid",
    "farmid",
    "secret",
    "secretoriginal",
    "ext",
    "marker",
]


def write_yfcc_sqlite(path: Path, tsv: bytes, *, index: bool = False) -> None:
    """The public database's layout for the 25-column lines of ``tsv`` (others skipped):
    no line number, no hash; ids and markers stored as integers where they are numbers."""
    import sqlite3

    db = sqlite3.connect(path)
    db.execute(f"CREATE TABLE yfcc100m_dataset ({', '.join(YFCC_SQL_COLUMNS)})")
    rows = []
    for line in tsv.decode().splitlines():
        fields = line.split("\t")
        if len(fields) == 25:
            row: list[object] = [fields[1], *fields[3:]]
            for k in (0, 22):  # photoid, marker
                row[k] = int(row[k]) if str(row[k]).isdigit() else row[k]
            rows.append(row)
    db.executemany(f"INSERT INTO yfcc100m_dataset VALUES ({', '.join('?' * 23)})", rows)
    if index:
        db.execute("CREATE INDEX photoid_index ON yfcc100m_dataset (photoid)")
    db.commit()
    db.close()


@pytest.mark.parametrize("index", [False, True], ids=["unindexed", "indexed"])
def test_yfcc_sqlite_gives_the_same_normalized_parquet_as_the_tsv(
    tmp_path: Path, index: bool
) -> None:
    from dalle_data.pipeline.fetch import fetch
    from dalle_data.pipeline.normalize import normalize

    tsv, subset = tmp_path / "yfcc100m_dataset.bz2", tmp_path / "subset.tsv"
    expected = write_yfcc(tsv, subset)
    database = tmp_path / "yfcc100m_dataset.sql"
    write_yfcc_sqlite(database, bz2.decompress(tsv.read_bytes()), index=index)
    outputs = {}
    for fmt, source in (("yfcc", tsv), ("yfcc", database), ("yfcc_sqlite", database)):
        raw, meta = tmp_path / fmt / source.name / "raw", tmp_path / fmt / source.name / "meta"
        fetch([str(source)], raw, subset=str(subset))
        record = normalize(fmt, raw, meta)
        outputs[fmt, source.name] = (meta / "normalized.parquet").read_bytes()
        tsv_only = {"blank_line", "wrong_column_count"}
        dropped = {k: v for k, v in expected.items() if source == tsv or k not in tsv_only}
        assert record["dropped"] == dict(sorted(dropped.items()))
    assert len(set(outputs.values())) == 1
    assert pq.read_table(meta / "normalized.parquet").column("row_id").to_pylist() == [50, 900]


def test_yfcc_sqlite_invalid_utf8_is_a_counted_drop(tmp_path: Path) -> None:
    import sqlite3

    database = tmp_path / "yfcc.sql"
    line = _yfcc_line(77, "Caf%C3%A9", "ok")
    write_yfcc_sqlite(database, f"{line}\n{_yfcc_line(78, 'x', 'y')}\n".encode())
    db = sqlite3.connect(database)
    db.execute("UPDATE yfcc100m_dataset SET title = CAST(X'ff41' AS TEXT) WHERE photoid = 78")
    db.commit()
    db.close()
    rows, dropped, counts = _run(yfcc.read, [SourceFile(database, 0)])
    assert counts == {"invalid_utf8": 1}
    assert rows.column("caption").to_pylist() == ["Café. ok"]
    assert "\\xffA" in dropped.column("raw")[0].as_py()


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("CREATE TABLE other (x)", "table yfcc100m_dataset \\(no such table\\)"),
        ("CREATE TABLE yfcc100m_dataset (photoid, title)", "it lacks description, downloadurl"),
    ],
)
def test_yfcc_sqlite_of_another_layout_is_a_clear_error(
    tmp_path: Path, setup: str, message: str
) -> None:
    import sqlite3

    database = tmp_path / "other.sql"
    db = sqlite3.connect(database)
    db.execute(setup)
    db.commit()
    db.close()
    with pytest.raises(SourceError, match=message):
        _run(yfcc.read, [SourceFile(database, 0)])


def test_yfcc_sqlite_truncated_is_a_clear_error(tmp_path: Path) -> None:
    database = tmp_path / "yfcc.sql"
    write_yfcc_sqlite(database, "\n".join(_yfcc_line(i, "t", "d") for i in range(3000)).encode())
    data = database.read_bytes()
    database.write_bytes(data[: len(data) // 2])
    with pytest.raises(SourceError, match="is corrupt or truncated"):
        _run(yfcc.read, [SourceFile(database, 0)])


def test_yfcc_sqlite_format_refuses_a_tsv(tmp_path: Path) -> None:
    path = tmp_path / "yfcc100m_dataset.bz2"
    write_yfcc(path)
    with pytest.raises(SourceError, match="is not an SQLite database"):
        _run(yfcc.read_sqlite, [SourceFile(path, 0)])


# ---------------------------------------------------------------- helpers


def _run(read, files: list[SourceFile], options: Options | None = None):  # type: ignore[no-untyped-def]
    chunks = list(read(files, options or Options()))
    rows = pa.concat_tables([c.rows for c in chunks])
    dropped = pa.concat_tables([c.dropped for c in chunks])
    assert rows.schema == SCHEMA and dropped.schema == DROPPED_SCHEMA
    input_rows = sum(c.input_rows for c in chunks)
    assert input_rows == rows.num_rows + dropped.num_rows
    counts: dict[str, int] = {}
    for reason in dropped.column("reason").to_pylist():
        counts[reason] = counts.get(reason, 0) + 1
    return rows, dropped, counts


# ---------------------------------------------------------------- line splitting


def test_split_lines_strips_crlf_and_counts_tabs() -> None:
    lines = split_lines(b"a\tb\r\n\r\n\n\rx\t\t\n", 10)
    assert lines.text.to_pylist() == [b"a\tb", b"", b"", b"\rx\t\t"]
    assert lines.numbers.tolist() == [10, 11, 12, 13]
    assert lines.tabs.tolist() == [1, 0, 0, 2]


def test_read_blocks_keeps_lines_whole_across_blocks(tmp_path: Path) -> None:
    path = tmp_path / "f.tsv"
    path.write_bytes(b"".join(f"line{i}\tx\n".encode() for i in range(100)) + b"tail")
    blocks = list(read_blocks(path, block_bytes=17))
    assert all(bytes(b).endswith(b"\n") for b in blocks)
    assert b"".join(bytes(b) for b in blocks) == path.read_bytes() + b"\n"


def test_decode_utf8_finds_each_invalid_value_in_a_large_array() -> None:
    values = [b"ok %d" % i for i in range(1000)]
    values[3] = b"\xff"
    values[777] = b"caf\xc3"
    strings, bad = decode_utf8(pa.array(values, pa.large_binary()))
    assert np.flatnonzero(bad).tolist() == [3, 777]
    assert strings[4].as_py() == "ok 4" and strings[3].as_py() == ""


# ---------------------------------------------------------------- adapters


def test_cc12m_counts_each_broken_line_under_its_reason(tmp_path: Path) -> None:
    path = tmp_path / "cc12m.tsv"
    expected = write_cc12m(path)
    rows, dropped, counts = _run(cc12m.read, [SourceFile(path, 2)])
    assert counts == expected
    assert rows.column("row_id").to_pylist() == [2_000_000_001, 2_000_000_003, 2_000_000_008]
    assert rows.column("caption").to_pylist() == [
        "a dog on a beach",
        "Two  cats &amp; a <PERSON>",  # cleaning is the filter's job
        "café au lait",
    ]
    bad = dropped.filter(pa.compute.equal(dropped.column("reason"), "invalid_utf8"))
    assert bad.column("raw").to_pylist() == ["https://example.com/e.jpg\tbad \\xff\\xfe bytes"]
    assert bad.column("row_id").to_pylist() == [2_000_000_006]


def test_wit_picks_captions_and_drops_languages_formats(tmp_path: Path) -> None:
    path = tmp_path / "wit_v1.train.all-00000-of-00010.tsv.gz"
    expected = write_wit(path)
    rows, dropped, counts = _run(wit.read, [SourceFile(path, 0)])
    assert counts == expected
    assert rows.column("caption").to_pylist() == [
        "Reference caption",
        "Attribution text",
        "Alt text",
        'Multi\nline "q"\ttab',
    ]
    assert rows.column("height").to_pylist() == [480, 480, 480, None]
    assert rows.column("width").to_pylist() == [640] * 4
    assert rows.column("row_id").to_pylist() == [1, 2, 3, 4]
    # Selection drops keep only the row id: the source row is found by it.
    lang = dropped.filter(pa.compute.equal(dropped.column("reason"), "language"))
    assert lang.column("row_id").to_pylist() == [5, 6] and lang.column("url").null_count == 2
    rows, _, counts = _run(wit.read, [SourceFile(path, 0)], Options(languages=["en", "fr"]))
    assert counts["language"] == 1 and "Français" in rows.column("caption").to_pylist()


def test_wit_refuses_a_file_without_its_columns(tmp_path: Path) -> None:
    path = tmp_path / "wit.tsv.gz"
    with gzip.open(path, "wt") as fh:
        fh.write("a\tb\n1\t2\n")
    with pytest.raises(SourceError, match="is not a WIT file"):
        _run(wit.read, [SourceFile(path, 0)])


@pytest.mark.parametrize("header", [True, False])
def test_yfcc_decodes_captions_and_applies_subset_and_license(tmp_path: Path, header: bool) -> None:
    path, subset = tmp_path / "yfcc100m_dataset.bz2", tmp_path / "subset.tsv"
    expected = write_yfcc(path, subset, header=header)
    rows, _, counts = _run(yfcc.read, [SourceFile(path, 0)], Options(subset=subset))
    assert counts == expected
    common = rows.drop_columns(["extra", "values"])
    assert sorted(common.to_pylist(), key=lambda r: r["row_id"]) == [
        {
            "row_id": 50,
            "url": "http://farm4.staticflickr.com/3/50_0123abcd.jpg",
            "caption": "Title! Second photo",
            "license": "Attribution-NonCommercial License",
            "width": None,
            "height": None,
        },
        {
            "row_id": 900,
            "url": "http://farm4.staticflickr.com/3/900_0123abcd.jpg",
            "caption": "Sunset at the beach. Took this & that",
            "license": "Attribution-NonCommercial License",
            "width": None,
            "height": None,
        },
    ]


def test_yfcc_license_allowlist_and_no_subset(tmp_path: Path) -> None:
    path = tmp_path / "yfcc100m_dataset"
    write_yfcc(path)
    path.write_bytes(bz2.decompress(path.read_bytes()))  # the plain-text form
    rows, _, counts = _run(
        yfcc.read, [SourceFile(path, 0)], Options(licenses=["All Rights Reserved"])
    )
    # Only photo 200 has that license; the video (300) was dropped before the license check.
    assert counts["license"] == 4 and "not_in_subset" not in counts
    assert rows.column("row_id").to_pylist() == [200]


def test_yfcc_subset_with_a_bad_id_is_a_clear_error(tmp_path: Path) -> None:
    subset = tmp_path / "subset.tsv"
    subset.write_text("0\t12\th\n1\tnot-a-number\th\n")
    with pytest.raises(SourceError, match="not-a-number"):
        yfcc.load_subset(subset)


# ---------------------------------------------------------------- offline sample


def test_sample_palette_contract() -> None:
    assert list(sample.COLOURS) == ["red", "green", "blue", "yellow", "purple", "orange"]
    assert set(sample.SHAPES) == {"circle", "square", "triangle"}
    assert not set(sample.BACKGROUNDS.values()) & set(sample.COLOURS.values())
    assert all(len(set(rgb)) == 1 for rgb in sample.BACKGROUNDS.values())  # grey scale


def test_make_sample_is_deterministic_and_captions_name_the_picture(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    first = sample.make_sample(Path("a"), count=40)
    sample.make_sample(Path("b"), count=40)
    assert first == {"rows": 44, "images": 40, "bad_entries": 3, "copies": 1}
    for i in range(40):
        assert (tmp_path / f"a/images/{i:05d}.jpg").read_bytes() == (
            tmp_path / f"b/images/{i:05d}.jpg"
        ).read_bytes()
    lines = (tmp_path / "a/sample.tsv").read_text().splitlines()
    assert len(lines) == 44
    assert lines[40].endswith(lines[1].split("\t")[1])
    assert (tmp_path / "a/images/copy-00001.jpg").read_bytes() == (
        tmp_path / "a/images/00001.jpg"
    ).read_bytes()
    urls = [line.split("\t")[0] for line in lines]
    assert urls[0] == "file:a/images/00000.jpg" and urls[-1] == urls[0]  # the duplicate
    assert urls[-3] == "file:a/images/missing.jpg"
    assert (tmp_path / "a/images/not-an-image.jpg").read_bytes().startswith(b"this is text")
    for i, line in enumerate(lines[:40]):
        colour, shape, background = sample.COMBOS[i % len(sample.COMBOS)]
        caption = line.split("\t")[1]
        assert colour in caption and shape in caption and background in caption
        image = Image.open(tmp_path / f"a/images/{i:05d}.jpg")
        assert image.size == (96, 96) and image.format == "JPEG"
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3).astype(int)
        shape_px = np.abs(pixels - sample.COLOURS[colour]).sum(axis=1) < 60
        assert 0.25 < shape_px.mean() < 0.50, (i, shape_px.mean())


# ---------------------------------------------------------------- normalize


def test_normalize_sorts_out_of_order_ids_in_buckets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dalle_data.pipeline import normalize
    from dalle_data.pipeline.fetch import fetch

    path, subset = tmp_path / "yfcc100m_dataset.bz2", tmp_path / "subset.tsv"
    expected = write_yfcc(path, subset)
    fetch([str(path)], tmp_path / "raw", subset=str(subset))
    monkeypatch.setattr(normalize, "SORT_BUCKET_ROWS", 1)  # one bucket per row
    record = normalize.normalize("yfcc", tmp_path / "raw", tmp_path / "meta")
    assert record["dropped"] == expected and record["output_rows"] == 2
    assert record["input_rows"] == sum(expected.values()) + 2
    rows = pq.read_table(tmp_path / "meta/normalized.parquet")
    assert rows.schema == SCHEMA and rows.column("row_id").to_pylist() == [50, 900]
    dropped = pq.read_table(tmp_path / "meta/normalize_dropped.parquet")
    assert dropped.num_rows == sum(expected.values())


def test_normalize_refuses_repeated_photo_ids(tmp_path: Path) -> None:
    from dalle_data.pipeline import normalize
    from dalle_data.pipeline.fetch import fetch

    path = tmp_path / "yfcc100m_dataset"
    lines = [_yfcc_line(pid, "A+title", "") for pid in (5, 3, 5)]
    path.write_text("\n".join(lines) + "\n")
    fetch([str(path)], tmp_path / "raw")
    with pytest.raises(SourceError, match="row id 5 more than once"):
        normalize.normalize("yfcc", tmp_path / "raw", tmp_path / "meta")
    assert not (tmp_path / "meta/normalized.parquet").exists()
