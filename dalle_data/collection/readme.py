"""The collection's front page, ``README.md``, in the spirit of the DALLE-models README.

One leaderboard per eval set (lowest held-out loss first), one table per family folder
(name linking to the model card, architecture, lineage, epochs, held-out loss per eval
set, a sample thumbnail), the lineage tree, and every flagged problem on its own line.
Generated from ``index.json`` alone, with no timestamp: an unchanged collection gives
the same bytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dalle_data.atomic import atomic_open

THUMBNAIL_WIDTH = 128


def _eval_label(board: dict[str, Any]) -> str:
    return f"{board['dataset']} eval `{board['manifest_sha256'][:8]}`"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _name_link(entry: dict[str, Any]) -> str:
    return f"[{entry['name']}]({entry['card']})" if entry["card"] else entry["name"]


def render_front_page(index: dict[str, Any], *, picture: bool) -> str:
    """Markdown for the collection described by ``index`` (see module doc)."""
    entries = index["checkpoints"]
    boards = index["eval_sets"]
    families = sorted({e["family"] for e in entries})
    flagged = [(e, p) for e in entries for p in e["problems"]]
    lines = [
        "# DALLE-pytorch checkpoint collection",
        "",
        f"{len(entries)} checkpoints in {len(families)} families "
        f"({', '.join(f'`{f}/`' for f in families) or 'none'}); "
        f"{len(boards)} held-out eval sets; {len(flagged)} problems flagged. "
        "Names follow `<depth>L_<dim_head>HD_<heads>H_<dim>I_<text_seq_len>T_<lineage>`. "
        "Machine-readable: `index.json`. Rebuild with `dalle-data collection <this folder>`.",
        "",
    ]
    if picture:
        lines += ["## Lineage", "", "![lineage tree](lineage.png)", ""]
    lines += ["## Leaderboards", ""]
    if not boards:
        lines += [
            "No checkpoint has held-out scores yet: `dalle-data evaluate <checkpoint> --shards "
            "<dataset>/eval` adds them.",
            "",
        ]
    for board in boards:
        lines += [
            f"### {_eval_label(board)} ({board['samples']} samples)",
            "",
            "| rank | checkpoint | loss | text | image | bits / image token | CLIP score |",
            "|---|---|---|---|---|---|---|",
            *(
                f"| {rank} | `{r['path']}` | **{_number(r['loss'])}** | "
                f"{_number(r['text_loss'])} | {_number(r['image_loss'])} | "
                f"{_number(r['bits_per_image_token'])} | {_number(r['clip_score'])} |"
                for rank, r in enumerate(board["ranking"], start=1)
            ),
            "",
        ]
    for family in families:
        lines += _family_table(family, [e for e in entries if e["family"] == family], boards)
    lines += ["## Problems", ""]
    problems = [f"- `{entry['path']}`: {problem}" for entry, problem in flagged]
    problems += [f"- {problem}" for problem in index.get("problems", [])]
    lines += problems or ["None."]
    return "\n".join(lines).rstrip() + "\n"


def _family_table(
    family: str, entries: list[dict[str, Any]], boards: list[dict[str, Any]]
) -> list[str]:
    heads = [f"loss on {_eval_label(b)}" for b in boards]
    lines = [
        f"## {family}/",
        "",
        "| name | architecture | lineage | epochs | " + " | ".join([*heads, "sample"]) + " |",
        "|---" * (5 + len(heads)) + "|",
    ]
    for entry in entries:
        scores = {r["manifest_sha256"]: r["loss"] for r in entry["evals"]}
        thumbnail = (
            f'<img src="{entry["samples"]}" width="{THUMBNAIL_WIDTH}">' if entry["samples"] else ""
        )
        cells = [
            _name_link(entry),
            entry["architecture"] or "unreadable",
            entry["lineage"] or "-",
            entry["epochs"] or "-",
            *(_number(scores.get(b["manifest_sha256"])) for b in boards),
            thumbnail,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def write_front_page(path: Path, index: dict[str, Any], *, picture: bool) -> Path:
    """Render and write README.md atomically."""
    with atomic_open(path, "w", encoding="utf-8") as fh:
        fh.write(render_front_page(index, picture=picture))
    return Path(path)
