"""Files that name classes load as data, nothing they name runs, and every malformed file is
one dalle-data error naming it (fuzzed: truncations, random bytes, text, bit flips, zips
missing members, legacy pickles). Every file is built here."""

from __future__ import annotations

import collections
import pickle
import random
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from dalle_data.errors import CheckpointError, DalleDataWarning
from dalle_data.model import safe_pickle, vqgan
from dalle_data.model.checkpoint import load_checkpoint, save_checkpoint
from tests.helpers import models, pickles

DEPTHS = ("top", "callbacks", "hparams")


def _hostile(depth: str, payload: object) -> dict:
    """A Lightning-shaped dict with ``payload`` at ``depth``."""
    obj: dict = {"state_dict": {"w": torch.ones(2)}, "callbacks": {}, "hyper_parameters": {}}
    if depth == "top":
        obj["extra"] = payload
    elif depth == "callbacks":
        obj["callbacks"] = {"ModelCheckpoint": {"best_model_path": payload}}
    else:
        obj["hyper_parameters"] = {"args": [payload]}
    return obj


@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_payloads_at_every_depth_load_as_placeholders_and_never_run(
    tmp_path: Path, depth: str, zip_format: bool
) -> None:
    marker = tmp_path / "pwned"
    for name, payload in pickles.payloads(marker).items():
        path = tmp_path / f"{name}.ckpt"
        torch.save(_hostile(depth, payload), path, _use_new_zipfile_serialization=zip_format)
        with pytest.warns(DalleDataWarning, match=f"none of their code ran\\): {name}$"):
            loaded = safe_pickle.load(path, what="VQGAN model")
        assert loaded.replaced == (name,)
        assert torch.equal(loaded.obj["state_dict"]["w"], torch.ones(2))
        assert not marker.exists(), name
        # ... and the loaders that use such files take only the tensors.
        with pytest.warns(DalleDataWarning):
            state, _ = vqgan.load_weights(path)
        assert list(state) == ["w"]
        assert not marker.exists(), name


def test_a_placeholder_keeps_its_arguments_and_state_as_data(tmp_path: Path) -> None:
    path = tmp_path / "x.pt"
    with pickles.stand_in("somepackage.module.Thing") as thing:
        obj = thing()
        obj.weights = torch.arange(3)
        obj.name = "kept"
        torch.save({"thing": obj, "cls": thing}, path)
    with pickles.absent("somepackage"), pytest.warns(DalleDataWarning, match="Thing"):
        loaded = safe_pickle.load(path, what="file").obj
    assert safe_pickle.placeholder_name(loaded["thing"]) == "somepackage.module.Thing"
    assert loaded["cls"] is type(loaded["thing"])
    assert loaded["thing"].state["name"] == "kept"
    assert torch.equal(loaded["thing"].state["weights"], torch.arange(3))
    assert repr(loaded["thing"]) == "<placeholder for somepackage.module.Thing>"


def test_plain_values_and_tensor_kinds_round_trip(tmp_path: Path) -> None:
    import argparse

    base = torch.randn(4, 5)
    obj = {
        "view": base[1:, ::2],
        "shared": (base, base),
        "param": torch.nn.Parameter(torch.ones(3)),
        "bf16": torch.ones(2, dtype=torch.bfloat16),
        "empty": torch.zeros(0, 3),
        "ordered": collections.OrderedDict(a=1),
        "bytes": b"\x00\xff",
        "set": {1, 2},
        "namespace": argparse.Namespace(lr=0.1, path=Path("/a/b")),
        "dtype": torch.float16,
        "size": torch.Size([2, 3]),
    }
    for zip_format in (True, False):
        path = tmp_path / f"{zip_format}.pt"
        torch.save(obj, path, _use_new_zipfile_serialization=zip_format)
        loaded = safe_pickle.load(path, what="file")
        assert loaded.replaced == ()
        got = loaded.obj
        assert torch.equal(got["view"], obj["view"])
        assert got["shared"][0].data_ptr() == got["shared"][1].data_ptr()
        assert type(got["param"]) is torch.Tensor and torch.equal(got["param"], torch.ones(3))
        assert got["bf16"].dtype == torch.bfloat16 and got["empty"].shape == (0, 3)
        assert got["ordered"] == obj["ordered"] and got["bytes"] == b"\x00\xff"
        assert got["set"] == {1, 2} and got["dtype"] is torch.float16
        assert got["namespace"].lr == 0.1 and str(got["namespace"].path) == "/a/b"
        assert got["size"] == torch.Size([2, 3])


