"""Caption tokenizers: exactly DALLE-pytorch's token ids, with a stable fingerprint.

Captions are tokenized once, when shards are written, so the ids must be the ones
DALLE-pytorch's tokenizer classes compute, or a model trained on the shards is silently
wrong. ``load(spec)`` takes the ``tokenizer`` config value (``simple``, ``hug:<json>``,
``yttm:<model>``).
"""

from __future__ import annotations

import html
import importlib.util
import itertools
import json
import re
from pathlib import Path
from typing import Any

import ftfy
import numpy as np
import regex

from dalle_data.config import tokenizer_file
from dalle_data.errors import DalleDataError
from dalle_data.hashing import sha256_bytes

ID_DTYPE = np.int32
_CLIP_SPECIALS = ("<|startoftext|>", "<|endoftext|>")
# Text ftfy and html.unescape return unchanged: printable ASCII, tab, CR, LF, no `&`.
_ASCII_SAFE = re.compile(r"[\t\n\r\x20-\x25\x27-\x7e]*")


class TokenizerError(DalleDataError):
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


def _check_texts(texts: list[str]) -> None:
    """A clear error for a non-string caption (each library fails its own obscure way)."""
    if all(isinstance(text, str) for text in texts):
        return
    i, bad = next((i, t) for i, t in enumerate(texts) if not isinstance(t, str))
    raise TokenizerError(
        f"caption {i} of the batch is {type(bad).__name__} {bad!r:.60}, not text: "
        "drop or fix that row before tokenizing"
    )


def _fingerprint(kind: str, content: bytes) -> str:
    return sha256_bytes(kind.encode() + b"\0" + content)


def _ids(values: Any) -> np.ndarray:
    return np.asarray(values, dtype=ID_DTYPE).reshape(-1)


# DALLE-pytorch 1.6.6's SimpleTokenizer (dalle_pytorch/tokenizer.py), rebuilt from its
# bundled merges file without importing dalle_pytorch: that module imports torch and
# transformers, about 8 s of start-up for every process that writes or verifies shards.
# tests/test_tokenizers.py proves these equal the reference's functions and vocabulary.
_CLIP_VOCAB_SIZE = 49408
_CLIP_MERGES = 49152 - 256 - 2  # the reference keeps lines 1..this of the merges file
_CLIP_PATTERN = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"""
    r"""[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)


def _clip_bpe_path() -> Path:
    """dalle-pytorch's ``bpe_simple_vocab_16e6.txt``, found without importing the package."""
    spec = importlib.util.find_spec("dalle_pytorch")
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        raise TokenizerError(
            "the `simple` tokenizer needs dalle-pytorch's bundled vocabulary, but dalle_pytorch "
            "is not installed: `pip install dalle-pytorch==1.6.6`"
        )
    return Path(locations[0]) / "data" / "bpe_simple_vocab_16e6.txt"


def _bytes_to_unicode() -> dict[int, str]:
    """The reference's printable stand-in character for every byte."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    bs += range(ord("®"), ord("ÿ") + 1)
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def _clip_vocab(merges_text: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The reference's ``encoder`` (token -> id) and merges in rank order."""
    lines = merges_text.split("\n")[1 : _CLIP_MERGES + 1]
    merges = [(a, b) for a, b in map(str.split, lines)]
    vocab = list(_bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(merge) for merge in merges]
    vocab += list(_CLIP_SPECIALS)
    return dict(zip(vocab, range(len(vocab)), strict=True)), merges


# The reference's word split and whitespace use the `regex` package (its \s and \p{L}
# classes, which differ from re's on some characters).
_CLIP_SPLIT = regex.compile(_CLIP_PATTERN, regex.IGNORECASE)
_CLIP_SPACE = regex.compile(r"\s+")


def _basic_clean(text: str) -> str:
    text = ftfy.fix_text(text)
    return html.unescape(html.unescape(text)).strip()


def _whitespace_clean(text: str) -> str:
    return _CLIP_SPACE.sub(" ", text).strip()


