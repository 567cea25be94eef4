"""dalle-data serve as people use it: a real server process, HTTP clients and a real browser.

The collection holds tiny DiscreteVAE models (32 px, 64 image tokens, 8 text tokens), so a
generation takes a fraction of a second on one CPU core.
"""

from __future__ import annotations

import base64
import contextlib
import importlib.util
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from dalle_data.hashing import sha256_file
from dalle_data.model.checkpoint import save_checkpoint
from dalle_data.model.lineage import Architecture, model_name, parse_lineage
from tests.helpers.http import Route, free_port, serve
from tests.helpers.models import TINY_VAE_PARAMS, tiny_dalle, tiny_hparams
from tests.helpers.s3 import S3Server
from tests.helpers.tiny import write_tokenizer

DALLE_DATA = str(Path(sys.executable).parent / "dalle-data")
FRONT_END_ORIGIN = "https://rom1504.github.io"
EVAL_SHA = "e" * 64


# --- the collection -------------------------------------------------------------------


def _checkpoint(path: Path, *, seed: int, segments: str, tokenizer: dict[str, Any]) -> str:
    hparams = tiny_hparams()
    dalle = tiny_dalle(hparams, seed=seed)
    save_checkpoint(
        path,
        hparams=hparams,
        vae_params=TINY_VAE_PARAMS,
        vae_class_name="DiscreteVAE",
        weights=dalle.state_dict(),
        epoch=1,
        opt_state=None,
        scheduler_state=None,
        lineage={"segments": segments, "history": []},
        tokenizer=tokenizer,
    )
    return model_name(Architecture.from_hparams(hparams), parse_lineage(segments))


def _record(root: Path, path: Path, name: str, parent: dict | None, evals: list) -> dict:
    """An index.json entry as ../shared/DESIGN.md's collection contract has it."""
    return {
        "path": path.relative_to(root).as_posix(),
        "family": "custom",
        "name": name,
        "sha256": sha256_file(path),
        "bytes": path.stat().st_size,
        "architecture": name.split("_tiny")[0],
        "lineage": name.split("_", 5)[-1],
        "epochs": name.rsplit("_", 1)[-1].rstrip("E"),
        "parent": parent,
        "tokenizer": {"kind": "hug", "vocab_size": 64},
        "evals": evals,
        "problems": [],
    }


def _score(loss: float) -> dict[str, Any]:
    return {
        "dataset": "tiny",
        "manifest_sha256": EVAL_SHA,
        "samples": 12,
        "text_loss": loss + 1,
        "image_loss": loss - 0.1,
        "loss": loss,
        "bits_per_image_token": loss / 0.693,
    }


