"""table format: any table of image URLs and captions in csv, tsv, jsonl or parquet files.

The config names the columns (``url_column``, ``caption_column``, optional
``license_column``, ``width_column``, ``height_column``, ``id_column``), so a LAION parquet
works with ``url_column: URL`` and ``caption_column: TEXT``. ``keep_columns`` go into the
``extra`` column as a JSON object (and from there into each sample's .json);
``value_columns`` (the keys of ``min_values``/``max_values``) into ``values`` as numbers.

The file type comes from the name (``.csv``, ``.tsv``, ``.jsonl``/``.json``, ``.parquet``,
each of the text ones optionally ``.gz``, ``.bz2`` or ``.zst``) unless ``file_type`` says.
csv has quoted fields, tsv has none; without a header, columns are named by
``column_names`` or by position (``url_column: 0``).

Row ids: the ``id_column`` when set (a row without a whole number there is ``bad_id``),
else ``source_index * 10**9 + n``, n counting data rows from 1 (jsonl: lines). Broken rows
are dropped under ``malformed_row`` (csv/tsv field count), ``invalid_json``, ``blank_line``
(jsonl), ``invalid_utf8`` and ``bad_id``; null URLs and captions go on to the filters
(``url_scheme``, ``empty_caption``). Everything streams by batch: memory does not grow
with the file.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from dalle_data.pipeline.sources import (
    Chunk,
    Lines,
    Options,
    SourceError,
    SourceFile,
    concat_dropped,
    csv_batches,
    decode_utf8,
    escaped,
    make_dropped,
    make_rows,
    map_blocks,
    numbered,
    row_ids,
    whole_numbers,
)

STAGE = "normalize"
FILE_TYPES = {
    "csv": "csv",
    "tsv": "tsv",
    "jsonl": "jsonl",
    "json": "jsonl",
    "ndjson": "jsonl",
    "parquet": "parquet",
}
COMPRESSED = (".gz", ".bz2", ".zst")
PARQUET_BATCH_ROWS = 1 << 16
CSV_BLOCK_BYTES = 16 << 20
NUMBER = r"^\s*[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?\s*$"


def read(files: list[SourceFile], options: Options) -> Iterator[Chunk]:
    """Yield one chunk per batch of each file, in file then row order."""
    for source in files:
        kind = file_type(source.path, options.file_type)
        if kind == "parquet":
            yield from _parquet(source, options)
        elif kind == "jsonl":
            yield from map_blocks(source, partial(_jsonl_lines, options=options))
        else:
            yield from _delimited(source, options, "," if kind == "csv" else "\t")


def file_type(path: Path, configured: str | None) -> str:
    """csv, tsv, jsonl or parquet: the configured one, else from the file name."""
    if configured:
        return configured
    name = path.name.lower()
    for suffix in COMPRESSED:
        name = name.removesuffix(suffix)
    kind = FILE_TYPES.get(name.rpartition(".")[2])
    if kind is None:
        raise SourceError(
            f"cannot tell the file type of {path.name} from its name: set "
            "datasets.<name>.file_type to csv, tsv, jsonl or parquet"
        )
    return kind


def wanted_columns(options: Options) -> list[str]:
    """Every column the options name, once each, in a fixed order."""
    names = [
        options.url_column,
        options.caption_column,
        options.license_column,
        options.width_column,
        options.height_column,
        options.id_column,
        *options.keep_columns,
        *options.value_columns,
    ]
    return list(dict.fromkeys(n for n in names if n))


def _check_columns(source: SourceFile, wanted: list[str], found: list[str]) -> None:
    missing = [c for c in wanted if c not in found]
    if missing:
        raise SourceError(
            f"{source.path} has no column {', '.join(map(repr, missing))} (it has "
            f"{found[:20]}): set datasets.<name>.url_column, caption_column ... to its columns"
        )


def _parquet(source: SourceFile, options: Options) -> Iterator[Chunk]:
    try:
        # pre_buffer caches every range it reads until the file is closed: memory would grow
        # with the file (to ~0.7 GiB more over a 10M-row LAION part); without it, it is flat.
        parquet = pq.ParquetFile(source.path, pre_buffer=False)
    except (pa.ArrowException, OSError) as err:
        raise SourceError(
            f"{source.path} is not a readable parquet file ({err}): check "
            "datasets.<name>.file_type, or delete it and rerun fetch"
        ) from err
    columns = wanted_columns(options)
    _check_columns(source, columns, parquet.schema_arrow.names)
    batches = parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns)
    for batch, numbers in numbered(source, batches):
        yield to_chunk(source, {c: batch.column(c) for c in columns}, numbers, options)


def _delimited(source: SourceFile, options: Options, delimiter: str) -> Iterator[Chunk]:
    columns = wanted_columns(options)
    positional = not options.header and not options.column_names
    if positional and not all(c.isdigit() for c in columns):
        raise SourceError(
            f"{source.path} has no header: name its columns with datasets.<name>.column_names "
            "or refer to them by position (url_column: 0, caption_column: 1)"
        )
    in_file = {c: f"f{c}" if positional else c for c in columns}
    read_options = pcsv.ReadOptions(
        block_size=CSV_BLOCK_BYTES,
        column_names=options.column_names or None,
        autogenerate_column_names=positional,
        skip_rows=1 if options.column_names and options.header else 0,
    )
    quoted = delimiter == ","
    parse_options = pcsv.ParseOptions(
        delimiter=delimiter,
        quote_char='"' if quoted else False,
        double_quote=quoted,
        newlines_in_values=quoted,
    )
    batches = csv_batches(
        source,
        read_options,
        parse_options,
        list(in_file.values()),
        hint="set datasets.<name>.url_column, caption_column ... (and header, column_names) "
        "to the file's columns",
    )
    for batch, numbers, malformed in batches:
        cols = {c: batch.column(name) for c, name in in_file.items()}
        chunk = to_chunk(source, cols, numbers, options)
        chunk.dropped = concat_dropped([chunk.dropped, malformed])
        chunk.input_rows += malformed.num_rows
        yield chunk


def _jsonl_lines(source: SourceFile, lines: Lines, *, options: Options) -> Chunk:
    """One JSON object per line; blank, undecodable and non-object lines are dropped."""
    text = lines.text
    strings, bad_utf8 = decode_utf8(text)
    blank = ~bad_utf8 & (
        pc.equal(pc.binary_length(pc.utf8_trim_whitespace(strings)), 0).to_numpy(
            zero_copy_only=False
        )
    )
    bad_json = np.zeros(len(text), dtype=bool)
    records = []
    for i, line in enumerate(strings.to_pylist()):
        if blank[i] or bad_utf8[i]:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        else:
            bad_json[i] = True
    good = ~(blank | bad_utf8 | bad_json)
    cols = {c: _from_python([r.get(c) for r in records]) for c in wanted_columns(options)}
    chunk = to_chunk(source, cols, lines.numbers[good], options)
    line_ids = None if options.id_column else row_ids(source, lines.numbers)
    broken = [
        make_dropped(
            STAGE,
            reason,
            {
                "row_id": None if line_ids is None else line_ids.filter(pa.array(mask)),
                "raw": raw(pa.array(mask)),
            },
            int(mask.sum()),
        )
        for reason, mask, raw in (
            ("blank_line", blank, strings.filter),
            ("invalid_utf8", bad_utf8, lambda m: escaped(text.filter(m))),
            ("invalid_json", bad_json, strings.filter),
        )
        if mask.any()
    ]
    chunk.dropped = concat_dropped([*broken, chunk.dropped])
    chunk.input_rows = len(text)
    return chunk


def _from_python(values: list[Any]) -> pa.Array:
    """A column of JSON values; mixed types become their JSON text."""
    try:
        return pa.array(values)
    except (pa.ArrowException, TypeError, ValueError):
        return pa.array(
            [v if v is None or isinstance(v, str) else json.dumps(v) for v in values], pa.string()
        )


def to_chunk(
    source: SourceFile, cols: dict[str, Any], numbers: np.ndarray, options: Options
) -> Chunk:
    """The common schema from one batch of named source columns."""
    n = len(numbers)
    cols = {k: v.combine_chunks() if isinstance(v, pa.ChunkedArray) else v for k, v in cols.items()}
    bad_utf8 = np.zeros(n, dtype=bool)

    def text(name: str | None) -> pa.Array | None:
        if name is None:
            return None
        values, bad = as_text(cols[name])
        bad_utf8[:] |= bad
        return values

    out: dict[str, Any] = {
        "url": text(options.url_column),
        "caption": text(options.caption_column),
        "license": text(options.license_column),
    }
    for key, name in (("width", options.width_column), ("height", options.height_column)):
        value = text(name)
        out[key] = None if value is None else whole_numbers(value)
    if options.id_column:
        out["row_id"] = whole_numbers(text(options.id_column), bits=64)
        bad_id = out["row_id"].is_null().to_numpy(zero_copy_only=False) & ~bad_utf8
    else:
        out["row_id"] = row_ids(source, numbers)
        bad_id = np.zeros(n, dtype=bool)
    if options.keep_columns:
        out["extra"] = json_objects({c: cols[c] for c in options.keep_columns})
    if options.value_columns:
        out["values"] = value_map({c: as_number(cols[c]) for c in options.value_columns}, n)
    dropped = []
    for reason, mask in (("invalid_utf8", bad_utf8), ("bad_id", bad_id)):
        if mask.any():
            sel = pa.array(mask)
            picked = {k: v.filter(sel) for k, v in out.items() if v is not None}
            dropped.append(make_dropped(STAGE, reason, picked, int(mask.sum())))
    keep = ~(bad_utf8 | bad_id)
    if not keep.all():
        sel = pa.array(keep)
        out = {k: None if v is None else v.filter(sel) for k, v in out.items()}
    return Chunk(
        rows=make_rows(out, int(keep.sum())), dropped=concat_dropped(dropped), input_rows=n
    )


def as_text(values: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """Any column as strings, and a mask of entries that are not valid UTF-8."""
    kind = values.type
    if pa.types.is_dictionary(kind):
        return as_text(values.dictionary_decode())
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return decode_utf8(values)
    ok = np.zeros(len(values), dtype=bool)
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return values, ok
    if pa.types.is_null(kind):
        return pa.nulls(len(values), pa.string()), ok
    try:
        return pc.cast(values, pa.string()), ok
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid):
        texts = [None if v is None else json.dumps(v, default=str) for v in values.to_pylist()]
        return pa.array(texts, pa.string()), ok


def as_number(values: pa.Array) -> pa.Array:
    """Any column as float64; entries that are not numbers become null."""
    kind = values.type
    if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind):
        return pc.cast(values, pa.float64())
    text = as_text(values)[0]
    ok = pc.match_substring_regex(text, NUMBER)
    return pc.cast(pc.if_else(ok, pc.utf8_trim_whitespace(text), None), pa.float64())


def value_map(columns: dict[str, pa.Array], n: int) -> pa.Array:
    """Per row a map from each column name to its number (null where there is none)."""
    names = list(columns)
    k = len(names)
    items = pc.take(
        pa.concat_arrays([columns[c] for c in names]),
        (np.arange(k)[None, :] * n + np.arange(n)[:, None]).ravel(),
    )
    keys = pc.take(pa.array(names, pa.string()), np.tile(np.arange(k), n))
    offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32))
    return pa.MapArray.from_arrays(offsets, keys, items)


def json_objects(columns: dict[str, pa.Array]) -> pa.Array:
    """Per row a JSON object of the given columns, keys sorted, built with vectorised string
    kernels (json.dumps per row costs more than the rest of normalize together)."""
    pieces: list[Any] = []
    for i, name in enumerate(sorted(columns)):
        pieces.append(pa.scalar(("{" if i == 0 else ", ") + json.dumps(name) + ": "))
        pieces.append(json_values(columns[name]))
    return pc.binary_join_element_wise(*pieces, pa.scalar("}"), "")


def json_values(values: pa.Array) -> pa.Array:
    """Each value as JSON text: numbers, booleans and strings vectorised (NaN and infinities
    as null), anything else through json.dumps."""
    kind = values.type
    if pa.types.is_dictionary(kind):
        return json_values(values.dictionary_decode())
    if pa.types.is_integer(kind):
        text = pc.cast(values, pa.string())
    elif pa.types.is_floating(kind):
        text = pc.cast(pc.if_else(pc.is_finite(values), values, None), pa.string())
        # 3.0 prints as "3": keep it a float in JSON.
        whole = pc.match_substring_regex(text, r"^-?[0-9]+$")
        text = pc.if_else(whole, pc.binary_join_element_wise(text, ".0", ""), text)
    elif pa.types.is_boolean(kind):
        text = pc.if_else(values, "true", "false")
    elif pa.types.is_string(kind) or pa.types.is_large_string(kind):
        text = _json_strings(values.cast(pa.string()))
    else:
        text = pa.array(
            [json.dumps(_plain(v), ensure_ascii=False, default=str) for v in values.to_pylist()],
            pa.string(),
        )
    return pc.fill_null(text, "null")


def _json_strings(values: pa.Array) -> pa.Array:
    text = values
    for char, escape in (("\\", "\\\\"), ('"', '\\"'), ("\n", "\\n"), ("\r", "\\r"), ("\t", "\\t")):
        text = pc.replace_substring(text, char, escape)
    text = pc.binary_join_element_wise('"', text, '"', "")
    # Other control characters need \u escapes: the few rows holding one go through json.
    odd = pc.fill_null(pc.match_substring_regex(values, r"[\x00-\x08\x0b\x0c\x0e-\x1f]"), False)
    if pc.any(odd).as_py():
        fixed = [json.dumps(v, ensure_ascii=False) for v in values.filter(odd).to_pylist()]
        text = pc.replace_with_mask(text, odd, pa.array(fixed, pa.string()))
    return text


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return value
