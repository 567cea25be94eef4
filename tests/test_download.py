"""Download + finalize against a hostile local server: every bad URL counted, every good kept."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import struct
import subprocess
import sys
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dalle_data.formats.manifest import read_manifest, verify
from dalle_data.formats.webdataset import read_shard, row_key
from dalle_data.pipeline.download import GLIBC_TUNABLES, DownloadSettings
from dalle_data.pipeline.download_plan import plan_download, read_plan
from dalle_data.pipeline.failures import failure_reason
from dalle_data.pipeline.finalize import finalize
from dalle_data.pipeline.retry import download_with_retries
from tests.helpers.http import LocalServer, Route, reset, serve, stall

TIMEOUT = 5.0  # generous: on a loaded 2-core machine a 1 s connect can time out
IMAGE_SIZE = 64


def image_bytes(mode: str, size: tuple[int, int], fmt: str, seed: int = 0) -> bytes:
    """A small noisy image (noise keeps JPEG sizes realistic and images distinct)."""
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    image = rgb.convert(mode) if mode != "P" else rgb.quantize(16)
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def png_bomb(side: int = 20_000) -> bytes:
    """A valid 1-bit PNG of side x side pixels (400 Mpx at 20000) in ~50 KB, built in ~0.2 s."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    row = b"\0" * (1 + side // 8)
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def redirect(location: str, status: int = 302) -> Route:
    return Route(status=status, headers={"Location": location})


def good_routes() -> dict[str, Route]:
    jpeg = {"Content-Type": "image/jpeg"}
    return {
        "/good.jpg": Route(image_bytes("RGB", (120, 90), "JPEG", 1), headers=jpeg),
        "/rgba.png": Route(image_bytes("RGBA", (100, 100), "PNG", 2)),
        "/palette.png": Route(image_bytes("P", (90, 120), "PNG", 3)),
        "/good.webp": Route(image_bytes("RGB", (130, 100), "WEBP", 4)),
        "/cmyk.jpg": Route(image_bytes("CMYK", (100, 80), "JPEG", 5), headers=jpeg),
        "/grey.jpg": Route(image_bytes("L", (80, 100), "JPEG", 6), headers=jpeg),
        "/moved.jpg": redirect("/target.jpg"),
        "/target.jpg": Route(image_bytes("RGB", (100, 100), "JPEG", 7), headers=jpeg),
    }


GOOD = [
    "/good.jpg",
    "/rgba.png",
    "/palette.png",
    "/good.webp",
    "/cmyk.jpg",
    "/grey.jpg",
    "/moved.jpg",
]

BAD = {
    "/missing.jpg": "http_404",
    "/error.jpg": "http_5xx",
    "/stall.jpg": "timeout",
    "/reset.jpg": "connection",
    "/loop.jpg": "too_many_redirects",
    "/page.jpg": "decode_error",
    "/empty.jpg": "decode_error",
    "/truncated.jpg": "decode_error",
    "/text.jpg": "decode_error",
    "/tiny.jpg": "image_too_small",
    "/wide.jpg": "aspect_ratio",
    "/bomb.png": "decompression_bomb",
    "/junk.jpg": "decode_error",
    "/noai.jpg": "x_robots_tag_opt_out",
}


