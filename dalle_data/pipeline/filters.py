"""Row filters in the datatrove shape: a filter only decides, the base counts and keeps.

A concrete filter implements ``keep(rows) -> bool array`` for a batch and nothing else.
:meth:`Filter.apply` is the one place that counts what a filter dropped and hands those
rows, under the filter's name as their reason, to the :class:`Exclusions` writer
(dropped.parquet). Every filter runs on pyarrow batches (columnar, no per-row Python).
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from dalle_data.errors import DalleDataError
from dalle_data.pipeline.captions import word_counts
from dalle_data.pipeline.sources import make_dropped

STAGE = "filter"
_MASK64 = (1 << 64) - 1


class FilterError(DalleDataError):
    """Bad filter input or options; the message names the file or value and the fix."""


class TableWriter(Protocol):
    def write_table(self, table: pa.Table) -> None: ...


class Exclusions:
    """Where dropped rows go: counted per reason and written to dropped.parquet."""

    def __init__(self, writer: TableWriter, reasons: list[str]) -> None:
        self.writer = writer
        self.counts: Counter[str] = Counter({reason: 0 for reason in reasons})

    def drop(self, reason: str, rows: pa.Table) -> None:
        if rows.num_rows:
            self.counts[reason] += rows.num_rows
            columns = {name: rows.column(name).combine_chunks() for name in rows.column_names}
            self.writer.write_table(make_dropped(STAGE, reason, columns, rows.num_rows))


class Filter(ABC):
    """A named row filter; ``name`` is the reason its rows get in dropped.parquet."""

    name: str

    @abstractmethod
    def keep(self, rows: pa.Table) -> pa.Array:
        """A boolean array: True for the rows of ``rows`` to keep."""

    def apply(self, rows: pa.Table, exclusions: Exclusions) -> pa.Table:
        """The rows this filter keeps; the others are counted and excluded."""
        mask = self.keep(rows)
        if mask.null_count == 0 and pc.all(mask).as_py() is not False:
            return rows  # nothing dropped: no copy of the batch
        exclusions.drop(self.name, rows.filter(pc.invert(mask)))
        return rows.filter(mask)


def splitmix64(values: np.ndarray) -> np.ndarray:
    """A bijective 64-bit mix (SplitMix64): distinct row ids give distinct, uniform values."""
    with np.errstate(over="ignore"):
        z = values.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


@dataclass(frozen=True)
class Subset:
    """Rows whose ``splitmix64(row_id)`` is below ``limit`` (``None`` = every row)."""

    fraction: float
    max_rows: int | None
    limit: int | None
    size: int

    def record(self) -> dict[str, Any]:
        return {
            "rule": "keep rows with splitmix64(row_id) / 2**64 < fraction; with max_rows, "
            "only the max_rows smallest such values",
            "fraction": self.fraction,
            "max_rows": self.max_rows,
            "limit": self.limit,
            "size": self.size,
        }


def choose_subset(row_ids: np.ndarray, fraction: float, max_rows: int | None) -> Subset:
    """The deterministic subset: a larger fraction or max_rows always contains a smaller one."""
    if not 0 < fraction <= 1:
        raise FilterError(f"fraction {fraction} is out of range: use a number in (0, 1]")
    if max_rows is not None and max_rows < 1:
        raise FilterError(f"max_rows {max_rows} is out of range: use a positive integer or null")
    limit = None if fraction >= 1 else int(fraction * 2**64)
    hashes = splitmix64(row_ids)
    inside = hashes if limit is None else hashes[hashes < np.uint64(limit)]
    if max_rows is not None and len(inside) > max_rows:
        limit = int(np.partition(inside, max_rows - 1)[max_rows - 1]) + 1
        inside = inside[inside < np.uint64(limit)] if limit <= _MASK64 else inside
    return Subset(fraction=fraction, max_rows=max_rows, limit=limit, size=len(inside))


class SubsetFilter(Filter):
    name = "subset"

    def __init__(self, subset: Subset) -> None:
        self.subset = subset

    def keep(self, rows: pa.Table) -> pa.Array:
        if self.subset.limit is None or self.subset.limit > _MASK64:
            return pa.array(np.ones(rows.num_rows, dtype=bool))
        hashes = splitmix64(rows.column("row_id").to_numpy())
        return pa.array(hashes < np.uint64(self.subset.limit))


class UrlSchemeFilter(Filter):
    """http(s) URLs with a host and no whitespace; ``file:`` only where a dataset allows it,
    so ``file:///etc/passwd``, ``ftp:`` or ``javascript:`` never reach a downloader."""

    name = "url_scheme"

    def __init__(self, *, allow_file_urls: bool) -> None:
        http = r"https?://[^\s/?#]+"
        scheme = rf"(?:{http}|file:)" if allow_file_urls else http
        self.pattern = rf"^(?i:{scheme})\S*$"

    def keep(self, rows: pa.Table) -> pa.Array:
        urls = rows.column("url").fill_null("")
        return pc.match_substring_regex(urls, self.pattern)


