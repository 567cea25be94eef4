"""evaluate: held-out losses exactly as DALLE-pytorch defines them, reproducible, stored per
eval set; train-extend scoring parent and output; the card the Hub reads; a CLIP score."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from typer.testing import CliRunner

from dalle_data.cli import app
from dalle_data.hashing import sha256_file
from dalle_data.model import checkpoint as ckpt_io
from dalle_data.model import evaluate as ev
from dalle_data.model.init import init_parent
from dalle_data.model.train import TrainArgs, train_extend
from tests.helpers.tiny import write_dataset, write_preset, write_tokenizer


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """cc12m training shards with a 21-sample eval split (3 shards), a fresh tiny parent."""
    root = tmp_path_factory.mktemp("evaluate")
    spec = write_tokenizer(root / "tokenizer.json")
    shards = write_dataset(root, 32, 16, dataset="cc12m", tokenizer=spec)
    eval_dir = write_dataset(root, 21, 8, dataset="cc12m", tokenizer=spec, split="eval")
    parent = init_parent(write_preset(root / "tiny.yaml"), root / "parent.pt", shards=[shards])
    return {"root": root, "shards": shards, "eval": eval_dir, "parent": parent, "spec": spec}


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def copy_parent(world: dict[str, Path], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(world["parent"], folder / "parent.pt"))


def test_per_sample_losses_are_dalle_pytorchs_loss(world: dict[str, Path]) -> None:
    dalle = ckpt_io.build_dalle(ckpt_io.load_checkpoint(world["parent"])).eval()
    eval_set = ev.load_eval_set(world["eval"])
    text, codes = next(ev._batches(ev._chunks(dalle, eval_set, torch.device("cpu")), 8))
    assert text.shape == (8, 8) and (text == 0).any()  # padding positions are scored too
    with torch.no_grad():
        losses = ev.sample_losses(dalle, text, codes)
        expected = float(dalle(text, codes, return_loss=True))
    w = dalle.loss_img_weight
    combined = float(((losses[:, 0] + w * losses[:, 1]) / (w + 1)).mean())
    assert combined == pytest.approx(expected, abs=1e-5)


def test_scores_do_not_depend_on_batch_size_or_run(world: dict[str, Path], tmp_path: Path) -> None:
    ckpt = copy_parent(world, tmp_path)
    records = []
    for batch_size in (1, 5, 32, 5):
        code, out = run("evaluate", ckpt, "--shards", world["eval"], "--json", "--batch-size",
                        batch_size)  # fmt: skip
        assert code == 0, out
        records.append(json.loads(out[out.index("{") :]))
    first = records[0]
    assert first["samples"] == 21 and first["dataset"] == "cc12m" and first["split"] == "eval"
    assert first["manifest_sha256"] == sha256_file(world["eval"] / "manifest.json")
    assert first["checkpoint"] == {"name": "parent", "sha256": sha256_file(ckpt)}
    for other in records[1:]:
        for field in ev.LOSS_FIELDS:
            assert other[field] == pytest.approx(first[field], abs=1e-5), field
    assert records[1] == records[3]  # a second run: the same numbers
    w = first["loss_img_weight"]
    assert first["loss"] == pytest.approx((first["text_loss"] + w * first["image_loss"]) / (w + 1))
    assert first["bits_per_image_token"] == pytest.approx(first["image_loss"] / math.log(2))
    # one record per (checkpoint, eval set): re-evaluating replaced it
    stored = json.loads((tmp_path / "eval.json").read_text())
    assert len(stored) == 1 and stored[0]["loss"] == records[-1]["loss"]
    code, out = run("evaluate", ckpt, "--shards", world["eval"])
    assert code == 0 and "bits/token" in out and "21 samples" in out


def test_eval_sets_are_never_mixed(world: dict[str, Path], tmp_path: Path) -> None:
    ckpt = copy_parent(world, tmp_path / "models")
    other = write_dataset(
        tmp_path / "wit", 7, 8, dataset="wit", tokenizer=world["spec"], split="eval"
    )
    assert run("evaluate", ckpt, "--shards", world["eval"])[0] == 0
    assert run("evaluate", ckpt, "--shards", other)[0] == 0
    # a second checkpoint in the same folder (the seed's flat layout) keeps its own records
    sibling = Path(shutil.copy(world["parent"], tmp_path / "models" / "sibling.pt"))
    assert run("evaluate", sibling, "--shards", other)[0] == 0
    records = ev.read_records(tmp_path / "models")
    keys = sorted((r["checkpoint"]["name"], r["dataset"]) for r in records)
    assert keys == [("parent", "cc12m"), ("parent", "wit"), ("sibling", "wit")]
    assert len({r["manifest_sha256"] for r in records}) == 2


def test_mismatched_or_unsound_sets_are_refused(world: dict[str, Path], tmp_path: Path) -> None:
    ckpt = copy_parent(world, tmp_path)
    spec40 = write_tokenizer(tmp_path / "t40.json", 40)
    vocab = write_dataset(tmp_path / "v", 8, 8, dataset="cc12m", tokenizer=spec40, split="eval")
    code, out = run("evaluate", ckpt, "--shards", vocab)
    assert code == 1 and "40 tokens" in out and "num_text_tokens=32" in out
    small = write_dataset(
        tmp_path / "s", 8, 8, image_size=16, tokenizer=world["spec"], split="eval"
    )
    code, out = run("evaluate", ckpt, "--shards", small)
    assert code == 1 and "16px images" in out
    code, out = run("evaluate", ckpt, "--shards", world["shards"].parent / "missing")
    assert code == 1 and "manifest.json does not exist" in out
    train = tmp_path / "train"
    shutil.copytree(world["eval"], train)
    manifest = json.loads((train / "manifest.json").read_text())
    (train / "manifest.json").write_text(json.dumps({**manifest, "split": "train"}))
    code, out = run("evaluate", ckpt, "--shards", train)
    assert code == 1 and "training split" in out
    broken = tmp_path / "broken"
    shutil.copytree(world["eval"], broken)
    (broken / "cc12m-eval-00001.tar").write_bytes(b"garbage")
    code, out = run("evaluate", ckpt, "--shards", broken)
    assert code == 1 and "cc12m-eval-00001.tar" in out
    assert not (tmp_path / "eval.json").exists()


def test_train_extend_scores_parent_and_output_and_the_card_shows_both(
    world: dict[str, Path], tmp_path: Path
) -> None:
    args = TrainArgs(
        parent=world["parent"],
        shards=(world["shards"],),
        epochs=Decimal(2),
        output_dir=tmp_path / "models",
        batch_size=8,
        learning_rate=3e-3,
        prompts=("a red square",),
        samples_per_prompt=1,
    )
    final = train_extend(args)
    records = ev.read_records(final.parent)
    assert [r["checkpoint"]["sha256"] for r in records] == [sha256_file(final)]
    step = json.loads((final.parent / "lineage.json").read_text())["history"][-1]
    (parent,) = step["parent_evals"]
    assert parent["checkpoint"]["sha256"] == sha256_file(world["parent"])
    assert parent["manifest_sha256"] == records[0]["manifest_sha256"]
    card = ModelCard.load(final.parent / "README.md")
    assert card.data.library_name == "dalle-pytorch"
    assert card.data.base_model == "1L_16HD_2H_32I_8T" and card.data.datasets == ["cc12m"]
    assert "text-to-image" in card.data.tags
    losses = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert losses["loss"] == pytest.approx(records[0]["loss"], abs=1e-6)
    assert card.data.eval_results[0].dataset_revision == records[0]["manifest_sha256"]
    text = card.text
    assert f"**{records[0]['loss']:.4f}** | {parent['loss']:.4f} |" in text
    # a later `evaluate` on another set adds a row and a model-index result, keeps the rest
    other = write_dataset(
        tmp_path / "wit", 7, 8, dataset="wit", tokenizer=world["spec"], split="eval"
    )
    assert run("evaluate", final, "--shards", other)[0] == 0
    again = ModelCard.load(final.parent / "README.md")
    assert {r.dataset_type for r in again.data.eval_results} == {"cc12m", "wit"}
    assert "Final training loss" in again.text and again.text.count("## Held-out evaluation") == 1
    # --no-eval skips it
    skipped = train_extend(replace(args, output_dir=tmp_path / "noeval", held_out=False))
    assert not (skipped.parent / "eval.json").exists()
    assert "Not evaluated yet" in (skipped.parent / "README.md").read_text()


TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def test_clip_score_from_local_weights_only(world: dict[str, Path], tmp_path: Path) -> None:
    import open_clip
    from safetensors.torch import save_file

    config = tmp_path / "tiny-clip.json"
    config.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-clip", pretrained=None)
    weights = tmp_path / "tiny-clip.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
    ckpt = copy_parent(world, tmp_path / "m")
    args = ["evaluate", ckpt, "--shards", world["eval"], "--json", "--clip-model", config,
            "--clip-weights", weights, "--clip-captions", "4"]  # fmt: skip
    code, out = run(*args)
    assert code == 0, out
    first = json.loads(out[out.index("{") :])
    assert -1.0 <= first["clip_score"] <= 1.0
    assert first["clip"]["captions"] == 4 and first["clip"]["model"] == "tiny-clip"
    assert first["clip"]["weights_sha256"] == sha256_file(weights)
    code, out = run(*args)
    assert json.loads(out[out.index("{") :])["clip_score"] == first["clip_score"]
    # a pickle that would run code is refused, and half the options are an error
    evil = tmp_path / "evil.pt"
    torch.save({"state": Path("x")}, evil)
    code, out = run(*args[:-4], "--clip-weights", evil)
    assert code == 1 and "pickled code" in out
    code, out = run("evaluate", ckpt, "--shards", world["eval"], "--clip-model", config)
    assert code == 1 and "--clip-weights" in out


def test_an_eval_split_in_a_bucket_scores_as_on_disk(
    world: dict[str, Path], tmp_path: Path, bucket: str
) -> None:
    from dalle_data import locations

    url = f"{bucket}/cc12m/eval"
    locations.put_tree(world["eval"], url)
    local = copy_parent(world, tmp_path / "local")
    remote = copy_parent(world, tmp_path / "remote")
    code, out = run("evaluate", local, "--shards", world["eval"], "--json")
    assert code == 0, out
    code, out_remote = run("evaluate", remote, "--shards", url, "--json",
                           "--cache-dir", tmp_path / "cache")  # fmt: skip
    assert code == 0, out_remote
    a, b = json.loads(out[out.index("{") :]), json.loads(out_remote[out_remote.index("{") :])
    assert {k: v for k, v in a.items() if k != "checkpoint"} == {
        k: v for k, v in b.items() if k != "checkpoint"
    }
    assert str(tmp_path / "cache") not in out_remote  # no cache path in the record
    # an object altered in the bucket is refused on arrival
    shard = next(p for p in sorted(world["eval"].iterdir()) if p.suffix == ".tar")
    altered = bytearray(shard.read_bytes())
    altered[-1500] ^= 0xFF
    locations.write_bytes(f"{url}/{shard.name}", bytes(altered))
    code, out = run("evaluate", remote, "--shards", url, "--cache-dir", tmp_path / "other")
    assert code == 1 and "arrived with sha256" in out


def test_an_empty_eval_split_is_not_scored(tmp_path: Path) -> None:
    """finalize writes eval/ for every dataset; one too small for eval_fraction has none."""
    spec = write_tokenizer(tmp_path / "tok.json")
    shards = write_dataset(tmp_path, 4, 4, dataset="small", tokenizer=spec)
    write_dataset(tmp_path, 0, 4, dataset="small", tokenizer=spec, split="eval")
    assert ev.find_eval_split([shards]) is None
    eval_dir = write_dataset(tmp_path, 2, 4, dataset="small", tokenizer=spec, split="eval")
    assert ev.find_eval_split([shards]) == eval_dir
