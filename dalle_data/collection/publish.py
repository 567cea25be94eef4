"""``publish``: put a train-extend output folder into a collection, atomically, then re-index.

The folder is copied to a hidden temporary folder beside its destination, every copied
file's sha256 is checked against the source, and the folder is renamed into place in one
step: a reader (or a kill -9) never sees half a checkpoint under its final name. A name
already published with the same checkpoint is a no-op; with a different one, refused.

Into a bucket, each file is one complete upload, the checkpoint and lineage.json last (a
folder without its checkpoint is not indexed, and publishing again completes it); each
object is then read back, into the collection's mirror, and its sha256 checked.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from dalle_data import locations
from dalle_data.atomic import DIR_MODE
from dalle_data.collection.index import CollectionError, write_index
from dalle_data.collection.mirror import fetch
from dalle_data.hashing import sha256_file
from dalle_data.model import checkpoint as ckpt_io
from dalle_data.model.train import LINEAGE


def _checkpoint_of(folder: Path) -> Path:
    """``<folder>/<folder name>.pt``, or why the folder is not a train-extend output."""
    if not folder.is_dir():
        raise CollectionError(
            f"{folder} is not a folder: pass a train-extend output folder (<family>/<name>/)"
        )
    checkpoint = folder / f"{folder.name}.pt"
    if not checkpoint.is_file():
        found = sorted(p.name for p in folder.glob("*.pt"))
        raise CollectionError(
            f"{folder} holds no {checkpoint.name} (found: {', '.join(found) or 'no .pt file'}); "
            "pass the folder train-extend wrote, <output_dir>/<family>/<name>/"
        )
    return checkpoint


def publish(
    checkpoint_dir: str | os.PathLike[str],
    root: str | os.PathLike[str],
    *,
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    """Copy ``checkpoint_dir`` to ``root/<family>/<name>/`` and re-index ``root`` (a folder
    or a bucket URL, whose mirror lives in ``cache_dir``).

    Returns ``{"path", "published": bool, "index"}``; ``published`` is False when the same
    checkpoint was already there.
    """
    source = Path(checkpoint_dir)
    checkpoint = _checkpoint_of(source)
    info = ckpt_io.summary(ckpt_io.load_checkpoint(checkpoint), file_name=checkpoint.name)
    name = checkpoint.stem
    if info["name"] != name:
        raise CollectionError(
            f"{checkpoint} is named {name} but its hparams and lineage make it {info['name']}: "
            "rename the folder and file before publishing"
        )
    target = locations.normalize(root)
    if isinstance(target, Path):
        target.mkdir(parents=True, exist_ok=True)
        published = _copy_in(source, checkpoint, target / info["family"] / name)
    else:
        locations.writable(target)
        published = _upload(source, checkpoint, target, f"{info['family']}/{name}", cache_dir)
    index = write_index(target, cache_dir=cache_dir)
    path = locations.join(target, info["family"], name, checkpoint.name)
    return {"path": path, "published": published, "index": index}


def _upload(source: Path, checkpoint: Path, root: str, folder: str, cache_dir: Path | None) -> bool:
    """Upload the folder's files to ``root/folder`` and read each back to check it; False
    if the same checkpoint is already there."""
    wanted = sha256_file(checkpoint)
    existing = locations.join(root, folder, checkpoint.name)
    if locations.exists(existing):
        return _already_there(existing, wanted)
    destination = locations.join(root, folder)
    locations.put_tree(source, destination, last=(checkpoint.name, LINEAGE))
    for path in sorted(p for p in source.iterdir() if p.is_file() and not p.name.startswith(".")):
        copied = fetch(root, f"{folder}/{path.name}", cache_dir)
        expected = wanted if path == checkpoint else sha256_file(path)
        if copied != expected:
            for name in (checkpoint.name, LINEAGE):  # no longer a finished folder
                locations.remove(locations.join(destination, name))
            raise CollectionError(
                f"{path} arrived in {destination} with different bytes (sha256 {copied[:12]} "
                f"instead of {expected[:12]}): publish again"
            )
    return True


def _copy_in(source: Path, checkpoint: Path, destination: Path) -> bool:
    """Copy the folder's files (hidden ones skipped) to ``destination`` atomically; False
    if the same checkpoint is already there."""
    wanted = sha256_file(checkpoint)
    if destination.exists():
        return _already_there(destination / checkpoint.name, wanted)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))
    try:
        files = sorted(p for p in source.iterdir() if p.is_file() and not p.name.startswith("."))
        for path in files:
            shutil.copyfile(path, staging / path.name)
            with open(staging / path.name, "rb") as fh:
                os.fsync(fh.fileno())
            copied = sha256_file(staging / path.name)
            expected = wanted if path == checkpoint else sha256_file(path)
            if copied != expected:
                raise CollectionError(
                    f"copying {path} gave different bytes (sha256 {copied[:12]} instead of "
                    f"{expected[:12]}): check the disk and publish again"
                )
        os.chmod(staging, DIR_MODE)
        try:
            os.rename(staging, destination)
        except OSError:
            if destination.exists():  # another publish of this name won the race
                return _already_there(destination / checkpoint.name, wanted)
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return True


def _already_there(existing: Path | str, wanted: str) -> bool:
    what = "other files"
    if locations.exists(existing):
        digest = locations.sha256(existing)
        if digest == wanted:
            return False
        what = f"a different checkpoint (sha256 {digest[:12]})"
    raise CollectionError(
        f"{locations.parent(existing)} already holds {what} under this name: the collection "
        "keeps one checkpoint per name; remove that folder first if it should be replaced"
    )
