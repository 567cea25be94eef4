"""What the tests' object-storage servers (s3.py: moto, gcs.py: gcp-storage-emulator) share."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """``values`` set in os.environ inside; the caller's variables restored after."""
    saved = {k: os.environ.get(k) for k in values}
    try:
        os.environ.update(values)
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def assert_secret_nowhere(
    secret: str, objects: dict[str, bytes], folders: list[Path], printed: str
) -> None:
    """``secret`` is in none of ``objects`` (a bucket's), no file below ``folders``, and
    not in ``printed``."""
    needle = secret.encode()
    assert needle not in printed.encode()
    for key, body in objects.items():
        assert needle not in body, key
    for folder in folders:
        for path in folder.rglob("*"):
            assert not path.is_file() or needle not in path.read_bytes(), path
