"""``lineage.png``: the collection's family tree, drawn by graphviz from parent sha256s.

An arrow goes from a parent to each checkpoint continued from it (matched by content, not
by name, so a renamed or mis-named parent still connects). Parents that are not in the
collection appear dashed; boxes are coloured by family, with a red border when the index
flags a problem. Each box names the checkpoint, its epochs and its best held-out loss.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dalle_data.atomic import atomic_path

_COLOURS = {"taming": "#dbe9f6", "openai": "#f6e3db", "custom": "#e2f3dc"}


def _label(entry: dict[str, Any]) -> str:
    arch, lineage = _split(entry["name"])
    lines = [arch, lineage] if lineage else [arch]
    lines.append(f"{entry['family']} · epochs {entry['epochs']}")
    if entry["evals"]:
        best = min(entry["evals"], key=lambda r: r["loss"])
        lines.append(f"held-out loss {best['loss']:.4f} ({best['dataset']})")
    if entry["problems"]:
        lines.append(f"{len(entry['problems'])} problem(s): see README")
    return "\n".join(lines)


def _split(name: str) -> tuple[str, str]:
    """(architecture part, lineage part) of a name, for a two-line label."""
    parts = name.split("_")
    return "_".join(parts[:5]), "_".join(parts[5:])


def lineage_graph(index: dict[str, Any]) -> Any:
    """The graphviz Digraph of ``index``'s loadable checkpoints and their parents."""
    import graphviz

    graph = graphviz.Digraph("lineage", graph_attr={"rankdir": "TB", "label": "", "dpi": "96"})
    graph.attr("node", shape="box", style="rounded,filled", fontname="Helvetica", fontsize="11")
    loaded = [e for e in index["checkpoints"] if e["architecture"] is not None]
    by_sha: dict[str, list[str]] = {}
    for number, entry in enumerate(loaded):
        node = f"c{number}"
        by_sha.setdefault(entry["sha256"], []).append(node)
        flagged = {"color": "#c0392b", "penwidth": "2"} if entry["problems"] else {}
        graph.node(
            node, _label(entry), fillcolor=_COLOURS.get(entry["family"], "#eeeeee"), **flagged
        )
    missing: dict[str, str] = {}
    for number, entry in enumerate(loaded):
        parent = entry.get("parent")
        if not parent:
            continue
        sources = by_sha.get(parent["sha256"])
        if sources is None:
            if parent["sha256"] not in missing:
                missing[parent["sha256"]] = f"m{len(missing)}"
                graph.node(
                    missing[parent["sha256"]],
                    f"{parent['name']}\n(not in the collection)",
                    style="rounded,dashed",
                    color="#888888",
                    fontcolor="#555555",
                )
            sources = [missing[parent["sha256"]]]
        for source in sources:
            graph.edge(source, f"c{number}")
    if not loaded:
        graph.node("empty", "no loadable checkpoints yet", shape="plaintext")
    return graph


def write_lineage_picture(path: Path, index: dict[str, Any]) -> str | None:
    """Render the tree to ``path`` (PNG, atomically); the problem as a sentence if graphviz's
    ``dot`` cannot, else None."""
    import graphviz

    try:
        png = lineage_graph(index).pipe(format="png")
    except graphviz.ExecutableNotFound:
        return (
            "lineage.png was not drawn: graphviz's `dot` program is not installed "
            "(apt-get install graphviz)"
        )
    except graphviz.CalledProcessError as err:
        return f"lineage.png was not drawn: dot failed ({err})"
    with atomic_path(path) as tmp:
        tmp.write_bytes(png)
    return None