def hostile_routes() -> dict[str, Route]:
    good = image_bytes("RGB", (120, 90), "JPEG", 8)
    return {
        "/error.jpg": Route(b"oops", status=500),
        "/stall.jpg": Route(handler=stall(TIMEOUT + 2)),
        "/reset.jpg": Route(handler=reset),
        "/loop.jpg": redirect("/loop.jpg"),
        "/page.jpg": Route(
            b"<html><body>not an image</body></html>", headers={"Content-Type": "text/html"}
        ),
        "/empty.jpg": Route(b""),
        "/truncated.jpg": Route(good[: len(good) // 2]),
        "/text.jpg": Route(b"this is a text file with a .jpg name\n"),
        "/tiny.jpg": Route(image_bytes("RGB", (8, 8), "JPEG", 9)),
        "/wide.jpg": Route(image_bytes("RGB", (400, 100), "JPEG", 10)),
        "/bomb.png": Route(png_bomb(), headers={"Content-Type": "image/png"}),
        "/junk.jpg": Route(os.urandom(60 * 2**20)),
        "/noai.jpg": Route(good, headers={"X-Robots-Tag": "noai"}),
    }


def write_metadata(ds_dir: Path, rows: list[dict[str, Any]], dropped: dict[str, int]) -> None:
    """What the metadata stages hand over: filtered.parquet and the two stage records."""
    meta = ds_dir / "metadata"
    meta.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            "row_id": pa.array([r["row_id"] for r in rows], pa.int64()),
            "url": [r["url"] for r in rows],
            "caption": [r["caption"] for r in rows],
            "license": [r.get("license") for r in rows],
            "width": pa.array([None] * len(rows), pa.int32()),
            "height": pa.array([None] * len(rows), pa.int32()),
            "extra": pa.array([r.get("extra") for r in rows], pa.string()),
        }
    )
    pq.write_table(table, meta / "filtered.parquet")
    n, d = len(rows), sum(dropped.values())
    normalize = {
        "input_rows": n + d,
        "dropped": dropped,
        "output_rows": n,
        "sources": ["x"],
        "seconds": 1,
    }
    (meta / "normalize.json").write_text(json.dumps(normalize))
    (meta / "filter.json").write_text(
        json.dumps({"input_rows": n, "dropped": {}, "output_rows": n})
    )


def build(
    ds_dir: Path,
    *,
    rows_per_part: int,
    allow_file_urls: bool = False,
    shard_size: int = 4,
    dataset: str = "test",
    tokenizer: str = "simple",
    distributor: str = "multiprocessing",
    processes: int = 1,
    holdout: Any = None,
    dedup_options: Any = None,
    **download: Any,
) -> dict:
    """plan-download -> download per part -> finalize (with ``holdout`` and
    ``dedup_options``), through the library functions;
    ``download`` overrides DownloadSettings (retry rounds, rate limit ...)."""
    plan = plan_download(
        ds_dir / "metadata" / "filtered.parquet",
        ds_dir / "download",
        rows_per_part=rows_per_part,
        allow_file_urls=allow_file_urls,
    )
    settings = DownloadSettings(
        image_size=IMAGE_SIZE,
        processes=processes,
        thread_count=16,
        timeout=TIMEOUT,
        distributor=distributor,
        **download,
    )
    for part in plan["parts"]:
        download_with_retries(
            ds_dir / "download" / "parts" / f"{part['name']}.parquet",
            ds_dir / "downloaded" / part["name"],
            settings,
        )
    return finalize(
        ds_dir,
        dataset=dataset,
        tokenizer_spec=tokenizer,
        image_size=IMAGE_SIZE,
        shard_size=shard_size,
        holdout=holdout,
        dedup_options=dedup_options,
    )


@pytest.fixture(scope="module")
def hostile(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[LocalServer, list[dict], Path]]:
    with serve({**good_routes(), **hostile_routes()}) as server:
        secret = tmp_path_factory.mktemp("local") / "secret.jpg"
        secret.write_bytes(image_bytes("RGB", (100, 100), "JPEG", 11))
        paths = sorted(GOOD + list(BAD))
        rows = [
            {
                "row_id": 1000 + 13 * i,
                "url": server.url(p),
                "caption": f"a picture of {p[1:]}",
                "license": "cc-by",
            }
            for i, p in enumerate(paths)
        ]
        rows.append(
            {"row_id": 5000, "url": secret.as_uri(), "caption": "a local file", "license": None}
        )
        ds_dir = tmp_path_factory.mktemp("hostile") / "test"
        write_metadata(ds_dir, rows, {"empty_caption": 3})
        # No retry rounds: the timeout, reset and 500 stay failed (tests/test_retry.py).
        build(ds_dir, rows_per_part=11, retry_rounds=0)
        yield server, rows, ds_dir


