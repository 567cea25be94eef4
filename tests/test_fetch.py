"""fetch: downloads from a local HTTP server (with Range resume), links local files."""

from __future__ import annotations

import hashlib
import http.server
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dalle_data.cli import app
from dalle_data.pipeline.fetch import FetchError, fetch
from tests.helpers.http import LocalServer, Route

BODY = bytes(range(256)) * 4000  # ~1 MB


def test_download_records_sha256_and_size(tmp_path: Path, http_server: LocalServer) -> None:
    http_server.routes["/data/cc12m.tsv"] = Route(body=BODY)
    record = fetch([http_server.url("/data/cc12m.tsv")], tmp_path / "raw")
    (entry,) = record["files"]
    assert entry["name"] == "cc12m.tsv" and entry["linked"] is False
    assert entry["sha256"] == hashlib.sha256(BODY).hexdigest() and entry["bytes"] == len(BODY)
    assert (tmp_path / "raw/cc12m.tsv").read_bytes() == BODY
    assert json.loads((tmp_path / "raw/fetch.json").read_text()) == record
    assert not (tmp_path / "raw/cc12m.tsv.part").exists()


def test_interrupted_download_resumes_with_range(tmp_path: Path, http_server: LocalServer) -> None:
    ranges: list[str | None] = []

    def cut_off(req: http.server.BaseHTTPRequestHandler) -> None:
        """Announce the whole body, send a third of it, then drop the connection."""
        ranges.append(req.headers.get("Range"))
        req.send_response(200)
        req.send_header("Content-Length", str(len(BODY)))
        req.end_headers()
        req.wfile.write(BODY[: len(BODY) // 3])
        req.wfile.flush()
        req.close_connection = True

    http_server.routes["/wit.tsv.gz"] = Route(handler=cut_off)
    raw = tmp_path / "raw"
    with pytest.raises(FetchError, match="rerun to resume"):
        fetch([http_server.url("/wit.tsv.gz")], raw)
    part = raw / "wit.tsv.gz.part"
    assert part.read_bytes() == BODY[: len(BODY) // 3]
    assert not (raw / "wit.tsv.gz").exists() and not (raw / "fetch.json").exists()

    http_server.routes["/wit.tsv.gz"] = Route(body=BODY)  # serves Range requests
    http_server.requests.clear()
    record = fetch([http_server.url("/wit.tsv.gz")], raw)
    assert record["files"][0]["sha256"] == hashlib.sha256(BODY).hexdigest()
    assert (raw / "wit.tsv.gz").read_bytes() == BODY and not part.exists()
    assert ranges == [None] and http_server.requests == ["/wit.tsv.gz"]


def test_resume_restarts_when_the_server_ignores_range(
    tmp_path: Path, http_server: LocalServer
) -> None:
    def no_range(req: http.server.BaseHTTPRequestHandler) -> None:
        req.send_response(200)
        req.send_header("Content-Length", str(len(BODY)))
        req.end_headers()
        req.wfile.write(BODY)

    http_server.routes["/f.tsv"] = Route(handler=no_range)
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "f.tsv.part").write_bytes(b"stale partial bytes")
    fetch([http_server.url("/f.tsv")], raw)
    assert (raw / "f.tsv").read_bytes() == BODY


def test_local_paths_and_file_urls_are_linked_not_copied(tmp_path: Path) -> None:
    a, b = tmp_path / "a.tsv", tmp_path / "b.tsv"
    a.write_text("x\ty\n")
    b.write_text("z\tw\n")
    raw = tmp_path / "raw"
    record = fetch([str(a), b.as_uri()], raw, subset=str(a.with_name("a.tsv")), select=[1])
    assert [f["name"] for f in record["files"]] == ["b.tsv", "a.tsv"]
    assert [(f["index"], f["role"]) for f in record["files"]] == [(1, "source"), (0, "subset")]
    assert (raw / "b.tsv").is_symlink() and (raw / "b.tsv").resolve() == b
    assert record["files"][0]["sha256"] == hashlib.sha256(b"z\tw\n").hexdigest()
    fetch([str(a), str(b)], raw)  # idempotent: the links are reused
    assert (raw / "a.tsv").resolve() == a


def test_fetch_errors_name_the_source(tmp_path: Path, http_server: LocalServer) -> None:
    with pytest.raises(FetchError, match="does not exist"):
        fetch([str(tmp_path / "missing.tsv")], tmp_path / "raw")
    with pytest.raises(FetchError, match="HTTP 404"):
        fetch([http_server.url("/nothing.tsv")], tmp_path / "raw")
    with pytest.raises(FetchError, match="same file name"):
        fetch(["https://a.org/x/f.tsv", "https://b.org/y/f.tsv"], tmp_path / "raw")
    with pytest.raises(FetchError, match=r"indices \[5\] do not exist"):
        fetch(["https://a.org/f.tsv"], tmp_path / "raw", select=[5])
    result = CliRunner().invoke(
        app, ["fetch", "--source", str(tmp_path / "nope.tsv"), "--raw-dir", str(tmp_path / "r")]
    )
    assert result.exit_code == 1 and "nope.tsv does not exist" in result.output
