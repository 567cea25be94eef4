"""The table source format on small files: LAION-style parquet, csv/tsv as spreadsheet tools
save them (byte-order mark, CRLF, quotes, compressed), jsonl with broken lines."""

from __future__ import annotations

import bz2
import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from dalle_data.pipeline.filters import ValueBoundFilter
from dalle_data.pipeline.sources import SCHEMA, Options, SourceError, SourceFile, cc12m, table


def run(path: Path, options: Options, index: int = 0) -> tuple[pa.Table, dict[str, int], int]:
    """Rows, dropped counts per reason and input rows of one file."""
    chunks = list(table.read([SourceFile(path, index)], options))
    rows = pa.concat_tables([c.rows for c in chunks])
    assert rows.schema == SCHEMA
    counts: dict[str, int] = {}
    for chunk in chunks:
        for reason in chunk.dropped.column("reason").to_pylist():
            counts[reason] = counts.get(reason, 0) + 1
    input_rows = sum(c.input_rows for c in chunks)
    assert input_rows == rows.num_rows + sum(counts.values())
    return rows, counts, input_rows


LAION = Options(
    url_column="URL",
    caption_column="TEXT",
    width_column="WIDTH",
    height_column="HEIGHT",
    license_column="LICENSE",
    keep_columns=["similarity", "NSFW"],
    value_columns=["similarity"],
)


def test_laion_parquet_columns_sizes_kept_columns_and_values(tmp_path: Path) -> None:
    path = tmp_path / "part-00000.parquet"
    pq.write_table(
        pa.table(
            {
                "SAMPLE_ID": [1, 2, 3],
                "URL": ["http://a/1.jpg", None, "ftp://x"],
                "TEXT": ["one", "two", None],
                "WIDTH": pa.array([640, None, 3], pa.int64()),
                "HEIGHT": pa.array([480.0, 2.5, None], pa.float64()),
                "LICENSE": ["?", None, "cc-by"],
                "NSFW": ["UNLIKELY", "NSFW", None],
                "similarity": [0.31, float("nan"), None],
            }
        ),
        path,
        row_group_size=2,
    )
    rows, counts, n = run(path, LAION, index=3)
    assert counts == {} and n == 3  # null and ftp URLs are the url_scheme filter's
    assert rows.column("row_id").to_pylist() == [3_000_000_001, 3_000_000_002, 3_000_000_003]
    assert rows.column("url").to_pylist() == ["http://a/1.jpg", None, "ftp://x"]
    assert rows.column("width").to_pylist() == [640, None, 3]
    assert rows.column("height").to_pylist() == [480, None, None]  # 2.5 is not a size
    assert [json.loads(e) for e in rows.column("extra").to_pylist()] == [
        {"NSFW": "UNLIKELY", "similarity": 0.31},
        {"NSFW": "NSFW", "similarity": None},
        {"NSFW": None, "similarity": None},
    ]
    keep = ValueBoundFilter({"similarity": 0.3}, minimum=True).keep(rows)
    assert keep.to_pylist() == [True, False, False]
    assert ValueBoundFilter({"similarity": 0.3}, minimum=False).keep(rows).to_pylist() == [
        False,
        False,
        False,
    ]


def test_a_missing_column_and_an_unknown_file_type_are_clear_errors(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"url": ["http://a"], "text": ["x"]}), path)
    with pytest.raises(SourceError, match=r"no column 'caption'.*caption_column"):
        run(path, Options())
    (tmp_path / "t.xlsx").write_bytes(b"")
    with pytest.raises(SourceError, match="file_type"):
        run(tmp_path / "t.xlsx", Options())
    (tmp_path / "t.csv").write_bytes(b"a,b\n1,2\n")
    with pytest.raises(SourceError, match="url"):
        run(tmp_path / "t.csv", Options())


def test_headerless_csv_from_a_spreadsheet(tmp_path: Path) -> None:
    path = tmp_path / "export.csv"
    path.write_bytes(
        b'\xef\xbb\xbfhttp://a/0.jpg,"a red, round\r\nthing"\r\n'
        b'http://a/1.jpg,"say ""cheese"""\r\n'
        b"one field\r\n"
        b"http://a/2.jpg,a,b\r\n"
        b"http://a/3.jpg,plain\r\n"
    )
    for options in (
        Options(header=False, url_column="0", caption_column="1"),
        Options(header=False, column_names=["u", "c"], url_column="u", caption_column="c"),
    ):
        rows, counts, n = run(path, options)
        assert counts == {"malformed_row": 2} and n == 5
        assert rows.column("url").to_pylist() == [
            "http://a/0.jpg",
            "http://a/1.jpg",
            "http://a/3.jpg",
        ]
        assert rows.column("caption").to_pylist() == [
            "a red, round\r\nthing",
            'say "cheese"',
            "plain",
        ]
        assert rows.column("row_id").to_pylist() == [1, 2, 3]
    with pytest.raises(SourceError, match="column_names"):
        run(path, Options(header=False, url_column="url", caption_column="1"))


