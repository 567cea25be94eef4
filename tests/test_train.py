"""train-extend end to end on tiny shards: names, lineage, pre-flight errors, resume, DDP."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import pytest
import torch

from dalle_data.errors import DalleDataWarning
from dalle_data.model import checkpoint as ckpt_io
from dalle_data.model.init import init_parent
from dalle_data.model.loader import LoaderError
from dalle_data.model.output_name import TrainError, planned_output
from dalle_data.model.train import TrainArgs, train_extend
from tests.helpers.pickles import write_early_2021_dalle
from tests.helpers.tiny import write_dataset, write_preset, write_tokenizer

ARCH = "1L_16HD_2H_32I_8T"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two datasets (48 samples in 3 shards each), one tokenizer, a fresh tiny parent."""
    root = tmp_path_factory.mktemp("train")
    spec = write_tokenizer(root / "tokenizer.json")
    cc12m = write_dataset(root, 48, 16, dataset="cc12m", tokenizer=spec)
    wit = write_dataset(root, 48, 16, dataset="wit", tokenizer=spec)
    parent = init_parent(write_preset(root / "tiny.yaml"), root / "parent.pt", shards=[cc12m])
    return {
        "root": root,
        "cc12m": cc12m,
        "wit": wit,
        "parent": parent,
        "preset": root / "tiny.yaml",
    }


def args_for(world: dict[str, Path], parent: Path, shards: str, out: Path, **kw) -> TrainArgs:
    options = {
        "epochs": Decimal(1),
        "batch_size": 8,
        "learning_rate": 1e-3,
        "prompts": ("a red square",),
        "samples_per_prompt": 2,
    } | kw
    return TrainArgs(parent=parent, shards=(world[shards],), output_dir=out, **options)


def history(final: Path) -> list[dict]:
    return json.loads((final.parent / "lineage.json").read_text())["history"]


