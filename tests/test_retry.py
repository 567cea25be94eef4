"""Hosts that push back: retry rounds after Retry-After, re-fetching only what failed,
per-host pacing, and the failure reasons that tell them apart."""

from __future__ import annotations

import email.utils
import http.server
import json
import os
import shutil
import signal
import socket
import ssl
import time
import urllib.error
from collections.abc import Iterator
from email.message import Message
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from dalle_data.formats.manifest import read_manifest
from dalle_data.pipeline import download as download_module
from dalle_data.pipeline.dataset_card import write_card
from dalle_data.pipeline.download import DownloadSettings
from dalle_data.pipeline.failures import REASONS, RETRYABLE, failure_reason, retry_after
from dalle_data.pipeline.finalize import finalize
from dalle_data.pipeline.hosts import Fetch, HostSchedule, host_order, reason_of, user_agent
from dalle_data.pipeline.retry import (
    download_with_retries,
    record_path,
    retry_after_seconds,
    round_wait,
)
from tests.helpers.http import LocalServer, Route, in_turn, send, serve, slow_down
from tests.test_download import IMAGE_SIZE, TIMEOUT, build, image_bytes, write_metadata

SLOW_DOWN = 2  # the 429 host's Retry-After, seconds
JPEG = {"Content-Type": "image/jpeg"}


def picture(i: int) -> Route:
    return Route(image_bytes("RGB", (90 + i, 70), "JPEG", 100 + i), headers=JPEG)


PATHS = ["/0.jpg", "/1.jpg", "/slow.jpg", "/2.jpg", "/flaky.jpg", "/missing.jpg", "/3.jpg"]
PATHS += ["/page.jpg", "/4.jpg"]
PERMANENT = {"/missing.jpg": "http_404", "/page.jpg": "decode_error"}


def answering_routes() -> dict[str, Route]:
    """Every host answers at once (the build the retried ones must equal)."""
    routes = {f"/{i}.jpg": picture(i) for i in range(5)}
    routes["/slow.jpg"] = picture(10)
    routes["/flaky.jpg"] = picture(11)
    routes["/page.jpg"] = Route(b"<html>not an image</html>", headers={"Content-Type": "text/html"})
    return routes


def pushing_back_routes() -> dict[str, Route]:
    """/slow.jpg answers 429 until SLOW_DOWN seconds passed; /flaky.jpg 503 once."""
    routes = answering_routes()
    routes["/slow.jpg"] = Route(handler=slow_down(SLOW_DOWN, picture(10)))
    routes["/flaky.jpg"] = Route(handler=in_turn(Route(b"busy", status=503), picture(11)))
    return routes


def rows_for(server: LocalServer) -> list[dict]:
    return [
        {"row_id": 100 + 7 * i, "url": server.url(p), "caption": f"picture {p[1:]}"}
        for i, p in enumerate(PATHS)
    ]


def reproducible(shards: Path, dataset: str = "test") -> dict[str, bytes]:
    """What must not depend on when an image came: shards, manifest and side tables."""
    names = sorted(p.name for p in shards.glob(f"{dataset}-*.tar"))
    names += ["manifest.json", "failures.parquet", "index.parquet"]
    return {name: (shards / name).read_bytes() for name in names}


@pytest.fixture(scope="module")
def server() -> Iterator[LocalServer]:
    """One server for the module: the URLs (port included) go into every sample's json."""
    with serve() as server:
        yield server


def listen(server: LocalServer, routes: dict[str, Route]) -> None:
    """Serve ``routes`` from now on, with an empty request log."""
    server.routes = routes
    server.requests.clear()
    server.seen.clear()


