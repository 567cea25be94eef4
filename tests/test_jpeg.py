"""The JPEG frame reader against Pillow, and on bodies that are not what they claim."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from dalle_data.jpeg import Frame, frame


def encoded(mode: str, size: tuple[int, int], **options: object) -> bytes:
    rng = np.random.default_rng(size[0] * 7 + size[1])
    pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buf, "JPEG", **options)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("mode", "options"),
    [
        ("RGB", {}),
        ("L", {}),
        ("CMYK", {}),
        ("RGB", {"progressive": True}),
        ("RGB", {"exif": b"Exif\x00\x00" + b"\x00" * 40_000, "icc_profile": b"\x00" * 70_000}),
    ],
)
def test_frame_is_what_pillow_reads(mode: str, options: dict) -> None:
    for size in [(1, 1), (97, 33), (640, 480), (3000, 17)]:
        body = encoded(mode, size, **options)
        with Image.open(io.BytesIO(body)) as image:
            layers = len(image.getbands())
        assert frame(body) == Frame(*size, layers)
        assert frame(memoryview(body)) == Frame(*size, layers)


def test_anything_else_has_no_frame() -> None:
    body = encoded("RGB", (64, 48))
    sof = body.index(b"\xff\xc0")
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, "PNG")
    lossless = body[:sof] + b"\xff\xc3" + body[sof + 2 :]
    no_height = body[: sof + 5] + b"\x00\x00" + body[sof + 7 :]  # height in a DNL segment
    for other in (
        b"",
        b"\xff\xd8",
        png.getvalue(),
        body[: sof + 6],  # cut inside the frame header
        body[:sof],  # cut before it
        lossless,
        no_height,
        body[:2] + b"\xff\xda" + body[2:],  # scan data before any frame
        body[:2] + b"\xff\xe0\x00\x01" + body[2:],  # a segment length under its own size
        body[:2] + b"junk" + body[2:],
    ):
        assert frame(other) is None
    # fill bytes between segments are allowed
    assert frame(body[:2] + b"\xff\xff" + body[2:]) == Frame(64, 48, 3)