class SimpleTokenizer(Tokenizer):
    """DALLE-pytorch's ``SimpleTokenizer`` (OpenAI CLIP BPE, 49408 tokens), many times faster.

    The reference's regex never matches across whitespace, so a caption's ids are the
    concatenation of the ids of its whitespace-separated chunks. Chunks repeat a lot
    across captions, so each distinct chunk is tokenized once (the reference's split regex,
    then a Rust BPE built from the reference's own vocabulary and merges) and its ids are
    kept in a flat array; a batch is then a few vectorized gathers.

    Getting the chunks costs the reference's clean-up (ftfy, html.unescape twice,
    whitespace collapse, lower-case), except for text of printable ASCII, tab, CR and LF
    without ``&``: ftfy and html.unescape return such text unchanged (a test checks it over
    that alphabet), so its chunks are ``text.lower().split()``.

    So mostly-ASCII captions (cc12m, YFCC) tokenize 6-7x faster than the reference
    (benchmarks/results/tokenize.md); captions that all need ftfy only about 2x. One
    process: forked workers measured no faster on 2 cores, neither for whole batches (each
    must learn the same chunks again) nor for ftfy alone. Not thread-safe: the chunk cache
    is updated in place.
    """

    kind = "simple"
    #: Distinct chunks kept; past this the cache starts over (bounded memory on huge corpora).
    max_cached_chunks = 1_000_000
    #: Captions per step: bounds the temporary lists of a large batch.
    slice_size = 4096

    def __init__(self) -> None:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import pre_tokenizers
        from tokenizers.models import BPE

        self.spec = "simple"
        self.vocab_size = _CLIP_VOCAB_SIZE
        # The merges file is bundled with dalle-pytorch; its bytes define the vocabulary.
        content = _clip_bpe_path().read_bytes()
        self.fingerprint = _fingerprint(self.kind, content)
        encoder, merges = _clip_vocab(content.decode("utf-8"))
        self._split = _CLIP_SPLIT
        model = BPE(vocab=encoder, merges=merges, end_of_word_suffix="</w>")
        self._bpe = HFTokenizer(model)
        # Words arrive already split by the reference regex; each is one BPE word.
        self._bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        self._special_ids = {w: encoder[w] for w in _CLIP_SPECIALS}
        self._reset_cache()

    def _reset_cache(self) -> None:
        self._chunk_index: dict[str, int] = {}
        self._chunk_start = np.zeros(0, dtype=np.int64)
        self._chunk_length = np.zeros(0, dtype=np.int64)
        self._chunk_tokens = np.zeros(0, dtype=ID_DTYPE)

    def _chunks(self, text: str) -> list[str]:
        if _ASCII_SAFE.fullmatch(text):
            return text.lower().split()
        cleaned = _whitespace_clean(_basic_clean(text)).lower()
        return cleaned.split(" ") if cleaned else []

    def _learn(self, chunks: list[str]) -> None:
        """Tokenize distinct new chunks the reference's way and append them to the cache."""
        words = [self._split.findall(chunk) for chunk in chunks]
        flat = list(itertools.chain.from_iterable(words))
        # A word equal to a special token string is that token (the reference's BPE cache
        # says so); no regex word contains one without being equal to it. Such a word goes
        # to the BPE as a one-token stand-in whose id is then overwritten.
        specials = [(i, self._special_ids[w]) for i, w in enumerate(flat) if w in self._special_ids]
        for i, _ in specials:
            flat[i] = "a"
        # One pre-tokenized sequence: each word is one BPE word, as in the reference, and
        # one call avoids the per-sequence overhead of encode_batch.
        encoding = self._bpe.encode(flat, is_pretokenized=True) if flat else None
        tokens = np.asarray(encoding.ids if encoding else [], dtype=ID_DTYPE)
        word_of_token = np.asarray(encoding.word_ids if encoding else [], dtype=np.int64)
        per_word = np.bincount(word_of_token, minlength=len(flat))
        word_start = np.cumsum(per_word) - per_word
        for i, special_id in specials:
            tokens[word_start[i]] = special_id
        words_per_chunk = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
        word_ends = np.concatenate([[0], np.cumsum(per_word)])
        chunk_word_ends = np.cumsum(words_per_chunk)
        lengths = word_ends[chunk_word_ends] - word_ends[chunk_word_ends - words_per_chunk]
        first = len(self._chunk_index)
        self._chunk_index.update(zip(chunks, range(first, first + len(chunks)), strict=True))
        starts = len(self._chunk_tokens) + np.cumsum(lengths) - lengths
        self._chunk_start = np.concatenate([self._chunk_start, starts])
        self._chunk_length = np.concatenate([self._chunk_length, lengths])
        self._chunk_tokens = np.concatenate([self._chunk_tokens, tokens])

    def _chunk_ids(self, chunks: list[str]) -> np.ndarray:
        get = self._chunk_index.get
        ids = np.fromiter(map(get, chunks, itertools.repeat(-1)), dtype=np.int64, count=len(chunks))
        missing = ids < 0
        if missing.any():
            unseen = list(itertools.compress(chunks, missing.tolist()))
            self._learn(list(dict.fromkeys(unseen)))
            learned = map(self._chunk_index.__getitem__, unseen)
            ids[missing] = np.fromiter(learned, dtype=np.int64, count=len(unseen))
        return ids

    def _encode_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """All ids of ``texts`` in one array, and where each text's ids end."""
        if len(self._chunk_index) > self.max_cached_chunks:
            self._reset_cache()
        chunks: list[str] = []
        per_text: list[int] = []
        for text in texts:
            pieces = self._chunks(text)
            chunks.extend(pieces)
            per_text.append(len(pieces))
        ids = self._chunk_ids(chunks)
        lengths = self._chunk_length[ids]
        ends = np.cumsum(lengths)
        # Output position k of chunk j reads _chunk_tokens[start_j + k - (end_j - length_j)].
        shift = np.repeat(self._chunk_start[ids] - (ends - lengths), lengths)
        tokens = self._chunk_tokens[np.arange(len(shift)) + shift]
        return tokens, np.concatenate([[0], ends])[np.cumsum(per_text, dtype=np.int64)]

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        _check_texts(texts)
        out: list[np.ndarray] = []
        for start in range(0, len(texts), self.slice_size):
            tokens, text_ends = self._encode_flat(texts[start : start + self.slice_size])
            ends = text_ends.tolist()
            out.extend(tokens[a:b] for a, b in itertools.pairwise([0, *ends]))  # views
        return out


