"""The model card (README.md beside a checkpoint), in the shape of the DALLE-models README.

It opens with Hugging Face Hub front matter (``library_name``, ``tags``, ``datasets``,
``base_model`` naming the parent, held-out scores as ``model-index``) so machines can read
what people read below it. ``dalle-data evaluate`` rewrites only the scores: the front
matter's ``model-index`` and the body section between :data:`EVALS_START` and
:data:`EVALS_END`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from dalle_data.atomic import atomic_open

CARD = "README.md"
EVALS_START = "<!-- held-out evaluation (dalle-data evaluate rewrites this section) -->"
EVALS_END = "<!-- end of held-out evaluation -->"
# (record field, model-index metric type, what it is), in the order tables show them.
METRICS = (
    ("loss", "loss", "held-out loss (DALLE-pytorch's weighted sum)"),
    ("text_loss", "text_cross_entropy", "held-out text cross-entropy"),
    ("image_loss", "image_cross_entropy", "held-out image cross-entropy"),
    ("bits_per_image_token", "bits_per_image_token", "bits per image token"),
    ("clip_score", "clip_score", "CLIP score"),
)


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
    evals: Sequence[Mapping[str, Any]] = (),
) -> str:
    """Markdown for a checkpoint whose last training step is ``history[-1]``.

    ``evals`` are its eval.json records; the parent's scores on the same eval sets come
    from ``history[-1]["parent_evals"]`` (train-extend measures them before training).
    """
    step = history[-1]
    rows = "\n".join(
        f"| {i + 1} | {h['dataset']} | {h['epochs']} | {h['steps']} | "
        f"`{h['parent']['name']}` | `{', '.join(s[:12] for s in h['manifest_sha256'])}` |"
        for i, h in enumerate(history)
    )
    tok = step.get("tokenizer") or {}
    metadata = {
        "library_name": "dalle-pytorch",
        "pipeline_tag": "text-to-image",
        "tags": ["dalle-pytorch", "dalle-data", "text-to-image", family, vae_class_name],
        "datasets": list(dict.fromkeys(h["dataset"] for h in history)),
        "base_model": step["parent"]["name"],
    }
    parts = [
        front_matter(metadata, name, evals),
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
        evals_section(evals, step.get("parent_evals") or ()),
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


def model_index(name: str, evals: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The Hub's ``model-index``: one result per eval set, its scores as metrics."""
    results = [
        {
            "task": {"type": "text-to-image", "name": "held-out evaluation"},
            "dataset": {
                "name": f"{r['dataset']} eval split",
                "type": r["dataset"],
                "split": r.get("split") or "eval",
                "revision": r["manifest_sha256"],
            },
            "metrics": [
                {"type": metric, "value": round(float(r[field]), 6), "name": what}
                for field, metric, what in METRICS
                if r.get(field) is not None
            ],
        }
        for r in evals
    ]
    return [{"name": name, "results": results}] if results else []


def front_matter(metadata: Mapping[str, Any], name: str, evals: Sequence[Mapping[str, Any]]) -> str:
    """The YAML block the Hub reads, between ``---`` lines."""
    data = dict(metadata)
    index = model_index(name, evals)
    if index:
        data["model-index"] = index
    return f"---\n{yaml.safe_dump(data, sort_keys=False, allow_unicode=True)}---\n"


def evals_section(
    evals: Sequence[Mapping[str, Any]], parent_evals: Sequence[Mapping[str, Any]]
) -> str:
    """The body's held-out scores, beside the parent's on the same eval set when known."""
    lines = [EVALS_START, "## Held-out evaluation", ""]
    if not evals:
        lines += [
            "Not evaluated yet: `dalle-data evaluate <checkpoint> --shards <dataset>/eval` "
            "scores it on a held-out split and fills this section.",
        ]
    else:
        parents = {r["manifest_sha256"]: r for r in parent_evals}
        lines += [
            "Mean per-sample cross-entropy (nats per token) on every sample of each held-out "
            "set, centre-cropped, in a fixed order (`eval.json` has the full records). The "
            "parent's scores are measured on the same set before training.",
            "",
            "| eval set | samples | loss | parent loss | text | image | bits / image token "
            "| CLIP score |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in evals:
            parent = parents.get(r["manifest_sha256"])
            clip = f"{r['clip_score']:.4f}" if r.get("clip_score") is not None else "-"
            parent_loss = f"{parent['loss']:.4f}" if parent else "-"
            lines.append(
                f"| {r['dataset']} (`{r['manifest_sha256'][:12]}`) | {r['samples']} | "
                f"**{r['loss']:.4f}** | {parent_loss} | "
                f"{r['text_loss']:.4f} | {r['image_loss']:.4f} | "
                f"{r['bits_per_image_token']:.4f} | {clip} |"
            )
    return "\n".join([*lines, "", EVALS_END])


def refresh_evals(
    path: Path, evals: Sequence[Mapping[str, Any]], parent_evals: Sequence[Mapping[str, Any]]
) -> None:
    """Rewrite the scores of an existing card (front matter and section), keep the rest."""
    text = Path(path).read_text(encoding="utf-8")
    metadata: dict[str, Any] = {}
    if text.startswith("---\n") and "\n---\n" in text[3:]:
        head, text = text[4:].split("\n---\n", 1)
        metadata = yaml.safe_load(head) or {}
    title = text.split("\n", 1)[0].removeprefix("# ").strip()
    metadata.pop("model-index", None)
    section = evals_section(evals, parent_evals)
    if EVALS_START in text and EVALS_END in text:
        before, rest = text.split(EVALS_START, 1)
        text = before + section + rest.split(EVALS_END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    with atomic_open(path, "w", encoding="utf-8") as fh:
        fh.write(front_matter(metadata, title, evals) + text)
