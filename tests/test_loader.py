"""The training loader: padding, crops, the split between ranks and workers, corrupt shards."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
import pytest

from dalle_data.model import loader
from dalle_data.model.loader import LoaderError, LoaderSpec, ShardRef
from tests.helpers.tiny import write_tiny_shards


def make_spec(tmp_path: Path, n: int, shard_size: int, **kwargs) -> LoaderSpec:
    records = write_tiny_shards(tmp_path, n, shard_size)
    shards = tuple(ShardRef(tmp_path / r["name"], r["samples"]) for r in records)
    options = {"batch_size": 4, "image_size": 32, "text_seq_len": 5, "seed": 3} | kwargs
    return LoaderSpec(shards=shards, **options)


def all_keys(spec: LoaderSpec, epoch: int = 0) -> list[str]:
    return [key for batch in loader.batches(spec, epoch) for key in batch.keys]


def test_pad_tokens_pads_with_zero_and_truncates() -> None:
    out = loader.pad_tokens([np.array([5, 6]), np.arange(1, 9)], 4)
    assert out.dtype == np.int64
    assert out.tolist() == [[5, 6, 0, 0], [1, 2, 3, 4]]


def test_batches_have_model_shapes_and_tokens_from_the_shard(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, 12, 6)
    batch = next(loader.batches(spec, 0))
    assert tuple(batch.text.shape) == (4, 5)
    assert tuple(batch.image.shape) == (4, 32, 32, 3)
    floats = batch.image_float()
    assert tuple(floats.shape) == (4, 3, 32, 32)
    assert float(floats.min()) >= 0.0 and float(floats.max()) <= 1.0
    for key, row in zip(batch.keys, batch.text.tolist(), strict=True):
        i = int(key)
        expected = [1 + i % 3] + [10 + j for j in range(i % 7)]
        assert row == (expected + [0] * 5)[:5]


def test_crop_box_stays_inside_and_square() -> None:
    draws = np.random.default_rng(0).random((50, loader.CROP_DRAWS))
    draws[:2, -2:] = [[0.0, 0.0], [0.999999, 0.999999]]  # the extreme corners
    for width, height in [(96, 96), (256, 180), (64, 300)]:
        for row in draws.tolist():
            left, top, w, h = loader.random_resized_crop_box(width, height, (0.75, 1.0), row)
            assert w == h and left >= 0 and left + w <= width and top >= 0 and top + h <= height


def test_crop_box_falls_back_to_the_central_square() -> None:
    never_fits = [1.0] * loader.CROP_TRIES + [0.0, 0.0]  # 64x300 at full area: side 139 > 64
    assert loader.random_resized_crop_box(64, 300, (1.0, 1.0), never_fits) == (0, 118, 64, 64)


def test_crops_depend_on_the_sample_not_on_who_reads_it(tmp_path: Path) -> None:
    one = make_spec(tmp_path, 24, 6)
    images = {k: im for b in loader.batches(one, 0) for k, im in zip(b.keys, b.image, strict=True)}
    split = dataclasses.replace(one, num_workers=2, batch_size=2)
    for batch in loader.batches(split, 0):
        for key, image in zip(batch.keys, batch.image, strict=True):
            assert np.array_equal(image, images[key])


def test_read_tokens_matches_np_load() -> None:
    from dalle_data.formats.webdataset import encode_tokens

    for ids in (np.arange(0), np.arange(7), np.arange(2**20, 2**20 + 300)):
        data = encode_tokens(ids)
        assert np.array_equal(loader.read_tokens(data), np.load(io.BytesIO(data)))
    other = io.BytesIO()
    np.save(other, np.arange(5, dtype=np.int16))  # not the shard format: np.load reads it
    assert loader.read_tokens(other.getvalue()).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError):
        loader.read_tokens(encode_tokens(np.arange(7))[:-4])  # truncated


def test_draft_decoding_gives_the_requested_size(tmp_path: Path) -> None:
    from tests.helpers.tiny import jpeg

    out = loader.decode_crop(jpeg((200, 0, 0), 256), 32, [0.5] * loader.CROP_DRAWS, (0.75, 1.0))
    assert out.shape == (32, 32, 3)
    assert out[16, 16, 0] > 150 and out[16, 16, 1] < 80  # the red centre survives


def test_epoch_is_reproducible_and_reshuffled(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, 24, 6)
    first = list(loader.batches(spec, 0))
    again = list(loader.batches(spec, 0))
    assert [b.keys for b in first] == [b.keys for b in again]
    assert all(np.array_equal(a.image, b.image) for a, b in zip(first, again, strict=True))
    assert all_keys(spec, 1) != all_keys(spec, 0)
    assert sorted(all_keys(spec, 1)) == sorted(all_keys(spec, 0))


@pytest.mark.parametrize(
    ("n", "shard_size", "world", "workers"),
    [(40, 5, 2, 2), (40, 20, 2, 2), (37, 37, 1, 2), (30, 4, 3, 1)],
)
def test_split_covers_each_sample_at_most_once(
    tmp_path: Path, n: int, shard_size: int, world: int, workers: int
) -> None:
    spec = make_spec(tmp_path, n, shard_size, world_size=world, num_workers=workers)
    plan = loader.epoch_plan(spec, 0)
    refs = [ref for consumer in plan for batch in consumer for ref in batch]
    assert len(refs) == len(set(refs))
    assert len({len(consumer) for consumer in plan}) == 1  # every consumer: same batch count
    lost = n - len(refs)
    assert lost < spec.consumers * spec.batch_size + (shard_size if n // shard_size >= 4 else 0)
    # what the ranks really receive (worker processes included) matches the plan
    seen = []
    for rank in range(world):
        ranked = dataclasses.replace(spec, rank=rank)
        keys = all_keys(ranked)
        assert len(keys) == loader.steps_per_epoch(spec) * spec.batch_size
        seen += keys
    assert len(seen) == len(set(seen)) == len(refs)


def test_resume_mid_epoch_continues_the_same_sequence(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, 40, 40, num_workers=2)
    full = [b.keys for b in loader.batches(spec, 0)]
    for start in (1, 3):
        resumed = [b.keys for b in loader.batches(spec, 0, start_step=start)]
        assert resumed == full[start:]


def test_too_small_dataset_is_a_clear_error(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, 6, 6, batch_size=4, world_size=2)
    with pytest.raises(LoaderError, match="no full batch of 4"):
        loader.epoch_plan(spec, 0)


def test_corrupt_shard_fails_with_its_name_or_is_skipped_and_counted(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, 16, 8, batch_size=4)
    bad = spec.shards[1].path
    bad.write_bytes(bad.read_bytes()[:700])  # truncated mid-member
    with pytest.raises(LoaderError, match=f"{bad.name}.*--skip-corrupt"):
        list(loader.batches(spec, 0))
    skipping = dataclasses.replace(spec, skip_corrupt=True)
    got = list(loader.batches(skipping, 0))
    assert sum(b.skipped for b in got) == 8
    assert sum(len(b.keys) for b in got) == 8
    assert all(int(k) < 8 for b in got for k in b.keys)


def test_undecodable_image_is_named_or_skipped(tmp_path: Path) -> None:
    from dalle_data.formats.webdataset import write_shards
    from tests.helpers.tiny import samples

    items = samples(8)
    items[2] = dataclasses.replace(items[2], jpg=b"not a jpeg")
    write_shards(items, tmp_path, dataset="tiny", shard_size=8)
    shard = ShardRef(tmp_path / "tiny-00000.tar", 8)
    spec = LoaderSpec(shards=(shard,), batch_size=8, image_size=16, text_seq_len=4)
    with pytest.raises(LoaderError, match="tiny-00000.tar: sample"):
        list(loader.batches(spec, 0))
    got = list(loader.batches(dataclasses.replace(spec, skip_corrupt=True), 0))
    assert [b.skipped for b in got] == [1] and len(got[0].keys) == 7
