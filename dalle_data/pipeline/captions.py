"""Caption cleaning kernels: HTML unescape, ftfy, single spaces, vectorised over arrow.

Only captions that are not plain ASCII (or hold HTML entities, control characters or stray
spaces) go through Python and ftfy; the rest are found clean by scanning their raw bytes.
"""

from __future__ import annotations

import html
import re
import unicodedata

import ftfy
import ftfy.badness
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# Characters ftfy's fixers other than its mojibake repair act on (one tested list).
from dalle_data.formats.tokenizers import FTFY_TOUCHES

# explain=False: ftfy's explanation steps are never read, only built.
FTFY_CONFIG = ftfy.TextFixerConfig(unescape_html=False, explain=False)

# Bytes after which a caption may change under cleaning: anything but printable ASCII, and
# "&" (HTML entities). Captions without them, and without doubled or edge spaces, are
# already clean; only the rest (a few percent) go through Python.
_PLAIN = np.zeros(256, dtype=bool)
_PLAIN[0x20:0x7F] = True
_PLAIN[ord("&")] = False
# Each pattern of ftfy's mojibake heuristic (ftfy.badness.BADNESS_RE) holds a non-ASCII
# character and spans at most this many characters (tests/test_filters.py checks both on
# the installed ftfy), so every match lies this close to a non-ASCII character.
MOJIBAKE_REACH = 7
_NON_ASCII = re.compile("[^\x00-\x7f]+")


def clean_caption(text: str) -> str:
    """The cleaning rule: HTML unescape, ftfy, then single spaces, trimmed."""
    text = html.unescape(text)
    if _needs_ftfy(text):
        text = ftfy.fix_text(text, FTFY_CONFIG)
    return " ".join(text.split())


def clean_caption_list(texts: list[str]) -> list[str]:
    """``clean_caption`` over a list (one task for a worker process)."""
    return [clean_caption(t) for t in texts]


def _needs_ftfy(text: str) -> bool:
    """False only where ftfy.fix_text returns ``text`` unchanged (it costs ~100 us a call)."""
    return (
        bool(FTFY_TOUCHES.search(text))
        or not unicodedata.is_normalized("NFC", text)
        or (not text.isascii() and looks_like_mojibake(text))
    )


def looks_like_mojibake(text: str) -> bool:
    """``ftfy.badness.is_bad(text)``, searching only around the non-ASCII characters: the
    whole-caption search costs ~60 us, mostly on ASCII words that can never match."""
    bad = ftfy.badness.BADNESS_RE
    start = end = -1
    for run in _NON_ASCII.finditer(text):
        lo, hi = max(0, run.start() - MOJIBAKE_REACH + 1), run.end() + MOJIBAKE_REACH - 1
        if lo > end >= 0:
            # search(text, pos, endpos): "^" still means the real start of the text.
            if bad.search(text, start, end):
                return True
            start = lo
        elif end < 0:
            start = lo
        end = hi
    return end >= 0 and bool(bad.search(text, start, end))


def rows_needing_python(captions: pa.Array) -> np.ndarray:
    """Rows whose caption ``clean_caption`` might change, found by scanning the raw bytes."""
    n = len(captions)
    rel, data = _buffers(captions)
    space = data == 0x20
    odd = ~_PLAIN[data]
    odd[1:] |= space[1:] & space[:-1]
    row_of = np.searchsorted(rel, np.flatnonzero(odd), side="right") - 1
    mask = np.zeros(n, dtype=bool)
    mask[row_of] = True
    lengths = np.diff(rel)
    nonempty = lengths > 0
    mask[nonempty] |= space[rel[:-1][nonempty]] | space[rel[1:][nonempty] - 1]
    return mask


def word_counts(captions: pa.Array) -> np.ndarray:
    """Words per cleaned caption (single spaces, trimmed): spaces + 1, or 0 when empty."""
    offsets, data = _buffers(captions)
    spaces_before = np.searchsorted(np.flatnonzero(data == 0x20), offsets)
    return np.where(np.diff(offsets) > 0, np.diff(spaces_before) + 1, 0)


def _buffers(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Offsets (from 0) and bytes of a string array, without copying the bytes."""
    _, offsets_buf, data_buf = arr.buffers()
    if len(arr) == 0 or offsets_buf is None:
        return np.zeros(len(arr) + 1, dtype=np.int64), np.zeros(0, dtype=np.uint8)
    offsets: np.ndarray = np.frombuffer(offsets_buf, dtype=_offset_dtype(arr))
    offsets = offsets[arr.offset : arr.offset + len(arr) + 1]
    if data_buf is None:
        return offsets - offsets[0], np.zeros(0, dtype=np.uint8)
    data = np.frombuffer(data_buf, dtype=np.uint8)[offsets[0] : offsets[-1]]
    return offsets - offsets[0], data


def _offset_dtype(arr: pa.Array) -> type:
    return np.int64 if pa.types.is_large_string(arr.type) else np.int32


def clean_captions(captions: pa.Array) -> pa.Array:
    """``clean_caption`` over an array; rows that are already clean are left as they are."""
    captions = pc.fill_null(captions, "")
    slow = rows_needing_python(captions)
    if not slow.any():
        return captions
    mask = pa.array(slow)
    done = clean_caption_list(captions.filter(mask).to_pylist())
    return pc.replace_with_mask(captions, mask, pa.array(done, captions.type))
