"""The train-tokenizer stage: a small byte-level BPE trained on a dataset's captions."""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dalle_data.atomic import atomic_open
from dalle_data.formats.tokenizers import TokenizerError

#: Id 0 is DALLE-pytorch's text padding (masked out), so a trained vocabulary reserves it.
PAD_TOKEN = "<pad>"
_MIN_VOCAB = 256 + 2  # every byte, <pad>, and at least one merge


def read_captions(source: Path) -> Iterator[str]:
    """Captions from a text file (one per line), a ``.parquet`` (column ``caption``) or a
    shards folder (``*.tar`` with ``<key>.txt`` members), in a fixed order."""
    if source.is_dir():
        shards = sorted(source.glob("*.tar"))
        if not shards:
            raise TokenizerError(
                f"folder {source} holds no *.tar shards: pass a shards folder, a text file "
                "or a filtered.parquet"
            )
        return _shard_captions(shards)
    if not source.is_file():
        raise TokenizerError(f"caption source {source} does not exist: check the path")
    if source.suffix == ".parquet":
        return _parquet_captions(source)
    return _text_captions(source)


def _shard_captions(shards: list[Path]) -> Iterator[str]:
    """The ``.txt`` members of each shard, read by offset (images are not read)."""
    from dalle_data.formats.webdataset import tar_members

    for shard in shards:
        try:
            members = tar_members(shard)
        except tarfile.TarError as err:
            raise TokenizerError(
                f"shard {shard} is not a readable tar ({err}): rebuild it"
            ) from err
        with open(shard, "rb") as fh:
            for name, offset, size in members:
                if name.endswith(".txt"):
                    fh.seek(offset)
                    yield _decode(fh.read(size), f"{shard}:{name}")


def _parquet_captions(path: Path) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for a bad file
        raise TokenizerError(f"{path} is not a readable parquet file ({err})") from err
    if "caption" not in parquet.schema_arrow.names:
        raise TokenizerError(
            f"{path} has no `caption` column (columns: {parquet.schema_arrow.names}): "
            "pass the filter stage's filtered.parquet"
        )
    for batch in parquet.iter_batches(columns=["caption"]):
        yield from (c for c in batch.column(0).to_pylist() if c is not None)


def _text_captions(path: Path) -> Iterator[str]:
    with open(path, "rb") as fh:
        for number, line in enumerate(fh, start=1):
            yield _decode(line.rstrip(b"\r\n"), f"{path} line {number}")


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise TokenizerError(f"{where} is not UTF-8 ({err}): re-encode the captions") from err


def train_bpe(source: Path, vocab_size: int, output: Path) -> dict[str, Any]:
    """Train a byte-level BPE on captions and write a ``tokenizer.json`` for ``hug:``.

    Small vocabularies keep small models fast (the CLIP vocabulary of 49408 tokens makes a
    tiny CPU model about 40x slower). NFC + lower-case normalization spends the merges on
    words rather than on capitalised duplicates. Id 0 is ``<pad>``, because DALLE-pytorch
    pads text with 0 and masks it out. Same input, same bytes out.
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    if vocab_size < _MIN_VOCAB:
        raise TokenizerError(
            f"--vocab-size {vocab_size} is too small: a byte-level BPE needs at least "
            f"{_MIN_VOCAB} (256 bytes, {PAD_TOKEN} and one merge)"
        )
    counted = 0

    def captions() -> Iterator[str]:
        nonlocal counted
        for caption in read_captions(source):
            counted += 1
            yield caption

    tokenizer = HFTokenizer(BPE())
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(captions(), trainer=trainer)
    if counted == 0:
        raise TokenizerError(f"{source} holds no captions: nothing to train a tokenizer on")
    with atomic_open(output, "w", encoding="utf-8") as fh:
        fh.write(tokenizer.to_str(pretty=True))
        fh.write("\n")
    return {"captions": counted, "vocab_size": tokenizer.get_vocab_size(), "output": str(output)}
