"""``index.json``: every checkpoint of a collection folder, what it is, and what is wrong.

A collection holds family folders (``taming/``, ``openai/``, ``custom/``) with either the
seed's ``<name>.pt`` files or dalle-data's ``<name>/<name>.pt`` folders. Every file is read
with the safe loader (no pickled code runs); a file that cannot be read becomes an entry
whose problem says why, never a crash. Problems are flagged per entry, one sentence each:
names that disagree with the weights (architecture from hparams, lineage from the lineage
key, with the name the file should have), one name with different contents, parents not
in the collection, missing model cards.

A checkpoint's held-out scores are every eval record of its sha256: those in the eval.json
beside it, and those its children measured before training (``parent_evals`` in their
lineage), one per eval set.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dalle_data import locations
from dalle_data.atomic import write_json
from dalle_data.errors import DalleDataError
from dalle_data.hashing import sha256_file
from dalle_data.model import checkpoint as ckpt_io
from dalle_data.model.evaluate import EvalError, records_for
from dalle_data.model.lineage import FAMILIES, LineageError, parse_name

INDEX = "index.json"
FRONT_PAGE = "README.md"
LINEAGE_PICTURE = "lineage.png"
_RECORD_FIELDS = ("manifest_sha256", "dataset", "samples", "loss")


def find_checkpoints(root: Path) -> Iterator[Path]:
    """``<family>/<name>.pt`` and ``<family>/<name>/<name>.pt`` (any .pt one or two levels
    below a family folder), sorted; hidden files and folders (temporary copies) skipped."""
    for family in sorted(p for p in root.iterdir() if p.is_dir() and not _hidden(p)):
        for item in sorted(family.iterdir()):
            if _hidden(item):
                continue
            if item.is_file() and item.suffix == ".pt":
                yield item
            elif item.is_dir():
                yield from sorted(p for p in item.glob("*.pt") if p.is_file() and not _hidden(p))


def _hidden(path: Path) -> bool:
    return path.name.startswith(".")


def card_path(checkpoint: Path) -> Path:
    """The model card: README.md in a dalle-data folder, ``<name>.md`` beside a seed file."""
    if _folder_layout(checkpoint):
        return checkpoint.parent / "README.md"
    return checkpoint.with_suffix(".md")


def sample_picture(checkpoint: Path) -> Path:
    """The sample grid: samples.png in a dalle-data folder, ``<name>.png`` beside a seed file."""
    if _folder_layout(checkpoint):
        return checkpoint.parent / "samples.png"
    return checkpoint.with_suffix(".png")


def _folder_layout(checkpoint: Path) -> bool:
    return checkpoint.parent.name == checkpoint.stem


def index_entry(root: Path, path: Path) -> dict[str, Any]:
    """One checkpoint's entry; a file that cannot be read gets its reason as a problem."""
    relative = path.relative_to(root)
    entry: dict[str, Any] = {
        "path": relative.as_posix(),
        "family": relative.parts[0],
        "name": path.stem,
        "sha256": sha256_file(path),
        "bytes": path.stat().st_size,
        "architecture": None,
        "lineage": None,
        "epochs": None,
        "parent": None,
        "tokenizer": None,
        "evals": [],
        "card": None,
        "samples": None,
        "problems": [],
    }
    try:
        ckpt = ckpt_io.load_checkpoint(path)
        info = ckpt_io.summary(ckpt, file_name=path.name)
    except DalleDataError as err:
        entry["problems"].append(f"cannot be loaded: {err}")
        return entry
    except Exception as err:  # noqa: BLE001 -- one odd file must not stop a whole index
        entry["problems"].append(f"cannot be loaded: {type(err).__name__}: {err}")
        return entry
    history = info["history"] or []
    step = history[-1] if history else {}
    entry.update(
        architecture=info["architecture"],
        lineage=info["lineage"],
        epochs=info["epochs"],
        vae_class_name=info["vae_class_name"],
        parameters=info["parameters"],
        expected_name=info["name"],
        parent=dict(step["parent"]) if step.get("parent") else None,
        tokenizer=ckpt.get("tokenizer") or None,
        parent_evals=list(step.get("parent_evals") or []),
    )
    entry["problems"] += _name_problems(path.stem, info)
    if info["family"] != entry["family"]:
        entry["problems"].append(
            f"is in {entry['family']}/ but its VAE ({info['vae_class_name']}) belongs in "
            f"{info['family']}/"
        )
    card, samples = card_path(path), sample_picture(path)
    if card.is_file():
        entry["card"] = card.relative_to(root).as_posix()
    else:
        entry["problems"].append(f"has no model card ({card.relative_to(root).as_posix()})")
    if samples.is_file():
        entry["samples"] = samples.relative_to(root).as_posix()
    try:
        records = records_for(entry["sha256"], path.parent)
    except EvalError as err:
        entry["problems"].append(f"its eval records cannot be read: {err}")
        records = []
    entry["evals"] = [r for r in records if all(k in r for k in _RECORD_FIELDS)]
    if len(entry["evals"]) < len(records):
        entry["problems"].append(
            f"{len(records) - len(entry['evals'])} of its eval.json records lack "
            f"{', '.join(_RECORD_FIELDS)}: evaluate it again"
        )
    return entry


