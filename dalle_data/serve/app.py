"""The HTTP app: dalle-service's API for a whole collection, and the collection's page.

dalle-service's front-end (rom1504/dalle-service) works unchanged against it:
``GET /`` -> ``"ok"``, ``GET /dalle-list`` -> names, ``POST /dalle`` with
``{"text", "num_images", "dalle_name"}`` -> base64 JPEGs. The front-end sends that body
as ``text/plain`` with a ``Bypass-Tunnel-Reminder`` header from another origin, so the
body is parsed whatever its content type and CORS is open, preflight included.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, HTTPException, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dalle_data.errors import DalleDataError
from dalle_data.serve.catalog import Catalog, Entry, ServeError, media_type, render_card
from dalle_data.serve.models import VqganFiles, load_model
from dalle_data.serve.worker import Expired, Generator, Job, QueueFull, Result

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
MAX_BODY = 64 * 1024  # a prompt, a count and a name; more is a mistake or an attack
# What a browser page from another origin may read of a /dalle answer.
REPORTED = ["X-Seed", "X-Model-Load", "X-Device", "X-Text-Tokens", "X-Text-Truncated"]
# The page loads nothing from anywhere else: it must work on a machine with no network.
PAGE_POLICY = "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'"
FRONT_END = "https://rom1504.github.io/dalle-service/"


@dataclass(frozen=True)
class Settings:
    """``dalle-data serve``'s options."""

    root: Path | str
    host: str = "127.0.0.1"
    port: int = 8000
    max_images: int = 8
    timeout: float = 300.0
    max_loaded: int = 2
    queue: int = 16
    vqgan: VqganFiles = field(default_factory=VqganFiles)
    cache_dir: Path | None = None  # a bucket ROOT's mirror (see collection.mirror)

    def check(self) -> None:
        if self.max_images < 1:
            raise ServeError(f"--max-images must be at least 1, got {self.max_images}")
        if not self.timeout > 0:
            raise ServeError(f"--timeout must be a positive number of seconds, got {self.timeout}")
        if not 1 <= self.port <= 65535:
            raise ServeError(f"--port must be in 1..65535, got {self.port}")


class DalleRequest(BaseModel):
    """POST /dalle's body; ``seed`` is ours (the same request and seed, the same images)."""

    model_config = ConfigDict(strict=True)

    text: str
    num_images: int
    dalle_name: str
    seed: int | None = Field(default=None, ge=0, lt=2**63)