@pytest.fixture(scope="module")
def answered(server: LocalServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The shards of a build in which every host answered the first time."""
    listen(server, answering_routes())
    ds_dir = tmp_path_factory.mktemp("answered") / "test"
    write_metadata(ds_dir, rows_for(server), {})
    build(ds_dir, rows_per_part=100, retry_rounds=0)
    assert read_manifest(ds_dir / "shards")["counts"]["written"] == 7
    return reproducible(ds_dir / "shards")


def test_recovered_images_give_the_bytes_of_a_first_time_answer(
    tmp_path: Path, server: LocalServer, answered: dict[str, bytes]
) -> None:
    listen(server, pushing_back_routes())
    ds_dir = tmp_path / "test"
    write_metadata(ds_dir, rows_for(server), {})
    build(ds_dir, rows_per_part=100, retry_rounds=2, retry_backoff=0.1)
    assert reproducible(ds_dir / "shards") == answered
    first, second = server.times("/slow.jpg")  # asked sooner, it would have refused again
    assert second - first >= SLOW_DOWN - 1  # Retry-After counts whole seconds
    for path in PERMANENT:
        assert server.requests.count(path) == 1  # permanent failures are never retried
    assert server.requests.count("/flaky.jpg") == 2
    facts = json.loads((ds_dir / "shards" / "build.json").read_text())["retry_rounds"]
    assert facts["recovered"] == {"http_429": 1, "http_5xx": 1}
    assert facts["still_retryable"] == 0
    (round_1,) = facts["rounds"]
    assert round_1["rows"] == 2 and round_1["wait_seconds"] >= SLOW_DOWN
    card = write_card(ds_dir / "shards").read_text()
    assert "## Retry rounds" in card and "http_429: 1, http_5xx: 1" in card


def test_rerun_fetches_only_rows_that_failed_retryably(
    tmp_path: Path, server: LocalServer, answered: dict[str, bytes]
) -> None:
    """A build whose hosts stayed down, then the same download once the network is back."""
    routes = answering_routes()
    routes["/slow.jpg"] = Route(b"slow down", status=429, headers={"Retry-After": "1"})
    routes["/flaky.jpg"] = Route(handler=in_turn(Route(b"", status=503)))
    listen(server, routes)
    ds_dir = tmp_path / "test"
    write_metadata(ds_dir, rows_for(server), {})
    manifest = build(ds_dir, rows_per_part=100, retry_rounds=0)
    assert manifest["counts"]["failed"] == {
        "decode_error": 1,
        "http_404": 1,
        "http_429": 1,
        "http_5xx": 1,
    }  # written (5) + failed (4) = input rows: the books close before the rerun
    failures = pq.read_table(ds_dir / "shards" / "failures.parquet").to_pylist()
    slow = next(f for f in failures if f["url"].endswith("/slow.jpg"))
    assert retry_after(slow["error"]) == "1" and failure_reason(slow["error"]) == "http_429"

    listen(server, answering_routes())
    # Other processes and a rate limit cut and order img2dataset's input otherwise: the
    # finished first round stands all the same.
    settings = DownloadSettings(
        image_size=IMAGE_SIZE,
        timeout=TIMEOUT,
        retry_rounds=1,
        processes=2,
        max_requests_per_second_per_host=50,
    )
    part = ds_dir / "download" / "parts" / "part-00000.parquet"
    record = download_with_retries(part, ds_dir / "downloaded" / "part-00000", settings)
    assert sorted(server.requests) == ["/flaky.jpg", "/slow.jpg"]  # not the whole part
    assert record == json.loads(record_path(ds_dir / "downloaded" / "part-00000").read_text())
    assert (record["downloaded"], record["failed"], record["retryable"]) == (
        7,
        {"decode_error": 1, "http_404": 1},
        0,
    )
    (round_1,) = record["rounds"]
    assert round_1["recovered"] == {"http_429": 1, "http_5xx": 1}
    finalize(ds_dir, dataset="test", tokenizer_spec="simple", image_size=IMAGE_SIZE, shard_size=4)
    assert reproducible(ds_dir / "shards") == answered


def test_fetch_records_status_and_retry_after(http_server: LocalServer) -> None:
    """The fetch img2dataset's workers use, called as img2dataset calls download_image."""
    http_server.routes["/busy"] = Route(b"", status=429, headers={"Retry-After": "120"})
    http_server.routes["/down"] = Route(b"", status=503)
    http_server.routes["/ok.jpg"] = picture(0)
    agent = user_agent("dalle-data-test", "mailto:crawler@example.org")
    fetch = Fetch(user_agent=agent)
    key, stream, error = fetch((3, http_server.url("/ok.jpg")), TIMEOUT, "dalle-data-test", None)
    assert key == 3 and stream is not None and stream.read() == picture(0).body and error is None
    assert http_server.seen[-1].user_agent == agent
    assert agent.startswith("dalle-data-test/") and "(mailto:crawler@example.org)" in agent
    _, _, busy = fetch((0, http_server.url("/busy")), TIMEOUT, None, None)
    assert (failure_reason(busy), retry_after(busy)) == ("http_429", "120")
    _, _, down = fetch((0, http_server.url("/down")), TIMEOUT, None, None)
    assert (failure_reason(down), retry_after(down)) == ("http_5xx", None)
    with socket.socket() as closed:  # a port nobody listens on: connection refused
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    _, _, refused = fetch((0, f"http://127.0.0.1:{port}/x.jpg"), TIMEOUT, None, None)
    assert failure_reason(refused) == "connection"


def test_fetch_keeps_its_connection_and_replaces_one_the_host_closed(
    http_server: LocalServer,
) -> None:
    """A thread's requests to a host share one connection (urllib pays a TCP and TLS
    handshake per image, and the host a connection per image); a connection the host hung
    up meanwhile is replaced, and the request sent again, instead of failing."""
    body = picture(0)
    ports: list[int] = []

    def answer(req: http.server.BaseHTTPRequestHandler) -> None:
        ports.append(req.client_address[1])
        send(req, body)

    def answer_then_hang_up(req: http.server.BaseHTTPRequestHandler) -> None:
        answer(req)
        req.close_connection = True  # without saying so (no "Connection: close")

    http_server.routes["/kept.jpg"] = Route(handler=answer)
    http_server.routes["/once.jpg"] = Route(handler=answer_then_hang_up)
    fetch = Fetch(user_agent="dalle-data-test")
    for path, connections in (("/kept.jpg", 1), ("/once.jpg", 4)):
        ports.clear()
        for _ in range(4):
            _, stream, error = fetch((0, http_server.url(path)), TIMEOUT, None, None)
            assert error is None and stream is not None and stream.read() == body.body
        assert len(set(ports)) == connections, path


def _http_error(code: int) -> urllib.error.HTTPError:
    return urllib.error.HTTPError("http://h/x", code, "msg", Message(), None)


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (_http_error(429), "http_429"),
        (_http_error(503), "http_5xx"),
        (_http_error(404), "http_404"),
        (_http_error(410), "http_410"),
        (_http_error(302), "too_many_redirects"),
        (urllib.error.URLError(TimeoutError("timed out")), "timeout"),
        (TimeoutError("The read operation timed out"), "timeout"),
        (urllib.error.URLError(socket.gaierror(socket.EAI_AGAIN, "Temporary failure")), "dns"),
        (urllib.error.URLError(socket.gaierror(socket.EAI_NONAME, "unknown")), "dns_not_found"),
        (urllib.error.URLError(ConnectionRefusedError(111, "refused")), "connection"),
        (ConnectionResetError(104, "Connection reset by peer"), "connection"),
        (urllib.error.URLError(FileNotFoundError(2, "No such file")), "file_not_found"),
        (urllib.error.URLError(ssl.SSLCertVerificationError("bad cert")), "tls_certificate"),
        (urllib.error.URLError("unknown url type: ftp"), "file_url_refused"),
    ],
)
def test_reason_of_each_kind_of_failure(error: BaseException, reason: str) -> None:
    assert reason_of(error) == reason
    assert reason in REASONS or reason.startswith("http_")


