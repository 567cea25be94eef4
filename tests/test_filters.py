"""Filters: subset selection, each named unit, caption cleaning, and the run's accounting."""

from __future__ import annotations

import json
from pathlib import Path

import ftfy
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from dalle_data.cli import app
from dalle_data.pipeline import filter_stage, filters
from dalle_data.pipeline.captions import (
    FTFY_CONFIG,
    MOJIBAKE_REACH,
    clean_caption,
    clean_captions,
    looks_like_mojibake,
)
from dalle_data.pipeline.filter_stage import FilterOptions, run
from dalle_data.pipeline.filters import (
    BlocklistFilter,
    CaptionLengthFilter,
    FilterError,
    UrlSchemeFilter,
    choose_subset,
)
from dalle_data.pipeline.sources import DROPPED_SCHEMA, SCHEMA, make_rows


def _rows(urls: list[str], captions: list[str], start: int = 1) -> pa.Table:
    n = len(urls)
    return make_rows(
        {
            "row_id": pa.array(range(start, start + n), pa.int64()),
            "url": pa.array(urls, pa.string()),
            "caption": pa.array(captions, pa.string()),
        },
        n,
    )


def test_subset_is_deterministic_and_nested() -> None:
    ids = np.arange(1, 200_001, dtype=np.int64)
    one = choose_subset(ids, 0.01, None)
    two = choose_subset(ids, 0.02, None)
    keep1 = filters.SubsetFilter(one).keep(_ids_table(ids)).to_numpy(zero_copy_only=False)
    keep2 = filters.SubsetFilter(two).keep(_ids_table(ids)).to_numpy(zero_copy_only=False)
    assert one.size == keep1.sum() and 1800 < one.size < 2200
    assert np.all(keep2[keep1])  # the 2% subset holds the 1% one
    capped = choose_subset(ids, 0.02, 500)
    keep_capped = filters.SubsetFilter(capped).keep(_ids_table(ids)).to_numpy(zero_copy_only=False)
    assert capped.size == keep_capped.sum() == 500 and np.all(keep2[keep_capped])
    assert choose_subset(ids[::-1].copy(), 0.02, 500) == capped  # order does not matter
    assert choose_subset(ids, 1.0, None).limit is None


def _ids_table(ids: np.ndarray) -> pa.Table:
    return pa.table({"row_id": pa.array(ids)})


@pytest.mark.parametrize(("fraction", "max_rows"), [(0.0, None), (1.5, None), (1.0, 0)])
def test_subset_refuses_bad_values(fraction: float, max_rows: int | None) -> None:
    with pytest.raises(FilterError, match="out of range"):
        choose_subset(np.arange(10), fraction, max_rows)


def test_url_scheme_allowlist() -> None:
    urls = [
        "https://example.com/a.jpg",
        "HTTP://EXAMPLE.COM/b.jpg",
        "file:///etc/passwd",
        "file:data/sample/x.jpg",
        "ftp://example.com/c.jpg",
        "javascript:alert(1)",
        "https://",
        "https://exa mple.com/d.jpg",
        "",
    ]
    rows = _rows(urls, ["c"] * len(urls))
    strict = UrlSchemeFilter(allow_file_urls=False).keep(rows).to_pylist()
    assert strict == [True, True, False, False, False, False, False, False, False]
    lax = UrlSchemeFilter(allow_file_urls=True).keep(rows).to_pylist()
    assert lax == [True, True, True, True, False, False, False, False, False]


def test_caption_cleaning_rules() -> None:
    raw = [
        "  Two  cats\tand a\ndog ",
        "Fish &amp; chips &lt;3",
        "The Mona Lisa doesnÃ¢â‚¬â„¢t have eyebrows.",
        "“curly” quotes",
        "plain caption",
        "",
    ]
    assert clean_captions(pa.array(raw)).to_pylist() == [
        "Two cats and a dog",
        "Fish & chips <3",
        "The Mona Lisa doesn't have eyebrows.",
        '"curly" quotes',
        "plain caption",
        "",
    ]


_TEXT = st.text(
    alphabet=st.one_of(
        st.characters(blacklist_categories=("Cs",)),  # UTF-8 data holds no surrogates
        st.sampled_from(list(" \t\n&;#ÃÂâ€™œ©é¨´ðŸ˜\u00a0\u0080\u200b\ufeff“”ﬁＡ")),
    ),
    max_size=12,
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_TEXT, min_size=1, max_size=8))
def test_vectorised_cleaning_equals_ftfy_on_every_row(texts: list[str]) -> None:
    """The fast paths (no Python for plain ASCII, no ftfy where it changes nothing) give
    exactly what unescape + ftfy + whitespace gives for every caption."""
    reference = [" ".join(ftfy.fix_text(_unescape(t), FTFY_CONFIG).split()) for t in texts]
    assert clean_captions(pa.array(texts)).to_pylist() == reference
    assert [clean_caption(t) for t in texts] == reference


