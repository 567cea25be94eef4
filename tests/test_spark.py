"""Spark downloads (img2dataset's pyspark distributor, local[2]) give the same shards."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.helpers.http import Route, serve
from tests.test_build_pipeline import shard_bytes
from tests.test_download import build, image_bytes, write_metadata

pytest.importorskip("pyspark")
if shutil.which("java") is None:
    pytest.skip("pyspark needs a Java runtime (make setup installs one)", allow_module_level=True)


@pytest.mark.slow
@pytest.mark.spark
def test_pyspark_build_is_byte_identical_to_multiprocessing(tmp_path: Path) -> None:
    routes = {f"/{i}.jpg": Route(image_bytes("RGB", (90 + i, 70), "JPEG", i)) for i in range(9)}
    with serve(routes) as server:
        paths = [f"/{i}.jpg" for i in range(9)] + ["/missing.jpg"]
        rows = [
            {"row_id": 7 * i + 1, "url": server.url(p), "caption": f"a photo of thing {i}"}
            for i, p in enumerate(paths)
        ]
        built = {}
        for distributor in ("multiprocessing", "pyspark"):
            ds_dir = tmp_path / distributor / "cc12m"
            write_metadata(ds_dir, rows, {"too_short": 1})
            build(
                ds_dir,
                rows_per_part=100,
                dataset="cc12m",
                distributor=distributor,
                processes=2,
            )
            from dalle_data.pipeline.dataset_card import write_card

            write_card(ds_dir / "shards")
            built[distributor] = shard_bytes(ds_dir / "shards")
    assert built["pyspark"] == built["multiprocessing"]
    assert b'"written": 9' in built["pyspark"]["manifest.json"]
