"""Retry rounds: the rows of a part that failed for a reason that can pass, fetched again.

A part's folder holds img2dataset's first round; round k lives in ``rounds/k/`` (its rows
in ``rounds/k.parquet``, chosen and timed before it starts, so a killed round resumes
with the same rows and the same wait). A row's result is its last attempt's, and the
images of every round are read by row, so the shards do not depend on when an image came.

Each run of the download command on a part gives its still-retryable rows up to
``retry_rounds`` more rounds: the first run ends with them, a rerun (``--forcerun
download``, or a changed ``download`` config) adds more, and a run killed part-way
finishes the rounds it had planned. The part's record ``downloaded/<part>.json`` (the
rule's output, run facts included) is written when the run ends.
"""

from __future__ import annotations

import dataclasses
import email.utils
import json
import random
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dalle_data.atomic import atomic_path, write_json
from dalle_data.pipeline.download import DownloadSettings, download_part
from dalle_data.pipeline.download_plan import DownloadError
from dalle_data.pipeline.download_results import PHASH_COLUMN, RowResult, read_part_results
from dalle_data.pipeline.failures import RETRYABLE, retry_after

ROUNDS = "rounds"
STATE = "state.json"
NOT_RECORDED = "other:not_recorded"


def record_path(out_dir: Path) -> Path:
    """``downloaded/<part>.json``: the part's record beside its folder."""
    return out_dir.with_name(out_dir.name + ".json")


def download_with_retries(part: Path, out_dir: Path, settings: DownloadSettings) -> dict[str, Any]:
    """A part's first round (once), then its retry rounds; writes and returns its record."""
    rounds_dir = out_dir / ROUNDS
    with tempfile.TemporaryDirectory(prefix="dalle-data-") as tmp:
        scratch = Path(tmp)
        download_part(part, out_dir, settings, scratch=scratch)
        state = _read_state(out_dir)
        done = len(_round_folders(out_dir)) - 1
        if state["target"] is None:  # no run left unfinished: this one grants more rounds
            state["target"] = done + settings.retry_rounds
        for k in range(done + 1, state["target"] + 1):
            facts = state["rounds"].get(str(k))
            if facts is None:
                facts = _plan_round(part, out_dir, k, settings)
                if facts is None:
                    break
                state["rounds"][str(k)] = facts
                write_json(rounds_dir / STATE, state)
            pause = facts["not_before"] - time.time()
            if pause > 0:
                print(f"round {k}: {facts['rows']} rows again in {pause:.1f} s", flush=True)
                time.sleep(pause)
            started = time.time()
            download_part(
                rounds_dir / f"{k}.parquet", rounds_dir / str(k), settings, scratch=scratch
            )
            facts["seconds"] = round(time.time() - started, 3)
            write_json(rounds_dir / STATE, state)
        state["target"] = None
        if rounds_dir.exists():
            write_json(rounds_dir / STATE, state)
    record = part_record(part, out_dir)
    write_json(record_path(out_dir), record)
    return record


def _read_state(out_dir: Path) -> dict[str, Any]:
    path = out_dir / ROUNDS / STATE
    if path.is_file():
        return json.loads(path.read_text())
    return {"target": None, "rounds": {}}


def _round_folders(out_dir: Path) -> list[Path]:
    """The part's folder (round 0), then each finished round's folder in order."""
    folders = [out_dir]
    while (out_dir / ROUNDS / str(len(folders))).is_dir():
        folders.append(out_dir / ROUNDS / str(len(folders)))
    return folders


def _plan_round(
    part: Path, out_dir: Path, k: int, settings: DownloadSettings
) -> dict[str, Any] | None:
    """Write round k's rows (every row whose last attempt failed retryably) and its start time."""
    results = read_results(out_dir)
    again = {r.row_id: r for r in results.values() if not r.ok and r.reason in RETRYABLE}
    if not again:
        return None
    table = pq.read_table(part)
    table = table.filter(pc.is_in(table.column("row_id"), pa.array(sorted(again), pa.int64())))
    path = out_dir / ROUNDS / f"{k}.parquet"
    path.parent.mkdir(exist_ok=True)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    ended = max(p.stat().st_mtime for p in _round_folders(out_dir)[-1].glob("*_stats.json"))
    wait = round_wait([r.error for r in again.values()], k, settings, ended)
    return {
        "rows": len(again),
        "retrying": dict(sorted(Counter(str(r.reason) for r in again.values()).items())),
        "wait_seconds": round(wait, 3),
        "not_before": ended + wait,
    }