def test_retryable_reasons_are_the_transient_ones() -> None:
    assert {"http_429", "http_5xx", "timeout", "dns", "connection"} == RETRYABLE


def test_retry_after_seconds_or_http_date() -> None:
    since = 1_700_000_000.0
    assert retry_after_seconds("30", since) == 30
    assert retry_after_seconds(email.utils.formatdate(since + 90, usegmt=True), since) == 90
    assert retry_after_seconds(email.utils.formatdate(since - 90, usegmt=True), since) == 0
    assert retry_after_seconds("soon", since) is None
    assert retry_after_seconds(None, since) is None


def test_round_wait_honours_retry_after_up_to_the_cap_else_backs_off() -> None:
    settings = DownloadSettings(image_size=64, retry_after_max=60, retry_backoff=4)
    asked = "[http_429 retry-after=30] HTTP Error 429: Too Many Requests"
    assert round_wait([asked], 1, settings, ended=0) == 30
    assert round_wait(["[http_429 retry-after=3600] x"], 1, settings, ended=0) == 60
    for k, (low, high) in ((1, (2, 4)), (3, (8, 16))):
        wait = round_wait(["[timeout] timed out"], k, settings, ended=0)
        assert low <= wait <= high
    assert round_wait([asked, "[http_5xx] HTTP Error 503"], 1, settings, ended=0) == 30


def test_host_schedule_spaces_one_host_and_leaves_others_alone(tmp_path: Path) -> None:
    schedule = HostSchedule(tmp_path, rate=4)
    starts = [schedule.reserve("busy.example") for _ in range(8)]
    assert [round(b - a, 6) for a, b in zip(starts, starts[1:], strict=False)] == [0.25] * 7
    other = HostSchedule(tmp_path, rate=4).reserve("quiet.example")
    assert other < starts[2]  # not behind the busy host's queue


def test_host_order_sends_a_busy_hosts_rows_to_the_back() -> None:
    urls = [f"http://busy/{i}" for i in range(6)] + ["http://quiet/a", "file:///x", None]
    order = host_order(urls, chunks=1)
    assert sorted(order) == list(range(9))
    assert order[:5] == [0, 6, 7, 8, 1]  # each host's first row, then the busy host's next
    dealt = host_order(urls, chunks=2)
    assert dealt == order[0::2] + order[1::2]


@pytest.fixture
def two_hosts() -> Iterator[tuple[LocalServer, LocalServer]]:
    routes = {f"/{i}.jpg": picture(i % 5) for i in range(48)}
    with serve(routes, host="127.0.0.1") as busy, serve(routes, host="127.0.0.2") as quiet:
        yield busy, quiet


