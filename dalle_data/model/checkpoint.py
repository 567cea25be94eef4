"""DALLE-pytorch checkpoints: safe load, legacy upgrade, model rebuild, atomic save.

The file format is DALLE-pytorch 1.6.6 train_dalle.py's ``torch.save`` dict (see
../shared/DESIGN.md, "Checkpoint contract"), so its generate.py and ``--dalle_path``
read what we write, and anyone loads it with ``weights_only=True``. Loading never runs
pickled code: files go through :mod:`safe_pickle`, so early-2021 files with the VAE module
pickled in ``hparams`` load too (only their tensors and plain values are used). torch and
dalle_pytorch are imported inside the functions that need them: ``dalle-data inspect``
and the lineage code stay importable without paying for them.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping
from decimal import Decimal
from importlib.metadata import version as package_version
from operator import attrgetter
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from dalle_data.atomic import atomic_path
from dalle_data.errors import CheckpointError
from dalle_data.model import safe_pickle, vqgan
from dalle_data.model.lineage import (
    Architecture,
    LineageError,
    Segment,
    family,
    format_epochs,
    format_lineage,
    model_name,
    parse_lineage,
    parse_name,
)

if TYPE_CHECKING:
    from torch import nn

_REQUIRED = ("hparams", "vae_params", "weights")
# The only persistent buffer DALLE 1.6.6 keeps (rotary frequencies): not a parameter.
_BUFFERS = frozenset({"transformer.pos_emb"})
_LOSS_PREFIX = "vae.model.loss."
_AXIAL_LEGACY = re.compile(r"^(image_pos_emb\.weights)_(\d+)$")
# A transformer layer's parameters sit under a chain of ``.fn`` wrappers: LayerScale ->
# PreNorm -> [CachedAs -> PreShiftToken] -> CachedAs/NonCached (attention only) -> module.
# DALLE-pytorch added the cache wrappers in 2022; 2021 files have fewer ``fn.`` levels.
_LAYER_CHAIN = re.compile(
    r"^(?P<head>transformer\.layers\.(?:layers\.\d+\.(?P<seq>[01])|blocks\.\d+\.(?P<rev>[fg])\.net)\.)"
    r"(?P<fns>(?:fn\.){2,})(?P<leaf>.+)$"
)
# Early-2021 train_dalle.py pickled the VAE module itself as hparams["vae"].
_PICKLED_VAE_CLASSES = {
    "VQGanVAE1024": "VQGanVAE",
    "VQGanVAE": "VQGanVAE",
    "OpenAIDiscreteVAE": "OpenAIDiscreteVAE",
    "DiscreteVAE": "DiscreteVAE",
}
_PLAIN_PARTS = ("hparams", "vae_params", "opt_state", "scheduler_state")

__all__ = ["CheckpointError"]  # re-exported: callers catch it from here


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a DALLE-pytorch checkpoint without running pickled code, upgraded to 1.6.6.

    Legacy 2021 files (only ``hparams``, ``vae_params``, ``weights``) come back with
    ``shift_tokens``/``rotary_emb`` set to False, axial position keys renamed, layer keys
    moved under the wrappers 1.6.6 adds, ``sparse`` layers as ``full`` (with a warning),
    ``vae.model.loss.*`` dropped and ``vae_class_name`` inferred from the weights (or from
    the class of the VAE pickled in ``hparams["vae"]``, which is then removed).
    """
    path = Path(path)
    return checkpoint_from(safe_pickle.load(path, what="checkpoint").obj, path)


def checkpoint_from(ckpt: Any, path: Path) -> dict[str, Any]:
    """:func:`load_checkpoint` for an object already read from ``path``; errors name it."""
    try:
        return _checked(ckpt, path)
    except CheckpointError as err:
        if str(path) in str(err):
            raise
        raise CheckpointError(f"checkpoint {path}: {err}") from None


