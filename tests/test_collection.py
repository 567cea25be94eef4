"""collection and publish on a small real collection: a root, two children on different
datasets, a grandchild, a copy under a taken name whose parent is elsewhere, a legacy file
named with the wrong architecture, and a corrupt file."""

from __future__ import annotations

import json
import shutil
import traceback
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from dalle_data.cli import app
from dalle_data.collection.index import write_index
from dalle_data.collection.lineage_tree import lineage_graph
from dalle_data.hashing import sha256_file
from dalle_data.model.init import init_parent
from dalle_data.model.train import TrainArgs, train_extend
from tests.helpers.s3 import S3Server
from tests.helpers.tiny import write_dataset, write_preset, write_tokenizer

ARCH = "1L_16HD_2H_32I_8T"


def run(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exit_code and not isinstance(result.exception, SystemExit):  # a crash: show it
        return result.exit_code, "".join(traceback.format_exception(*result.exc_info))
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("collection")
    spec = write_tokenizer(base / "tokenizer.json")
    data = {}
    for dataset in ("cc12m", "wit"):
        data[dataset] = write_dataset(base, 16, 16, dataset=dataset, tokenizer=spec)
        write_dataset(base, 6, 8, dataset=dataset, tokenizer=spec, split="eval")
    preset = write_preset(base / "tiny.yaml")
    root = base / "collection"
    (root / "custom").mkdir(parents=True)
    # the root, in the seed's flat layout, with its card beside it
    first = init_parent(preset, root / "custom" / f"{ARCH}.pt", shards=[data["cc12m"]])
    (root / "custom" / f"{ARCH}.md").write_text(f"# {ARCH}\n")
    args = TrainArgs(
        parent=first,
        shards=(data["cc12m"],),
        epochs=Decimal(1),
        output_dir=base / "out",
        batch_size=8,
        prompts=("a red square",),
        samples_per_prompt=1,
    )
    child_cc12m = train_extend(args)
    child_wit = train_extend(replace(args, shards=(data["wit"],)))
    code, out = run("publish", child_cc12m.parent, root)
    assert code == 0, out
    assert run("publish", child_wit.parent, root)[0] == 0
    published = root / "custom" / child_cc12m.stem / child_cc12m.name
    grandchild = train_extend(replace(args, parent=published, shards=(data["wit"],)))
    assert run("publish", grandchild.parent, root)[0] == 0
    # the same name from another parent, which is not in the collection
    outside = init_parent(preset, base / "outside.pt", shards=[data["cc12m"]], seed=1)
    other = train_extend(replace(args, parent=outside, output_dir=base / "other"))
    assert other.name == child_cc12m.name
    shutil.copy(other, root / "custom" / other.name)
    # a 2021-style file (no lineage key) whose name claims another architecture
    ckpt = torch.load(first, weights_only=True)
    plain = {k: ckpt[k] for k in ("hparams", "vae_params", "weights")}
    torch.save(plain, root / "custom" / "16L_64HD_8H_512I_128T_cc12m_1E.pt")
    (root / "taming").mkdir()
    (root / "taming" / "12L_64HD_8H_512I_128T.pt").write_bytes(b"\x80\x02not a torch file")
    return {
        "root": root,
        "first": first,
        "child_cc12m": child_cc12m,
        "child_wit": child_wit,
        "grandchild": grandchild,
        "other": other,
    }


def entries(root: Path) -> dict[str, dict]:
    index = json.loads((root / "index.json").read_text())
    return {e["path"]: e for e in index["checkpoints"]}


def test_index_lists_every_file_with_its_facts_and_flags(built: dict[str, Path]) -> None:
    root = built["root"]
    code, out = run("collection", root)
    assert code == 0, out
    found = entries(root)
    a, b, g = (
        f"custom/{built[k].stem}/{built[k].name}"
        for k in ("child_cc12m", "child_wit", "grandchild")
    )
    legacy, broken = "custom/16L_64HD_8H_512I_128T_cc12m_1E.pt", "taming/12L_64HD_8H_512I_128T.pt"
    dup, first = f"custom/{built['other'].name}", f"custom/{ARCH}.pt"
    assert sorted(found) == sorted([first, a, b, g, dup, legacy, broken])
    root_sha = sha256_file(built["first"])
    assert found[first]["sha256"] == root_sha and found[first]["parent"] is None
    assert found[a]["parent"]["sha256"] == root_sha and found[b]["parent"]["sha256"] == root_sha
    assert found[g]["parent"]["sha256"] == found[a]["sha256"]
    assert found[g]["lineage"] == "cc12m-1E_wit-1E" and found[g]["epochs"] == "2"
    assert found[a]["architecture"] == ARCH and found[a]["tokenizer"]["vocab_size"] == 32
    assert found[a]["bytes"] == (root / a).stat().st_size
    assert found[a]["card"] == f"custom/{built['child_cc12m'].stem}/README.md"
    # scores: each measured by train-extend after training, plus those its children
    # measured before training (parent_evals): the child's wit score comes from the grandchild
    assert [r["dataset"] for r in found[b]["evals"]] == ["wit"]
    assert sorted(r["dataset"] for r in found[a]["evals"]) == ["cc12m", "wit"]
    assert sorted(r["dataset"] for r in found[first]["evals"]) == ["cc12m", "wit"]
    for clean in (first, b, g):
        assert found[clean]["problems"] == [], (clean, found[clean]["problems"])
    problems = {path: " | ".join(e["problems"]) for path, e in found.items()}
    assert f"should be named {ARCH}_cc12m_1E" in problems[legacy]
    assert "architecture part 16L_64HD_8H_512I_128T" in problems[legacy]
    assert (
        "cannot be loaded" in problems[broken] and "not a readable torch file" in problems[broken]
    )
    assert "is not in the collection" in problems[dup] and "has no model card" in problems[dup]
    assert "has no model card" in problems[legacy]
    # the CLI prints each flag on its own line
    assert out.count("flag: ") == sum(len(e["problems"]) for e in found.values())
    assert f"front page: {root / 'README.md'}" in out


def test_duplicate_names_are_flagged_on_both_files(built: dict[str, Path]) -> None:
    found = {e["path"]: e for e in write_index(built["root"])["checkpoints"]}
    a = f"custom/{built['child_cc12m'].stem}/{built['child_cc12m'].name}"
    dup = f"custom/{built['other'].name}"
    assert any(f"also used by {dup}" in p for p in found[a]["problems"])
    assert any(f"also used by {a}" in p for p in found[dup]["problems"])


def test_front_page_tables_leaderboards_and_picture(built: dict[str, Path]) -> None:
    root = built["root"]
    index = write_index(root)
    readme = (root / "README.md").read_text()
    boards = {b["dataset"]: b for b in index["eval_sets"]}
    assert sorted(boards) == ["cc12m", "wit"]
    for board in boards.values():
        losses = [r["loss"] for r in board["ranking"]]
        assert losses == sorted(losses)
        assert f"### {board['dataset']} eval `{board['manifest_sha256'][:8]}`" in readme
    assert (
        "## custom/" in readme
        and "## taming/" in readme
        and "![lineage tree](lineage.png)" in readme
    )
    child = built["child_cc12m"]
    assert f"[{child.stem}](custom/{child.stem}/README.md)" in readme
    assert f'<img src="custom/{child.stem}/samples.png" width="128">' in readme
    assert "## Problems" in readme and f"should be named {ARCH}_cc12m_1E" in readme
    # the picture: a PNG a person can read, with the tree's edges and the missing parent
    with Image.open(root / "lineage.png") as picture:
        assert picture.format == "PNG" and picture.width > 200 and picture.height > 200
    source = lineage_graph(index).source
    assert source.count("->") == 4  # root->2 children, child->grandchild, missing->other
    assert "(not in the collection)" in source and "dashed" in source
    # reindexing an unchanged collection writes the same bytes
    before = [(root / n).read_bytes() for n in ("index.json", "README.md", "lineage.png")]
    write_index(root)
    assert before == [(root / n).read_bytes() for n in ("index.json", "README.md", "lineage.png")]


def test_publish_is_a_no_op_again_and_refuses_a_different_file(
    built: dict[str, Path], tmp_path: Path
) -> None:
    root = built["root"]
    code, out = run("publish", built["child_cc12m"].parent, root)
    assert code == 0 and "already published" in out
    code, out = run("publish", built["other"].parent, root)
    assert code == 1 and "different checkpoint" in out and "remove that folder" in out
    assert not [p for p in (root / "custom").iterdir() if p.name.startswith(".")]
    code, out = run("publish", tmp_path, root)
    assert code == 1 and "pass the folder train-extend wrote" in out
    # a fresh collection: files arrive byte-identical, then get indexed
    fresh = tmp_path / "fresh"
    code, out = run("publish", built["child_wit"].parent, fresh)
    assert code == 0, out
    copied = fresh / "custom" / built["child_wit"].stem
    for source in built["child_wit"].parent.iterdir():
        assert (copied / source.name).read_bytes() == source.read_bytes()
    assert (fresh / "index.json").is_file() and (fresh / "lineage.png").is_file()
    assert "is not in the collection" in (fresh / "README.md").read_text()


def test_a_bucket_collection_is_the_same_collection(
    built: dict[str, Path], s3: S3Server, bucket: str, tmp_path: Path
) -> None:
    """publish into an s3:// collection and index it: the same index.json, README.md and
    lineage.png bytes as the same collection in a folder; a re-index downloads nothing that
    did not change; the same refusals and no-ops as on disk."""
    local, cache = tmp_path / "local", tmp_path / "cache"
    printed = ""
    for key in ("child_cc12m", "child_wit"):
        code, out = run("publish", built[key].parent, bucket, "--cache-dir", cache)
        assert code == 0 and "published: s3://" in out, out
        printed += out
        assert run("publish", built[key].parent, local)[0] == 0
    objects = s3.objects(bucket)
    for name in ("index.json", "README.md", "lineage.png"):
        assert objects[name] == (local / name).read_bytes(), name
    for key in ("child_cc12m", "child_wit"):
        for source in built[key].parent.iterdir():
            assert objects[f"custom/{built[key].stem}/{source.name}"] == source.read_bytes()
    # a re-index writes the same bytes and downloads only the object that changed
    (mirror,) = (cache / "collections").iterdir()
    a = f"custom/{built['child_cc12m'].stem}"
    inodes = {
        n: (mirror / a / n).stat().st_ino for n in (f"{built['child_cc12m'].stem}.pt", "README.md")
    }
    code, out = run("collection", bucket, "--cache-dir", cache)
    assert code == 0 and f"front page: {bucket}/README.md" in out, out
    printed += out
    assert s3.objects(bucket) == objects
    assert {n: (mirror / a / n).stat().st_ino for n in inodes} == inodes
    card = objects[f"{a}/README.md"] + b"\nEdited in the bucket.\n"
    s3.client().put_object(Bucket=bucket.removeprefix("s3://"), Key=f"{a}/README.md", Body=card)
    code, out = run("collection", bucket, "--cache-dir", cache)
    assert code == 0, out
    assert (mirror / a / "README.md").read_bytes() == card
    assert (mirror / a / f"{built['child_cc12m'].stem}.pt").stat().st_ino == inodes[
        f"{built['child_cc12m'].stem}.pt"
    ]
    # publishing again: a no-op; another checkpoint under a taken name: refused
    code, out = run("publish", built["child_cc12m"].parent, bucket, "--cache-dir", cache)
    assert code == 0 and "already published" in out, out
    code, out = run("publish", built["other"].parent, bucket, "--cache-dir", cache)
    assert code == 1 and "different checkpoint" in out and "remove that folder" in out, out
    printed += out
    # an object deleted from the bucket leaves the index and the mirror
    gone = f"custom/{built['child_wit'].stem}/{built['child_wit'].name}"
    s3.client().delete_object(Bucket=bucket.removeprefix("s3://"), Key=gone)
    assert run("collection", bucket, "--cache-dir", cache)[0] == 0
    index = json.loads(s3.objects(bucket)["index.json"])
    assert [e["path"] for e in index["checkpoints"]] == [f"{a}/{built['child_cc12m'].name}"]
    assert not (mirror / gone).exists()
    s3.assert_secret_nowhere(bucket, [tmp_path], printed)