# --- malformed files: one dalle-data error naming the file, never a traceback ------------------


@pytest.fixture(scope="module")
def originals(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Well-formed files of each kind the loaders meet (tiny)."""
    folder = tmp_path_factory.mktemp("originals")
    dalle = models.tiny_dalle(models.tiny_hparams(depth=1))
    saved = models.train_dalle_dict(dalle, models.tiny_hparams(depth=1))
    paths = {"dalle-data": folder / "dalle-data.pt", "legacy-format": folder / "legacy.pt"}
    save_checkpoint(
        paths["dalle-data"],
        hparams=saved["hparams"],
        vae_params=saved["vae_params"],
        vae_class_name="DiscreteVAE",
        weights=saved["weights"],
        epoch=1,
        opt_state=None,
        scheduler_state=None,
        lineage={"segments": "sample_1E"},
        tokenizer={"kind": "simple"},
    )
    torch.save(saved, paths["legacy-format"], _use_new_zipfile_serialization=False)
    paths["lightning"] = folder / "last.ckpt"
    pickles.write_lightning_vqgan(
        paths["lightning"], {"quantize.embedding.weight": torch.ones(4, 2)}
    )
    return paths


def _assert_one_clear_error(path: Path) -> None:
    """Both loaders end in CheckpointError naming ``path`` (a warning is fine)."""
    for loader in (load_checkpoint, vqgan.load_weights):
        with pytest.raises(CheckpointError) as err, _quiet():
            loader(path)
        message = str(err.value)
        assert str(path) in message and "\n" not in message, message


@contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.mark.parametrize("kind", ["dalle-data", "legacy-format", "lightning"])
def test_truncated_files(tmp_path: Path, originals: dict[str, Path], kind: str) -> None:
    data = originals[kind].read_bytes()
    lengths = sorted(
        {0, 1, 2, 4, 10, 64, 100, len(data) - 1, len(data) - 22}
        | {len(data) * k // 37 for k in range(1, 37)}
    )
    for n in lengths:
        path = tmp_path / f"cut-{n}.pt"
        path.write_bytes(data[:n])
        _assert_one_clear_error(path)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"definitely not a checkpoint",
        b'{"hparams": {}}\n',
        b"<!DOCTYPE html><html><body>404 Not Found</body></html>",
        "çé text in UTF-8\n".encode(),
        pickle.dumps({"hparams": {}, "vae_params": None, "weights": {}}, protocol=2),
        pickle.dumps([1, 2, 3], protocol=4),
        b"\x80\x02",
        b"PK\x03\x04 truncated zip",
        b"ustar".rjust(262, b"\0"),
    ],
    ids=[
        "empty",
        "text",
        "json",
        "html",
        "utf8",
        "plain-pickle",
        "pickle4",
        "pickle-head",
        "zip-head",
        "tar",
    ],
)
def test_foreign_files(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    _assert_one_clear_error(path)


def test_random_bytes(tmp_path: Path) -> None:
    rng = random.Random(13)
    for size in (1, 7, 100, 4096, 70000):
        for start in (b"", b"\x80\x02", b"PK\x03\x04"):
            path = tmp_path / f"random-{size}-{len(start)}.pt"
            path.write_bytes(start + rng.randbytes(size))
            _assert_one_clear_error(path)


def test_a_flipped_bit_in_a_tensor_is_refused(tmp_path: Path, originals: dict[str, Path]) -> None:
    data = bytearray(originals["dalle-data"].read_bytes())
    with zipfile.ZipFile(originals["dalle-data"]) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("/data/0"))
    # The member's data starts after its local header (30 bytes + name + extra field).
    name_len, extra_len = (
        int.from_bytes(data[info.header_offset + 26 : info.header_offset + 28], "little"),
        int.from_bytes(data[info.header_offset + 28 : info.header_offset + 30], "little"),
    )
    start = info.header_offset + 30 + name_len + extra_len
    data[start + info.file_size // 2] ^= 0x10
    path = tmp_path / "bitrot.pt"
    path.write_bytes(data)
    # torch itself loads this silently with one wrong weight:
    assert torch.load(path, weights_only=True)["weights"]
    with pytest.raises(CheckpointError, match=f"checkpoint {path} is damaged .*Bad CRC-32"):
        load_checkpoint(path)


@pytest.mark.parametrize("kind", ["dalle-data", "lightning"])
def test_bit_flips_anywhere_are_refused_or_harmless(
    tmp_path: Path, originals: dict[str, Path], kind: str
) -> None:
    """A flip is either refused or lands where it changes nothing (zip padding, timestamps)."""
    original = originals[kind].read_bytes()
    with _quiet():
        expected = safe_pickle.load(originals[kind], what="file").obj
    rng = random.Random(kind)
    path = tmp_path / "flipped.pt"
    for position in sorted(rng.sample(range(len(original)), 120)):
        data = bytearray(original)
        data[position] ^= 1 << rng.randrange(8)
        path.write_bytes(data)
        try:
            with _quiet():
                got = safe_pickle.load(path, what="file").obj
        except CheckpointError as err:
            assert str(path) in str(err)
            continue
        assert _same(got, expected), f"byte {position} changed what loads"


def _same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return (
            isinstance(b, dict)
            and len(a) == len(b)
            and all(_same(ka, kb) and _same(a[ka], b[kb]) for ka, kb in zip(a, b, strict=True))
        )
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))  # type: ignore[arg-type]
    if safe_pickle.placeholder_name(a):
        return safe_pickle.placeholder_name(a) == safe_pickle.placeholder_name(b)
    return a == b


def test_legacy_format_flips_never_crash(tmp_path: Path, originals: dict[str, Path]) -> None:
    """The legacy format has no checksum: a flip may load, but never ends in a traceback."""
    original = originals["legacy-format"].read_bytes()
    rng = random.Random(5)
    path = tmp_path / "flipped.pt"
    for position in rng.sample(range(len(original)), 80):
        data = bytearray(original)
        data[position] ^= 1 << rng.randrange(8)
        path.write_bytes(data)
        try:
            with _quiet():
                load_checkpoint(path)
        except CheckpointError as err:
            assert str(path) in str(err)


def _rezip(source: Path, target: Path, drop: str) -> None:
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as out:
        for info in src.infolist():
            if not info.filename.endswith(drop):
                out.writestr(info, src.read(info))


@pytest.mark.parametrize("member", ["/data.pkl", "/data/0", "/data/3"])
def test_zips_missing_members(tmp_path: Path, originals: dict[str, Path], member: str) -> None:
    path = tmp_path / "incomplete.pt"
    _rezip(originals["dalle-data"], path, member)
    _assert_one_clear_error(path)


def test_a_zip_without_optional_records_still_loads(
    tmp_path: Path, originals: dict[str, Path]
) -> None:
    path = tmp_path / "no-byteorder.pt"
    _rezip(originals["dalle-data"], path, "/byteorder")
    assert load_checkpoint(path)["weights"]


def test_a_zip_of_something_else(tmp_path: Path) -> None:
    path = tmp_path / "images.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("a.jpg", b"\xff\xd8")
    with pytest.raises(CheckpointError, match="zip archive without one <name>/data.pkl"):
        load_checkpoint(path)


def test_a_torchscript_archive(tmp_path: Path) -> None:
    path = tmp_path / "scripted.pt"
    with _quiet():
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), path)
    with pytest.raises(CheckpointError, match="TorchScript archive"):
        load_checkpoint(path)


def test_a_text_file_named_pt_is_one_line_in_the_cli(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from dalle_data.cli import app

    path = tmp_path / "model.pt"
    path.write_text("hello, this is not a model\n" * 5)
    result = CliRunner().invoke(app, ["inspect", str(path)])
    assert result.exit_code == 1
    assert result.stderr == (
        f"error: checkpoint {path} is not a readable torch file: it is a text file (it starts "
        "with 'hello, this is not a model hello, this is not a model hello,'), not a torch.save "
        "file\n"
    )