def test_every_row_is_written_or_counted(hostile: tuple[LocalServer, list[dict], Path]) -> None:
    _, rows, ds_dir = hostile
    manifest = read_manifest(ds_dir / "shards")
    expected: dict[str, int] = {}
    for reason in BAD.values():
        expected[reason] = expected.get(reason, 0) + 1
    expected["file_url_refused"] = 1
    assert manifest["counts"] == {
        "input_rows": len(rows) + 3,
        # Finalize's own reasons are listed when nothing fell under them.
        "dropped": {"duplicate_image": 0, "empty_caption": 3, "eval_duplicate": 0, "eval_split": 0},
        "failed": dict(sorted(expected.items())),
        "written": len(GOOD),
    }
    failures = pq.read_table(ds_dir / "shards" / "failures.parquet").to_pylist()
    by_url = {f["url"].rsplit("/", 1)[-1]: f["reason"] for f in failures}
    assert by_url == {**{p[1:]: r for p, r in BAD.items()}, "secret.jpg": "file_url_refused"}
    assert all(f["error"] for f in failures)
    assert verify(ds_dir / "shards", retokenize=3)["samples"] == len(GOOD)


def test_good_images_present_with_metadata(hostile: tuple[LocalServer, list[dict], Path]) -> None:
    server, rows, ds_dir = hostile
    samples = [
        s for shard in sorted((ds_dir / "shards").glob("test-*.tar")) for s in read_shard(shard)
    ]
    by_path = {r["url"].replace(server.url(""), ""): r for r in rows}
    wanted = [by_path[p] for p in sorted(GOOD)]
    assert [s["__key__"] for s in samples] == [row_key(r["row_id"]) for r in wanted]
    originals = good_routes()
    for sample, row, path in zip(samples, wanted, sorted(GOOD), strict=True):
        meta = json.loads(sample["json"])
        body = originals["/target.jpg" if path == "/moved.jpg" else path].body
        source = Image.open(io.BytesIO(body))
        assert meta["sha256"] == __import__("hashlib").sha256(body).hexdigest()
        assert (meta["original_width"], meta["original_height"]) == source.size
        assert (meta["url"], meta["row_id"], meta["caption"], meta["license"]) == (
            row["url"],
            row["row_id"],
            row["caption"],
            "cc-by",
        )
        assert sample["txt"].decode() == row["caption"]
        stored = Image.open(io.BytesIO(sample["jpg"]))
        assert stored.format == "JPEG" and min(stored.size) == IMAGE_SIZE