def _checked(ckpt: Any, path: Path) -> dict[str, Any]:
    if not isinstance(ckpt, dict):
        raise CheckpointError(
            f"{path} holds a {type(ckpt).__name__}, not a DALLE-pytorch checkpoint dict "
            "(expected keys hparams, vae_params, weights)"
        )
    missing = [key for key in _REQUIRED if key not in ckpt]
    if missing:
        raise CheckpointError(
            f"{path} is not a DALLE-pytorch checkpoint: it has no {', '.join(missing)} "
            f"(found keys: {', '.join(map(str, ckpt)) or 'none'})"
        )
    if not isinstance(ckpt["hparams"], dict):
        raise CheckpointError(f"{path}: hparams is a {type(ckpt['hparams']).__name__}, not a dict")
    ckpt = _without_pickled_vae(ckpt)
    for key in _PLAIN_PARTS:
        _check_plain(ckpt.get(key), key)
    if isinstance(ckpt["weights"], str):
        raise CheckpointError(
            f"{path} is a DeepSpeed auxiliary file without weights ({ckpt['weights']!r}); "
            "consolidate the DeepSpeed checkpoint into a single .pt first"
        )
    if not isinstance(ckpt["weights"], dict):
        raise CheckpointError(
            f"{path}: weights is a {type(ckpt['weights']).__name__}, not a state dict"
        )
    return _upgrade(ckpt, path)


def build_vae(
    ckpt: Mapping[str, Any],
    *,
    vqgan_model_path: str | os.PathLike[str] | None = None,
    vqgan_config_path: str | os.PathLike[str] | None = None,
) -> nn.Module:
    """The checkpoint's VAE: DiscreteVAE from ``vae_params``, VQGanVAE from local files.

    Nothing is downloaded: a VQGAN comes from the given paths or the files DALLE-pytorch
    caches in ~/.cache/dalle, and its training loss (LPIPS, which would fetch VGG16)
    is replaced by taming's DummyLoss.
    """
    from dalle_data.compat import import_dalle_pytorch

    dalle_pytorch = import_dalle_pytorch()
    vae_class = ckpt.get("vae_class_name") or _infer_vae_class(ckpt)
    family(vae_class)
    if vae_class == "DiscreteVAE":
        if not isinstance(ckpt["vae_params"], dict):
            raise CheckpointError("a DiscreteVAE checkpoint needs vae_params as a dict")
        try:
            return dalle_pytorch.DiscreteVAE(**ckpt["vae_params"])
        except TypeError as err:
            raise CheckpointError(f"vae_params do not fit DiscreteVAE: {err}") from None
    if vae_class == "OpenAIDiscreteVAE":
        raise CheckpointError(
            "this checkpoint uses OpenAI's discrete VAE, which DALLE-pytorch only builds on "
            "torch<1.11 and downloads from the internet; dalle-data supports DiscreteVAE "
            "(custom) and VQGanVAE (taming) checkpoints"
        )
    return vqgan.build_vae(*vqgan.vqgan_files(vqgan_model_path, vqgan_config_path))


