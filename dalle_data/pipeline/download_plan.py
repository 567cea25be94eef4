"""The download plan: filtered rows split into independent parts, non-web URLs refused.

A part is the unit of work a cluster schedules and a failure reruns; the plan is a
checkpoint for Snakemake (the number of parts is known only once the metadata is filtered).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from dalle_data.atomic import atomic_path, write_json
from dalle_data.errors import DalleDataError

PLAN = "plan.json"
REFUSED = "refused.parquet"
# `extra`: a table source's kept columns, which finalize copies into each sample's .json.
PART_COLUMNS = ["row_id", "url", "caption", "license", "extra"]
WEB_SCHEMES = ("http://", "https://")


class DownloadError(DalleDataError):
    """A download input or outcome a user must act on; the message names it and the fix."""


def part_name(index: int) -> str:
    """`part-NNNNN`, the name of a download part (its parquet and its output folder)."""
    return f"part-{index:05d}"


def plan_download(
    filtered: Path, plan_dir: Path, *, rows_per_part: int, allow_file_urls: bool
) -> dict[str, Any]:
    """Split ``filtered.parquet`` into parts of ``rows_per_part`` rows under ``plan_dir``.

    Rows whose URL is not http(s) are refused here unless ``allow_file_urls`` (the filter
    stage drops them already; this keeps a web dataset from reading local files even if a
    hand-made metadata table slips through). They are kept in ``refused.parquet`` and
    counted under ``file_url_refused``.
    """
    if rows_per_part < 1:
        raise DownloadError(f"download.rows_per_part must be at least 1, got {rows_per_part}")
    try:
        source = pq.ParquetFile(filtered)
    except (FileNotFoundError, pa.ArrowInvalid) as err:
        raise DownloadError(f"cannot read {filtered} ({err}): run the filter stage first") from None
    missing = [c for c in PART_COLUMNS if c not in source.schema_arrow.names]
    if missing:
        raise DownloadError(f"{filtered} lacks columns {missing}: rebuild it with the filter stage")
    parts_dir = plan_dir / "parts"
    if parts_dir.exists():
        shutil.rmtree(parts_dir)
    parts_dir.mkdir(parents=True)
    parts: list[dict[str, Any]] = []
    refused: list[pa.Table] = []
    pending: list[pa.Table] = []
    pending_rows = rows = 0
    previous = -1

    def flush(table: pa.Table) -> None:
        name = part_name(len(parts))
        with atomic_path(parts_dir / f"{name}.parquet") as tmp:
            pq.write_table(table, tmp)
        parts.append({"name": name, "rows": table.num_rows})

    for batch in source.iter_batches(columns=PART_COLUMNS, batch_size=65_536):
        table = pa.Table.from_batches([batch])
        ids = table.column("row_id").to_pylist()
        if ids and (ids[0] <= previous or any(b <= a for a, b in zip(ids, ids[1:], strict=False))):
            raise DownloadError(
                f"{filtered} is not sorted by unique row_id: rebuild it with the filter stage"
            )
        previous = ids[-1] if ids else previous
        rows += table.num_rows
        if not allow_file_urls:
            web = pa.array(
                [
                    isinstance(u, str) and u.startswith(WEB_SCHEMES)
                    for u in table.column("url").to_pylist()
                ]
            )
            refused.append(table.filter(pa.compute.invert(web)).select(["row_id", "url"]))
            table = table.filter(web)
        pending.append(table)
        pending_rows += table.num_rows
        while pending_rows >= rows_per_part:
            merged = pa.concat_tables(pending)
            flush(merged.slice(0, rows_per_part))
            rest = merged.slice(rows_per_part)
            pending, pending_rows = [rest], rest.num_rows
    if pending_rows:
        flush(pa.concat_tables(pending))
    refused_table = (
        pa.concat_tables(refused)
        if refused
        else pa.table({"row_id": pa.array([], pa.int64()), "url": pa.array([], pa.string())})
    )
    with atomic_path(plan_dir / REFUSED) as tmp:
        pq.write_table(refused_table, tmp)
    plan = {
        "input_rows": rows,
        "parts": parts,
        "refused": {"file_url_refused": refused_table.num_rows} if refused_table.num_rows else {},
        "rows_per_part": rows_per_part,
    }
    write_json(plan_dir / PLAN, plan)
    return plan


def read_plan(plan_dir: Path) -> dict[str, Any]:
    """Load ``plan.json`` written by :func:`plan_download`."""
    path = plan_dir / PLAN
    if not path.is_file():
        raise DownloadError(f"{path} does not exist: run `dalle-data plan-download` first")
    return json.loads(path.read_text(encoding="utf-8"))