def test_img2datasets_tars_carry_plain_ustar_members(
    hostile: tuple[LocalServer, list[dict], Path],
) -> None:
    """Each member of a downloaded tar is one 512-byte ustar header and its data: no pax
    header (webdataset's float mtime needs one per member) before it."""
    _, _, ds_dir = hostile
    tars = sorted((ds_dir / "downloaded").glob("part-*/*.tar"))
    assert tars
    for path in tars:
        with tarfile.open(path) as tar:
            members = tar.getmembers()
        assert members and all(m.isfile() and not m.pax_headers for m in members), path
        assert len({m.mtime for m in members}) == 1 and isinstance(members[0].mtime, int)
        # a pax member would add two blocks before the header
        expected = sum(512 + -(-m.size // 512) * 512 for m in members)
        assert members[-1].offset_data + -(-members[-1].size // 512) * 512 == expected


def test_file_url_of_web_dataset_never_reaches_img2dataset(
    hostile: tuple[LocalServer, list[dict], Path],
) -> None:
    _, _, ds_dir = hostile
    plan = read_plan(ds_dir / "download")
    assert plan["refused"] == {"file_url_refused": 1}
    for part in (ds_dir / "download" / "parts").glob("*.parquet"):
        assert not any(u.startswith("file:") for u in pq.read_table(part).column("url").to_pylist())
    for status in (ds_dir / "downloaded").glob("part-*/*.parquet"):
        assert not any(
            u.startswith("file:") for u in pq.read_table(status).column("url").to_pylist()
        )


def test_no_partial_folders_left(hostile: tuple[LocalServer, list[dict], Path]) -> None:
    _, _, ds_dir = hostile
    names = sorted(p.name for p in (ds_dir / "downloaded").iterdir())
    assert names == ["part-00000", "part-00000.json", "part-00001", "part-00001.json"]
    assert not list((ds_dir / "shards").glob(".*.tmp"))


def test_download_leaves_the_callers_process_alone(
    hostile: tuple[LocalServer, list[dict], Path],
) -> None:
    """img2dataset ran in a process of its own: the caller keeps torch and its environment."""
    assert importlib.util.find_spec("torch") is not None
    assert "DALLE_DATA_IMG2DATASET_PROCESS" not in os.environ
    assert os.environ.get("GLIBC_TUNABLES") != GLIBC_TUNABLES


MALLOC_SCRIPT = """
import ctypes, sys
from dalle_data.pipeline.malloc import set_tunables

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
set_tunables(sys.argv[1])
before = libc.mallinfo2().hblks
libc.malloc(4 << 20)
print(libc.mallinfo2().hblks - before)
"""


def test_a_forked_process_gets_the_download_allocator_settings() -> None:
    """A runner forked from the stage server never read GLIBC_TUNABLES: set_tunables gives it
    the same malloc settings, so a decoded image's 4 MB buffer comes from the heap instead of
    an mmap of its own; settings glibc would not read are skipped, not fatal."""

    def mmapped_blocks(tunables: str) -> str:
        result = subprocess.run(
            [sys.executable, "-c", MALLOC_SCRIPT, tunables], capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    assert mmapped_blocks("") == "1"
    assert mmapped_blocks(GLIBC_TUNABLES) == "0"
    assert mmapped_blocks("glibc.malloc.mmap_threshold=0x2000000:glibc.malloc.top_pad=x:y") == "0"


def test_missing_local_file_is_counted_as_file_not_found(tmp_path: Path) -> None:
    """A dataset that allows file: URLs (the sample) names a file that is gone."""
    present = tmp_path / "images" / "present.jpg"
    present.parent.mkdir()
    present.write_bytes(image_bytes("RGB", (90, 80), "JPEG", 3))
    rows = [
        {"row_id": 1, "url": present.as_uri(), "caption": "a file that is there"},
        {"row_id": 2, "url": (tmp_path / "images" / "gone.jpg").as_uri(), "caption": "gone"},
    ]
    ds_dir = tmp_path / "local"
    write_metadata(ds_dir, rows, {})
    manifest = build(ds_dir, rows_per_part=10, allow_file_urls=True)
    assert manifest["counts"]["failed"] == {"file_not_found": 1}
    assert manifest["counts"]["written"] == 1


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ("HTTP Error 404: Not Found", "http_404"),
        ("HTTP Error 503: Service Unavailable", "http_5xx"),
        ("HTTP Error 403: Forbidden", "http_403"),
        ("<urlopen error timed out>", "timeout"),
        ("<urlopen error [Errno 111] Connection refused>", "connection"),
        ("<urlopen error [Errno -3] Temporary failure in name resolution>", "dns"),
        ("<urlopen error [Errno -2] Name or service not known>", "dns_not_found"),
        ("HTTP Error 429: Too Many Requests", "http_429"),
        ("[http_429 retry-after=30] HTTP Error 429: Too Many Requests", "http_429"),
        ("<urlopen error unknown url type: ftp>", "file_url_refused"),
        ("<urlopen error [Errno 2] No such file or directory: '/x/1.jpg'>", "file_not_found"),
        ("something odd happened!", "other:something_odd_happened"),
        (None, "other:unknown"),
    ],
)
def test_failure_reason(message: str | None, reason: str) -> None:
    assert failure_reason(message) == reason
