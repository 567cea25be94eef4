"""Source adapters: one module per source format, each turning raw files into the common schema.

An adapter is a function ``read(files, options) -> Iterator[Chunk]``. Each chunk carries the
rows it kept (``SCHEMA``), the rows it dropped with their reason (``DROPPED_SCHEMA``) and how
many source rows it read, so ``input_rows = sum(dropped) + output_rows`` closes per chunk.
Line-based formats share the block reader and line splitter below: they work on whole
32 MiB blocks with numpy/pyarrow, so a 12M-row file never becomes 12M Python objects.
"""

from __future__ import annotations

import importlib
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from dalle_data.errors import DalleDataError

SCHEMA = pa.schema(
    [
        pa.field("row_id", pa.int64(), nullable=False),
        pa.field("url", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("license", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        # Columns a `table` source keeps (keep_columns) as a JSON object, copied into each
        # sample's .json; null for the other formats.
        pa.field("extra", pa.string()),
        # Numeric columns the min_values/max_values filters read, by name.
        pa.field("values", pa.map_(pa.string(), pa.float64())),
    ]
)

# Every row a stage drops, with the stage and the rule that dropped it. `raw` holds the source
# line of rows that could not be parsed (invalid UTF-8 escaped with backslashes).
DROPPED_SCHEMA = pa.schema(
    [
        pa.field("row_id", pa.int64()),
        pa.field("stage", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("url", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("license", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("raw", pa.string()),
    ]
)

# Parquet writer options: dictionary pages only for the low-cardinality columns (on unique
# URLs and captions they cost time on write and, more, on every read).
ROWS_PARQUET: dict[str, Any] = {"use_dictionary": ["license"]}
DROPPED_PARQUET: dict[str, Any] = {"use_dictionary": ["stage", "reason", "license"]}

# Rows outside a chosen selection (a subset, another language) are not defects: dropped.parquet
# keeps only their row_id and reason, which find them in the source, instead of a second copy
# of most of a 100M-row source.
SELECTION_REASONS = frozenset({"subset", "not_in_subset", "language"})

BLOCK_BYTES = 32 << 20
# Blocks parsed at once: pyarrow and numpy release the GIL, so threads use both cores.
WORKERS = 2
ROW_ID_STRIDE = 10**9


class SourceError(DalleDataError):
    """A source file that cannot be read at all; the message names the file and the fix."""


@dataclass(frozen=True)
class SourceFile:
    """One fetched file: ``index`` is its position in the configured source list."""

    path: Path
    index: int


@dataclass
class Chunk:
    """What an adapter read from one block of a source."""

    rows: pa.Table
    dropped: pa.Table
    input_rows: int


@dataclass
class Options:
    """Format options from the dataset config (only some apply to each format)."""

    languages: list[str] = field(default_factory=lambda: ["en"])
    licenses: list[str] = field(default_factory=list)
    subset: Path | None = None
    # `table`: which column holds what (None = the source has no such column).
    url_column: str = "url"
    caption_column: str = "caption"
    license_column: str | None = None
    width_column: str | None = None
    height_column: str | None = None
    id_column: str | None = None
    keep_columns: list[str] = field(default_factory=list)
    value_columns: list[str] = field(default_factory=list)
    # `table`: csv, tsv, jsonl or parquet (None = from the file name); csv/tsv header and,
    # without one, the column names.
    file_type: str | None = None
    header: bool = True
    column_names: list[str] = field(default_factory=list)
    # `folder`: "first" caption line per image, or "each" line a sample of its own.
    caption_lines: str = "first"

    def record(self) -> dict[str, Any]:
        """The options as plain data, for normalize.json (and so the manifest)."""
        return {k: str(v) if isinstance(v, Path) else v for k, v in vars(self).items()}


Adapter = Callable[[list[SourceFile], Options], Iterator[Chunk]]


# ``<module>_<variant>`` names a module's ``read_<variant>`` (yfcc_sqlite: yfcc.read_sqlite).
FORMATS = ("cc12m", "wit", "yfcc", "yfcc_sqlite", "table", "folder")


def adapter(fmt: str) -> Adapter:
    """The reader for a ``format`` config value (its module is imported on demand)."""
    if fmt not in FORMATS:
        raise SourceError(f"unknown source format {fmt!r}: use one of {list(FORMATS)}")
    name, _, variant = fmt.partition("_")
    module = importlib.import_module(f"dalle_data.pipeline.sources.{name}")
    read: Adapter = getattr(module, f"read_{variant}" if variant else "read")
    return read


def make_rows(columns: dict[str, Any], n: int) -> pa.Table:
    """A SCHEMA table from the given columns; missing columns are null."""
    arrays = []
    for f in SCHEMA:
        value = columns.get(f.name)
        if value is None:
            arrays.append(pa.nulls(n, f.type))
        else:
            arrays.append(pc.cast(value, f.type) if value.type != f.type else value)
    return pa.Table.from_arrays(arrays, schema=SCHEMA)


def make_dropped(stage: str, reason: str | pa.Array, columns: dict[str, Any], n: int) -> pa.Table:
    """A DROPPED_SCHEMA table; selection reasons keep only row_id and reason."""
    if isinstance(reason, str):
        if reason in SELECTION_REASONS:
            columns = {"row_id": columns.get("row_id")}
        reason_arr = pa.array([reason] * n, pa.string()) if n else pa.array([], pa.string())
    else:
        reason_arr = reason
    arrays = []
    for f in DROPPED_SCHEMA:
        if f.name == "stage":
            arrays.append(pa.array([stage] * n, pa.string()))
        elif f.name == "reason":
            arrays.append(reason_arr)
        elif columns.get(f.name) is None:
            arrays.append(pa.nulls(n, f.type))
        else:
            value = columns[f.name]
            arrays.append(pc.cast(value, f.type) if value.type != f.type else value)
    return pa.Table.from_arrays(arrays, schema=DROPPED_SCHEMA)


def drop_first_failed(
    stage: str,
    checks: list[tuple[str, np.ndarray]],
    columns: dict[str, pa.Array],
    also: Callable[[str, pa.Array], dict[str, pa.Array]] | None = None,
) -> tuple[np.ndarray, list[pa.Table]]:
    """Each row that fails one of ``checks`` (reason, mask), in order, dropped under the
    first it fails with its ``columns`` (and ``also(reason, selection)``): the mask of the
    rows left, and the dropped tables."""
    n = len(next(iter(columns.values())))
    remaining = np.ones(n, dtype=bool)
    dropped = []
    for reason, mask in checks:
        mask = mask & remaining
        remaining &= ~mask
        if mask.any():
            sel = pa.array(mask)
            picked = {k: v.filter(sel) for k, v in columns.items()}
            picked |= also(reason, sel) if also else {}
            dropped.append(make_dropped(stage, reason, picked, int(mask.sum())))
    return remaining, dropped


def concat_dropped(tables: list[pa.Table]) -> pa.Table:
    tables = [t for t in tables if t.num_rows]
    return pa.concat_tables(tables) if tables else DROPPED_SCHEMA.empty_table()


UTF8_BOM = b"\xef\xbb\xbf"


def read_blocks(path: Path, block_bytes: int = BLOCK_BYTES) -> Iterator[memoryview]:
    """Blocks of whole lines (each ending in ``\\n``) from a plain, .gz, .bz2 or .zst file.

    A UTF-8 byte-order mark (spreadsheet tools write one) is not part of the first line.
    """
    try:
        stream = pa.input_stream(str(path), compression="detect")
    except (OSError, pa.ArrowException) as err:
        raise SourceError(f"cannot open source file {path}: {err}") from err
    with stream:
        carry = b""
        first = True
        while True:
            try:
                data = stream.read(block_bytes)
            except (OSError, pa.ArrowException) as err:
                raise SourceError(
                    f"source file {path} is corrupt or truncated ({err}): delete it and rerun fetch"
                ) from err
            if not data:
                break
            if first:
                first = False
                data = data.removeprefix(UTF8_BOM)
            data = carry + data
            cut = data.rfind(b"\n") + 1
            if cut == 0:
                carry = data
                continue
            carry = data[cut:]
            yield memoryview(data)[:cut]
        if carry:
            yield memoryview(carry + b"\n")


@dataclass
class Lines:
    """The lines of one block: ``text`` (binary, without ``\\r\\n``), 1-based line numbers and
    the number of tabs in each line (counted with numpy: far faster than per-string search)."""

    text: pa.LargeBinaryArray
    numbers: np.ndarray
    tabs: np.ndarray


def split_lines(block: bytes | memoryview, first_number: int) -> Lines:
    """Split a block of whole lines without creating a Python object per line."""
    buf = np.frombuffer(block, dtype=np.uint8)
    nl = np.flatnonzero(buf == 10)
    n = len(nl)
    starts = np.empty(n, dtype=np.int64)
    starts[0:1] = 0
    starts[1:] = nl[:-1] + 1
    has_cr = nl > starts
    has_cr[has_cr] = buf[nl[has_cr] - 1] == 13
    keep = buf != 10
    keep[nl[has_cr] - 1] = False
    data = buf[keep]
    offsets = np.empty(n + 1, dtype=np.int64)
    offsets[0] = 0
    offsets[1:] = nl - np.arange(n) - np.cumsum(has_cr)
    text = pa.LargeBinaryArray.from_buffers(
        pa.large_binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(data)]
    )
    # Tabs per line: how many tab positions fall before each line's end, differenced.
    tabs_before = np.searchsorted(np.flatnonzero(buf == 9), nl)
    tabs = np.diff(tabs_before, prepend=0)
    numbers = np.arange(first_number, first_number + n, dtype=np.int64)
    return Lines(text=text, numbers=numbers, tabs=tabs)


def map_blocks(source: SourceFile, parse: Callable[[SourceFile, Lines], Chunk]) -> Iterator[Chunk]:
    """``parse`` each block's lines on a small thread pool, yielding chunks in file order."""
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        pending: deque[Future[Chunk]] = deque()
        first = 1
        for block in read_blocks(source.path):
            pending.append(pool.submit(lambda b, f: parse(source, split_lines(b, f)), block, first))
            first += int(np.count_nonzero(np.frombuffer(block, dtype=np.uint8) == 10))
            if len(pending) > WORKERS:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def decode_utf8(text: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """Cast binary to string; returns the strings and a mask of invalid UTF-8 entries.

    Invalid entries become empty strings in the result: the caller drops them by the mask.
    The whole-array cast is fast; when it fails, halves are retried so only a few small
    slices are checked value by value.
    """
    target = pa.large_string() if pa.types.is_large_binary(text.type) else pa.string()
    bad = np.zeros(len(text), dtype=bool)
    try:
        return text.cast(target), bad
    except pa.ArrowInvalid:
        _find_invalid(text, target, 0, bad)
    clean = pc.if_else(pa.array(bad), pa.scalar(b"", text.type), text)
    return clean.cast(target), bad


def _find_invalid(text: pa.Array, target: pa.DataType, start: int, bad: np.ndarray) -> None:
    try:
        text.cast(target)
        return
    except pa.ArrowInvalid:
        pass
    if len(text) <= 64:
        for i, value in enumerate(text.to_pylist()):
            if value is not None:
                try:
                    value.decode("utf-8")
                except UnicodeDecodeError:
                    bad[start + i] = True
        return
    half = len(text) // 2
    _find_invalid(text.slice(0, half), target, start, bad)
    _find_invalid(text.slice(half), target, start + half, bad)


def escaped(text: pa.Array) -> pa.Array:
    """Raw bytes as text for dropped.parquet: UTF-8 where valid, backslash escapes elsewhere."""
    return pa.array(
        [None if v is None else v.decode("utf-8", "backslashreplace") for v in text.to_pylist()],
        pa.string(),
    )


def row_ids(source: SourceFile, numbers: np.ndarray) -> pa.Array:
    """``source_index * 10**9 + line_number``: stable per source line, unique per dataset."""
    if len(numbers) and numbers[-1] >= ROW_ID_STRIDE:
        raise SourceError(
            f"source file {source.path} has more than {ROW_ID_STRIDE - 1} lines: split it into "
            "several files listed under `source`"
        )
    return pa.array(source.index * ROW_ID_STRIDE + numbers, pa.int64())


def whole_numbers(values: pa.Array, bits: int = 32) -> pa.Array:
    """Text as non-negative int32 (or int64) values; anything but a plain whole number
    (``640``, ``640.0``) or a value out of range becomes null."""
    dtype, digits = (pa.int32(), 9) if bits == 32 else (pa.int64(), 18)
    text = pc.utf8_trim_whitespace(values)
    ok = pc.match_substring_regex(text, rf"^[0-9]{{1,{digits}}}(\\.0*)?$")
    whole = pc.replace_substring_regex(text, r"\\.0*$", "")
    return pc.cast(pc.if_else(ok, whole, pa.scalar(None, values.type)), dtype)


def csv_batches(
    source: SourceFile,
    read_options: pcsv.ReadOptions,
    parse_options: pcsv.ParseOptions,
    columns: list[str],
    *,
    hint: str,
) -> Iterator[tuple[pa.RecordBatch, np.ndarray, pa.Table]]:
    """Batches of ``columns`` (as binary) of a delimited file, their record numbers (from 1)
    and the rows the parser refused (wrong field count) as ``malformed_row`` drops.

    A last batch may be empty, to carry the refused rows that follow the last good one.
    """
    malformed: list[str] = []

    def on_invalid(row: Any) -> str:
        malformed.append(row.text)
        return "skip"

    def refused() -> pa.Table:
        texts = pa.array(malformed, pa.string())
        malformed.clear()
        return make_dropped("normalize", "malformed_row", {"raw": texts}, len(texts))

    parse_options.invalid_row_handler = on_invalid
    try:
        reader = pcsv.open_csv(
            str(source.path),
            read_options=read_options,
            parse_options=parse_options,
            convert_options=pcsv.ConvertOptions(
                include_columns=columns, column_types={c: pa.binary() for c in columns}
            ),
        )
    except (pa.ArrowInvalid, pa.ArrowKeyError, OSError) as err:
        raise SourceError(
            f"{source.path} cannot be read with the columns {columns} ({err}): {hint}"
        ) from err
    for batch, numbers in numbered(source, iter(reader)):
        yield batch, numbers, refused()
    if malformed:
        empty = pa.RecordBatch.from_pylist([], schema=reader.schema)
        yield empty, np.zeros(0, dtype=np.int64), refused()


def numbered(
    source: SourceFile, batches: Iterator[pa.RecordBatch]
) -> Iterator[tuple[pa.RecordBatch, np.ndarray]]:
    """Batches with their record numbers (from 1); a read error names the file and the last
    record read."""
    record = 1
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (pa.ArrowException, OSError) as err:
            raise SourceError(
                f"{source.path} cannot be read after record {record - 1} ({err}): the file is "
                "corrupt, truncated or not in the configured format; delete it and rerun fetch"
            ) from err
        yield batch, np.arange(record, record + batch.num_rows, dtype=np.int64)
        record += batch.num_rows