def _unescape(text: str) -> str:
    import html

    return html.unescape(text)


def test_every_mojibake_pattern_is_short_and_holds_a_non_ascii_character() -> None:
    """What looks_like_mojibake relies on, checked on the installed ftfy's pattern."""
    from re import _constants as sre
    from re import _parser

    def non_ascii(op: object, arg: object) -> bool:
        if op is sre.LITERAL:
            return arg >= 128  # type: ignore[operator]
        if op is sre.IN:
            return all(
                (o is sre.LITERAL and a >= 128) or (o is sre.RANGE and a[0] >= 128)
                for o, a in arg  # type: ignore[attr-defined]
            )
        return False

    pattern = ftfy.badness.BADNESS_RE
    parsed = _parser.parse(pattern.pattern, pattern.flags)
    assert parsed.getwidth()[1] <= MOJIBAKE_REACH
    [(op, (_, branches))] = list(parsed)
    assert op is sre.BRANCH
    for branch in branches:
        assert any(non_ascii(o, a) for o, a in branch), branch
        # Only "^" (start of text) is anchored; search(text, pos, endpos) keeps its meaning.
        assert all(a is sre.AT_BEGINNING for o, a in branch if o is sre.AT), branch


_MOJIBAKE_TEXT = st.text(
    alphabet=st.sampled_from(list("ab Z.,!?\n\t°ÃÂâ€™œŒ©é¨´ðŸ˜¢£¥×²ØÙàà√±≈‚ÄвЂВГРСβΒΓΞΟā\xa0\x85")),
    max_size=40,
)


@settings(max_examples=500, deadline=None)
@given(_MOJIBAKE_TEXT)
def test_mojibake_check_near_non_ascii_equals_ftfy(text: str) -> None:
    assert looks_like_mojibake(text) == ftfy.badness.is_bad(text)


def test_caption_length_and_blocklist() -> None:
    rows = _rows(["https://a"] * 4, ["one", "one two three", "a b c d e f", "NSFW stuff"])
    keep = CaptionLengthFilter(min_words=2, max_words=5).keep(rows).to_pylist()
    assert keep == [False, True, False, True]
    assert BlocklistFilter(["nsfw", "x.y"]).keep(rows).to_pylist() == [True, True, True, False]
    with pytest.raises(FilterError, match="min_words 6 is above"):
        CaptionLengthFilter(min_words=6, max_words=5)


def _write_normalized(metadata: Path, rows: pa.Table, drops: int = 0) -> None:
    metadata.mkdir(parents=True)
    pq.write_table(rows, metadata / "normalized.parquet")
    (metadata / "normalize.json").write_text(
        json.dumps(
            {
                "input_rows": rows.num_rows + drops,
                "output_rows": rows.num_rows,
                "dropped": {"no_tab": drops},
                "seconds": 1.0,
                "sources": [{"bytes": 10}],
            }
        )
    )


def test_run_counts_every_rule_and_keeps_every_dropped_row(tmp_path: Path) -> None:
    metadata = tmp_path / "metadata"
    urls = [
        "https://x/1.jpg",
        "file:///etc/passwd",
        "ftp://x/2.jpg",
        "javascript:alert(1)",
        "https://x/3.jpg",
        "https://x/1.jpg",
        "https://x/4.jpg",
        "https://x/5.jpg",
        "https://x/6.jpg",
        "https://x/7.jpg",
    ]
    captions = [
        "a dog",
        "c",
        "c",
        "c",
        "   ",
        "a dup",
        "one",
        "too many words here",
        "bad word",
        "ok",
    ]
    _write_normalized(metadata, _rows(urls, captions))
    options = FilterOptions(min_words=1, max_words=3, blocklist=("WORD",), workers=1)
    record = run(metadata, options)
    assert record["dropped"] == {
        "subset": 0,
        "url_scheme": 3,
        "empty_caption": 1,
        "caption_length": 1,
        "blocklist": 1,
        "duplicate_url": 1,
    }
    assert record["input_rows"] == 10 and record["output_rows"] == 3
    kept = pq.read_table(metadata / "filtered.parquet")
    assert kept.schema == SCHEMA
    assert kept.column("row_id").to_pylist() == [1, 7, 10]
    assert kept.column("caption").to_pylist() == ["a dog", "one", "ok"]
    dropped = pq.read_table(metadata / "dropped.parquet")
    assert sorted(
        zip(dropped.column("row_id").to_pylist(), dropped.column("reason").to_pylist(), strict=True)
    ) == [
        (2, "url_scheme"),
        (3, "url_scheme"),
        (4, "url_scheme"),
        (5, "empty_caption"),
        (6, "duplicate_url"),
        (8, "caption_length"),
        (9, "blocklist"),
    ]
    report = json.loads((metadata / "report.json").read_text())
    assert report["filter"]["output_rows"] == 3 and report["files"]["filtered.parquet"] > 0