def build_dalle(
    ckpt: Mapping[str, Any],
    *,
    vqgan_model_path: str | os.PathLike[str] | None = None,
    vqgan_config_path: str | os.PathLike[str] | None = None,
) -> nn.Module:
    """DALLE rebuilt from ``hparams`` (never from a file name), weights loaded strictly."""
    from dalle_data.compat import import_dalle_pytorch

    dalle_pytorch = import_dalle_pytorch()
    vae = build_vae(ckpt, vqgan_model_path=vqgan_model_path, vqgan_config_path=vqgan_config_path)
    try:
        dalle = dalle_pytorch.DALLE(vae=vae, **ckpt["hparams"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"hparams do not fit DALLE-pytorch 1.6.6's DALLE: {err}") from None
    expected = dalle.state_dict()
    weights = ckpt["weights"]
    missing = [key for key in expected if key not in weights]
    unexpected = [key for key in weights if key not in expected]
    resized = [k for k, t in weights.items() if k in expected and t.shape != expected[k].shape]
    if missing or unexpected or resized:
        problems = [
            f"{len(keys)} {what} (first: {', '.join(keys[:3])})"
            for what, keys in (("missing", missing), ("unexpected", unexpected))
            if keys
        ]
        problems += [
            f"{k} is {tuple(weights[k].shape)}, the model has {tuple(expected[k].shape)}"
            for k in resized[:3]
        ]
        raise CheckpointError(
            "the checkpoint's weights do not match the model its hparams describe: "
            f"{'; '.join(problems)}"
        )
    dalle.load_state_dict(weights, strict=True)
    return dalle


def model_int(model: nn.Module, attribute: str) -> int:
    """An int setting DALLE-pytorch keeps as a plain attribute (``"vae.image_size"``).

    torch types every module attribute as ``Tensor | Module`` and dalle_pytorch has no
    annotations, so the one cast lives here instead of at every reader.
    """
    return cast(int, attrgetter(attribute)(model))


def save_checkpoint(
    path: str | os.PathLike[str],
    *,
    hparams: Mapping[str, Any],
    vae_params: Mapping[str, Any] | None,
    vae_class_name: str,
    weights: Mapping[str, Any],
    epoch: int,
    opt_state: Mapping[str, Any] | None,
    scheduler_state: Mapping[str, Any] | None,
    lineage: Mapping[str, Any],
    tokenizer: Mapping[str, Any],
    version: str | None = None,
) -> None:
    """Write train_dalle.py's dict plus ``lineage`` and ``tokenizer``, atomically.

    ``lineage`` and ``tokenizer`` must be plain data (dict, list, str, int, float, bool,
    None) so that ``weights_only`` loading, ours and everyone's, accepts them.
    ``lineage["segments"]`` is the lineage string (``format_lineage``) the name uses.
    """
    import torch

    family(vae_class_name)
    parts = {
        "hparams": hparams,
        "vae_params": vae_params,
        "weights": weights,
        "opt_state": opt_state,
        "scheduler_state": scheduler_state,
        "lineage": lineage,
        "tokenizer": tokenizer,
    }
    for key, value in parts.items():
        _check_plain(value, key)
    segments = lineage.get("segments")
    if segments is not None:
        try:
            parse_lineage(segments)
        except (LineageError, TypeError) as err:
            raise CheckpointError(f"lineage['segments'] {segments!r} is invalid: {err}") from None
    obj = {
        "hparams": dict(hparams),
        "vae_params": None if vae_params is None else dict(vae_params),
        "epoch": epoch,
        "version": version or package_version("dalle-pytorch"),
        "vae_class_name": vae_class_name,
        "weights": dict(weights),
        "opt_state": opt_state,
        "scheduler_state": scheduler_state,
        "lineage": dict(lineage),
        "tokenizer": dict(tokenizer),
    }
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def lineage_segments(ckpt: Mapping[str, Any]) -> tuple[Segment, ...] | None:
    """The segments recorded in the checkpoint's ``lineage`` key, or None if it has none."""
    lineage = ckpt.get("lineage")
    if lineage is None:
        return None
    segments = lineage.get("segments") if isinstance(lineage, dict) else None
    if not isinstance(segments, str):
        raise CheckpointError(
            f"the checkpoint's lineage key has no 'segments' string (got {lineage!r:.200})"
        )
    try:
        return parse_lineage(segments)
    except LineageError as err:
        raise CheckpointError(f"the checkpoint's lineage is invalid: {err}") from None


def summary(ckpt: Mapping[str, Any], *, file_name: str | None = None) -> dict[str, Any]:
    """What ``inspect`` and model cards show: architecture, VAE, lineage, epochs, size, name.

    The lineage comes from the checkpoint's ``lineage`` key; without one (a checkpoint
    from plain DALLE-pytorch), from ``file_name`` if that parses as a lineage name.
    """
    try:
        arch = Architecture.from_hparams(ckpt["hparams"])
    except LineageError as err:
        raise CheckpointError(f"cannot name this checkpoint: {err}") from None
    vae_class = ckpt.get("vae_class_name") or _infer_vae_class(ckpt)
    segments = lineage_segments(ckpt)
    lineage_source = "the lineage key"
    if segments is None:
        segments, lineage_source = _segments_from_file_name(file_name)
    weights = ckpt["weights"]
    dalle_params = sum(
        t.numel() for k, t in weights.items() if not k.startswith("vae.") and k not in _BUFFERS
    )
    total_epochs = sum((seg.epochs for seg in segments), Decimal(0))
    lineage = ckpt.get("lineage")
    return {
        "name": model_name(arch, segments),
        "family": family(vae_class),
        "architecture": str(arch),
        "hparams": {field: getattr(arch, field) for field in arch.__dataclass_fields__},
        "vae_class_name": vae_class,
        "lineage": format_lineage(segments),
        "lineage_source": lineage_source,
        "epochs": format_epochs(total_epochs) if segments else "0",
        "epoch": ckpt.get("epoch"),
        "parameters": dalle_params,
        "vae_parameters": sum(t.numel() for k, t in weights.items() if k.startswith("vae.")),
        "dalle_pytorch_version": ckpt.get("version"),
        "history": lineage.get("history") if isinstance(lineage, dict) else None,
    }


def format_summary(info: Mapping[str, Any]) -> str:
    """``summary()`` as the aligned text ``dalle-data inspect`` prints."""
    arch = ", ".join(f"{field} {value}" for field, value in info["hparams"].items())
    epoch = "" if info["epoch"] is None else f" (epoch counter {info['epoch']})"
    version = info["dalle_pytorch_version"] or "unknown (legacy file, no version key)"
    rows = [
        ("name", info["name"]),
        ("architecture", f"{info['architecture']} ({arch})"),
        ("vae", f"{info['family']} ({info['vae_class_name']})"),
        ("lineage", f"{info['lineage'] or 'none'} (from {info['lineage_source']})"),
        ("epochs", f"{info['epochs']}{epoch}"),
        ("parameters", f"{info['parameters']:,} (+ {info['vae_parameters']:,} in the VAE)"),
        ("dalle-pytorch", version),
    ]
    return "\n".join(f"{label:<14}{value}" for label, value in rows)


def _segments_from_file_name(file_name: str | None) -> tuple[tuple[Segment, ...], str]:
    if file_name is None:
        return (), "nowhere: no lineage key"
    try:
        return parse_name(file_name).lineage, "the file name"
    except LineageError:
        return (), "nowhere: no lineage key and the file name does not parse"


def _without_pickled_vae(ckpt: dict[str, Any]) -> dict[str, Any]:
    """An early-2021 file's hparams without the pickled VAE; its class names the VAE kind."""
    vae = ckpt["hparams"].get("vae")
    if vae is None:
        return ckpt
    pickled = safe_pickle.placeholder_name(vae) or type(vae).__name__
    vae_class = _PICKLED_VAE_CLASSES.get(pickled.rpartition(".")[2])
    if vae_class is None:
        raise CheckpointError(
            f"hparams['vae'] holds a {pickled}, not a VAE DALLE-pytorch knows "
            f"({', '.join(_PICKLED_VAE_CLASSES)})"
        )
    hparams = {k: v for k, v in ckpt["hparams"].items() if k != "vae"}
    return {"vae_class_name": vae_class, **ckpt, "hparams": hparams}


def inspect_file(path: str | os.PathLike[str]) -> tuple[dict[str, Any], str]:
    """What ``dalle-data inspect`` prints for a DALLE checkpoint, VQGAN weights or config."""
    path = Path(path)
    if vqgan.is_vqgan_file(path):
        info = vqgan.describe(path)
        return info, vqgan.format_description(info)
    obj = safe_pickle.load(path, what="checkpoint").obj
    if vqgan.is_vqgan_file(path, obj):
        info = vqgan.describe(path, obj)
        return info, vqgan.format_description(info)
    info = summary(checkpoint_from(obj, path), file_name=path.name)
    return info, format_summary(info)


def _upgrade(ckpt: dict[str, Any], path: Path) -> dict[str, Any]:
    """A copy of ``ckpt`` in DALLE-pytorch 1.6.6's format (legacy keys renamed)."""
    hparams = dict(ckpt["hparams"])
    # 1.6.6 turned both on by default; models saved before they existed had neither.
    hparams.setdefault("shift_tokens", False)
    hparams.setdefault("rotary_emb", False)
    attn_types = hparams.get("attn_types")
    if attn_types is not None:
        as_tuple = (attn_types,) if isinstance(attn_types, str) else tuple(attn_types)
        if "sparse" in as_tuple:
            # DALLE-pytorch's 'sparse' needs DeepSpeed's CUDA kernel; its parameters are
            # those of full attention, so the same weights run with a dense causal mask.
            warnings.warn(
                f"{path}: attn_types {as_tuple} has 'sparse' layers; they run as 'full' "
                "attention (same weights, dense causal pattern; DeepSpeed is not used)",
                stacklevel=3,
            )
        hparams["attn_types"] = tuple("full" if t == "sparse" else t for t in as_tuple)
    import torch

    weights = {}
    for key, tensor in ckpt["weights"].items():
        if not isinstance(key, str) or not isinstance(tensor, torch.Tensor):
            raise CheckpointError(
                f"{path}: weights[{key!r}] is a {type(tensor).__name__}, not a tensor under a "
                "string key; is this a DALLE-pytorch checkpoint?"
            )
        if key.startswith(_LOSS_PREFIX):
            continue
        key = _AXIAL_LEGACY.sub(r"\1.\2", key)
        weights[_wrapper_depth(key, shift_tokens=bool(hparams["shift_tokens"]))] = tensor
    upgraded = {**ckpt, "hparams": hparams, "weights": weights}
    if not upgraded.get("vae_class_name"):
        upgraded["vae_class_name"] = _infer_vae_class(upgraded)
    return upgraded


def _wrapper_depth(key: str, *, shift_tokens: bool) -> str:
    """``key`` with as many ``fn.`` levels as DALLE-pytorch 1.6.6 puts above the module.

    Keys that already match (every file 1.6.6 wrote) are returned unchanged.
    """
    match = _LAYER_CHAIN.match(key)
    if match is None:
        return key
    attention = (match["seq"] or match["rev"]) in ("0", "f")
    depth = 2 + (2 if shift_tokens else 0) + (1 if attention else 0)
    return f"{match['head']}{'fn.' * depth}{match['leaf']}"


def _infer_vae_class(ckpt: Mapping[str, Any]) -> str:
    """Legacy files have no vae_class_name; their weights (which include the VAE's) tell."""
    if ckpt.get("vae_params") is not None:
        return "DiscreteVAE"
    keys = ckpt["weights"].keys()
    if any(k.startswith("vae.model.") for k in keys):
        return "VQGanVAE"
    if any(k.startswith(("vae.enc.", "vae.dec.")) for k in keys):
        return "OpenAIDiscreteVAE"
    raise CheckpointError(
        "cannot tell which VAE this checkpoint uses: no vae_class_name, no vae_params and "
        "no vae.* weights"
    )


def _check_plain(value: Any, where: str, _inside: frozenset[int] = frozenset()) -> None:
    """Refuse values ``torch.load(weights_only=True)`` would reject, naming where they are.

    Checked before writing so a bad value costs nothing and names its place, instead of
    a checkpoint that saves fine and then cannot be loaded safely; and after loading, so
    only plain data from a file is ever used.
    """
    import torch

    if value is None or isinstance(value, bool | int | float | str | torch.Tensor):
        return
    if id(value) in _inside:
        raise CheckpointError(f"{where} contains itself; checkpoints keep trees of plain data")
    inside = _inside | {id(value)}
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str | int):
                raise CheckpointError(f"{where} has a key {key!r:.60} that is not a str or int")
            _check_plain(item, f"{where}[{key!r}]", inside)
        return
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _check_plain(item, f"{where}[{index}]", inside)
        return
    pickled = safe_pickle.placeholder_name(value)
    if pickled is not None:
        raise CheckpointError(
            f"{where} holds a pickled {pickled} object; dalle-data uses only tensors and plain "
            "data from a checkpoint (re-save it without that object)"
        )
    raise CheckpointError(
        f"{where} is a {type(value).__name__}; checkpoints keep only tensors and plain data "
        "(dict, list, tuple, str, int, float, bool, None) so they load without running code"
    )
