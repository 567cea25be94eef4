"""What a training run's output is called, worked out without torch.

Snakemake needs the lineage-named checkpoint path when it parses the workflow, before
anything runs; keeping this free of torch keeps every `snakemake` start fast.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

from dalle_data.errors import TrainError
from dalle_data.model import lineage as lin


def parent_history(
    ckpt: dict[str, Any], path: Path, override: str | None
) -> tuple[tuple[lin.Segment, ...], list[dict[str, Any]], str]:
    """The parent's lineage segments, its recorded history, and its name.

    The lineage is, in order of precedence: ``--parent-lineage``, the checkpoint's own
    ``lineage`` key (written by dalle-data), the lineage part of the file name.
    """
    from dalle_data.model.checkpoint import lineage_segments

    lineage = ckpt.get("lineage")
    recorded = lineage if isinstance(lineage, dict) else {}
    name = recorded.get("name") or path.stem
    history = list(recorded.get("history") or [])
    if override is not None:
        try:
            return lin.parse_lineage(override), history, name
        except lin.LineageError as err:
            raise TrainError(f"--parent-lineage {override!r}: {err}") from err
    segments = lineage_segments(ckpt)
    if segments is not None:
        return segments, history, name
    try:
        return lin.parse_name(name).lineage, history, name
    except lin.LineageError as err:
        raise TrainError(
            f"parent {path}: its name {name!r} does not say what it was trained on ({err}). "
            "Pass --parent-lineage with its datasets and epochs, e.g. --parent-lineage "
            "cc12m_1E, or --parent-lineage '' for a model trained on nothing yet"
        ) from err


def planned_output(
    parent: Path,
    dataset: str,
    epochs: Decimal | float | str,
    output_dir: Path,
    *,
    parent_lineage: str | None = None,
    max_steps: int | None = None,
    presets_dir: Path = Path("configs/models"),
) -> Path:
    """The checkpoint train-extend will write, known before it runs (for Snakemake).

    A parent that does not exist yet must be ``<anything>/<preset>.pt``, the output of
    ``dalle-data init`` for ``<presets_dir>/<preset>.yaml``, whose hparams the preset gives.
    """
    from dalle_data.model import init as presets

    if max_steps is not None:
        raise TrainError(
            "train.max_steps makes the epoch count (and so the output name) depend on the "
            "data size: set train.epochs instead (fractions allowed), or run "
            "`dalle-data train-extend --max-steps` directly"
        )
    parent = Path(parent)
    if parent.is_file():
        from dalle_data.model import checkpoint as ckpt_io

        ckpt = ckpt_io.load_checkpoint(parent)
        segments, _, _ = parent_history(ckpt, parent, parent_lineage)
        arch = lin.Architecture.from_hparams(ckpt["hparams"])
        family = lin.family(ckpt["vae_class_name"])
    else:
        preset = Path(presets_dir) / f"{parent.stem}.yaml"
        if not preset.is_file():
            raise TrainError(
                f"train.parent {parent} does not exist and {preset} is no preset to build it "
                "from: point train.parent at a checkpoint, or at <dir>/<preset>.pt for a "
                f"preset in {presets_dir}"
            )
        arch = lin.Architecture.from_hparams(presets.preset_hparams(presets.load_preset(preset), 1))
        segments = lin.parse_lineage(parent_lineage or "")
        family = presets.preset_family(preset)
    name = lin.model_name(arch, lin.extend(segments, dataset, Decimal(str(epochs))))
    return checkpoint_path(Path(output_dir), family, name)


def checkpoint_path(output_dir: Path, family: str, name: str) -> Path:
    """Where a checkpoint of ``name`` goes: ``<output_dir>/<family>/<name>/<name>.pt``."""
    return output_dir / family / name / f"{name}.pt"