def test_rate_per_host_holds_across_processes(
    tmp_path: Path, two_hosts: tuple[LocalServer, LocalServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    busy, quiet = two_hosts
    monkeypatch.setattr(download_module, "ROWS_PER_WORKER", 1)  # two workers for 48 rows
    rate = 8
    urls = [busy.url(f"/{i}.jpg") for i in range(48)]
    urls[5:45:10] = [quiet.url(f"/{i}.jpg") for i in range(4)]
    ds_dir = tmp_path / "test"
    rows = [{"row_id": i, "url": u, "caption": f"picture {i}"} for i, u in enumerate(urls)]
    write_metadata(ds_dir, rows, {})
    manifest = build(
        ds_dir,
        rows_per_part=100,
        processes=2,
        max_requests_per_second_per_host=rate,
        user_agent_token="dalle-data-test",
        contact="https://example.org/crawler",
    )
    # Every row downloaded (its 5 pictures repeat, so image dedup writes fewer samples) ...
    assert manifest["counts"]["input_rows"] == 48 and not manifest["counts"]["failed"]
    # ... by two img2dataset worker processes, a shard each
    assert len(list((ds_dir / "downloaded" / "part-00000").glob("*_stats.json"))) == 2
    for server, n in ((busy, 44), (quiet, 4)):
        times = sorted(s.at for s in server.seen)
        assert len(times) == n
        # Start times are 1/rate apart; 10% allows for the network between client and server.
        assert times[-1] - times[0] >= 0.9 * (n - 1) / rate
    assert max(s.at for s in quiet.seen) < sorted(s.at for s in busy.seen)[-10]
    agents = {s.user_agent for s in busy.seen + quiet.seen}
    assert agents == {user_agent("dalle-data-test", "https://example.org/crawler")}


@pytest.mark.slow
def test_snakemake_kill9_in_a_retry_round_then_more_rounds_once_the_host_is_back(
    tmp_path: Path, server: LocalServer
) -> None:
    """`snakemake --cores N target`: killed while a retry round waits, unlocked, run again
    (the bytes of an uninterrupted run); then, the 503 host back, rerun with more rounds
    (only its row is fetched, finalize reruns, the bytes of a first-time answer)."""
    from tests.test_build_pipeline import CONFIG, SNAKEFILE, finished, snakemake

    down = Route(handler=in_turn(Route(b"busy", status=503)))
    work = tmp_path / "work"
    ds_dir = work / "data" / "cc12m"
    write_metadata(ds_dir, rows_for(server), {})
    (work / "Snakefile").write_text(SNAKEFILE)
    config = CONFIG.replace("rows_per_part: 6", "rows_per_part: 100")
    (work / "extra.yaml").write_text(
        config.replace("retry_rounds: 0", "retry_rounds: 1\n  retry_backoff: 0.1")
    )
    shards = ds_dir / "shards"

    def expected(name: str, routes: dict[str, Route]) -> dict[str, bytes]:
        """An uninterrupted library build of the same rows against ``routes``."""
        listen(server, routes)
        other = tmp_path / name / "cc12m"
        shutil.copytree(ds_dir / "metadata", other / "metadata")
        build(other, rows_per_part=100, dataset="cc12m", retry_rounds=0)
        return reproducible(other / "shards", "cc12m")

    still_down = expected("still_down", {**answering_routes(), "/flaky.jpg": down})
    all_back = expected("all_back", answering_routes())

    listen(server, {**pushing_back_routes(), "/flaky.jpg": down})
    proc = snakemake(work, "--cores", "1", "target")
    planned = ds_dir / "downloaded" / "part-00000" / "rounds" / "1.parquet"
    deadline = time.monotonic() + 300
    while not planned.exists():  # round 1 waits out /slow.jpg's Retry-After
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "the build never planned a retry round"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished(snakemake(work, "--unlock"))
    finished(snakemake(work, "--cores", "1", "target"))
    assert reproducible(shards, "cc12m") == still_down
    assert server.requests.count("/slow.jpg") == 2  # once refused, once after the wait

    listen(server, answering_routes())
    (work / "extra.yaml").write_text(config.replace("retry_rounds: 0", "retry_rounds: 2"))
    finished(snakemake(work, "--cores", "1", "target"))
    assert server.requests == ["/flaky.jpg"]
    assert reproducible(shards, "cc12m") == all_back
    facts = json.loads((shards / "build.json").read_text())["retry_rounds"]
    assert facts["recovered"] == {"http_429": 1, "http_5xx": 1}
    assert "| 2 | 1 | 1 |" in (shards / "README.md").read_text()  # round 2: 1 part, 1 row
