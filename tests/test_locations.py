"""Locations: local paths and URLs behind one API, against a real S3 server and HTTP server."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from dalle_data import locations
from dalle_data.atomic import write_json
from tests.helpers.http import Route, serve


def test_paths_stay_paths_and_urls_are_checked(tmp_path: Path) -> None:
    assert locations.normalize(tmp_path) == tmp_path
    assert locations.normalize(f"file://{tmp_path}") == tmp_path
    assert locations.join("s3://b/data/", "sample", "shards") == "s3://b/data/sample/shards"
    assert locations.join(tmp_path, "a") == tmp_path / "a"
    assert locations.is_remote("gs://b/x") and locations.is_remote("hf://datasets/u/r")
    assert not locations.is_remote("data/x") and not locations.is_remote("file:///x")
    with pytest.raises(locations.LocationError, match="unknown location scheme 'ftp'"):
        locations.normalize("ftp://host/x")
    with pytest.raises(locations.LocationError, match="remove the user:password@ part"):
        locations.normalize("s3://AKIA:secret@bucket/x")


def test_secret_storage_options_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(locations.OPTIONS_ENV, json.dumps({"s3": {"anon": False}}))
    assert locations.storage_options("s3") == {"anon": False}
    monkeypatch.setenv(locations.OPTIONS_ENV, json.dumps({"s3": {"secret": "x"}}))
    with pytest.raises(locations.LocationError, match="looks like a secret"):
        locations.storage_options("s3")


def test_bucket_round_trip_matches_local_bytes(bucket: str, tmp_path: Path) -> None:
    obj = {"b": [1, 2], "a": "é"}
    write_json(tmp_path / "local.json", obj)
    locations.write_json(f"{bucket}/dir/remote.json", obj)
    remote = locations.read_bytes(f"{bucket}/dir/remote.json")
    assert remote == (tmp_path / "local.json").read_bytes()
    assert locations.sha256(f"{bucket}/dir/remote.json") == hashlib.sha256(remote).hexdigest()
    assert locations.sizes(f"{bucket}/dir") == {"remote.json": len(remote)}
    digest = locations.download(f"{bucket}/dir/remote.json", tmp_path / "copy.json")
    assert (tmp_path / "copy.json").read_bytes() == remote
    assert digest == hashlib.sha256(remote).hexdigest()


def test_a_failed_write_uploads_nothing(bucket: str) -> None:
    with pytest.raises(RuntimeError), locations.write_path(f"{bucket}/half.bin") as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed")
    assert locations.sizes(bucket) == {}
    assert not locations.exists(f"{bucket}/half.bin")


def test_a_large_object_goes_up_in_one_completed_multipart_upload(s3, bucket: str) -> None:
    # s3fs switches to multipart at twice its 50 MiB chunk; an object listed at all is whole.
    big = bytes(range(256)) * (4 * 2**20 // 256) * 26  # 104 MiB
    locations.write_bytes(f"{bucket}/big.bin", big)
    name = bucket.removeprefix("s3://")
    head = s3.client().head_object(Bucket=name, Key="big.bin")
    assert head["ContentLength"] == len(big)
    assert re.fullmatch(r'"[0-9a-f]{32}-[0-9]+"', head["ETag"])  # a completed multipart upload
    assert s3.client().list_multipart_uploads(Bucket=name).get("Uploads", []) == []
    assert locations.sha256(f"{bucket}/big.bin") == hashlib.sha256(big).hexdigest()


def test_put_tree_sends_the_marker_files_last(
    bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for rel in ("m/m.pt", "m/lineage.json", "m/README.md", "m/a/b.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(rel)
    sent: list[str] = []
    real_upload = locations.upload

    def upload(local: Path, location: locations.Location) -> None:
        real_upload(local, location)
        sent.append(str(location).removeprefix(f"{bucket}/out/"))

    monkeypatch.setattr(locations, "upload", upload)
    locations.put_tree(tmp_path, f"{bucket}/out", last=("m/m.pt", "m/lineage.json"))
    assert sent == ["m/README.md", "m/a/b.txt", "m/m.pt", "m/lineage.json"]
    assert locations.read_bytes(f"{bucket}/out/m/a/b.txt") == b"m/a/b.txt"


def test_http_is_read_only() -> None:
    with serve({"/x/f.bin": Route(body=b"hello")}) as server:
        url = server.url("/x/f.bin")
        assert locations.read_bytes(url) == b"hello"
        assert locations.sha256(url) == hashlib.sha256(b"hello").hexdigest()
        with pytest.raises(locations.LocationError, match="read-only"):
            locations.write_bytes(url, b"no")
        with pytest.raises(locations.LocationError, match="does not exist"):
            locations.read_bytes(server.url("/x/missing"))


def test_a_collection_url_that_cannot_be_written_is_refused_clearly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from dalle_data.cli import app

    monkeypatch.chdir(tmp_path)
    for args in (["collection", "https://127.0.0.1:9/models"], ["collection", "ftp://b/models"]):
        result = CliRunner().invoke(app, [*args, "--cache-dir", str(tmp_path / "cache")])
        assert result.exit_code == 1 and (
            "read-only" in result.output or "unknown" in result.output
        )
    assert list(tmp_path.iterdir()) == []  # no local "https:" folder, no mirror made
