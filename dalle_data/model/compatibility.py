"""Does a checkpoint fit a shard set? The checks train-extend and evaluate share.

DALLE-pytorch would only fail on these later (an index error in the text embedding) or
not at all (ids from another tokenizer with the same vocabulary size train and score
silently wrong), so both commands refuse them before the first batch.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from dalle_data.errors import TrainError


def check_compatible(
    path: str | os.PathLike[str],
    ckpt: Mapping[str, Any],
    *,
    tokenizer: Mapping[str, Any],
    image_size: int,
    vae_image_size: int,
) -> None:
    """Refuse shards (``tokenizer`` record, stored ``image_size``) that checkpoint ``path``
    cannot read: another vocabulary, other token ids, or images smaller than its VAE's."""
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