class HugTokenizer(Tokenizer):
    """DALLE-pytorch's ``HugTokenizer``: a Hugging Face ``tokenizer.json``."""

    kind = "hug"

    def __init__(self, spec: str, path: Path) -> None:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers.processors import ByteLevel

        self.spec = spec
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
        self.fingerprint = _fingerprint(self.kind, _hug_identity(data))

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        _check_texts(texts)
        encoded = self._tokenizer.encode_batch(list(texts))
        return [_ids(enc.ids) for enc in encoded]


def _hug_identity(data: dict[str, Any]) -> bytes:
    """What decides the ids of a tokenizer.json, serialized canonically: independent of the
    path, the formatting and the tokenizers version that wrote it (merges are ``"a b"``
    strings in files before 0.20, ``["a", "b"]`` pairs since)."""
    model = data.get("model") or {}
    merges = model.get("merges")
    identity = {
        "model": {
            "type": model.get("type"),
            "vocab": model.get("vocab"),
            "merges": [m.split(" ") if isinstance(m, str) else m for m in merges]
            if merges is not None
            else None,
            "unk_token": model.get("unk_token"),
        },
        **{key: data.get(key) for key in ("added_tokens", "normalizer", "pre_tokenizer")},
    }
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return canonical.encode("utf-8")


class YttmTokenizer(Tokenizer):
    """DALLE-pytorch's ``YttmTokenizer``: a YouTokenToMe BPE model."""

    kind = "yttm"

    def __init__(self, spec: str, path: Path) -> None:
        import youtokentome as yttm

        self.spec = spec
        try:
            content = path.read_bytes()
            _check_yttm_model(content)
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
        _check_texts(texts)
        encoded = self._bpe.encode(list(texts), output_type=self._output_type)
        return [_ids(ids) for ids in encoded]


def _check_yttm_model(content: bytes) -> None:
    """Refuse what youtokentome would load without complaint and then abort the process on:
    the model is ``<chars> <merges>``, that many ``<codepoint> <id>`` and ``<a> <b> <id>``
    lines, then ``<unk> <pad> <bos> <eos>``."""
    lines = [line.split() for line in content.decode("ascii").splitlines()]
    if not lines or len(lines[0]) != 2 or not all(f.isdigit() for f in lines[0]):
        raise ValueError("no `<chars> <merges>` header")
    chars, merges = int(lines[0][0]), int(lines[0][1])
    shape = [2] * chars + [3] * merges + [4]
    if [len(line) for line in lines[1:]] != shape or not all(
        f.lstrip("-").isdigit() for line in lines[1:] for f in line
    ):
        raise ValueError(f"the body does not hold {chars} characters and {merges} merges")


def load(spec: str) -> Tokenizer:
    """The tokenizer for a config value: ``simple``, ``hug:<path>`` or ``yttm:<path>``."""
    if spec == "simple":
        return SimpleTokenizer()
    location = tokenizer_file(spec)
    if location is None:
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
    return HugTokenizer(spec, path) if spec.startswith("hug:") else YttmTokenizer(spec, path)
