"""Models loaded on demand, at most ``max_loaded`` per device, least recently used leaving.

A collection can hold more checkpoints than a GPU holds models: nothing is loaded at
start-up, a request loads the model it names, and loading one more than ``max_loaded``
first drops the one used longest ago.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dalle_data.formats import tokenizers
from dalle_data.serve.catalog import Entry, ServeError

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    """A DALLE ready to sample on its device, with the tokenizer it was trained with."""

    name: str
    dalle: nn.Module
    tokenizer: tokenizers.Tokenizer
    text_seq_len: int
    device: str


@dataclass(frozen=True)
class VqganFiles:
    """The VQGAN files taming checkpoints need (None: DALLE-pytorch's ~/.cache/dalle ones)."""

    model_path: Path | None = None
    config_path: Path | None = None


def load_model(entry: Entry, device: str, vqgan: VqganFiles) -> LoadedModel:
    """Load ``entry``'s checkpoint safely and move its DALLE to ``device`` in eval mode."""
    from dalle_data.model import checkpoint as ckpt_io
    from dalle_data.model.checkpoint import model_int

    ckpt = ckpt_io.load_checkpoint(entry.fetch())
    tokenizer = _tokenizer(ckpt, entry)
    dalle = ckpt_io.build_dalle(
        ckpt, vqgan_model_path=vqgan.model_path, vqgan_config_path=vqgan.config_path
    )
    del ckpt
    dalle = dalle.to(device).eval()
    return LoadedModel(
        name=entry.name,
        dalle=dalle,
        tokenizer=tokenizer,
        text_seq_len=model_int(dalle, "text_seq_len"),
        device=device,
    )


def _tokenizer(ckpt: dict[str, Any], entry: Entry) -> tokenizers.Tokenizer:
    """The recorded tokenizer; if its file is not where training left it, the file of the
    same name beside the checkpoint, provided its fingerprint is the recorded one."""
    from dalle_data.model.generate import checkpoint_tokenizer

    try:
        return checkpoint_tokenizer(ckpt)
    except tokenizers.TokenizerError as err:
        recorded = ckpt.get("tokenizer") or {}
        kind, _, location = str(recorded.get("spec", "")).partition(":")
        beside = entry.beside(Path(location).name) if location else None
        if kind not in ("hug", "yttm") or beside is None:
            raise ServeError(f"model {entry.name}: {err}") from None
        tokenizer = checkpoint_tokenizer(ckpt, f"{kind}:{beside}")
        if tokenizer.fingerprint != recorded.get("fingerprint"):
            raise ServeError(
                f"model {entry.name}: {beside} is not the tokenizer it was trained with "
                f"(fingerprint {tokenizer.fingerprint}, recorded {recorded.get('fingerprint')})"
            ) from None
        return tokenizer


class ModelCache:
    """The models loaded on one device; ``get`` loads on a miss and evicts the LRU one."""

    def __init__(
        self, *, device: str, max_loaded: int, load: Callable[[Entry, str], LoadedModel]
    ) -> None:
        if max_loaded < 1:
            raise ServeError(f"--max-loaded must be at least 1, got {max_loaded}")
        self.device = device
        self.max_loaded = max_loaded
        self._load = load
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()  # ``get`` runs in the device's worker, ``names`` anywhere

    def get(self, entry: Entry) -> tuple[LoadedModel, bool]:
        """The model for ``entry`` and whether this call loaded it."""
        with self._lock:
            model = self._models.get(entry.name)
            if model is not None:
                self._models.move_to_end(entry.name)
                return model, False
            while len(self._models) >= self.max_loaded:
                gone, _ = self._models.popitem(last=False)
                log.info("%s: unloaded %s (--max-loaded %d)", self.device, gone, self.max_loaded)
        _release_memory(self.device)
        log.info("%s: loading %s", self.device, entry.name)
        model = self._load(entry, self.device)
        with self._lock:
            self._models[entry.name] = model
        return model, True

    def names(self) -> list[str]:
        """Loaded models, least recently used first."""
        with self._lock:
            return list(self._models)


def _release_memory(device: str) -> None:
    """Hand an evicted model's GPU memory back before the next one loads."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()
