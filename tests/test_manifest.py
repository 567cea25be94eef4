"""manifest.json accounting and `verify`: missing, truncated, altered shards are named."""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest

from dalle_data.formats import tokenizers
from dalle_data.formats.manifest import ManifestError, read_manifest, verify, write_manifest
from dalle_data.formats.webdataset import write_shards
from dalle_data.hashing import sha256_file
from tests.test_shards import make_samples

TOKENIZER = {"kind": "test", "vocab_size": 10, "fingerprint": "f" * 64, "spec": "simple"}


def build(tmp_path: Path, n: int = 5, failed: int = 2) -> Path:
    shards = write_shards(make_samples(n), tmp_path, dataset="demo", shard_size=2)
    counts = {
        "input_rows": n + failed + 3,
        "dropped": {"too_long": 1, "empty_caption": 2},
        "failed": {"http_404": failed},
        "written": n,
    }
    write_manifest(
        tmp_path, dataset="demo", tokenizer=TOKENIZER, image_size=64, shards=shards, counts=counts
    )
    return tmp_path


def test_manifest_contents(tmp_path: Path) -> None:
    manifest = read_manifest(build(tmp_path))
    assert manifest["counts"] == {
        "input_rows": 10,
        "dropped": {"empty_caption": 2, "too_long": 1},
        "failed": {"http_404": 2},
        "written": 5,
    }
    assert [s["samples"] for s in manifest["shards"]] == [2, 2, 1]
    assert "time" not in json.dumps(manifest)
    report = verify(tmp_path)
    assert (report["shards"], report["samples"]) == (3, 5)


def test_accounting_must_close(tmp_path: Path) -> None:
    shards = write_shards(make_samples(2), tmp_path, dataset="demo", shard_size=2)
    counts = {"input_rows": 9, "dropped": {}, "failed": {"timeout": 1}, "written": 2}
    with pytest.raises(ManifestError, match=r"input_rows 9 != dropped 0 \+ failed 1 \+ written 2"):
        write_manifest(
            tmp_path,
            dataset="demo",
            tokenizer=TOKENIZER,
            image_size=64,
            shards=shards,
            counts=counts,
        )
    assert not (tmp_path / "manifest.json").exists()


def test_verify_names_missing_truncated_altered(tmp_path: Path) -> None:
    build(tmp_path)
    shard = tmp_path / "demo-00001.tar"
    original = shard.read_bytes()

    shard.write_bytes(original[:-1024])
    with pytest.raises(ManifestError, match=r"demo-00001\.tar is truncated"):
        verify(tmp_path)

    altered = bytearray(original)
    altered[600] ^= 1
    shard.write_bytes(bytes(altered))
    with pytest.raises(ManifestError, match=r"demo-00001\.tar was altered"):
        verify(tmp_path)

    shard.unlink()
    with pytest.raises(ManifestError, match=r"demo-00001\.tar is missing"):
        verify(tmp_path)


def test_verify_counts_complete_samples(tmp_path: Path) -> None:
    build(tmp_path)
    manifest = read_manifest(tmp_path)
    # A shard rewritten without one field, manifest hash updated to match: still refused.
    path = tmp_path / "demo-00002.tar"
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w") as tar:
        for member, data in members:
            if not member.name.endswith(".txt"):
                tar.addfile(member, io.BytesIO(data))
    manifest["shards"][2].update(sha256=sha256_file(path), bytes=path.stat().st_size)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match=r"demo-00002\.tar sample \d+ lacks txt"):
        verify(tmp_path)


def test_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="manifest.json does not exist"):
        verify(tmp_path)


def test_verify_retokenizes_spread_out_captions(tmp_path: Path) -> None:
    """Stored tok.npy must equal a fresh encoding of txt; a mismatch names shard and key."""
    simple = tokenizers.load("simple")
    samples = make_samples(7)
    ids = simple.encode_batch([s.txt for s in samples])
    good = [replace(s, tokens=t) for s, t in zip(samples, ids, strict=True)]
    bad = list(good)
    bad[5] = replace(bad[5], tokens=bad[5].tokens[:-1])
    for name, chosen in (("good", good), ("bad", bad)):
        folder = tmp_path / name
        shards = write_shards(chosen, folder, dataset="demo", shard_size=3)
        counts = {"input_rows": 7, "dropped": {}, "failed": {}, "written": 7}
        write_manifest(
            folder,
            dataset="demo",
            tokenizer=simple.record(),
            image_size=64,
            shards=shards,
            counts=counts,
        )
    assert verify(tmp_path / "good", retokenize=100)["retokenized"] == 7
    assert verify(tmp_path / "good", retokenize=2)["retokenized"] == 2
    assert verify(tmp_path / "bad", retokenize=2)["retokenized"] == 2  # samples 0 and 6
    with pytest.raises(ManifestError, match=rf"demo-00001\.tar sample {bad[5].key}: tok.npy"):
        verify(tmp_path / "bad", retokenize=7)
