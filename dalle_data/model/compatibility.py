"""Does a checkpoint fit a shard set? The checks train-extend and evaluate share.

DALLE-pytorch would only fail on these later (an index error in the text embedding) or
not at all (ids from another tokenizer with the same vocabulary size train and score
silently wrong), so both commands refuse them before the first batch.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Protocol

from dalle_data.errors import TrainError
from dalle_data.model.checkpoint import model_int


class ShardFacts(Protocol):
    """What the checks read of a shard set (train's ShardSet, evaluate's EvalSet)."""

    @property
    def tokenizer(self) -> Mapping[str, Any]: ...

    @property
    def image_size(self) -> int: ...


def check_compatible(
    path: str | os.PathLike[str], ckpt: Mapping[str, Any], data: ShardFacts, dalle: Any
) -> None:
    """Refuse shards that checkpoint ``path`` (loaded as ``ckpt``, built as ``dalle``) cannot
    read: another vocabulary, other token ids, or images smaller than its VAE's."""
    tokenizer, image_size = data.tokenizer, data.image_size
    vae_image_size = model_int(dalle, "vae.image_size")
    vocab = ckpt["hparams"].get("num_text_tokens")
    shards_vocab = tokenizer.get("vocab_size")
    if vocab != shards_vocab:
        raise TrainError(
            f"the shards were tokenized with {tokenizer.get('spec')!r} "
            f"({shards_vocab} tokens) but checkpoint {path} has num_text_tokens={vocab}: "
            "rebuild the shards with the checkpoint's tokenizer (config `tokenizer`) or pick "
            "a checkpoint built for this vocabulary"
        )
    recorded = (ckpt.get("tokenizer") or {}).get("fingerprint")
    if recorded and recorded != tokenizer.get("fingerprint"):
        raise TrainError(
            f"the shards' tokenizer {tokenizer.get('spec')!r} has the checkpoint's vocabulary "
            f"size but not its token ids (fingerprint {tokenizer.get('fingerprint')} vs "
            f"the checkpoint's {recorded}): rebuild the shards with the tokenizer recorded in "
            f"{path}"
        )
    if image_size < vae_image_size:
        raise TrainError(
            f"the shards hold {image_size}px images but the VAE of {path} needs "
            f"{vae_image_size}px: rebuild the shards with image_size >= {vae_image_size} "
            "(crops are only resized down)"
        )
