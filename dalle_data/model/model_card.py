"""The model card (README.md beside a checkpoint), in the shape of the DALLE-models README."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dalle_data.atomic import atomic_open


def _hparam_block(step: Mapping[str, Any], hparams: Mapping[str, Any]) -> str:
    hyper = step["hyperparameters"]
    attn = tuple(hparams.get("attn_types") or ("full",))
    lines = [
        f"EPOCHS = {step['epochs']}",
        f"BATCH_SIZE = {hyper['batch_size']}",
        f"LEARNING_RATE = {hyper['learning_rate']}",
        f"GRAD_CLIP_NORM = {hyper['clip_grad_norm']}",
        "",
        f'MODEL_DIM = {hparams["dim"]:<22} # model dimension,            "{hparams["dim"]}I"',
        f"TEXT_SEQ_LEN = {hparams['text_seq_len']:<19} # text sequence length,  "
        f'     "{hparams["text_seq_len"]}T"',
        f'DEPTH = {hparams["depth"]:<26} # number of layers,            "{hparams["depth"]}L"',
        f"HEADS = {hparams.get('heads', 8):<26} # number of heads,             "
        f'"{hparams.get("heads", 8)}H"',
        f"DIM_HEAD = {hparams.get('dim_head', 64):<23} # number of head dimensions,  "
        f'"{hparams.get("dim_head", 64)}HD"',
        f"REVERSIBLE = {bool(hparams.get('reversible', False))}",
        f"LOSS_IMG_WEIGHT = {hparams.get('loss_img_weight', 7)}",
        "LR_DECAY = False",
        f"ATTN_TYPES = {attn!r}",
    ]
    return "\n".join(lines)


def render(
    *,
    name: str,
    family: str,
    hparams: Mapping[str, Any],
    vae_class_name: str,
    history: Sequence[Mapping[str, Any]],
    final_loss: float | None,
    prompts: Sequence[str],
    samples_file: str | None,
    quality: Mapping[str, Any] | None = None,
) -> str:
    """Markdown for a checkpoint whose last training step is ``history[-1]``."""
    step = history[-1]
    rows = "\n".join(
        f"| {i + 1} | {h['dataset']} | {h['epochs']} | {h['steps']} | "
        f"`{h['parent']['name']}` | `{', '.join(s[:12] for s in h['manifest_sha256'])}` |"
        for i, h in enumerate(history)
    )
    tok = step.get("tokenizer") or {}
    parts = [
        f"# {name}",
        "",
        f"`{family}/{name}`: a DALLE-pytorch checkpoint ({vae_class_name} image tokens), "
        f"continued from `{step['parent']['name']}` on `{step['dataset']}` by dalle-data. "
        "Load it with DALLE-pytorch's `generate.py --dalle_path` or continue it with "
        "`train_dalle.py --dalle_path` / `dalle-data train-extend`.",
        "",
        "## Hyperparameters",
        "",
        "```",
        _hparam_block(step, hparams),
        "```",
        "",
        f"Final training loss: {final_loss:.4f}" if final_loss is not None else "",
        "",
        "## Datasets and lineage",
        "",
        "Every training step of this checkpoint, oldest first (full record: `lineage.json`).",
        "",
        "| # | dataset | epochs | steps | parent | manifest sha256 |",
        "|---|---|---|---|---|---|",
        rows,
        "",
        f"Tokenizer: `{tok.get('spec', 'unrecorded')}` ({tok.get('vocab_size', '?')} tokens, "
        f"fingerprint `{str(tok.get('fingerprint', '?'))[:16]}`).",
        "",
        "## Generation capabilities and quality",
        "",
    ]
    if quality is not None:
        each = quality["images"] // len(quality["per_colour"])
        parts += [
            f"**{quality['metric']}: {quality['accuracy']:.2f}** "
            f"({quality['correct']} of {quality['images']} images; chance "
            f"{quality['chance']:.2f}). For each colour, {each} "
            f'images for "{quality["prompt"]}" were generated (seed {quality["seed"]}, none '
            "re-drawn); an image counts as correct when the nearest palette colour of most "
            "non-background pixels (background: the border's dominant colour) is the prompted one.",
            "",
            "| colour | correct |",
            "|---|---|",
            *(f"| {c} | {n} / {each} |" for c, n in quality["per_colour"].items()),
            "",
        ]
        if quality.get("grid"):
            parts += [
                "The scored images, one row per colour in the table's order:",
                "",
                f"![colour evaluation]({quality['grid']})",
                "",
            ]
    if samples_file:
        parts += [
            "Samples (one row per prompt):",
            "",
            *(f'* "{p}"' for p in prompts),
            "",
            f"![samples]({samples_file})",
            "",
        ]
    return "\n".join(parts).rstrip() + "\n"


def write_card(path: Path, **kwargs: Any) -> Path:
    """Render the card and write it atomically to ``path``."""
    with atomic_open(path, "w", encoding="utf-8") as fh:
        fh.write(render(**kwargs))
    return Path(path)
