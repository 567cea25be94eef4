"""Caption tokenizers: exactly DALLE-pytorch's token ids, with a stable fingerprint.

Captions are tokenized once, when shards are written, so the ids must be the ones
DALLE-pytorch's tokenizer classes compute, or a model trained on the shards is silently
wrong. ``load(spec)`` takes the ``tokenizer`` config value (``simple``, ``hug:<json>``,
``yttm:<model>``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from dalle_data.compat import import_dalle_pytorch
from dalle_data.hashing import sha256_bytes

ID_DTYPE = np.int32


class TokenizerError(ValueError):
    """A tokenizer spec or file a user must fix; the message names it and the fix."""


class Tokenizer:
    """What shards, manifests and checkpoints need from a tokenizer."""

    kind: str
    spec: str
    vocab_size: int
    fingerprint: str

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Unpadded, untruncated ids per text, equal to the DALLE-pytorch class's ``encode``."""
        raise NotImplementedError

    def record(self) -> dict[str, Any]:
        """The tokenizer's identity for manifests and checkpoints."""
        return {
            "kind": self.kind,
            "vocab_size": self.vocab_size,
            "fingerprint": self.fingerprint,
            "spec": self.spec,
        }


def _fingerprint(kind: str, content: bytes) -> str:
    return sha256_bytes(kind.encode() + b"\0" + content)


def _ids(values: Any) -> np.ndarray:
    return np.asarray(values, dtype=ID_DTYPE).reshape(-1)


class SimpleTokenizer(Tokenizer):
    """DALLE-pytorch's ``SimpleTokenizer`` (OpenAI CLIP BPE, 49408 tokens)."""

    kind = "simple"

    def __init__(self) -> None:
        import_dalle_pytorch()
        from dalle_pytorch import tokenizer as dt

        self._reference = dt.SimpleTokenizer()
        self.spec = "simple"
        self.vocab_size = int(self._reference.vocab_size)
        # The merges file is bundled with dalle-pytorch; its bytes define the vocabulary.
        self.fingerprint = _fingerprint(self.kind, Path(dt.default_bpe()).read_bytes())

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [_ids(self._reference.encode(text)) for text in texts]


class HugTokenizer(Tokenizer):
    """DALLE-pytorch's ``HugTokenizer``: a Hugging Face ``tokenizer.json``."""

    kind = "hug"

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers.processors import ByteLevel

        self.spec = f"hug:{path}"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            tokenizer = HFTokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a bare Exception on bad JSON
            raise TokenizerError(
                f"tokenizer file {path} is not a Hugging Face tokenizer.json ({err}); "
                "train one with `dalle-data train-tokenizer` or point `tokenizer: hug:` at another"
            ) from err
        for setting in ("truncation", "padding"):
            if data.get(setting):
                raise TokenizerError(
                    f"tokenizer file {path} enables {setting}; shards store unpadded, "
                    f"untruncated ids: save it with `{setting}` set to null"
                )
        # HugTokenizer replaces any post-processor (so no special tokens are added).
        tokenizer.post_processor = ByteLevel(trim_offsets=True)
        self._tokenizer = tokenizer
        self.vocab_size = int(tokenizer.get_vocab_size())
        # Only what decides the ids, serialized canonically: independent of file
        # formatting, paths and the library version that wrote the file.
        identity = {key: data.get(key) for key in ("added_tokens", "normalizer", "pre_tokenizer")}
        identity["model"] = data.get("model")
        canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        self.fingerprint = _fingerprint(self.kind, canonical.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [_ids(enc.ids) for enc in self._tokenizer.encode_batch(list(texts))]


class YttmTokenizer(Tokenizer):
    """DALLE-pytorch's ``YttmTokenizer``: a YouTokenToMe BPE model."""

    kind = "yttm"

    def __init__(self, path: Path) -> None:
        import youtokentome as yttm

        self.spec = f"yttm:{path}"
        try:
            content = path.read_bytes()
            self._bpe = yttm.BPE(model=str(path))
        except (OSError, ValueError) as err:
            raise TokenizerError(
                f"tokenizer file {path} is not a YouTokenToMe model ({err}); "
                "point `tokenizer: yttm:` at a model written by `yttm.BPE.train`"
            ) from err
        self._output_type = yttm.OutputType.ID
        self.vocab_size = int(self._bpe.vocab_size())
        self.fingerprint = _fingerprint(self.kind, content)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        if not texts:
            return []
        encoded = self._bpe.encode(list(texts), output_type=self._output_type)
        return [_ids(ids) for ids in encoded]


def load(spec: str) -> Tokenizer:
    """The tokenizer for a config value: ``simple``, ``hug:<path>`` or ``yttm:<path>``."""
    if spec == "simple":
        return SimpleTokenizer()
    kind, sep, location = spec.partition(":")
    if not sep or kind not in ("hug", "yttm") or not location:
        raise TokenizerError(
            f"tokenizer spec {spec!r} is not understood: use `simple`, "
            "`hug:<path/to/tokenizer.json>` or `yttm:<path/to/model>`"
        )
    path = Path(location)
    if not path.is_file():
        raise TokenizerError(
            f"tokenizer file {path} (from spec {spec!r}) does not exist: build it first "
            "(`dalle-data train-tokenizer` for hug:) or fix the path in the config"
        )
    return HugTokenizer(path) if kind == "hug" else YttmTokenizer(path)
