"""Caption tokenizers: exactly DALLE-pytorch's token ids, with a stable fingerprint.

Captions are tokenized once, when shards are written, so the ids must be the ones
DALLE-pytorch's tokenizer classes compute, or a model trained on the shards is silently
wrong. ``load(spec)`` takes the ``tokenizer`` config value (``simple``, ``hug:<json>``,
``yttm:<model>``).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import html
import importlib.util
import itertools
import json
import re
import unicodedata
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import ftfy
import ftfy.badness
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import regex

from dalle_data.config import tokenizer_file
from dalle_data.errors import DalleDataError
from dalle_data.hashing import sha256_bytes

ID_DTYPE = np.int32
_CLIP_SPECIALS = ("<|startoftext|>", "<|endoftext|>")
# Text ftfy and html.unescape return unchanged: printable ASCII, tab, CR, LF, no `&`.
_ASCII_SAFE = re.compile(r"[\t\n\r\x20-\x25\x27-\x7e]*")
# Characters that ftfy's fixers other than its mojibake repair change or act on: HTML
# entities (and html.unescape), C0/C1 and other control characters, CR and line
# separators, Latin ligatures, curly quotes, full/half width forms, surrogates.
# tests/test_tokenizers.py checks every code point against each fixer.
FTFY_TOUCHES = re.compile(
    "[&\x00-\x08\x0b\x0d-\x1f\x7f-\x9f\u0132\u0133\u0149\u01c4-\u01cc\u01f1-\u01f3"
    "\u02bc\u2018-\u201f\u2028\u2029\u206a-\u206f\u3000\ud800-\udfff\ufb00-\ufb06"
    "\ufeff\ufff9-\ufffc\uff01-\uffef]"
)
_FTFY_SEGMENT = ftfy.TextFixerConfig().max_decode_length  # longer lines are cut


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


@functools.cache
def clip_model() -> tuple[str, dict[str, int], Any]:
    """The ``simple`` tokenizer's fingerprint, vocabulary and BPE model, built once a process
    (0.15 s; the stage server builds it before it forks the stages that tokenize). The BPE
    model is shared by every SimpleTokenizer: it keeps no state of a caller's."""
    from tokenizers.models import BPE

    # The merges file is bundled with dalle-pytorch; its bytes define the vocabulary.
    content = _clip_bpe_path().read_bytes()
    encoder, merges = _clip_vocab(content.decode("utf-8"))
    # Words arrive split by the reference's regex and mapped to its byte stand-ins, so the
    # BPE model alone (without a Tokenizer's pipeline around it) does the rest.
    bpe = BPE(vocab=encoder, merges=merges, end_of_word_suffix="</w>")
    return _fingerprint(SimpleTokenizer.kind, content), encoder, bpe


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


# Bytes as the reference's stand-in characters, for str.translate on latin-1 text.
_BYTE_CHARS = {byte: ord(char) for byte, char in _bytes_to_unicode().items()}
# No word contains "\n" (whitespace), so its stand-in separates words after mapping.
_WORD_BREAK = chr(_BYTE_CHARS[ord("\n")])


def _basic_clean(text: str) -> str:
    if _ftfy_may_change(text):
        text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return text.strip()


def _ftfy_may_change(text: str) -> bool:
    """False only where ftfy.fix_text and html.unescape return ``text`` unchanged (ftfy
    costs tens of microseconds a caption): no character they act on, NFC already, and no
    line (ftfy fixes line by line) that is not ASCII and looks like mojibake to ftfy."""
    return (
        len(text) > _FTFY_SEGMENT
        or bool(FTFY_TOUCHES.search(text))
        or not unicodedata.is_normalized("NFC", text)
        or any(not line.isascii() and ftfy.badness.is_bad(line) for line in _lines(text))
    )


def _lines(text: str) -> list[str]:
    """``text`` cut after each "\\n", as ftfy.fix_text cuts it."""
    parts = text.split("\n")
    return [part + "\n" for part in parts[:-1]] + parts[-1:]


def _whitespace_clean(text: str) -> str:
    return _CLIP_SPACE.sub(" ", text).strip()


def _starts(lengths: np.ndarray) -> np.ndarray:
    """Where each of consecutive runs of ``lengths`` items starts."""
    return np.cumsum(lengths) - lengths


