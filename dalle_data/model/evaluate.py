"""``evaluate``: a checkpoint's held-out losses on an eval shard set, stored in ``eval.json``.

The losses are DALLE-pytorch 1.6.6's own (``DALLE.forward(..., return_loss=True)``): text
cross-entropy over the ``text_seq_len`` caption positions (padding included, each pad
position with its own id), image cross-entropy over the image tokens, and their weighted
sum ``(text + w * image) / (w + 1)`` with the checkpoint's ``loss_img_weight``. They are
computed per sample from DALLE's logits and averaged over every sample of the set in
float64, so the result does not depend on the batch size (DALLE's own loss is a batch
mean). Images are centre-cropped and read in manifest order, and the VAE encodes them in
fixed chunks of :data:`VAE_CHUNK` whatever the batch size, so the image tokens (an argmax)
are the same in every run.

``eval.json`` beside a checkpoint is a list of records, one per (checkpoint sha256, eval
manifest sha256): scores on different eval sets are never mixed, and a folder holding
several checkpoints (the seed's ``<family>/<name>.pt`` layout) keeps them apart.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from dalle_data import locations
from dalle_data.atomic import write_json
from dalle_data.errors import DalleDataError
from dalle_data.formats.manifest import MANIFEST, read_manifest, shard_problem
from dalle_data.formats.webdataset import sample_layouts
from dalle_data.hashing import sha256_file
from dalle_data.model import checkpoint as ckpt_io
from dalle_data.model.compatibility import check_compatible
from dalle_data.model.loader import decode_crop, pad_tokens, read_tokens
from dalle_data.model.shard_cache import local_folder

EVAL_RECORD = "eval.json"
EVAL_SPLIT_DIR = "eval"
# Images per VAE call: fixed so the image tokens never depend on --batch-size.
VAE_CHUNK = 16
LOSS_FIELDS = ("text_loss", "image_loss", "loss", "bits_per_image_token")


class EvalError(DalleDataError):
    """An eval shard set that cannot be scored, or an eval.json that cannot be read."""


@dataclass(frozen=True)
class EvalSet:
    """A checked held-out shard set: its folder, identity and shards in manifest order."""

    path: Path
    dataset: str
    split: str | None
    manifest_sha256: str
    tokenizer: dict[str, Any]
    image_size: int
    shards: tuple[Path, ...]
    samples: int


def load_eval_set(path: str | os.PathLike[str]) -> EvalSet:
    """Read an eval shard folder's manifest and check every shard's bytes against it.

    A set whose manifest says ``"split": "train"`` is refused: scores on data a model
    trained on say nothing about which model is better.
    """
    folder = Path(path)
    manifest = read_manifest(folder)
    split = manifest.get("split")
    if split == "train":
        raise EvalError(
            f"{folder} is a training split (manifest.json says split: train): evaluate on the "
            f"held-out shards, {folder.parent / EVAL_SPLIT_DIR}"
        )
    for shard in manifest["shards"]:
        problem = shard_problem(folder / shard["name"], shard)
        if problem:
            raise EvalError(f"{problem} (an eval set is scored only when every shard is intact)")
    samples = sum(int(s["samples"]) for s in manifest["shards"])
    if samples == 0:
        raise EvalError(f"{folder} holds no samples: nothing to evaluate")
    return EvalSet(
        path=folder,
        dataset=manifest["dataset"],
        split=split,
        manifest_sha256=sha256_file(folder / MANIFEST),
        tokenizer=dict(manifest["tokenizer"]),
        image_size=int(manifest["image_size"]),
        shards=tuple(folder / s["name"] for s in manifest["shards"]),
        samples=samples,
    )


def find_eval_split(shards_dirs: Sequence[Path | str]) -> Path | str | None:
    """The held-out split beside training shards: ``<ds>/eval`` next to ``<ds>/shards``
    (folders or bucket URLs); None when there is none, or it is empty (eval_fraction too
    small for the dataset)."""
    for shards in shards_dirs:
        candidate = locations.join(locations.parent(shards), EVAL_SPLIT_DIR)
        manifest = locations.join(candidate, MANIFEST)
        if locations.exists(manifest) and read_manifest(candidate)["counts"]["written"]:
            return candidate
    return None


def _samples(eval_set: EvalSet, image_size: int, text_seq_len: int) -> Iterator[tuple[Any, ...]]:
    """(text ids, uint8 image) of every sample, in manifest order, centre-cropped."""
    for path in eval_set.shards:
        with open(path, "rb") as fh:
            for key, fields in sample_layouts(path):
                try:
                    parts = {}
                    for ext in ("jpg", "tok.npy"):
                        offset, size = fields[ext]
                        fh.seek(offset)
                        parts[ext] = fh.read(size)
                    image = decode_crop(parts["jpg"], image_size, None, (1.0, 1.0))
                    tokens = read_tokens(parts["tok.npy"])
                except (OSError, ValueError, KeyError, SyntaxError) as err:
                    raise EvalError(
                        f"eval shard {path}: sample {key} is unreadable ({err}): rebuild the "
                        "eval split"
                    ) from err
                yield pad_tokens([tokens], text_seq_len)[0], image


def _chunks(
    dalle: Any, eval_set: EvalSet, device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(text, image codes) for every sample, encoded by the VAE in chunks of VAE_CHUNK."""
    image_size = ckpt_io.model_int(dalle, "vae.image_size")
    text_seq_len = ckpt_io.model_int(dalle, "text_seq_len")
    texts: list[np.ndarray] = []
    images: list[np.ndarray] = []

    def encode() -> tuple[torch.Tensor, torch.Tensor]:
        pixels = torch.from_numpy(np.stack(images)).to(device).permute(0, 3, 1, 2).float() / 255
        codes = dalle.vae.get_codebook_indices(pixels)
        text = torch.from_numpy(np.stack(texts)).to(device)
        texts.clear()
        images.clear()
        return text, codes

    for text, image in _samples(eval_set, image_size, text_seq_len):
        texts.append(text)
        images.append(image)
        if len(images) == VAE_CHUNK:
            yield encode()
    if images:
        yield encode()


