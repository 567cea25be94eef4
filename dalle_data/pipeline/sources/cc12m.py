"""cc12m format: ``url<TAB>caption`` per line, no header (also the offline sample's format).

Real files hold broken lines; each is dropped under its own reason: ``blank_line``,
``invalid_utf8``, ``no_tab`` and ``extra_columns`` (more than one tab).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dalle_data.pipeline.sources import (
    Chunk,
    Lines,
    Options,
    SourceFile,
    concat_dropped,
    decode_utf8,
    escaped,
    make_dropped,
    make_rows,
    map_blocks,
    row_ids,
)

STAGE = "normalize"


def read(files: list[SourceFile], options: Options) -> Iterator[Chunk]:
    """Yield one chunk per block of each file, in file then line order."""
    del options  # cc12m has no format options
    for source in files:
        yield from map_blocks(source, parse_lines)


def parse_lines(source: SourceFile, lines: Lines) -> Chunk:
    """Split lines into url and caption; every line lands in rows or in dropped."""
    text = lines.text
    ids = row_ids(source, lines.numbers)
    strings, bad_utf8 = decode_utf8(text)
    blank = pc.equal(pc.binary_length(text), 0).to_numpy(zero_copy_only=False)
    valid = ~blank & ~bad_utf8
    good = valid & (lines.tabs == 1)
    dropped = [
        make_dropped(
            STAGE, reason, {"row_id": ids.filter(sel), "raw": raw(sel)}, len(ids.filter(sel))
        )
        for reason, sel, raw in (
            ("blank_line", blank, strings.filter),
            ("no_tab", valid & (lines.tabs == 0), strings.filter),
            ("extra_columns", valid & (lines.tabs > 1), strings.filter),
            ("invalid_utf8", bad_utf8, lambda m: escaped(text.filter(m))),
        )
        if sel.any()
    ]
    if not good.all():
        mask = pa.array(good)
        strings, ids = strings.filter(mask), ids.filter(mask)
    # flatten + take is several times faster than list_element on large arrays.
    fields = pc.split_pattern(strings, "\t", max_splits=1).flatten()
    n = len(ids)
    rows = make_rows(
        {
            "row_id": ids,
            "url": pc.take(fields, np.arange(0, 2 * n, 2)),
            "caption": pc.take(fields, np.arange(1, 2 * n, 2)),
        },
        n,
    )
    return Chunk(rows=rows, dropped=concat_dropped(dropped), input_rows=len(text))
