"""Shared fixtures. Every test runs offline: servers bind 127.0.0.1 only."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

import dalle_data.compat  # noqa: F401  (offline env vars and the dalle_pytorch shim, first)
from tests.helpers.http import LocalServer, serve

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


@pytest.fixture
def http_server() -> Iterator[LocalServer]:
    """An empty LocalServer; tests add routes to ``http_server.routes``."""
    with serve() as server:
        yield server
