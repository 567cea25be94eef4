"""The last lines of ``make demo``: where the demo's outputs are and its measured quality.

``python -m dalle_data.demo.summary data [CONFIG ...]``: later config files override
earlier ones, as with ``snakemake --configfile`` (default: configs/config.yaml).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

from dalle_data import config as ddconfig
from dalle_data.model.output_name import planned_output


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merge(out[key], value) if both else value
    return out


def summary(output_dir: Path, config_paths: list[Path]) -> str:
    """A few lines naming the shards, the checkpoint, its card and the quality figure, and
    ending with the command that serves the demo's collection."""
    merged: dict[str, Any] = {}
    for path in config_paths:
        merged = _merge(merged, yaml.safe_load(path.read_text(encoding="utf-8")) or {})
    config = ddconfig.validate(merged)
    train = config["train"]
    final = planned_output(
        Path(train["parent"]),
        train["dataset"],
        train["epochs"],
        Path(train["output_dir"]),
        parent_lineage=train.get("parent_lineage"),
    )
    lines = [
        f"shards:     {output_dir / train['dataset'] / 'shards'}",
        f"checkpoint: {final}",
        f"card:       {final.parent / 'README.md'}",
        f"samples:    {final.parent / 'samples.png'}",
    ]
    quality_path = final.parent / "quality.json"
    if quality_path.is_file():
        q = json.loads(quality_path.read_text(encoding="utf-8"))
        lines.append(
            f"quality:    {q['metric']} {q['accuracy']:.2f} ({q['correct']}/{q['images']} "
            f'images for "{q["prompt"]}"; chance {q["chance"]:.2f}; per colour '
            + ", ".join(f"{c} {n}" for c, n in q["per_colour"].items())
            + ")"
        )
    else:
        lines.append(f"quality:    not measured ({quality_path} is missing)")
    lines += held_out_lines(final)
    front_page = output_dir / "collection" / "README.md"
    if front_page.is_file():
        lines.append(f"collection: {front_page} (front page; index.json and lineage.png beside it)")
    lines.append(
        f"serve:      dalle-data serve {output_dir / 'collection'}"
        "   # then open http://127.0.0.1:8000/ui"
    )
    return "\n".join(lines)


class HeldOutError(ValueError):
    """The demo's child is not better than its parent on the held-out split."""


def held_out_lines(final: Path) -> list[str]:
    """Held-out loss of parent and child on each eval set; raises if the child is not better."""
    from dalle_data.model.evaluate import EVAL_RECORD

    records_path = final.parent / EVAL_RECORD
    lineage_path = final.parent / "lineage.json"
    if not (records_path.is_file() and lineage_path.is_file()):
        return [f"held-out:   not measured (no eval split, so no {records_path})"]
    history = json.loads(lineage_path.read_text(encoding="utf-8"))["history"]
    parents = {r["manifest_sha256"]: r for r in history[-1].get("parent_evals") or []}
    lines = []
    worse = []
    for record in json.loads(records_path.read_text(encoding="utf-8")):
        if record["checkpoint"]["name"] != final.stem:
            continue
        parent = parents.get(record["manifest_sha256"])
        versus = f", parent {parent['loss']:.4f}" if parent else ""
        lines.append(
            f"held-out:   loss {record['loss']:.4f}{versus} on {record['samples']} "
            f"{record['dataset']} eval samples"
        )
        if parent and record["loss"] >= parent["loss"]:
            worse.append(record["dataset"])
    if worse:
        raise HeldOutError(
            f"the trained checkpoint is not better than its parent on the held-out "
            f"{', '.join(worse)} split: train longer (train.epochs) or check the data"
        )
    return lines


def main(argv: list[str]) -> int:
    output_dir = Path(argv[0]) if argv else Path("data")
    configs = [Path(a) for a in argv[1:]] or [Path("configs/config.yaml")]
    try:
        print(summary(output_dir, configs))
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