def round_wait(errors: list[str | None], k: int, settings: DownloadSettings, ended: float) -> float:
    """Seconds after the last round ended before round ``k`` may start.

    The longest Retry-After the servers asked for; for failures without one, an
    exponential backoff with jitter (so parallel jobs do not come back in step); at most
    ``retry_after_max``.
    """
    delays = [0.0]
    for error in errors:
        asked = retry_after_seconds(retry_after(error), ended)
        if asked is None:
            base = settings.retry_backoff * 2 ** (k - 1)
            delays.append(base * random.uniform(0.5, 1.0))  # noqa: S311 (jitter, not crypto)
        else:
            delays.append(asked)
    return min(settings.retry_after_max, max(delays))


def retry_after_seconds(value: str | None, since: float) -> float | None:
    """A ``Retry-After`` value (delay-seconds or an HTTP date) as seconds after ``since``."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - since) if when.tzinfo else None


def read_results(out_dir: Path) -> dict[int, RowResult]:
    """Per row_id, the last attempt's result over every finished round of a part."""
    results: dict[int, RowResult] = {}
    for _, round_results in _rounds(out_dir):
        results.update(round_results)
    return results


def records_phash(out_dir: Path) -> bool:
    """Whether img2dataset's results of every round of a part carry each image's perceptual
    hash (those of a part downloaded before the download stage recorded it do not)."""
    return all(
        PHASH_COLUMN in pq.read_schema(path).names
        for folder in _round_folders(out_dir)
        for path in folder.glob("*.parquet")
    )


def _rounds(out_dir: Path) -> list[tuple[int, dict[int, RowResult]]]:
    rounds = []
    for k, folder in enumerate(_round_folders(out_dir)):
        prefix = folder.relative_to(out_dir).as_posix()
        found = read_part_results(folder)
        if k:
            found = {
                row_id: dataclasses.replace(r, shard=f"{prefix}/{r.shard}")
                for row_id, r in found.items()
            }
        rounds.append((k, found))
    return rounds


def part_record(part: Path, out_dir: Path) -> dict[str, Any]:
    """What became of a part's rows, with the facts of its retry rounds (not reproducible:
    waits and times belong to the build record, never the manifest)."""
    state = _read_state(out_dir)
    rows = pq.read_metadata(part).num_rows
    results: dict[int, RowResult] = {}
    rounds = []
    for k, found in _rounds(out_dir):
        if k:
            recovered = Counter(str(results[i].reason) for i, r in found.items() if r.ok)
            facts = state["rounds"].get(str(k), {})
            rounds.append(
                {
                    "round": k,
                    "rows": len(found),
                    "retrying": facts.get("retrying", {}),
                    "recovered": dict(sorted(recovered.items())),
                    "wait_seconds": facts.get("wait_seconds"),
                    "seconds": facts.get("seconds"),
                }
            )
        results.update(found)
    failed = Counter(str(r.reason) for r in results.values() if not r.ok)
    if rows > len(results):
        failed[NOT_RECORDED] += rows - len(results)
    downloaded = sum(r.ok for r in results.values())
    if downloaded + sum(failed.values()) != rows:
        raise DownloadError(
            f"{out_dir} accounts for {downloaded + sum(failed.values())} of {rows} rows of "
            f"{part}: delete {out_dir} and download it again"
        )
    return {
        "part": part.stem,
        "rows": rows,
        "downloaded": downloaded,
        "failed": dict(sorted(failed.items())),
        "retryable": sum(n for reason, n in failed.items() if reason in RETRYABLE),
        "rounds": rounds,
    }


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The retry rounds of every part of a dataset, added up round by round (for build.json
    and the dataset card): rows tried again, recovered per reason, the longest wait."""
    rounds: dict[int, dict[str, Any]] = {}
    for record in records:
        for facts in record["rounds"]:
            total = rounds.setdefault(
                facts["round"],
                {"parts": 0, "rows": 0, "recovered": Counter(), "wait_seconds": 0.0},
            )
            total["parts"] += 1
            total["rows"] += facts["rows"]
            total["recovered"].update(facts["recovered"])
            total["wait_seconds"] = max(total["wait_seconds"], facts["wait_seconds"] or 0.0)
    recovered: Counter[str] = Counter()
    for total in rounds.values():
        recovered.update(total["recovered"])
        total["recovered"] = dict(sorted(total["recovered"].items()))
    return {
        "rounds": [{"round": k, **rounds[k]} for k in sorted(rounds)],
        "recovered": dict(sorted(recovered.items())),
        "still_retryable": sum(record["retryable"] for record in records),
    }
