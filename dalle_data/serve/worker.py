"""Generation requests: a bounded wait, one generation at a time per device, a deadline.

Each device (every CUDA GPU, else the CPU) has one worker thread and its own model cache;
they all take jobs from one queue. ``submit`` refuses a job when ``capacity`` jobs are
already waiting (the caller answers 503 with Retry-After). A job's deadline covers its
wait, its model's loading and its sampling: the model's forward hook checks it at every
sampled token, so a job past its deadline stops within one token instead of running on.
"""

from __future__ import annotations

import base64
import io
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from dalle_data.errors import DalleDataError
from dalle_data.serve.catalog import Entry, ServeError
from dalle_data.serve.models import LoadedModel, ModelCache

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """Every waiting place is taken; ``retry_after`` estimates when one frees (seconds)."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the generation queue is full; retry in {retry_after} s")
        self.retry_after = retry_after


class Expired(Exception):
    """A job went past its deadline (or its caller gave up) before it finished."""


@dataclass
class Job:
    """One POST /dalle: what to generate and by when (``time.monotonic()`` seconds)."""

    entry: Entry
    text: str
    num_images: int
    seed: int
    deadline: float
    future: Future[Result] = field(default_factory=Future)
    abandoned: threading.Event = field(default_factory=threading.Event)

    def check(self) -> None:
        """Raise Expired when the job should stop."""
        if self.abandoned.is_set() or time.monotonic() > self.deadline:
            raise Expired


@dataclass(frozen=True)
class Result:
    """Base64 JPEGs and what the response headers report about them."""

    images: list[str]
    tokens: int
    text_seq_len: int
    loaded: bool
    device: str


class Generator:
    """The queue and the per-device workers that empty it."""

    def __init__(
        self,
        *,
        devices: list[str],
        capacity: int,
        max_loaded: int,
        load: Callable[[Entry, str], LoadedModel],
    ) -> None:
        if capacity < 1:
            raise ServeError(f"--queue must be at least 1, got {capacity}")
        self.capacity = capacity
        self.caches = [ModelCache(device=d, max_loaded=max_loaded, load=load) for d in devices]
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._waiting = 0
        self._running = 0
        self._mean_seconds = 1.0  # running mean of job times, for Retry-After
        self._closing = threading.Event()
        self._threads = [
            threading.Thread(target=self._work, args=(cache,), name=f"generate-{cache.device}")
            for cache in self.caches
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Let running jobs finish, fail waiting ones, and end the workers."""
        self._closing.set()
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join()

    def submit(self, job: Job) -> Future[Result]:
        """Queue ``job``; QueueFull when ``capacity`` jobs already wait."""
        with self._lock:
            if self._waiting >= self.capacity:
                raise QueueFull(self._retry_after())
            self._waiting += 1
        self._jobs.put(job)
        return job.future

    def status(self) -> dict[str, Any]:
        """What /ui/api/status shows: queue use and the models loaded on each device."""
        with self._lock:
            counts = {"waiting": self._waiting, "running": self._running}
        return {
            **counts,
            "capacity": self.capacity,
            "devices": {cache.device: cache.names() for cache in self.caches},
        }

    def _retry_after(self) -> int:
        ahead = self._waiting + self._running
        return max(1, math.ceil(self._mean_seconds * ahead / len(self._threads)))

    def _work(self, cache: ModelCache) -> None:
        interrupt = _Interrupt()
        while (job := self._jobs.get()) is not None:
            with self._lock:
                self._waiting -= 1
                self._running += 1
            started = time.monotonic()
            try:
                if not job.future.set_running_or_notify_cancel():
                    continue
                if self._closing.is_set():
                    job.future.set_exception(ServeError("the server is shutting down"))
                else:
                    self._run(job, cache, interrupt)
            finally:
                with self._lock:
                    self._running -= 1
                    took = time.monotonic() - started
                    self._mean_seconds = 0.8 * self._mean_seconds + 0.2 * took

    def _run(self, job: Job, cache: ModelCache, interrupt: _Interrupt) -> None:
        try:
            job.check()
            model, loaded = cache.get(job.entry)
            if loaded:
                interrupt.attach(model)
            job.check()
            interrupt.job = job
            try:
                images, tokens = _generate(model, job)
            finally:
                interrupt.job = None
            job.future.set_result(
                Result(
                    images=images,
                    tokens=tokens,
                    text_seq_len=model.text_seq_len,
                    loaded=loaded,
                    device=cache.device,
                )
            )
        except Exception as err:  # any failure is this job's answer, never the worker's end
            if not isinstance(err, Expired | DalleDataError):
                log.exception("generation from %s failed", job.entry.name)
            job.future.set_exception(err)


class _Interrupt:
    """A forward pre-hook that stops the current job at its deadline (once per token)."""

    def __init__(self) -> None:
        self.job: Job | None = None

    def attach(self, model: LoadedModel) -> None:
        # On DALLE (each sampling step calls it) and on its transformer, so a faster
        # sampling loop that calls the transformer directly is covered too.
        for module in (model.dalle, model.dalle.get_submodule("transformer")):
            module.register_forward_pre_hook(self)

    def __call__(self, module: Any, args: Any) -> None:
        job = self.job
        if job is not None:
            job.check()


def _generate(model: LoadedModel, job: Job) -> tuple[list[str], int]:
    """Base64 JPEGs for ``job`` and the prompt's length in tokens before truncation."""
    from dalle_data.model.generate import encode_prompts, generate_images

    tokens = len(model.tokenizer.encode_batch([job.text])[0])
    text = encode_prompts(model.tokenizer, [job.text], model.text_seq_len)
    images = generate_images(model.dalle, text, num_images=job.num_images, seed=job.seed)
    return [_jpeg_base64(image) for image in images], tokens


def _jpeg_base64(image: Any) -> str:
    """One (3, H, W) [0, 1] tensor as the base64 JPEG dalle-service answers with."""
    from PIL import Image

    array = (image.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=95)
    return base64.b64encode(buffer.getvalue()).decode("ascii")
