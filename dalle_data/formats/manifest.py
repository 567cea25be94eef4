"""``manifest.json``: what a shard folder holds, how it was made, and a check that it still does.

The manifest is the dataset's identity (its sha256 goes into checkpoint lineage), so it
holds no timestamps or host facts: the same inputs give the same bytes. It also closes
the books: ``input_rows = sum(dropped) + sum(failed) + written``, or it is not written.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from dalle_data import locations
from dalle_data.atomic import write_json
from dalle_data.errors import DalleDataError
from dalle_data.formats.webdataset import SampleLayout, sample_layouts
from dalle_data.hashing import sha256_file

MANIFEST = "manifest.json"
VERIFY_RECORD = "verify.json"
SAMPLE_FIELDS = ("jpg", "json", "tok.npy", "txt")
TRAIN_SPLIT, EVAL_SPLIT = "train", "eval"
SPLITS = (TRAIN_SPLIT, EVAL_SPLIT)
# The folder of each split beside the dataset's other outputs, and what finalize writes in
# it besides the shards (read by the dataset card, which must not import the stage).
SPLIT_DIRS = {TRAIN_SPLIT: "shards", EVAL_SPLIT: "eval"}
FAILURES = "failures.parquet"
INDEX = "index.parquet"
EXAMPLES = "duplicate_examples.parquet"
BUILD_RECORD = "build.json"


class ManifestError(DalleDataError):
    """A manifest that is missing, inconsistent, or does not match the shards beside it."""


def check_counts(counts: dict[str, Any]) -> None:
    """Raise unless ``input_rows == sum(dropped) + sum(failed) + written``."""
    dropped = sum(counts["dropped"].values())
    failed = sum(counts["failed"].values())
    total = dropped + failed + counts["written"]
    if counts["input_rows"] != total:
        raise ManifestError(
            f"row accounting does not close: input_rows {counts['input_rows']} != dropped "
            f"{dropped} + failed {failed} + written {counts['written']} (= {total}); some "
            "rows were lost or counted twice: rebuild the metadata and download stages"
        )


def write_manifest(
    shards_dir: Path,
    *,
    dataset: str,
    tokenizer: dict[str, Any],
    image_size: int,
    shards: list[dict[str, Any]],
    counts: dict[str, Any],
    provenance: dict[str, Any] | None = None,
    split: str = TRAIN_SPLIT,
) -> dict[str, Any]:
    """Check the accounting and write ``<shards_dir>/manifest.json`` atomically.

    ``tokenizer`` is the tokenizer's ``record()``; ``shards`` what ``write_shards``
    returned; ``counts`` holds ``input_rows``, ``dropped``, ``failed`` and ``written``;
    ``provenance`` (source hashes, config hash, subset rule) is stored as given; ``split``
    is ``train`` or ``eval`` (the held-out split, which train-extend refuses).
    """
    if split not in SPLITS:
        raise ManifestError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    written = sum(s["samples"] for s in shards)
    if counts["written"] != written:
        raise ManifestError(
            f"counts.written is {counts['written']} but the shards hold {written} samples"
        )
    check_counts(counts)
    manifest = {
        "dataset": dataset,
        "split": split,
        "tokenizer": dict(tokenizer),
        "image_size": image_size,
        "shards": [{k: s[k] for k in ("name", "sha256", "samples", "bytes")} for s in shards],
        "counts": {
            "input_rows": counts["input_rows"],
            "dropped": dict(sorted(counts["dropped"].items())),
            "failed": dict(sorted(counts["failed"].items())),
            "written": written,
        },
        "provenance": provenance or {},
    }
    write_json(Path(shards_dir) / MANIFEST, manifest)
    return manifest


def read_manifest(shards_dir: Path | str) -> dict[str, Any]:
    """Load ``<shards_dir>/manifest.json`` (a folder or a URL), refusing a missing or
    malformed one."""
    path = locations.join(shards_dir, MANIFEST)
    try:
        manifest = json.loads(locations.read_bytes(path).decode("utf-8"))
    except (FileNotFoundError, locations.LocationError):
        raise ManifestError(
            f"{path} does not exist: build the shards first (dalle-data finalize)"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ManifestError(f"{path} is not valid JSON ({err}): rebuild the shards") from None
    missing = [
        k for k in ("dataset", "tokenizer", "image_size", "shards", "counts") if k not in manifest
    ]
    if missing:
        raise ManifestError(f"{path} lacks {', '.join(missing)}: rebuild the shards")
    return manifest


def verify(shards_dir: Path, *, retokenize: int = 0) -> dict[str, Any]:
    """Re-hash and count every shard against the manifest; optionally re-tokenize captions.

    Raises ManifestError naming the first shard that is missing, truncated, altered or
    holds the wrong samples, or a caption whose stored tokens no longer match it.
    Returns a report suitable for ``verify.json``.
    """
    shards_dir = Path(shards_dir)
    manifest = read_manifest(shards_dir)
    total = 0
    layouts: dict[str, list[SampleLayout]] = {}
    for shard in tqdm(manifest["shards"], desc="verify", unit=" shards", mininterval=2.0):
        path = shards_dir / shard["name"]
        problem = shard_problem(path, shard)
        if problem:
            raise ManifestError(problem)
        layouts[shard["name"]] = _complete_samples(path)
        count = len(layouts[shard["name"]])
        if count != shard["samples"]:
            raise ManifestError(
                f"shard {path} holds {count} complete samples, the manifest says {shard['samples']}"
            )
        total += count
    if total != manifest["counts"]["written"]:
        raise ManifestError(
            f"the shards hold {total} samples, counts.written says {manifest['counts']['written']}"
        )
    check_counts(manifest["counts"])
    checked = (
        _retokenize(shards_dir, manifest, layouts, retokenize) if retokenize > 0 and total else 0
    )
    return {
        "dataset": manifest["dataset"],
        "manifest_sha256": sha256_file(shards_dir / MANIFEST),
        "shards": len(manifest["shards"]),
        "samples": total,
        "retokenized": checked,
    }


def shard_problem(path: Path, shard: dict[str, Any]) -> str | None:
    """Why the shard at ``path`` is not the one its manifest entry describes, or None."""
    if not path.is_file():
        return f"shard {path} is missing: rebuild with dalle-data finalize"
    size = path.stat().st_size
    if size < shard["bytes"]:
        return f"shard {path} is truncated ({size} of {shard['bytes']} bytes): rebuild it"
    if size != shard["bytes"] or sha256_file(path) != shard["sha256"]:
        return f"shard {path} was altered (sha256 differs from {MANIFEST}): rebuild it"
    return None


def _complete_samples(path: Path) -> list[SampleLayout]:
    """The samples of a shard from its tar headers alone, refusing one that lacks a field."""
    samples = sample_layouts(path)
    for key, fields in samples:
        missing = [f for f in SAMPLE_FIELDS if f not in fields]
        if missing:
            raise ManifestError(f"shard {path} sample {key} lacks {', '.join(missing)}: rebuild it")
    return samples


def _retokenize(
    shards_dir: Path, manifest: dict[str, Any], layouts: dict[str, list[SampleLayout]], n: int
) -> int:
    """Compare stored ``tok.npy`` with a fresh encoding of ``txt`` for ``n`` spread-out samples."""
    from dalle_data.formats import tokenizers

    recorded = manifest["tokenizer"]
    tokenizer = tokenizers.load(recorded["spec"])
    if tokenizer.fingerprint != recorded["fingerprint"]:
        raise ManifestError(
            f"tokenizer {recorded['spec']!r} now has fingerprint {tokenizer.fingerprint}, the "
            f"shards were tokenized with {recorded['fingerprint']}: restore that tokenizer file "
            "or rebuild the shards"
        )
    total = manifest["counts"]["written"]
    wanted = (
        sorted(set(np.linspace(0, total - 1, num=min(n, total), dtype=np.int64).tolist()))
        if total
        else []
    )
    index = 0
    picked: list[tuple[str, str, str, np.ndarray]] = []
    for shard in manifest["shards"]:
        first, index = index, index + shard["samples"]
        chosen = [i - first for i in wanted if first <= i < index]
        if not chosen:
            continue
        layout = layouts[shard["name"]]
        with open(shards_dir / shard["name"], "rb") as fh:
            for position in chosen:
                key, fields = layout[position]
                txt, tok = _read(fh, fields["txt"]), _read(fh, fields["tok.npy"])
                tokens = np.load(io.BytesIO(tok), allow_pickle=False)
                picked.append((shard["name"], key, txt.decode("utf-8"), tokens))
    fresh = tokenizer.encode_batch([caption for _, _, caption, _ in picked])
    for (name, key, caption, stored), ids in zip(picked, fresh, strict=True):
        if not np.array_equal(np.asarray(ids, dtype=np.int64), stored.astype(np.int64)):
            raise ManifestError(
                f"shard {shards_dir / name} sample {key}: tok.npy does not match its txt "
                f"{caption[:60]!r} under tokenizer {recorded['spec']!r} (caption or tokens "
                "altered after tokenization): rebuild the shards"
            )
    return len(picked)


def _read(fh: Any, where: tuple[int, int]) -> bytes:
    fh.seek(where[0])
    return fh.read(where[1])