def test_run_with_subset_records_rule_and_size(tmp_path: Path) -> None:
    metadata = tmp_path / "metadata"
    n = 1000
    _write_normalized(metadata, _rows([f"https://x/{i}" for i in range(n)], ["a cat"] * n))
    record = run(metadata, FilterOptions(fraction=0.5, max_rows=100, workers=1))
    assert record["subset"]["size"] == 100 and record["subset"]["max_rows"] == 100
    assert record["dropped"]["subset"] == 900 and record["output_rows"] == 100
    dropped = pq.read_table(metadata / "dropped.parquet")
    assert dropped.num_rows == 900 and dropped.column("url").null_count == 900  # ids only


def test_worker_pool_and_inline_cleaning_write_the_same_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One batch is cleaned in this process, several in a spawned pool: same results; and
    the same bytes whatever the number of workers."""
    n = 40
    urls = [f"https://x/{i % 35}" for i in range(n)]
    # Mojibake and entities to clean; every third caption too long once cleaned.
    captions = [
        [f"  a  cat {i} ", f"caf\u00c3\u00a9 &amp; dog {i}", f"a&nbsp;big dog {i} x y"][i % 3]
        for i in range(n)
    ]
    results, files = {}, {}
    for batch_rows, workers in ((filter_stage.BATCH_ROWS, 2), (7, 2), (7, 1)):
        monkeypatch.setattr(filter_stage, "BATCH_ROWS", batch_rows)
        metadata = tmp_path / f"{batch_rows}-{workers}" / "metadata"
        _write_normalized(metadata, _rows(urls, captions))
        record = run(metadata, FilterOptions(max_words=4, workers=workers))
        results[batch_rows] = (
            {k: record[k] for k in ("input_rows", "dropped", "output_rows")},
            pq.read_table(metadata / "filtered.parquet").to_pylist(),
            sorted(pq.read_table(metadata / "dropped.parquet").column("row_id").to_pylist()),
        )
        files[workers] = [
            (metadata / f).read_bytes() for f in ("filtered.parquet", "dropped.parquet")
        ]
    inline, pooled = results.values()
    assert inline == pooled
    assert files[1] == files[2]
    assert inline[0]["dropped"] == {
        "subset": 0,
        "url_scheme": 0,
        "duplicate_url": 5,
        "empty_caption": 0,
        "caption_length": 11,
    }
    assert inline[0]["output_rows"] == 24
    assert inline[1][0]["caption"] == "a cat 0" and inline[1][1]["caption"] == "café & dog 1"


def test_cli_filter_without_normalized_is_a_clear_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["filter", "--metadata-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert "normalized.parquet does not exist: run `dalle-data normalize` first" in result.output


def test_the_base_class_counts_and_excludes_what_a_filter_drops(tmp_path: Path) -> None:
    """A concrete filter only decides; Filter.apply counts the rest and writes them."""
    rows = _rows(["https://a/1", "ftp://b/2", "https://c/3"], ["x", "y", "z"])
    with pq.ParquetWriter(tmp_path / "d.parquet", DROPPED_SCHEMA) as writer:
        exclusions = filters.Exclusions(writer, ["url_scheme"])
        kept = UrlSchemeFilter(allow_file_urls=False).apply(rows, exclusions)
    assert kept.column("url").to_pylist() == ["https://a/1", "https://c/3"]
    assert exclusions.counts == {"url_scheme": 1}
    dropped = pq.read_table(tmp_path / "d.parquet").to_pylist()
    assert [(d["row_id"], d["reason"], d["stage"]) for d in dropped] == [
        (2, "url_scheme", "filter")
    ]


@pytest.mark.parametrize("collide", [False, True])
def test_duplicate_urls_are_a_filter_whose_first_row_wins_across_batches(
    collide: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    urls = ["https://a", "https://b", "https://a", "https://c", "https://b", "https://a"]
    if collide:  # every URL but c gets one hash: only the URLs themselves tell them apart
        monkeypatch.setattr(
            filters,
            "url_hashes",
            lambda a: np.array([9 if u == "https://c" else 7 for u in a.to_pylist()], np.uint64),
        )
    rows = _rows(urls, ["x"] * len(urls))
    unit = filters.DuplicateUrlFilter()
    for start in range(0, len(urls), 4):
        unit.see(rows.slice(start, 4))
    keep = [unit.keep(rows.slice(start, 4)).to_pylist() for start in range(0, len(urls), 4)]
    assert sum(keep, []) == [True, True, False, True, False, False]


def test_caption_cleaning_fixes_what_ftfy_fixes_in_a_modifier_apostrophe() -> None:
    """U+02BC is one of the characters ftfy's fixers change (uncurl_quotes)."""
    text = "rock \u02bcn\u02bc roll"
    expected = " ".join(ftfy.fix_text(text, FTFY_CONFIG).split())
    assert expected != text
    assert clean_caption(text) == expected
    assert clean_captions(pa.array([text])).to_pylist() == [expected]