def test_lineage_names_end_to_end(world: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "models"
    first = train_extend(args_for(world, world["parent"], "cc12m", out))
    assert first == out / "custom" / f"{ARCH}_cc12m_1E" / f"{ARCH}_cc12m_1E.pt"
    second = train_extend(args_for(world, first, "wit", out))
    assert second.name == f"{ARCH}_cc12m-1E_wit-1E.pt"
    steps = history(second)
    assert [h["dataset"] for h in steps] == ["cc12m", "wit"]
    assert steps[1]["parent"]["sha256"] == ckpt_sha(first)
    assert steps[1]["steps"] == 6 and steps[1]["samples_seen"] == 48
    assert steps[1]["manifest_sha256"] == [ckpt_sha(world["wit"] / "manifest.json")]
    assert steps[1]["tokenizer"]["vocab_size"] == 32
    # the checkpoint is DALLE-pytorch's dict plus our lineage, and rebuilds
    ckpt = ckpt_io.load_checkpoint(second)
    assert ckpt["lineage"]["segments"] == "cc12m-1E_wit-1E"
    ckpt_io.build_dalle(ckpt)
    card = (second.parent / "README.md").read_text()
    for line in ("EPOCHS = 1", "BATCH_SIZE = 8", "MODEL_DIM = 32", "TEXT_SEQ_LEN = 8", "DEPTH = 1"):
        assert line in card
    assert "Final training loss" in card and (second.parent / "samples.png").stat().st_size > 0
    # a --max-steps stop is a partial epoch; returning to cc12m appends a segment
    partial = train_extend(args_for(world, second, "cc12m", out, max_steps=3))
    assert partial.name == f"{ARCH}_cc12m-1E_wit-1E_cc12m-0.5E.pt"
    assert len(history(partial)) == 3
    # Snakemake's planned name agrees with what training wrote
    assert planned_output(first, "wit", 1, out) == second


def test_legacy_parent_is_named_by_its_file_or_refused(
    world: dict[str, Path], tmp_path: Path
) -> None:
    ckpt = torch.load(world["parent"], weights_only=True)
    plain = {k: ckpt[k] for k in ("hparams", "vae_params", "weights", "vae_class_name")}
    named = tmp_path / f"{ARCH}_cc12m_2E.pt"
    torch.save(plain, named)
    out = tmp_path / "models"
    result = train_extend(args_for(world, named, "cc12m", out, max_steps=2))
    assert result.name == f"{ARCH}_cc12m_2.33E.pt"
    unnamed = tmp_path / "dalle.pt"
    shutil.copy(named, unnamed)
    with pytest.raises(TrainError, match="--parent-lineage"):
        train_extend(args_for(world, unnamed, "cc12m", out))
    given = train_extend(
        args_for(world, unnamed, "wit", out, max_steps=3, parent_lineage="cc12m_3E")
    )
    assert given.name == f"{ARCH}_cc12m-3E_wit-0.5E.pt"


def test_an_early_2021_file_extends_like_any_parent(world: dict[str, Path], tmp_path: Path) -> None:
    """train_dalle.py of early 2021 pickled the VAE module in hparams; it is rebuilt from
    vae_params, and the name comes from hparams and the file name's lineage."""
    import dalle_pytorch

    parent = torch.load(world["parent"], weights_only=True)
    hparams = {
        k: v for k, v in parent["hparams"].items() if k not in ("shift_tokens", "rotary_emb")
    }
    vae = dalle_pytorch.DiscreteVAE(**parent["vae_params"])
    dalle = dalle_pytorch.DALLE(vae=vae, shift_tokens=False, rotary_emb=False, **hparams)
    early = tmp_path / f"{ARCH}_cc12m_2E.pt"
    vae_class = "dalle_pytorch.dalle_pytorch.DiscreteVAE"
    write_early_2021_dalle(early, dalle, vae_class, parent["vae_params"], hparams=hparams)
    with pytest.warns(DalleDataWarning, match=vae_class):
        result = train_extend(args_for(world, early, "wit", tmp_path / "models", max_steps=2))
    assert result.name == f"{ARCH}_cc12m-2E_wit-0.33E.pt"
    assert torch.load(result, weights_only=True)["hparams"]["shift_tokens"] is False


def test_preflight_errors_say_what_to_do(world: dict[str, Path], tmp_path: Path) -> None:
    root = tmp_path
    other_vocab = write_dataset(
        root / "v", 16, 16, dataset="cc12m", tokenizer=write_tokenizer(root / "t40.json", 40)
    )
    small = write_dataset(root / "s", 16, 16, dataset="cc12m", image_size=16)
    args = args_for(world, world["parent"], "cc12m", root / "out")
    with pytest.raises(TrainError, match="40 tokens.*num_text_tokens=32.*rebuild the shards"):
        train_extend(replace(args, shards=(other_vocab,)))
    with pytest.raises(TrainError, match="16px images.*needs 32px.*image_size >= 32"):
        train_extend(replace(args, shards=(small,)))
    with pytest.raises(TrainError, match="several datasets \\(cc12m, wit\\)"):
        train_extend(replace(args, shards=(world["cc12m"], world["wit"])))
    broken = root / "broken"
    shutil.copytree(world["cc12m"], broken)
    (broken / "cc12m-00001.tar").write_bytes(b"garbage")
    with pytest.raises(TrainError, match="cc12m-00001.tar.*--skip-corrupt"):
        train_extend(replace(args, shards=(broken,)))
    skipped = train_extend(
        replace(args, shards=(broken,), output_dir=root / "skip", skip_corrupt=True)
    )
    assert history(skipped)[0]["corrupt_shards_skipped"] == [str(broken / "cc12m-00001.tar")]
    assert history(skipped)[0]["steps"] == 4  # 32 intact samples / batch 8


def test_batches_of_only_corrupt_samples_are_skipped(
    world: dict[str, Path], tmp_path: Path
) -> None:
    """15 of 16 samples undecodable (their shard intact): each epoch has a batch of none."""
    spec = f"hug:{world['root'] / 'tokenizer.json'}"
    shards = write_dataset(tmp_path, 16, 16, dataset="cc12m", tokenizer=spec, corrupt=15)
    args = replace(args_for(world, world["parent"], "cc12m", tmp_path / "out"), shards=(shards,))
    with pytest.raises(LoaderError, match="--skip-corrupt"):
        train_extend(replace(args, epochs=Decimal(2)))
    final = train_extend(replace(args, epochs=Decimal(2), skip_corrupt=True))
    step = history(final)[0]
    assert (step["steps"], step["samples_seen"], step["corrupt_samples_skipped"]) == (4, 2, 30)
    weights = ckpt_io.load_checkpoint(final)["weights"]
    assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())


def ckpt_sha(path: Path) -> str:
    from dalle_data.hashing import sha256_file

    return sha256_file(path)


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "dalle_data.cli", *args]


@pytest.mark.slow
def test_resume_after_kill_9_matches_an_uninterrupted_run(
    world: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "models"
    command = cli(
        "train-extend", str(world["parent"]), "--shards", str(world["cc12m"]), "--epochs", "6",
        "--output-dir", str(out), "--batch-size", "8", "--learning-rate", "0.001",
        "--save-every-n-steps", "4", "--prompt", "a red square",
    )  # fmt: skip
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list(out.glob(".runs/*/step-*.pt")) and proc.poll() is None:
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("no step checkpoint within 120 s")
        time.sleep(0.05)
    if proc.poll() is not None:
        pytest.fail(f"train-extend exited early: {proc.stderr.read().decode()[-2000:]}")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    final = out / "custom" / f"{ARCH}_cc12m_6E" / f"{ARCH}_cc12m_6E.pt"
    assert not final.exists(), "the run finished before it could be killed"
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming" in done.stdout + done.stderr
    step = history(final)[0]
    assert step["steps"] == 36 and step["resumed_from_step"] > 0
    assert not list(out.glob(".runs/*/step-*.pt"))
    # the same run without interruption, in this process, reaches the same weights
    again = TrainArgs(
        parent=world["parent"], shards=(world["cc12m"],), epochs=Decimal(6),
        output_dir=tmp_path / "again", batch_size=8, learning_rate=1e-3,
        prompts=("a red square",),
    )  # fmt: skip
    reference = train_extend(again)
    a = ckpt_io.load_checkpoint(final)["weights"]
    b = ckpt_io.load_checkpoint(reference)["weights"]
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)


