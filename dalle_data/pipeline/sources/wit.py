"""WIT format: gzip TSV with a header and 17 columns, quoted fields that hold tabs and quotes.

Caption: the reference description, else the alt text, else the attribution description
without its ``English:``-style language prefix. Rows in other languages (config
``languages``) and images img2dataset cannot decode (anything but jpeg, png, webp by mime
type: no svg, no gif) are dropped. A row's id counts the parsed records of its file from 1
(quoted fields may span lines, so physical line numbers would not be stable ids).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from dalle_data.pipeline.sources import (
    Chunk,
    Options,
    SourceFile,
    concat_dropped,
    csv_batches,
    decode_utf8,
    drop_first_failed,
    make_rows,
    row_ids,
    whole_numbers,
)

STAGE = "normalize"
COLUMNS = (
    "language",
    "image_url",
    "caption_reference_description",
    "caption_attribution_description",
    "caption_alt_text_description",
    "mime_type",
    "original_height",
    "original_width",
)
MIME_TYPES = ("image/jpeg", "image/png", "image/webp")
# "English: A view of ...", "Deutsch: ..." — one or two words of letters, then a colon.
LANGUAGE_PREFIX = r"^\s*\pL+(?:[ -]\pL+)?:\s*"
BLOCK_BYTES = 16 << 20


def read(files: list[SourceFile], options: Options) -> Iterator[Chunk]:
    """Yield one chunk per parsed block of each file, in file then record order."""
    for source in files:
        yield from _read_file(source, options)


def _read_file(source: SourceFile, options: Options) -> Iterator[Chunk]:
    batches = csv_batches(
        source,
        pcsv.ReadOptions(block_size=BLOCK_BYTES),
        pcsv.ParseOptions(
            delimiter="\t", quote_char='"', double_quote=True, newlines_in_values=True
        ),
        list(COLUMNS),
        hint="this is not a WIT file: check datasets.<name>.format",
    )
    for batch, numbers, malformed in batches:
        chunk = parse_batch(source, batch, numbers, options)
        chunk.dropped = concat_dropped([chunk.dropped, malformed])
        chunk.input_rows += malformed.num_rows
        yield chunk


def parse_batch(
    source: SourceFile, batch: pa.RecordBatch, numbers: np.ndarray, options: Options
) -> Chunk:
    """Pick url, caption, size from one batch of WIT records; drop the rest with a reason."""
    n = batch.num_rows
    ids = row_ids(source, numbers)
    cols: dict[str, pa.Array] = {}
    bad_utf8 = np.zeros(n, dtype=bool)
    for name in COLUMNS:
        cols[name], bad = decode_utf8(batch.column(name))
        bad_utf8 |= bad
    caption = _caption(cols)
    reasons = [
        ("invalid_utf8", bad_utf8),
        ("language", ~_is_in(cols["language"], options.languages)),
        ("mime_type", ~_is_in(cols["mime_type"], list(MIME_TYPES))),
        ("no_caption", pc.equal(pc.binary_length(caption), 0).to_numpy(zero_copy_only=False)),
    ]
    raw = {"row_id": ids, "url": cols["image_url"], "caption": caption}
    remaining, dropped = drop_first_failed(STAGE, reasons, raw)
    keep = pa.array(remaining)
    rows = make_rows(
        {
            "row_id": ids.filter(keep),
            "url": cols["image_url"].filter(keep),
            "caption": caption.filter(keep),
            "width": whole_numbers(cols["original_width"]).filter(keep),
            "height": whole_numbers(cols["original_height"]).filter(keep),
        },
        int(remaining.sum()),
    )
    return Chunk(rows=rows, dropped=concat_dropped(dropped), input_rows=n)


def _caption(cols: dict[str, pa.Array]) -> pa.Array:
    attribution = pc.replace_substring_regex(
        pc.utf8_trim_whitespace(cols["caption_attribution_description"]),
        LANGUAGE_PREFIX,
        "",
        max_replacements=1,
    )
    caption = attribution
    for name in ("caption_alt_text_description", "caption_reference_description"):
        text = pc.utf8_trim_whitespace(cols[name])
        caption = pc.if_else(pc.greater(pc.binary_length(text), 0), text, caption)
    return caption


def _is_in(values: pa.Array, allowed: list[str]) -> np.ndarray:
    lowered = pc.utf8_lower(pc.utf8_trim_whitespace(values))
    found = pc.is_in(lowered, value_set=pa.array([a.lower() for a in allowed], values.type))
    return found.to_numpy(zero_copy_only=False)