def build_collection(root: Path) -> list[str]:
    """Three tiny models: a root with a card and samples, its child, and a flat seed-layout
    file whose tokenizer was moved beside it (the recorded path no longer exists)."""
    tokenizer_path = root / "tokenizers" / "tokenizer.json"
    spec = write_tokenizer(tokenizer_path, vocab_size=64)
    from dalle_data.formats import tokenizers

    record = tokenizers.load(spec).record()
    names, entries = [], []
    parent = None
    for seed, segments, loss in ((1, "tiny_1E", 5.25), (2, "tiny_2E", 4.5)):
        staging = root / "staging.pt"
        name = _checkpoint(staging, seed=seed, segments=segments, tokenizer=record)
        folder = root / "custom" / name
        folder.mkdir(parents=True)
        path = folder / f"{name}.pt"
        staging.rename(path)
        Image.new("RGB", (136, 70), (80, 60, 200)).save(folder / "samples.png")
        (folder / "README.md").write_text(
            f"---\nlibrary_name: dalle-pytorch\n---\n# {name}\n\n"
            f"| field | value |\n|---|---|\n| lineage | {segments} |\n\n"
            "![samples](samples.png)\n\n<script>alert('card html is escaped')</script>\n",
            encoding="utf-8",
        )
        entries.append(_record(root, path, name, parent, [_score(loss)]))
        parent = {"name": name, "sha256": entries[-1]["sha256"]}
        names.append(name)
    moved = dict(record, spec=f"hug:{root / 'gone' / 'tokenizer.json'}")
    flat = root / "custom" / "flat.pt"
    name = _checkpoint(flat, seed=3, segments="other_1E", tokenizer=moved)
    flat = flat.rename(root / "custom" / f"{name}.pt")
    shutil.copy(tokenizer_path, root / "custom" / "tokenizer.json")
    entries.append(_record(root, flat, name, None, []))
    names.append(name)
    escape = dict(entries[0], name="escapee", path="../outside.pt")
    index = {"checkpoints": [*entries, escape]}
    (root / "index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    Image.new("RGB", (200, 120), (240, 240, 240)).save(root / "lineage.png")
    return names


@pytest.fixture(scope="module")
def collection(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("serve") / "collection"
    root.mkdir()
    return root, build_collection(root)


# --- the server, as a real process ------------------------------------------------------


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def post(self, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
        """POST /dalle as dalle-service's front-end does: a JSON string sent as text/plain."""
        content = body if isinstance(body, bytes | str) else json.dumps(body)
        sent = {"Content-Type": "text/plain;charset=UTF-8", "Bypass-Tunnel-Reminder": "go"}
        return httpx.post(
            f"{self.url}/dalle", content=content, headers={**sent, **(headers or {})}, timeout=600
        )

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.get(f"{self.url}{path}", timeout=60, **kwargs)


@contextlib.contextmanager
def run_server(root: Path | str, *options: str, log_dir: Path | None = None) -> Iterator[Server]:
    """``dalle-data serve ROOT`` on a free 127.0.0.1 port, stopped with Ctrl-C afterwards;
    its log in ``log_dir`` (default: beside a local ROOT).

    One torch thread: tiny models sample far faster without thread hand-offs, above all on
    a machine whose cores are shared.
    """
    port = free_port()
    log = (log_dir or Path(root).parent) / f"serve-{port}.log"
    command = ["dalle-data", "serve", str(root), "--port", str(port), *options]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    server = Server(url=f"http://127.0.0.1:{port}", process=process, log=log)
    give_up = time.monotonic() + 600  # a hang guard, not a speed check
    try:
        while True:  # ready when GET / answers; a server that exits is a failure
            if time.monotonic() > give_up:
                pytest.fail(f"dalle-data serve did not answer GET /:\n{log.read_text()}")
            if process.poll() is not None:
                pytest.fail(f"dalle-data serve exited {process.returncode}:\n{log.read_text()}")
            with contextlib.suppress(httpx.TransportError):
                if server.get("/").status_code == 200:
                    break
            time.sleep(0.2)
        yield server
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def server(collection: tuple[Path, list[str]]) -> Iterator[Server]:
    root, _ = collection
    with run_server(root, "--max-images", "4", "--max-loaded", "1", "--queue", "2") as running:
        yield running
    assert running.process.returncode == 0, running.log.read_text()
    assert "Traceback" not in running.log.read_text()


def _jpegs(response: httpx.Response) -> list[Image.Image]:
    assert response.status_code == 200, response.text
    images = []
    for text in response.json():
        image = Image.open(io.BytesIO(base64.b64decode(text, validate=True)))
        assert image.format == "JPEG"
        images.append(image)
    return images


def _loaded(server: Server) -> list[str]:
    return server.get("/ui/api/status").json()["devices"]["cpu"]


# --- dalle-service's API ----------------------------------------------------------------


def test_the_api_is_dalle_services(server: Server, collection: tuple[Path, list[str]]) -> None:
    _, names = collection
    assert _loaded(server) == []  # nothing loads before a request names a model
    health = server.get("/")
    assert health.status_code == 200 and health.json() == "ok"
    assert server.get("/dalle-list").json() == names  # the escaping entry is not served
    answer = server.post(
        {"text": "a red square", "num_images": 3, "dalle_name": names[0]},
        headers={"Origin": FRONT_END_ORIGIN},
    )
    images = _jpegs(answer)
    assert [image.size for image in images] == [(32, 32)] * 3
    assert answer.headers["access-control-allow-origin"] == "*"
    exposed = answer.headers["access-control-expose-headers"].lower()
    assert "x-seed" in exposed and "x-text-truncated" in exposed
    assert answer.headers["x-model-load"] == "loaded" and _loaded(server) == [names[0]]


def test_cors_preflight_admits_the_front_ends_header(server: Server) -> None:
    preflight = httpx.options(
        f"{server.url}/dalle",
        headers={
            "Origin": FRONT_END_ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "bypass-tunnel-reminder",
            "Access-Control-Request-Private-Network": "true",
        },
    )
    assert preflight.status_code == 200, preflight.text
    assert preflight.headers["access-control-allow-origin"] == "*"
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert "bypass-tunnel-reminder" in preflight.headers["access-control-allow-headers"].lower()
    # Chrome asks before a public page (github.io) may call a server on this machine.
    assert preflight.headers["access-control-allow-private-network"] == "true"
    listing = server.get("/dalle-list", headers={"Origin": FRONT_END_ORIGIN})
    assert listing.headers["access-control-allow-origin"] == "*"


def _bad_bodies(name: str) -> list[tuple[Any, int, str]]:
    ok = {"text": "a red square", "num_images": 1, "dalle_name": name}
    return [
        ({**ok, "dalle_name": "no-such-model"}, 404, "/dalle-list"),
        ({**ok, "dalle_name": "escapee"}, 404, "no model named"),
        ({**ok, "dalle_name": f"../custom/{name}/{name}.pt"}, 404, "no model named"),
        ('{"text": "a red square", "num_images": 1,', 400, "not JSON"),
        (b"\xff\xfe not utf-8", 400, "not JSON"),
        ("[1, 2]", 400, "JSON object"),
        ({**ok, "num_images": "2"}, 400, "num_images"),
        ({**ok, "num_images": True}, 400, "num_images"),
        ({**ok, "num_images": 1.5}, 400, "num_images"),
        ({**ok, "text": 5}, 400, "text"),
        ({"text": "a red square", "num_images": 1}, 400, "dalle_name"),
        ({**ok, "seed": -1}, 400, "seed"),
        ({**ok, "num_images": 0}, 400, "1..4"),
        ({**ok, "num_images": 5}, 400, "1..4"),
        ({**ok, "text": "   "}, 400, "non-empty"),
        ({**ok, "text": "x" * 70_000}, 413, "bytes"),
    ]


def test_bad_requests_get_clear_json_errors(
    server: Server, collection: tuple[Path, list[str]]
) -> None:
    _, names = collection
    for body, status, words in _bad_bodies(names[0]):
        answer = server.post(body)
        assert answer.status_code == status, (body, answer.text)
        detail = answer.json()["detail"]
        assert isinstance(detail, str) and words in detail, (body, detail)
    assert server.get("/").json() == "ok"  # and the server is still there


def test_over_long_text_is_truncated_as_dalle_pytorch_does(
    server: Server, collection: tuple[Path, list[str]]
) -> None:
    _, names = collection
    long = {"text": "a red square a blue square w1 w2 w3 w4", "num_images": 2, "seed": 5}
    cut = dict(long, text="a red square a blue square w1 w2")  # its first 8 tokens
    long_answer = server.post({**long, "dalle_name": names[0]})
    cut_answer = server.post({**cut, "dalle_name": names[0]})
    assert long_answer.headers["x-text-truncated"] == "10 tokens cut to the model's text_seq_len 8"
    assert long_answer.headers["x-text-tokens"] == "10"
    assert "x-text-truncated" not in cut_answer.headers
    assert long_answer.json() == cut_answer.json()


def test_a_seed_gives_the_same_images(server: Server, collection: tuple[Path, list[str]]) -> None:
    _, names = collection
    body = {"text": "a blue square", "num_images": 2, "dalle_name": names[0], "seed": 7}
    first, again = server.post(body), server.post(body)
    other = server.post({**body, "seed": 8})
    assert first.headers["x-seed"] == "7"
    assert first.json() == again.json() != other.json()
    unseeded = server.post({k: v for k, v in body.items() if k != "seed"})
    reseeded = server.post({**body, "seed": int(unseeded.headers["x-seed"])})
    assert unseeded.json() == reseeded.json()  # X-Seed says how to get them again


def test_a_full_queue_answers_503_with_retry_after(
    server: Server, collection: tuple[Path, list[str]]
) -> None:
    """20 requests at once against one CPU worker and 2 waiting places."""
    _, names = collection
    body = {"text": "a green square", "num_images": 4, "dalle_name": names[0], "seed": 1}
    start = threading.Barrier(20)
    answers: list[httpx.Response] = []

    def call() -> None:
        start.wait()
        answers.append(server.post(body))

    threads = [threading.Thread(target=call) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    statuses = sorted(answer.status_code for answer in answers)
    assert set(statuses) == {200, 503}, statuses
    for answer in answers:
        if answer.status_code == 503:
            assert int(answer.headers["retry-after"]) >= 1
            assert "queue is full" in answer.json()["detail"]
        else:
            assert len(_jpegs(answer)) == 4
    assert len({json.dumps(a.json()) for a in answers if a.status_code == 200}) == 1
    status = server.get("/ui/api/status").json()
    assert (status["waiting"], status["running"], status["capacity"]) == (0, 0, 2)


def test_models_load_lazily_and_the_least_recently_used_leaves(
    server: Server, collection: tuple[Path, list[str]]
) -> None:
    """--max-loaded 1: a second model pushes the first out; the first then loads again."""
    _, names = collection
    first, second = names[0], names[2]

    def load(name: str) -> str:
        answer = server.post({"text": "a red square", "num_images": 1, "dalle_name": name})
        assert answer.status_code == 200, answer.text
        return answer.headers["x-model-load"]

    load(first)
    assert (load(first), _loaded(server)) == ("cached", [first])
    assert (load(second), _loaded(server)) == ("loaded", [second])
    assert (load(first), _loaded(server)) == ("loaded", [first])


# --- the collection's page -------------------------------------------------------------


def test_the_page_and_what_it_reads(server: Server, collection: tuple[Path, list[str]]) -> None:
    _, names = collection
    page = server.get("/ui")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "default-src 'self'" in page.headers["content-security-policy"]
    static = Path(__file__).parents[1] / "dalle_data" / "serve" / "static"
    for asset in static.iterdir():  # every asset is ours: nothing from a CDN
        text = asset.read_text(encoding="utf-8")
        assert server.get(f"/ui/static/{asset.name}").text == text
        assert "//cdn" not in text and 'src="http' not in text and "@import" not in text
    info = server.get("/ui/api/collection").json()
    assert [m["name"] for m in info["models"]] == names
    board = info["leaderboards"][0]
    assert (board["dataset"], board["manifest_sha256"]) == ("tiny", EVAL_SHA)
    assert [row["name"] for row in board["rows"]] == [names[1], names[0]]  # lower loss first
    assert any("escapee" in line and "outside" in line for line in info["skipped"])
    card = server.get(f"/ui/api/models/{names[0]}/card").json()["html"]
    assert "<table>" in card and "library_name" not in card  # front matter dropped
    assert f'src="/ui/api/models/{names[0]}/files/samples.png"' in card
    assert "<script>" not in card and "&lt;script&gt;" in card  # raw HTML is shown, not run
    samples = server.get(f"/ui/api/models/{names[0]}/files/samples.png")
    assert samples.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(samples.content)).size == (136, 70)
    for name, file in (
        (names[0], "..%2Findex.json"),
        (names[0], "nothing.png"),
        ("escapee", "samples.png"),
    ):
        assert server.get(f"/ui/api/models/{name}/files/{file}").status_code == 404
    assert server.get(f"/ui/api/models/{names[2]}/card").json() == {"html": ""}
    assert server.get("/ui/lineage.png").headers["content-type"] == "image/png"


def _browser() -> Any:
    """Debian's chromium, headless, through selenium; skips (with the reason) without it."""
    missing = [p for p in ("/usr/bin/chromium", "/usr/bin/chromedriver") if not Path(p).exists()]
    if missing or importlib.util.find_spec("selenium") is None:
        reason = (
            f"no {' or '.join(missing) or 'selenium'}: `apt-get install chromium chromium-driver`"
        )
        print(f"browser test skipped: {reason}", file=sys.stderr)
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.add_argument("--window-size=1280,1400")
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def test_a_person_generates_images_in_the_browser(
    server: Server, collection: tuple[Path, list[str]]
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    _, names = collection
    driver = _browser()
    try:
        wait = WebDriverWait(driver, 300)
        driver.get(f"{server.url}/ui")
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
        rows = driver.find_elements(By.CSS_SELECTOR, "#models tr")
        assert [row.get_attribute("data-name") for row in rows] == names
        choice = Select(driver.find_element(By.ID, "model"))
        assert [option.text for option in choice.options] == names

        rows[1].click()  # the model's card and sample grid
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#card table"))
        assert driver.find_element(By.ID, "detail-name").text == names[1]
        wait.until(
            lambda d: d.execute_script("return document.getElementById('samples').naturalWidth") > 0
        )

        driver.find_element(By.ID, "use-model").click()
        assert choice.first_selected_option.text == names[1]
        driver.find_element(By.ID, "prompt").send_keys("a blue square")
        count = driver.find_element(By.ID, "num-images")
        count.clear()
        count.send_keys("3")
        driver.find_element(By.ID, "go").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results img.generated")) == 3)
        widths = driver.execute_script(
            "const imgs = [...document.querySelectorAll('#results img.generated')];"
            "return Promise.all(imgs.map(i => i.decode().then(() => i.naturalWidth)));"
        )
        assert widths == [32, 32, 32]
        status = driver.find_element(By.ID, "gen-status")
        assert "ok" in status.get_attribute("class") and "seed" in status.text
        tree = [node.text for node in driver.find_elements(By.CSS_SELECTOR, "#tree .node")]
        assert sorted(tree) == sorted(names)
    finally:
        driver.quit()


# --- limits, in process -----------------------------------------------------------------


def test_a_request_past_timeout_gets_504(collection: tuple[Path, list[str]]) -> None:
    from fastapi.testclient import TestClient

    from dalle_data.serve.app import Settings, create_app

    root, names = collection
    app = create_app(Settings(root=root, timeout=0.001), devices=["cpu"])
    with TestClient(app) as client:
        body = {"text": "a red square", "num_images": 1, "dalle_name": names[0]}
        answer = client.post("/dalle", content=json.dumps(body))
        assert answer.status_code == 504
        assert "--timeout 0.001 s" in answer.json()["detail"]


def test_an_abandoned_generation_stops_at_the_next_token(
    collection: tuple[Path, list[str]],
) -> None:
    """The deadline is checked at every sampled token, not only before sampling starts."""
    from functools import partial

    from dalle_data.serve.catalog import Catalog
    from dalle_data.serve.models import VqganFiles, load_model
    from dalle_data.serve.worker import Expired, Generator, Job

    root, names = collection
    entry = Catalog.open(root).entries[names[0]]
    generator = Generator(
        devices=["cpu"], capacity=1, max_loaded=1, load=partial(load_model, vqgan=VqganFiles())
    )
    generator.start()
    try:
        warm = Job(entry, "a red square", 1, 0, time.monotonic() + 600)
        assert len(generator.submit(warm).result(timeout=600).images) == 1
        model, loaded = generator.caches[0].get(entry)
        assert not loaded
        job = Job(entry, "a red square", 1, 0, time.monotonic() + 600)
        steps = 0

        def give_up_at_step_3(module: Any, args: Any) -> None:
            nonlocal steps
            steps += 1
            if steps == 3:
                job.abandoned.set()  # what the server does when a request times out

        hook = model.dalle.register_forward_pre_hook(give_up_at_step_3)
        try:
            with pytest.raises(Expired):
                generator.submit(job).result(timeout=600)
        finally:
            hook.remove()
        assert steps == 3  # 64 image tokens otherwise
    finally:
        generator.stop()


def test_a_collection_without_index_is_indexed_or_explained(tmp_path: Path) -> None:
    from dalle_data.serve.catalog import Catalog, ServeError

    root = tmp_path / "collection"
    (root / "custom").mkdir(parents=True)
    try:
        can_index = importlib.util.find_spec("dalle_data.collection.index") is not None
    except ModuleNotFoundError:  # no dalle_data.collection package yet
        can_index = False
    if not can_index:
        with pytest.raises(ServeError, match="run `dalle-data collection"):
            Catalog.open(root)
    else:
        assert Catalog.open(root).entries == {}
        assert json.loads((root / "index.json").read_text())["checkpoints"] == []
    with pytest.raises(ServeError, match="not a folder"):
        Catalog.open(tmp_path / "nowhere")


def test_serve_options_are_checked_before_anything_starts(
    collection: tuple[Path, list[str]],
) -> None:
    from typer.testing import CliRunner

    from dalle_data.cli import app

    root, _ = collection
    for option, value, words in (
        ("--max-images", "0", "--max-images must be at least 1"),
        ("--max-loaded", "0", "--max-loaded must be at least 1"),
        ("--queue", "0", "--queue must be at least 1"),
        ("--timeout", "0", "--timeout must be a positive"),
    ):
        result = CliRunner().invoke(app, ["serve", str(root), option, value])
        assert result.exit_code == 1 and words in result.output, result.output


# --- a collection in a bucket, or on a read-only web server ------------------------------


def test_a_bucket_collection_is_served(
    collection: tuple[Path, list[str]], s3: S3Server, bucket: str, tmp_path: Path
) -> None:
    """The same collection uploaded to S3 serves the same models: index, cards and pictures
    fetched at start-up, each checkpoint when first asked for (the flat one's tokenizer
    fetched from beside it)."""
    from dalle_data import locations

    root, names = collection
    locations.put(root, f"{bucket}/models")
    cache = tmp_path / "cache"
    url = f"{bucket}/models"
    with run_server(url, "--cache-dir", str(cache), log_dir=tmp_path) as running:
        assert running.get("/dalle-list").json() == names
        for name in (names[1], names[2]):
            body = {"text": "a blue square", "num_images": 1, "dalle_name": name, "seed": 3}
            assert [image.size for image in _jpegs(running.post(body))] == [(32, 32)]
        card = running.get(f"/ui/api/models/{names[0]}/card").json()["html"]
        assert f"/ui/api/models/{names[0]}/files/samples.png" in card
        assert running.get(f"/ui/api/models/{names[0]}/files/samples.png").status_code == 200
        assert running.get("/ui/lineage.png").content == (root / "lineage.png").read_bytes()
        assert running.get("/ui/api/collection").json()["root"] == "models"
    log = running.log.read_text()
    assert running.process.returncode == 0 and "Traceback" not in log, log
    fetched = {p.name for p in cache.rglob("*.pt")}
    assert fetched == {f"{names[1]}.pt", f"{names[2]}.pt"}  # names[0] was never asked for
    s3.assert_secret_nowhere(bucket, [tmp_path], log)


def test_an_http_collection_is_served_read_only(
    collection: tuple[Path, list[str]], tmp_path: Path
) -> None:
    """A collection on a plain web server (no listing, no writing) serves from its index;
    a checkpoint whose bytes are not the indexed ones is refused."""
    from dalle_data.serve.catalog import Catalog, ServeError
    from dalle_data.serve.models import VqganFiles, load_model

    root, names = collection
    routes = {
        f"/c/{p.relative_to(root).as_posix()}": Route(p.read_bytes())
        for p in root.rglob("*")
        if p.is_file()
    }
    with serve(routes) as web:
        catalog = Catalog.open(web.url("/c"), cache_dir=tmp_path)
        assert list(catalog.entries) == names
        entry = catalog.entries[names[0]]
        assert entry.card is not None and "samples.png" in entry.files
        model = load_model(entry, "cpu", VqganFiles())
        assert model.name == names[0]
        relative = entry.record["path"]
        web.routes[f"/c/{relative}"] = Route(b"replaced")
        entry.checkpoint.unlink()
        with pytest.raises(ServeError, match="index.json says"):
            entry.fetch()
        del web.routes["/c/index.json"]
        with pytest.raises(ServeError, match="cannot be indexed in place"):
            Catalog.open(web.url("/c"), cache_dir=tmp_path)
