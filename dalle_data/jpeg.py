"""A JPEG's size and colour components, read from its frame header without decoding it.

The download workers ask this of every image (whether a DCT-scaled decode covers the
target size, how to decode the perceptual hash's copy); Pillow's ``Image.open`` answers
too, but parses every marker segment in Python first, about 25 us an image.
"""

from __future__ import annotations

from typing import NamedTuple

# Start-of-frame markers of the Huffman-coded DCT modes libjpeg decodes with scaling:
# baseline, extended sequential and progressive.
_DCT_FRAMES = frozenset({0xC0, 0xC1, 0xC2})
# Every other start-of-frame (lossless, hierarchical, arithmetic-coded): no answer.
_OTHER_FRAMES = frozenset(range(0xC3, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers without a length: TEM and the restart markers.
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})


class Frame(NamedTuple):
    width: int
    height: int
    components: int


def frame(data: bytes | memoryview) -> Frame | None:
    """The frame header of a baseline, extended or progressive JPEG; None for anything else
    (another format, another JPEG mode, a header cut short or malformed), which callers
    hand to a full decoder to judge."""
    if data[:3] != b"\xff\xd8\xff":
        return None
    at, end = 2, len(data)
    while at + 4 <= end:
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker in _STANDALONE:
            at += 2
            continue
        length = int.from_bytes(data[at + 2 : at + 4], "big")
        if marker in _DCT_FRAMES:
            if length < 8 or at + 10 > end:
                return None
            height = int.from_bytes(data[at + 5 : at + 7], "big")
            width = int.from_bytes(data[at + 7 : at + 9], "big")
            # A height of 0 comes later in a DNL segment: leave that to a decoder.
            return Frame(width, height, data[at + 9]) if width and height else None
        if marker in _OTHER_FRAMES or marker in (0xD8, 0xD9, 0xDA) or length < 2:
            return None
        at += 2 + length
    return None
