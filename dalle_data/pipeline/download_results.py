"""What img2dataset recorded for each row of a finished part, with failures given a reason."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from dalle_data.pipeline.failures import failure_reason

# The column the download stage adds to img2dataset's results: the perceptual hash of each
# written image (pipeline/dedup.py), computed in the worker that encoded it.
PHASH_COLUMN = "phash"


@dataclass(frozen=True)
class RowResult:
    """img2dataset's outcome for one row of a part."""

    row_id: int
    ok: bool
    reason: str | None
    error: str | None
    shard: str | None
    key: str | None
    sha256: str | None
    original_width: int | None
    original_height: int | None
    # None for a part downloaded before the download stage recorded it: finalize hashes then.
    phash: int | None = None


def read_part_results(part_dir: Path) -> dict[int, RowResult]:
    """Per row_id, what img2dataset recorded in a finished part's ``*.parquet`` files."""
    results: dict[int, RowResult] = {}
    columns = [
        "row_id",
        "key",
        "status",
        "error_message",
        "sha256",
        "original_width",
        "original_height",
    ]
    for path in sorted(part_dir.glob("*.parquet")):
        names = pq.read_schema(path).names
        table = pq.read_table(
            path, columns=columns + [PHASH_COLUMN] * (PHASH_COLUMN in names)
        ).to_pylist()
        for row in table:
            ok = row["status"] == "success"
            results[row["row_id"]] = RowResult(
                row_id=row["row_id"],
                ok=ok,
                reason=None if ok else failure_reason(row["error_message"]),
                error=None if ok else row["error_message"],
                shard=path.with_suffix(".tar").name,
                key=row["key"],
                sha256=row["sha256"],
                original_width=row["original_width"],
                original_height=row["original_height"],
                phash=row.get(PHASH_COLUMN),
            )
    return results
