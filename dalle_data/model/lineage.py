"""Checkpoint names: ``<depth>L_<dim_head>HD_<heads>H_<dim>I_<text_seq_len>T[_<lineage>]``.

The grammar follows the DALLE-models naming convention (../shared/DESIGN.md, "Lineage
names"). Only canonical spellings are valid, so ``str(parse_name(n)) == n`` for every
valid ``n``; a near miss (``cc12m-1E`` alone, ``1.50E``, ``CC12M``) is refused with the
canonical spelling as a suggestion, found by a lenient parse of the same text.

- Architecture: five positive integers without leading zeros, always in this order.
- Lineage, one dataset: ``cc12m_1E``. Several, in training order: ``cc12m-2E_wit-1E``.
  Two consecutive segments never name the same dataset (they would have been merged).
- Epochs: a positive number with at most two decimals, no leading or trailing zeros
  (``1E``, ``0.5E``, ``12.25E``), then an upper-case ``E``.
- Dataset names: ``[a-z0-9]+``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any

from dalle_data.errors import CheckpointError, DalleDataError

FAMILIES = ("taming", "openai", "custom")
"""Folder names of the DALLE-models collection, one per VAE kind."""

EXAMPLE = "12L_64HD_8H_512I_128T_cc12m-2E_wit-1E"
_HELP = (
    f"a valid name looks like {EXAMPLE}, 12L_64HD_8H_512I_128T_cc12m_1E or, "
    "with no lineage part, 12L_64HD_8H_512I_128T"
)

_DATASET = re.compile(r"[a-z0-9]+")
_EPOCHS_LENIENT = re.compile(r"(\d*\.?\d+)[eE]")
_ARCH_FIELDS = (
    ("depth", "L"),
    ("dim_head", "HD"),
    ("heads", "H"),
    ("dim", "I"),
    ("text_seq_len", "T"),
)
_ARCH_TOKEN = re.compile(r"(\d+)(L|HD|H|I|T)", re.IGNORECASE)
_CENT = Decimal("0.01")
# Far beyond any real run, and small enough that quantizing to 0.01 never overflows.
_MAX_EPOCHS = Decimal(10) ** 9

# DALLE-pytorch 1.6.6's constructor defaults, for hparams written without them.
_HPARAM_DEFAULTS = {"heads": 8, "dim_head": 64, "text_seq_len": 256}


class LineageError(DalleDataError):
    """A model name, lineage or epoch count that does not follow the grammar."""


@dataclass(frozen=True)
class Segment:
    """Epochs trained on one dataset, consecutively."""

    dataset: str
    epochs: Decimal


@dataclass(frozen=True)
class Architecture:
    """The five hparams a name carries; always read from a checkpoint, never a file name."""

    depth: int
    dim_head: int
    heads: int
    dim: int
    text_seq_len: int

    @classmethod
    def from_hparams(cls, hparams: Mapping[str, Any]) -> Architecture:
        """The architecture of a DALLE-pytorch ``hparams`` dict (DALLE's defaults fill gaps)."""
        values = {}
        for field, _ in _ARCH_FIELDS:
            value = hparams.get(field, _HPARAM_DEFAULTS.get(field))
            if value is None:
                raise LineageError(f"hparams has no {field!r}; DALLE needs it to build the model")
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LineageError(f"hparams {field}={value!r} is not a positive integer")
            values[field] = value
        return cls(**values)

    def __str__(self) -> str:
        return "_".join(f"{getattr(self, field)}{suffix}" for field, suffix in _ARCH_FIELDS)


@dataclass(frozen=True)
class ModelName:
    """Architecture plus lineage: everything a checkpoint's file name says."""

    arch: Architecture
    lineage: tuple[Segment, ...] = ()

    def __str__(self) -> str:
        return model_name(self.arch, self.lineage)


def format_epochs(epochs: Decimal) -> str:
    """``Decimal("0.50")`` -> ``"0.5"``; refuses counts <= 0 or with more than two decimals."""
    value = _as_decimal(epochs)
    if not value > 0:
        raise LineageError(f"epoch count {epochs} must be greater than 0")
    if value != value.quantize(_CENT):
        raise LineageError(
            f"epoch count {epochs} has more than two decimals; names keep at most two "
            "(extend() rounds to 0.01)"
        )
    text = f"{value.quantize(_CENT):f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def format_lineage(segments: Iterable[Segment]) -> str:
    """The lineage part of a name: ``""``, ``cc12m_1E`` or ``cc12m-2E_wit-1E``."""
    segments = tuple(segments)
    for seg in segments:
        _check_dataset(seg.dataset)
    for before, after in zip(segments, segments[1:], strict=False):
        if before.dataset == after.dataset:
            raise LineageError(
                f"consecutive segments on {before.dataset!r} must be merged into one "
                "(use extend() to build lineages)"
            )
    if len(segments) == 1:
        return f"{segments[0].dataset}_{format_epochs(segments[0].epochs)}E"
    return "_".join(f"{seg.dataset}-{format_epochs(seg.epochs)}E" for seg in segments)


def model_name(arch: Architecture, segments: Iterable[Segment]) -> str:
    """``<arch>`` or ``<arch>_<lineage>``."""
    lineage = format_lineage(segments)
    return f"{arch}_{lineage}" if lineage else str(arch)


def extend(
    segments: Iterable[Segment], dataset: str, epochs: Decimal | int | str
) -> tuple[Segment, ...]:
    """The lineage after training ``epochs`` more on ``dataset``.

    Epochs are rounded to 0.01 first (an extension that rounds to 0 is an error). The
    same dataset as the last segment adds to it; any other dataset, including a return
    to an earlier one, appends a new segment.
    """
    _check_dataset(dataset)
    value = _as_decimal(epochs)
    rounded = value.quantize(_CENT, rounding=ROUND_HALF_UP)
    if not rounded > 0:
        raise LineageError(
            f"cannot extend a lineage by {epochs} epochs of {dataset!r}: it rounds to "
            f"{rounded}, and names count epochs in steps of 0.01 (train at least 0.005 epochs)"
        )
    segments = tuple(segments)
    if segments and segments[-1].dataset == dataset:
        last = segments[-1]
        return (*segments[:-1], Segment(dataset, _normal(last.epochs + rounded)))
    return (*segments, Segment(dataset, _normal(rounded)))


def parse_lineage(text: str) -> tuple[Segment, ...]:
    """Segments of a canonical lineage part (``""`` -> ``()``)."""
    segments = _lenient_lineage(text, text)
    canonical = format_lineage(segments)
    if canonical != text:
        raise LineageError(f"lineage {text!r} is not in canonical form; write it as {canonical!r}")
    return segments


def parse_name(name: str) -> ModelName:
    """Parse ``[family/]<arch>[_<lineage>][.pt]``; refuse anything not canonical."""
    stem = _strip_name(name)
    tokens = stem.split("_")
    arch_tokens, rest = tokens[:5], tokens[5:]
    arch = _lenient_arch(name, arch_tokens)
    segments = _lenient_lineage(name, "_".join(rest)) if rest else ()
    canonical = model_name(arch, segments)
    if canonical != stem:
        raise LineageError(
            f"model name {name!r} is not in canonical form; did you mean {canonical!r}? ({_HELP})"
        )
    return ModelName(arch, segments)


def _strip_name(name: str) -> str:
    stem = name.removesuffix(".pt")
    if "/" in stem:
        family, _, stem = stem.partition("/")
        if family not in FAMILIES or "/" in stem:
            raise LineageError(
                f"model name {name!r}: the only prefix allowed is a family folder "
                f"({', '.join(f + '/' for f in FAMILIES)}); pass the file name itself"
            )
    if not stem:
        raise LineageError(f"model name {name!r} is empty; {_HELP}")
    return stem


def _lenient_arch(name: str, tokens: list[str]) -> Architecture:
    """The architecture, tolerating case, leading zeros and field order, for suggestions."""
    found: dict[str, int] = {}
    for token in tokens:
        match = _ARCH_TOKEN.fullmatch(token)
        if match is None:
            break
        suffix = match.group(2).upper()
        field = next(f for f, s in _ARCH_FIELDS if s == suffix)
        if field in found:
            break
        found[field] = int(match.group(1))
    if len(found) < len(_ARCH_FIELDS):
        missing = [f"<{f}>{s}" for f, s in _ARCH_FIELDS if f not in found]
        raise LineageError(
            f"model name {name!r} does not start with the five architecture fields "
            f"<depth>L_<dim_head>HD_<heads>H_<dim>I_<text_seq_len>T (missing or malformed: "
            f"{', '.join(missing)}); {_HELP}"
        )
    zero = [f for f, value in found.items() if value == 0]
    if zero:
        raise LineageError(f"model name {name!r}: {zero[0]} is 0; architecture fields are >= 1")
    return Architecture(**found)


def _lenient_lineage(name: str, text: str) -> tuple[Segment, ...]:
    """Segments from ``text``, accepting ``-``/``_`` anywhere, ``e``, and unmerged repeats."""
    if text == "":
        return ()
    tokens = re.split(r"[-_]", text)
    if len(tokens) % 2:
        raise LineageError(
            f"lineage {text!r} in {name!r} does not pair each dataset with an epoch count "
            f"(<dataset>_<epochs>E for one dataset, <dataset>-<epochs>E_... for several; "
            f"dataset names have no '-' or '_'); {_HELP}"
        )
    segments: tuple[Segment, ...] = ()
    for dataset, count in zip(tokens[::2], tokens[1::2], strict=True):
        if _DATASET.fullmatch(dataset.lower()) is None:
            raise LineageError(
                f"dataset name {dataset!r} in {name!r} must match [a-z0-9]+ "
                "(lower-case letters and digits only)"
            )
        match = _EPOCHS_LENIENT.fullmatch(count)
        if match is None:
            raise LineageError(
                f"epoch count {count!r} in {name!r} must be a positive number with at most "
                "two decimals followed by E, such as 1E or 0.5E"
            )
        epochs = _as_decimal(match.group(1))
        if epochs != epochs.quantize(_CENT) or not epochs > 0:
            raise LineageError(
                f"epoch count {count!r} in {name!r} must be greater than 0 with at most two "
                "decimals, such as 1E or 0.25E"
            )
        segments = _append_exact(segments, dataset.lower(), epochs)
    return segments


def _append_exact(
    segments: tuple[Segment, ...], dataset: str, epochs: Decimal
) -> tuple[Segment, ...]:
    if segments and segments[-1].dataset == dataset:
        return (*segments[:-1], Segment(dataset, _normal(segments[-1].epochs + epochs)))
    return (*segments, Segment(dataset, _normal(epochs)))


def _check_dataset(dataset: str) -> None:
    if not isinstance(dataset, str) or _DATASET.fullmatch(dataset) is None:
        raise LineageError(
            f"dataset name {dataset!r} must match [a-z0-9]+ (lower-case letters and digits only)"
        )


def _as_decimal(value: Decimal | int | str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, Decimal | int | str | float):
        raise LineageError(f"epoch count {value!r} is not a number")
    try:
        result = Decimal(str(value)) if isinstance(value, float) else Decimal(value)
    except InvalidOperation:
        raise LineageError(f"epoch count {value!r} is not a number") from None
    if not result.is_finite() or abs(result) >= _MAX_EPOCHS:
        raise LineageError(f"epoch count {value!r} is not a number below {_MAX_EPOCHS:,}")
    return result


def _normal(value: Decimal) -> Decimal:
    """One representation per value (``2.50`` -> ``2.5``) so equal segments print alike."""
    normal = value.quantize(_CENT).normalize()
    return normal.quantize(Decimal(1)) if normal == normal.to_integral_value() else normal


# The family folder (``taming/<name>``) of a checkpoint, by its VAE class.
VAE_FAMILIES = {"VQGanVAE": "taming", "OpenAIDiscreteVAE": "openai", "DiscreteVAE": "custom"}


def family(vae_class_name: str) -> str:
    """The DALLE-models family folder of a VAE class: taming, openai or custom."""
    try:
        return VAE_FAMILIES[vae_class_name]
    except KeyError:
        raise CheckpointError(
            f"unknown VAE class {vae_class_name!r}; dalle-data knows "
            f"{', '.join(f'{cls} ({fam})' for cls, fam in VAE_FAMILIES.items())}"
        ) from None
