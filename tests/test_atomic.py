"""Atomic writes: all or nothing under the final name."""

from __future__ import annotations

import os
import stat

import pytest

from dalle_data.atomic import atomic_open, atomic_path, write_json


def test_written_file_appears_whole_with_a_normal_mode(tmp_path):
    target = tmp_path / "sub" / "out.json"
    write_json(target, {"b": 1, "a": [1, 2]})
    assert target.read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in target.parent.iterdir()] == ["out.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_open(target) as fh:
        fh.write("half of the new")
        raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_nothing_is_visible_under_the_final_name_while_writing(tmp_path):
    target = tmp_path / "big.bin"
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"x" * 1000)
        assert not target.exists()
        assert tmp.parent == target.parent  # same filesystem: the rename is atomic
    assert target.read_bytes() == b"x" * 1000


@pytest.mark.parametrize(("durable", "fsyncs"), [(True, 2), (False, 0)])
def test_durable_decides_only_the_fsyncs(tmp_path, monkeypatch, durable, fsyncs):
    calls = []
    monkeypatch.setattr(os, "fsync", calls.append)
    target = tmp_path / "shard.tar"
    with atomic_path(target, durable=durable) as tmp:
        tmp.write_bytes(b"y" * 10)
        assert not target.exists()
    assert target.read_bytes() == b"y" * 10 and len(calls) == fsyncs
    assert [p.name for p in tmp_path.iterdir()] == ["shard.tar"]