def _grown(array: np.ndarray, size: int) -> np.ndarray:
    """``array``, or a copy at least twice as long where ``size`` items do not fit."""
    if size <= len(array):
        return array
    out = np.zeros(max(size, 2 * len(array)), dtype=array.dtype)
    out[: len(array)] = array
    return out


def _arrow_strings(texts: list[str]) -> pa.Array:
    """``texts`` as an arrow array, built from their bytes (pa.array would import pandas)."""
    sizes = [len(text) if text.isascii() else len(text.encode("utf-8")) for text in texts]
    offsets = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    data = "".join(texts).encode("utf-8")
    buffers = [None, pa.py_buffer(offsets), pa.py_buffer(data)]
    return pa.Array.from_buffers(pa.large_string(), len(texts), buffers)


def _integers(array: pa.Array) -> np.ndarray:
    """A null-free arrow integer array as a numpy view (to_numpy would import pandas)."""
    data = array.buffers()[1]
    values = np.frombuffer(data or b"", dtype=f"int{array.type.bit_width}")
    return values[array.offset : array.offset + len(array)]


class _IdCache:
    """Token ids of distinct strings (caption chunks, or words), in flat growable arrays.

    ``ids`` maps strings to cache indices, learning unseen ones with ``learn`` (distinct
    strings -> each one's number of ids, and all their ids concatenated); ``gather`` then
    concatenates the token ids of many indices with a few vectorized operations.
    """

    def __init__(self, learn: Callable[[list[str]], tuple[np.ndarray, np.ndarray]]) -> None:
        self._learn = learn
        self.index: dict[str, int] = {}
        self._start = np.zeros(1024, dtype=np.int64)
        self._length = np.zeros(1024, dtype=np.int64)
        self._tokens = np.zeros(4096, dtype=ID_DTYPE)
        self._used = 0  # items of _tokens

    def add(self, keys: list[str], lengths: np.ndarray, tokens: np.ndarray) -> None:
        first, count, used = len(self.index), len(keys), self._used
        self.index.update(zip(keys, range(first, first + count), strict=True))
        self._start = _grown(self._start, first + count)
        self._length = _grown(self._length, first + count)
        self._tokens = _grown(self._tokens, used + len(tokens))
        self._start[first : first + count] = used + _starts(lengths)
        self._length[first : first + count] = lengths
        self._tokens[used : used + len(tokens)] = tokens
        self._used += len(tokens)

    def ids(self, keys: list[str]) -> np.ndarray:
        get = self.index.get
        ids = np.fromiter(map(get, keys, itertools.repeat(-1)), dtype=np.int64, count=len(keys))
        missing = ids < 0
        if missing.any():
            unseen = list(itertools.compress(keys, missing.tolist()))
            new = list(dict.fromkeys(unseen))
            self.add(new, *self._learn(new))
            learned = map(self.index.__getitem__, unseen)
            ids[missing] = np.fromiter(learned, dtype=np.int64, count=len(unseen))
        return ids

    def gather(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The token ids of cache indices ``ids`` concatenated, and how many each has."""
        lengths = self._length[ids]
        # Output position k of string j reads _tokens[start_j + k - (where j's run starts)].
        shift = np.repeat(self._start[ids] - _starts(lengths), lengths)
        return self._tokens[np.arange(len(shift)) + shift], lengths


class SimpleTokenizer(Tokenizer):
    """DALLE-pytorch's ``SimpleTokenizer`` (OpenAI CLIP BPE, 49408 tokens), many times faster.

    The reference's regex never matches across whitespace, so a caption's ids are the
    concatenation of the ids of its whitespace-separated chunks, and a chunk's ids those
    of its regex words. Both repeat a lot across captions, so each distinct chunk is
    split once (the reference's regex) and each distinct word goes once through a Rust
    BPE built from the reference's own vocabulary and merges; their ids are kept in flat
    arrays, and a batch is a few vectorized gathers.

    Getting the chunks costs the reference's clean-up (ftfy, html.unescape twice,
    whitespace collapse, lower-case), except for text of printable ASCII, tab, CR and LF
    without ``&``: ftfy and html.unescape return such text unchanged (a test checks it over
    that alphabet), so its chunks are its lower-cased whitespace-separated pieces. Arrow
    splits and deduplicates the chunks of a whole batch, so only distinct chunks meet Python.

    So mostly-ASCII captions (cc12m, YFCC) tokenize many times faster than the reference
    (benchmarks/results/tokenize.md); captions that all need ftfy only about 2x. One
    process: forked workers measured no faster on 2 cores, neither for whole batches (each
    must learn the same chunks again) nor for ftfy alone. Not thread-safe: the caches are
    updated in place.
    """

    kind = "simple"
    #: Distinct chunks kept; past this the caches start over (bounded memory on huge corpora).
    max_cached_chunks = 1_000_000
    #: Captions per step: bounds the temporary arrays of a large batch.
    slice_size = 65536

    def __init__(self) -> None:
        self.spec = "simple"
        self.vocab_size = _CLIP_VOCAB_SIZE
        self.fingerprint, encoder, self._bpe = clip_model()
        self._special_ids = {w: encoder[w] for w in _CLIP_SPECIALS}
        self._reset_cache()

    def _reset_cache(self) -> None:
        self._words = _IdCache(self._encode_words)
        # A word equal to a special token string is that token (the reference's BPE cache
        # says so); no regex word contains one without being equal to it.
        specials = list(self._special_ids)
        ones = np.ones(len(specials), dtype=np.int64)
        self._words.add(specials, ones, np.asarray(list(self._special_ids.values())))
        self._chunks = _IdCache(self._encode_chunks)

    def _encode_words(self, words: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """BPE ids of distinct regex words (no special token among them)."""
        joined = "\n".join(words).encode("utf-8").decode("latin-1").translate(_BYTE_CHARS)
        pieces = list(map(self._bpe.tokenize, joined.split(_WORD_BREAK)))
        lengths = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
        ids = [piece.id for piece in itertools.chain.from_iterable(pieces)]
        return lengths, np.asarray(ids, dtype=ID_DTYPE)

    def _encode_chunks(self, chunks: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Ids of distinct whitespace-free chunks: those of their regex words in order.
        A chunk of ASCII letters only is one regex word (most chunks are: no regex call)."""
        words = [
            [chunk] if chunk.isascii() and chunk.isalpha() else _CLIP_SPLIT.findall(chunk)
            for chunk in chunks
        ]
        flat = list(itertools.chain.from_iterable(words))
        tokens, per_word = self._words.gather(self._words.ids(flat))
        words_per_chunk = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
        word_ends = np.concatenate([[0], np.cumsum(per_word)])
        chunk_word_ends = np.cumsum(words_per_chunk)
        lengths = word_ends[chunk_word_ends] - word_ends[chunk_word_ends - words_per_chunk]
        return lengths, tokens

    def _encode_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """All ids of ``texts`` in one array, and where each text's ids end."""
        if len(self._chunks.index) > self.max_cached_chunks:
            self._reset_cache()
        # Texts outside the ASCII fast path are cleaned the reference's way: single spaces
        # between chunks, none at the ends, lower-case (ascii_lower then changes nothing).
        cleaned = [
            text if _ASCII_SAFE.fullmatch(text) else _whitespace_clean(_basic_clean(text)).lower()
            for text in texts
        ]
        # Arrow's ASCII whitespace is Python's except \x1c-\x1f, which only cleaned text
        # holds, and the reference does not split at. Runs of it at the ends, and empty
        # texts, give "" chunks: no ids.
        pieces = pc.ascii_split_whitespace(pc.ascii_lower(_arrow_strings(cleaned)))
        distinct = pieces.flatten().dictionary_encode()
        ids = self._chunks.ids(distinct.dictionary.to_pylist())
        tokens, lengths = self._chunks.gather(ids[_integers(distinct.indices)])
        chunk_ends = np.concatenate([[0], np.cumsum(lengths)])
        return tokens, chunk_ends[_integers(pieces.offsets)[1:]]

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        _check_texts(texts)
        out: list[np.ndarray] = []
        with _without_cyclic_gc():
            for start in range(0, len(texts), self.slice_size):
                tokens, text_ends = self._encode_flat(texts[start : start + self.slice_size])
                ends = text_ends.tolist()
                out.extend(tokens[a:b] for a, b in itertools.pairwise([0, *ends]))  # views
        return out


@contextlib.contextmanager
def _without_cyclic_gc() -> Iterator[None]:
    """Python's cycle collector paused: a batch allocates ~10 small lists and strings per
    caption, none in a cycle, and the collections they trigger (each walking every live
    object, the 49k-entry vocabulary and the caches included) cost up to 40% of the time."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


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