def create_app(settings: Settings, *, devices: list[str] | None = None) -> FastAPI:
    """The app for ``settings.root``; models load on first use, on ``devices``."""
    settings.check()
    catalog = Catalog.open(settings.root, cache_dir=settings.cache_dir)
    generator = Generator(
        devices=devices or _devices(),
        capacity=settings.queue,
        max_loaded=settings.max_loaded,
        load=partial(load_model, vqgan=settings.vqgan),
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        generator.start()
        yield
        generator.stop()

    # FastAPI's /docs pages load their scripts from a CDN: off, like everything remote.
    app = FastAPI(title="dalle-data serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=["*"],
        allow_methods=["GET", "POST", "OPTIONS"],
        allow_headers=["*"],
        expose_headers=REPORTED,
        # Chrome asks before a public page (the front-end on github.io) calls this machine.
        allow_private_network=True,
        max_age=600,
    )

    @app.get("/")
    def health() -> str:
        return "ok"

    @app.get("/dalle-list")
    def dalle_list() -> list[str]:
        return list(catalog.entries)

    @app.post("/dalle")
    async def dalle(request: Request) -> JSONResponse:
        body = _parse(await _read_body(request))
        entry = catalog.entries.get(body.dalle_name)
        if entry is None:
            raise HTTPException(
                404,
                f"no model named {body.dalle_name!r} in this collection: "
                f"GET /dalle-list lists the {len(catalog.entries)} it serves",
            )
        if not 1 <= body.num_images <= settings.max_images:
            raise HTTPException(
                400, f"num_images must be in 1..{settings.max_images}, got {body.num_images}"
            )
        if not body.text.strip():
            raise HTTPException(400, "text must be a non-empty prompt")
        seed = secrets.randbelow(2**31) if body.seed is None else body.seed
        job = Job(entry, body.text, body.num_images, seed, time.monotonic() + settings.timeout)
        result = await _wait(generator, job, settings.timeout)
        return JSONResponse(result.images, headers=_report(result, seed))

    @app.get("/ui", response_class=HTMLResponse)
    def page() -> HTMLResponse:
        html = (STATIC / "index.html").read_text(encoding="utf-8")
        return HTMLResponse(html, headers={"Content-Security-Policy": PAGE_POLICY})

    @app.get("/ui/api/collection")
    def collection() -> dict[str, Any]:
        limits = {"max_images": settings.max_images, "timeout": settings.timeout}
        return {**catalog.summary(), "limits": limits}

    @app.get("/ui/api/status")
    def status() -> dict[str, Any]:
        return generator.status()

    @app.get("/ui/api/models/{name}/card")
    def card(name: str) -> dict[str, str]:
        entry = _entry(catalog, name)
        return {"html": render_card(entry, partial(_file_url, entry))}

    @app.get("/ui/api/models/{name}/files/{file_name}")
    def model_file(name: str, file_name: str) -> FileResponse:
        path = _entry(catalog, name).files.get(file_name)
        if path is None:
            raise HTTPException(404, f"model {name} has no file {file_name!r}")
        return FileResponse(path, media_type=media_type(path))

    @app.get("/ui/lineage.png")
    def lineage() -> FileResponse:
        if catalog.lineage_picture is None:
            raise HTTPException(404, "the collection has no lineage.png")
        return FileResponse(catalog.lineage_picture, media_type="image/png")

    app.mount("/ui/static", StaticFiles(directory=STATIC), name="static")
    return app


async def _read_body(request: Request) -> bytes:
    """The body, whatever its content type, refused past MAX_BODY bytes."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise HTTPException(413, f"the body is over {MAX_BODY} bytes; a prompt is short")
    return body


def _parse(body: bytes) -> DalleRequest:
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise HTTPException(
            400,
            f"the body is not JSON ({err}): send "
            '{"text": "a prompt", "num_images": 4, "dalle_name": "<a name from /dalle-list>"}',
        ) from None
    if not isinstance(payload, dict):
        raise HTTPException(400, f"the body must be a JSON object, not {type(payload).__name__}")
    try:
        return DalleRequest.model_validate(payload)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg']} (got {e.get('input')!r:.40})"
            for e in err.errors()
        )
        raise HTTPException(400, f"bad request body: {problems}") from None


async def _wait(generator: Generator, job: Job, timeout: float) -> Result:
    """Queue ``job`` and wait for it, answering 503 (queue full), 504 (too slow) or 500."""
    try:
        future = generator.submit(job)
    except QueueFull as full:
        raise HTTPException(
            503,
            f"{full} (this server runs one generation at a time per device, "
            f"with at most {generator.capacity} waiting)",
            headers={"Retry-After": str(full.retry_after)},
        ) from None
    try:
        return await asyncio.wait_for(asyncio.wrap_future(future), timeout)
    except (TimeoutError, Expired):
        job.abandoned.set()
        raise HTTPException(
            504, f"the generation did not finish within --timeout {timeout:g} s"
        ) from None
    except DalleDataError as err:
        raise HTTPException(500, f"model {job.entry.name} cannot generate: {err}") from None
    except Exception as err:
        raise HTTPException(500, f"generation failed: {type(err).__name__} (see the log)") from None


def _report(result: Result, seed: int) -> dict[str, str]:
    headers = {
        "X-Seed": str(seed),
        "X-Model-Load": "loaded" if result.loaded else "cached",
        "X-Device": result.device,
        "X-Text-Tokens": str(result.tokens),
    }
    if result.tokens > result.text_seq_len:
        # DALLE-pytorch's tokenize(..., truncate_text=True): the first text_seq_len ids.
        headers["X-Text-Truncated"] = (
            f"{result.tokens} tokens cut to the model's text_seq_len {result.text_seq_len}"
        )
    return headers


def _entry(catalog: Catalog, name: str) -> Entry:
    entry = catalog.entries.get(name)
    if entry is None:
        raise HTTPException(404, f"no model named {name!r} in this collection")
    return entry


def _file_url(entry: Entry, file_name: str) -> str:
    return f"/ui/api/models/{quote(entry.name)}/files/{quote(file_name)}"


def _devices() -> list[str]:
    """Every CUDA GPU, one worker each; else the CPU."""
    import torch

    count = torch.cuda.device_count()
    return [f"cuda:{i}" for i in range(count)] or ["cpu"]


def serve(settings: Settings) -> None:
    """Serve ``settings.root`` until interrupted (Ctrl-C)."""
    import uvicorn

    from dalle_data.compat import import_dalle_pytorch

    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(name)s: %(message)s")
    if not _loopback(settings.host):
        log.warning(
            "listening on %s: anyone who can reach this machine can use its %s",
            settings.host,
            "GPU" if _devices()[0] != "cpu" else "CPU",
        )
    app = create_app(settings)
    import_dalle_pytorch()  # now, so the first request does not pay for it
    base = f"http://{settings.host}:{settings.port}"
    print(
        f"serving {settings.root}: the collection's page at {base}/ui; "
        f"dalle-service's front-end at {FRONT_END}?back={base}",
        flush=True,
    )
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may well be reachable from elsewhere
        return False