def _batches(
    chunks: Iterator[tuple[torch.Tensor, torch.Tensor]], batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Re-cut the VAE's fixed chunks into batches of ``batch_size`` for the transformer."""
    text_parts: list[torch.Tensor] = []
    code_parts: list[torch.Tensor] = []
    held = 0
    for text, codes in chunks:
        text_parts.append(text)
        code_parts.append(codes)
        held += len(text)
        while held >= batch_size:
            all_text, all_codes = torch.cat(text_parts), torch.cat(code_parts)
            yield all_text[:batch_size], all_codes[:batch_size]
            text_parts, code_parts = [all_text[batch_size:]], [all_codes[batch_size:]]
            held -= batch_size
    if held:
        yield torch.cat(text_parts), torch.cat(code_parts)


def sample_losses(dalle: Any, text: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """(B, 2) float64 per-sample text and image cross-entropy, as DALLE.forward defines them.

    DALLE 1.6.6 gives each padding position ``i`` the id ``num_text_tokens - text_seq_len
    + i`` (its ``num_text_tokens`` already includes those), predicts the caption after a
    <bos> and the image tokens after the caption, offset by ``num_text_tokens``. Its logits
    mask leaves text positions only text logits and image positions only image logits, so
    each part's softmax is taken over its own slice (the masked logits add exactly 0), which
    keeps memory at a batch's image logits instead of the whole vocabulary per position.
    """
    text_seq_len = ckpt_io.model_int(dalle, "text_seq_len")
    num_text = ckpt_io.model_int(dalle, "num_text_tokens")
    logits = dalle(text, codes)
    pads = torch.arange(text_seq_len, device=text.device) + (num_text - text_seq_len)
    text_labels = torch.where(text == 0, pads, text)
    text_nll = F.cross_entropy(
        logits[:, :text_seq_len, :num_text].transpose(1, 2), text_labels, reduction="none"
    )
    image_nll = F.cross_entropy(
        logits[:, text_seq_len:, num_text:].transpose(1, 2), codes, reduction="none"
    )
    return torch.stack((text_nll.double().mean(dim=1), image_nll.double().mean(dim=1)), dim=1)


@torch.no_grad()
def score(
    dalle: Any,
    eval_set: EvalSet,
    *,
    batch_size: int = 16,
    progress: bool = True,
) -> dict[str, Any]:
    """The held-out losses of ``dalle`` on every sample of ``eval_set`` (see module doc)."""
    if batch_size < 1:
        raise EvalError(f"--batch-size must be at least 1, got {batch_size}")
    device = next(dalle.parameters()).device
    was_training = dalle.training
    dalle.eval()
    totals = torch.zeros(2, dtype=torch.float64)
    seen = 0
    bar = tqdm(
        total=eval_set.samples,
        desc=f"evaluate on {eval_set.dataset} ({eval_set.path.name})",
        unit=" samples",
        disable=not progress,
        mininterval=1.0,
    )
    try:
        for text, codes in _batches(_chunks(dalle, eval_set, device), batch_size):
            totals += sample_losses(dalle, text, codes).sum(dim=0).cpu()
            seen += len(text)
            bar.update(len(text))
    finally:
        bar.close()
        dalle.train(was_training)
    text_loss, image_loss = (float(v) / seen for v in totals)
    weight = float(dalle.loss_img_weight)
    return {
        "dataset": eval_set.dataset,
        "split": eval_set.split,
        "manifest_sha256": eval_set.manifest_sha256,
        "samples": seen,
        "text_loss": text_loss,
        "image_loss": image_loss,
        "loss": (text_loss + weight * image_loss) / (weight + 1),
        "loss_img_weight": weight,
        "bits_per_image_token": image_loss / math.log(2),
        "crop": "centre",
    }


def eval_record_path(checkpoint: str | os.PathLike[str]) -> Path:
    """``eval.json`` beside the checkpoint."""
    return Path(checkpoint).parent / EVAL_RECORD


def read_records(folder: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every record of ``<folder>/eval.json`` ([] without one)."""
    path = Path(folder) / EVAL_RECORD
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise EvalError(f"{path} is not valid JSON ({err}): delete it and evaluate again") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise EvalError(f"{path} is not a list of eval records: delete it and evaluate again")
    return records


def records_for(checkpoint_sha256: str, folder: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of one checkpoint (by content) in ``<folder>/eval.json``."""
    return [
        r
        for r in read_records(folder)
        if (r.get("checkpoint") or {}).get("sha256") == checkpoint_sha256
    ]


def store_record(checkpoint: str | os.PathLike[str], record: Mapping[str, Any]) -> dict[str, Any]:
    """Add ``record`` (of ``checkpoint``) to the eval.json beside it, atomically.

    It replaces the record of the same checkpoint on the same eval set, and records of an
    older file that held this checkpoint's name (their sha256 is no longer this file's).
    """
    path = Path(checkpoint)
    stored = {**record, "checkpoint": {"name": path.stem, "sha256": sha256_file(path)}}
    kept = [
        r
        for r in read_records(path.parent)
        if (r.get("checkpoint") or {}).get("name") != path.stem
        or (
            r["checkpoint"].get("sha256") == stored["checkpoint"]["sha256"]
            and r.get("manifest_sha256") != stored["manifest_sha256"]
        )
    ]
    records = sorted(
        [*kept, stored], key=lambda r: (r["checkpoint"]["name"], r["dataset"], r["manifest_sha256"])
    )
    write_json(eval_record_path(path), records)
    return stored


def cached_record(checkpoint: Path, checkpoint_sha256: str, eval_set: EvalSet) -> dict | None:
    """A record of this checkpoint on this eval set already in the eval.json beside it."""
    for record in records_for(checkpoint_sha256, checkpoint.parent):
        if record.get("manifest_sha256") == eval_set.manifest_sha256:
            return record
    return None


def evaluate_checkpoint(
    checkpoint: str | os.PathLike[str],
    eval_dir: Path | str,
    *,
    batch_size: int = 16,
    device: str = "auto",
    vqgan_model_path: str | os.PathLike[str] | None = None,
    vqgan_config_path: str | os.PathLike[str] | None = None,
    clip: Mapping[str, Any] | None = None,
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    """Score ``checkpoint`` on ``eval_dir``, store the record in eval.json and return it.

    ``clip`` (``model``, ``weights``, ``captions``, ``seed``) adds a CLIP score
    (:mod:`dalle_data.model.clip_score`). A model card beside the checkpoint is updated.
    An ``eval_dir`` URL is read through a copy in ``cache_dir`` (sha256-checked).
    """
    path = Path(checkpoint)
    ckpt = ckpt_io.load_checkpoint(path)
    eval_set = load_eval_set(local_folder(eval_dir, cache_dir))
    dalle = ckpt_io.build_dalle(
        ckpt, vqgan_model_path=vqgan_model_path, vqgan_config_path=vqgan_config_path
    )
    check_compatible(path, ckpt, eval_set, dalle)
    dalle = dalle.to(pick_device(device))
    record = score(dalle, eval_set, batch_size=batch_size)
    if clip is not None:
        from dalle_data.model.clip_score import clip_score

        record.update(clip_score(dalle, eval_set, **clip))
    stored = store_record(path, record)
    refresh_card(path, ckpt)
    return stored


def refresh_card(checkpoint: Path, ckpt: Mapping[str, Any]) -> None:
    """Rewrite the scores in the dalle-data model card beside ``checkpoint``, if it has one."""
    from dalle_data.model.model_card import CARD, refresh_evals

    card = checkpoint.parent / CARD
    if not (card.is_file() and checkpoint.parent.name == checkpoint.stem):
        return
    history = (ckpt.get("lineage") or {}).get("history") or [{}]
    refresh_evals(
        card,
        records_for(sha256_file(checkpoint), checkpoint.parent),
        history[-1].get("parent_evals") or (),
    )


def pick_device(device: str) -> torch.device:
    """``auto``: the first CUDA device when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as err:
        raise EvalError(
            f"--device {device!r} is not a torch device ({err}): use cpu or cuda"
        ) from None


def format_record(record: Mapping[str, Any]) -> str:
    """A record as the aligned text ``dalle-data evaluate`` prints."""
    rows = [
        ("checkpoint", f"{record['checkpoint']['name']} ({record['checkpoint']['sha256'][:12]})"),
        (
            "eval set",
            f"{record['dataset']} ({record['manifest_sha256'][:12]}), {record['samples']} samples",
        ),
        ("text loss", f"{record['text_loss']:.4f} nats/token"),
        ("image loss", f"{record['image_loss']:.4f} nats/token"),
        ("loss", f"{record['loss']:.4f} (image weight {record['loss_img_weight']:g})"),
        ("bits/token", f"{record['bits_per_image_token']:.4f} per image token"),
    ]
    if record.get("clip_score") is not None:
        rows.append(("clip score", f"{record['clip_score']:.4f} ({record['clip']['model']})"))
    return "\n".join(f"{label:<12}{value}" for label, value in rows)


def held_out_split(
    shards_dirs: Sequence[Path | str],
    checkpoint: Path,
    ckpt: Mapping[str, Any],
    dalle: Any,
    cache_dir: Path | None = None,
) -> EvalSet | None:
    """The eval split beside training shards (train-extend's), checked against the
    checkpoint; None when the dataset has none. A bucket's split is read from the cache."""
    found = find_eval_split(shards_dirs)
    if found is None:
        return None
    eval_set = load_eval_set(local_folder(found, cache_dir))
    check_compatible(checkpoint, ckpt, eval_set, dalle)
    return eval_set


def score_parent(
    dalle: Any, parent: Path, parent_sha256: str, eval_set: EvalSet, *, batch_size: int
) -> dict[str, Any]:
    """The parent's record on ``eval_set``: from the eval.json beside it when there, else
    measured (train-extend calls this before training, while ``dalle`` is the parent)."""
    cached = cached_record(parent, parent_sha256, eval_set)
    if cached is not None:
        return cached
    record = score(dalle, eval_set, batch_size=batch_size)
    return {**record, "checkpoint": {"name": parent.stem, "sha256": parent_sha256}}