@pytest.mark.parametrize("suffix", ["", ".gz", ".bz2", ".zst"])
def test_tsv_with_header_plain_or_compressed(tmp_path: Path, suffix: str) -> None:
    data = (
        "\ufeffurl\tcaption\tid\n"
        'http://a/1.jpg\t"quoted" words stay\t5\n'
        "http://a/2.jpg\tno id\tx\n"
        "http://a/3.jpg\tcaf\u00e9\t6\n"
    ).encode()
    compress = {
        "": lambda b: b,
        ".gz": lambda b: gzip.compress(b, mtime=0),
        ".bz2": bz2.compress,
        ".zst": zstandard.compress,
    }[suffix]
    path = tmp_path / f"cc3m.tsv{suffix}"
    path.write_bytes(compress(data))
    rows, counts, n = run(path, Options(id_column="id"))
    assert counts == {"bad_id": 1} and n == 3
    assert rows.column("row_id").to_pylist() == [5, 6]
    assert rows.column("caption").to_pylist() == ['"quoted" words stay', "caf\u00e9"]


def test_jsonl_counts_each_broken_line(tmp_path: Path) -> None:
    path = tmp_path / "captions.jsonl"
    path.write_bytes(
        b'{"url": "http://a/1.jpg", "caption": "one", "w": "640"}\r\n'
        b'{"url": "http://a/2.jpg", "caption": "cut\n'
        b"\n"
        b"[1, 2]\n"
        b'{"url": "http://a/3.jpg", "caption": "bad \xff byte"}\n'
        b'{"url": 5, "caption": ["a", "list"], "w": 12}\n'
    )
    rows, counts, n = run(path, Options(width_column="w"), index=1)
    assert counts == {"invalid_json": 2, "blank_line": 1, "invalid_utf8": 1} and n == 6
    assert rows.column("row_id").to_pylist() == [1_000_000_001, 1_000_000_006]
    assert rows.column("url").to_pylist() == ["http://a/1.jpg", "5"]
    assert rows.column("caption").to_pylist() == ["one", '["a", "list"]']
    assert rows.column("width").to_pylist() == [640, 12]


def test_cc12m_file_starting_with_a_byte_order_mark_keeps_its_first_row(tmp_path: Path) -> None:
    path = tmp_path / "cc12m.tsv"
    path.write_bytes(b"\xef\xbb\xbfhttps://a/1.jpg\tfirst\r\nhttps://a/2.jpg\tsecond\r\n")
    chunks = list(cc12m.read([SourceFile(path, 0)], Options()))
    assert [c.dropped.num_rows for c in chunks] == [0]
    assert chunks[0].rows.column("url").to_pylist() == ["https://a/1.jpg", "https://a/2.jpg"]


def test_values_map_keeps_row_alignment_for_several_columns() -> None:
    a = pa.array([1.0, None, 3.0])
    b = pa.array([0.5, 0.25, None])
    values = table.value_map({"a": a, "b": b}, 3)
    assert values.to_pylist() == [
        [("a", 1.0), ("b", 0.5)],
        [("a", None), ("b", 0.25)],
        [("a", 3.0), ("b", None)],
    ]
    assert table.as_number(pa.array(["x", "1e3", " 2 ", None])).to_pylist() == [
        None,
        1000.0,
        2.0,
        None,
    ]


def test_kept_columns_become_the_json_python_would_write() -> None:
    columns = {
        "s": pa.array(['a"b\\c\nd\te\r', None, "caf\u00e9 \x01 x", ""]),
        "f": pa.array([0.31, float("nan"), 3.0, None]),
        "i": pa.array([1, None, -5, 2**60]),
        "b": pa.array([True, False, None, True]),
        "l": pa.array([[1], None, [2, 3], []]),
        "d": pa.array(["x", "y", "x", None]).dictionary_encode(),
    }
    plain = {k: v.to_pylist() for k, v in columns.items()}
    plain["f"][1] = None  # NaN is not JSON
    for i, text in enumerate(table.json_objects(columns).to_pylist()):
        want = {k: v[i] for k, v in plain.items()}
        assert text == json.dumps(want, ensure_ascii=False, sort_keys=True)