@pytest.mark.slow
def test_two_process_ddp_on_cpu_splits_the_data(world: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "models"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command = [
        *torchrun, "-m", "dalle_data.cli", "train-extend", str(world["parent"]),
        "--shards", str(world["cc12m"]), "--epochs", "1", "--output-dir", str(out),
        "--batch-size", "8", "--prompt", "a red square",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    final = out / "custom" / f"{ARCH}_cc12m_1E" / f"{ARCH}_cc12m_1E.pt"
    step = history(final)[0]
    # 48 samples, global batch 8 = 4 per rank: 6 steps, each rank saw half of the data
    assert step["hyperparameters"]["world_size"] == 2
    assert step["steps"] == 6 and step["samples_seen"] == 48
    assert sorted(p.name for p in final.parent.iterdir()) == [
        f"{final.name}",
        "README.md",
        "lineage.json",
        "samples.png",
    ]


@pytest.mark.slow
def test_ddp_survives_batches_of_only_corrupt_samples(
    world: dict[str, Path], tmp_path: Path
) -> None:
    """A rank whose batch is all corrupt still meets the other in backward (no hang)."""
    spec = f"hug:{world['root'] / 'tokenizer.json'}"
    shards = write_dataset(tmp_path, 16, 16, dataset="cc12m", tokenizer=spec, corrupt=15)
    out = tmp_path / "models"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command = [
        *torchrun, "-m", "dalle_data.cli", "train-extend", str(world["parent"]),
        "--shards", str(shards), "--epochs", "2", "--output-dir", str(out),
        "--batch-size", "8", "--skip-corrupt", "--prompt", "a red square",
    ]  # fmt: skip
    done = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, check=False, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    step = history(out / "custom" / f"{ARCH}_cc12m_2E" / f"{ARCH}_cc12m_2E.pt")[0]
    # 4 samples per rank and batch: 2 steps an epoch, most of them blank on one rank or both
    assert (step["steps"], step["samples_seen"], step["corrupt_samples_skipped"]) == (4, 2, 30)


@pytest.mark.slow
def test_training_from_and_into_a_bucket_matches_local_disk(
    world: dict[str, Path], tmp_path: Path, s3, bucket: str, capfd: pytest.CaptureFixture[str]
) -> None:
    from dalle_data import locations

    locations.put_tree(world["cc12m"], f"{bucket}/cc12m/shards")
    local = train_extend(args_for(world, world["parent"], "cc12m", tmp_path / "local"))
    remote_args = replace(
        args_for(world, world["parent"], "cc12m", tmp_path),
        shards=(f"{bucket}/cc12m/shards",),
        output_dir=f"{bucket}/models",
        cache_dir=tmp_path / "cache",
    )
    remote = train_extend(remote_args)
    name = f"{ARCH}_cc12m_1E"
    assert remote == f"{bucket}/models/custom/{name}/{name}.pt"
    folder = f"{bucket}/models/custom/{name}"
    assert set(locations.sizes(folder)) == {
        f"{name}.pt",
        "lineage.json",
        "README.md",
        "samples.png",
    }
    locations.download(remote, tmp_path / "remote.pt")
    a = ckpt_io.load_checkpoint(local)["weights"]
    b = ckpt_io.load_checkpoint(tmp_path / "remote.pt")["weights"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    record = json.loads(locations.read_bytes(f"{folder}/lineage.json"))
    assert record["history"][-1]["shards"] == [f"{bucket}/cc12m/shards"]
    assert train_extend(remote_args) == remote  # done already: nothing to do
    printed = "".join(capfd.readouterr())
    assert "already the result of this run" in printed
    # the credentials are nowhere in what the run wrote or printed
    secret = s3.secret_key.encode()
    name_of_bucket = bucket.removeprefix("s3://")
    client = s3.client()
    for obj in client.list_objects_v2(Bucket=name_of_bucket)["Contents"]:
        body = client.get_object(Bucket=name_of_bucket, Key=obj["Key"])["Body"].read()
        assert secret not in body, obj["Key"]
    for path in tmp_path.rglob("*"):
        assert not path.is_file() or secret not in path.read_bytes(), path
    assert s3.secret_key not in printed