class EmptyCaptionFilter(Filter):
    name = "empty_caption"

    def keep(self, rows: pa.Table) -> pa.Array:
        return pc.greater(pc.binary_length(rows.column("caption").fill_null("")), 0)


class CaptionLengthFilter(Filter):
    """Caption length in words (single spaces after cleaning) within [min_words, max_words]."""

    name = "caption_length"

    def __init__(self, *, min_words: int, max_words: int) -> None:
        if min_words > max_words:
            raise FilterError(
                f"filters.min_words {min_words} is above filters.max_words {max_words}: "
                "lower min_words or raise max_words"
            )
        self.min_words, self.max_words = min_words, max_words

    def keep(self, rows: pa.Table) -> pa.Array:
        captions = rows.column("caption").combine_chunks().fill_null("")
        words = word_counts(captions)
        return pa.array((words >= self.min_words) & (words <= self.max_words))


class BlocklistFilter(Filter):
    """Drops captions holding a listed word (case-insensitive, whole words)."""

    name = "blocklist"

    def __init__(self, words: list[str]) -> None:
        cleaned = [w.strip() for w in words if w.strip()]
        self.pattern = r"(?i)\b(?:" + "|".join(re.escape(w) for w in cleaned) + r")\b"

    def keep(self, rows: pa.Table) -> pa.Array:
        return pc.invert(pc.match_substring_regex(rows.column("caption"), self.pattern))


class ValueBoundFilter(Filter):
    """Rows whose numeric columns (a table source's ``values``) reach the bounds: at least
    ``min_values`` (name ``min_values``) or at most ``max_values`` (``max_values``). A row
    without the value does not reach the bound."""

    def __init__(self, bounds: dict[str, float], *, minimum: bool) -> None:
        self.name = "min_values" if minimum else "max_values"
        self.bounds, self.minimum = dict(bounds), minimum

    def keep(self, rows: pa.Table) -> pa.Array:
        values = rows.column("values").combine_chunks()
        keep = np.ones(rows.num_rows, dtype=bool)
        for column, bound in self.bounds.items():
            value = pc.map_lookup(values, pa.scalar(column), "first")
            ok = pc.greater_equal(value, bound) if self.minimum else pc.less_equal(value, bound)
            keep &= pc.fill_null(ok, False).to_numpy(zero_copy_only=False)
        return pa.array(keep)


class DuplicateUrlFilter(Filter):
    """The first row (by row_id) of each URL wins; later rows with that URL are dropped.

    Which row is first is a property of the whole table, so :meth:`see` is shown every batch
    (in row order) before any :meth:`keep`; rows must then come to :meth:`keep` in the same
    order. Only rows whose 64-bit URL hash is shared are compared by URL, as they come to
    :meth:`keep`. Memory: one hash per row seen, then the URLs of those rows.
    """

    name = "duplicate_url"
    columns = ("url",)

    def __init__(self) -> None:
        self.hashes: list[np.ndarray] = []
        self.shared: np.ndarray | None = None
        self.offset = 0
        self.urls: set[str] = set()

    def see(self, rows: pa.Table) -> None:
        self.hashes.append(url_hashes(rows.column("url").combine_chunks()))

    def keep(self, rows: pa.Table) -> pa.Array:
        if self.shared is None:
            seen = np.concatenate(self.hashes) if self.hashes else np.zeros(0, dtype=np.uint64)
            self.shared, self.hashes = shared_hash_positions(seen), []
        lo, hi = np.searchsorted(self.shared, [self.offset, self.offset + rows.num_rows])
        positions = self.shared[lo:hi] - self.offset
        self.offset += rows.num_rows
        keep = np.ones(rows.num_rows, dtype=bool)
        urls = rows.column("url").take(pa.array(positions)).to_pylist()
        for pos, url in zip(positions.tolist(), urls, strict=True):
            if url in self.urls:
                keep[pos] = False
            else:
                self.urls.add(url)
        return pa.array(keep)


def url_hashes(urls: pa.Array) -> np.ndarray:
    """64-bit hashes of URLs; collisions are resolved by comparing the URLs themselves."""
    return pd.util.hash_array(urls.to_numpy(zero_copy_only=False), categorize=False)


def shared_hash_positions(hashes: np.ndarray) -> np.ndarray:
    """Sorted positions of the hashes that occur more than once (the only duplicate
    candidates)."""
    order = np.argsort(hashes)
    same = hashes[order[1:]] == hashes[order[:-1]]
    shared = np.zeros(len(hashes), dtype=bool)
    shared[order[1:][same]] = True
    shared[order[:-1][same]] = True
    return np.flatnonzero(shared)