def _name_problems(stem: str, info: dict[str, Any]) -> list[str]:
    """How the file name disagrees with the checkpoint (architecture, lineage, grammar)."""
    expected = info["name"]
    try:
        named = parse_name(stem)
    except LineageError:
        named = None
    if named is None:
        try:
            arch = str(parse_name("_".join(stem.split("_")[:5])).arch)
        except LineageError:
            return [f"name {stem!r} does not follow the lineage grammar: it should be {expected}"]
        if arch != info["architecture"]:
            return [
                f"name's architecture part {arch} disagrees with its hparams "
                f"({info['architecture']}): it should be named {expected}"
            ]
        return [
            f"name's lineage part {stem.removeprefix(arch).lstrip('_')!r} does not follow the "
            f"lineage grammar: it should be named {expected}"
        ]
    problems = []
    if str(named.arch) != info["architecture"]:
        problems.append(
            f"name's architecture part {named.arch} disagrees with its hparams "
            f"({info['architecture']}): it should be named {expected}"
        )
    named_lineage = str(named).removeprefix(str(named.arch)).lstrip("_")
    if info["lineage_source"] == "the lineage key" and named_lineage != info["lineage"]:
        problems.append(
            f"name's lineage {named_lineage or '(none)'} disagrees with its lineage key "
            f"({info['lineage'] or 'none'}): it should be named {expected}"
        )
    return problems


def build_index(root: str | os.PathLike[str]) -> dict[str, Any]:
    """The index of the collection at ``root`` (nothing written)."""
    from tqdm import tqdm

    root = Path(root)
    if not root.is_dir():
        raise CollectionError(f"collection {root} is not a folder: create it or publish into it")
    paths = list(find_checkpoints(root))
    entries = [
        index_entry(root, p) for p in tqdm(paths, desc="index", unit=" files", mininterval=2.0)
    ]
    _cross_checks(entries)
    for entry in entries:
        entry.pop("parent_evals", None)
    return {"checkpoints": entries, "eval_sets": eval_sets(entries)}


class CollectionError(DalleDataError):
    """A collection folder or a checkpoint folder that cannot be indexed or published."""


def _cross_checks(entries: list[dict[str, Any]]) -> None:
    """Flags that need the whole collection: one name with two contents, missing parents,
    families outside the convention; and parents' scores measured by their children."""
    by_name: dict[str, list[dict[str, Any]]] = defaultdict(list)
    by_sha: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for entry in entries:
        by_name[entry["name"]].append(entry)
        by_sha[entry["sha256"]].append(entry)
    for entry in entries:
        others = [o["path"] for o in by_name[entry["name"]] if o["sha256"] != entry["sha256"]]
        if others:
            entry["problems"].append(
                f"name {entry['name']} is also used by {', '.join(others)} with different contents"
            )
        if entry["family"] not in FAMILIES:
            entry["problems"].append(
                f"family folder {entry['family']}/ is none of {', '.join(FAMILIES)}"
            )
        parent = entry["parent"]
        if parent and parent.get("sha256") not in by_sha:
            entry["problems"].append(
                f"parent {parent.get('name')} (sha256 {str(parent.get('sha256'))[:12]}) is not in "
                "the collection"
            )
        for record in entry.get("parent_evals") or []:
            for parent_entry in by_sha.get((parent or {}).get("sha256", ""), []):
                known = {r["manifest_sha256"] for r in parent_entry["evals"]}
                if record.get("manifest_sha256") not in known:
                    parent_entry["evals"].append(record)


def eval_sets(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One leaderboard per eval set (by manifest sha256): every checkpoint scored on it,
    lowest held-out loss first."""
    boards: dict[str, dict[str, Any]] = {}
    for entry in entries:
        for record in entry["evals"]:
            board = boards.setdefault(
                record["manifest_sha256"],
                {
                    "manifest_sha256": record["manifest_sha256"],
                    "dataset": record["dataset"],
                    "samples": record["samples"],
                    "ranking": [],
                },
            )
            board["ranking"].append(
                {
                    "path": entry["path"],
                    "name": entry["name"],
                    **{k: record.get(k) for k in ("loss", "text_loss", "image_loss")},
                    "bits_per_image_token": record.get("bits_per_image_token"),
                    "clip_score": record.get("clip_score"),
                }
            )
    for board in boards.values():
        board["ranking"].sort(key=lambda r: (r["loss"], r["path"]))
    return sorted(boards.values(), key=lambda b: (b["dataset"], b["manifest_sha256"]))


def write_index(root: str | os.PathLike[str], *, cache_dir: Path | None = None) -> dict[str, Any]:
    """Index the collection at ``root``: write index.json, README.md and lineage.png there.

    A bucket ``root`` is indexed through its local mirror in ``cache_dir``
    (:mod:`dalle_data.collection.mirror`) and gets the same three files, index.json last.
    Returns the index. Reruns on an unchanged collection write the same bytes.
    """
    from dalle_data.collection import mirror
    from dalle_data.collection.lineage_tree import write_lineage_picture
    from dalle_data.collection.readme import write_front_page

    target = locations.normalize(root)
    if isinstance(target, Path):
        folder = target
    else:
        locations.writable(target)
        folder = mirror.sync(target, cache_dir)
    index = build_index(folder)
    picture_problem = write_lineage_picture(folder / LINEAGE_PICTURE, index)
    index["problems"] = [picture_problem] if picture_problem else []
    write_json(folder / INDEX, index)
    write_front_page(folder / FRONT_PAGE, index, picture=picture_problem is None)
    if not isinstance(target, Path):
        mirror.upload_outputs(folder, target, (LINEAGE_PICTURE, FRONT_PAGE, INDEX))
    return index
