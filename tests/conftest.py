"""Shared fixtures. Every test runs offline: servers bind 127.0.0.1 only."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import dalle_data.compat  # noqa: F401  (offline env vars and the dalle_pytorch shim, first)
from tests.helpers.gcs import GCSServer, gcs_emulator
from tests.helpers.http import LocalServer, serve
from tests.helpers.s3 import S3Server, moto_server

# Snakemake rules call `dalle-data`: subprocesses must find this interpreter's scripts
# even when pytest is run without activating the venv.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"


@pytest.fixture
def http_server() -> Iterator[LocalServer]:
    """An empty LocalServer; tests add routes to ``http_server.routes``."""
    with serve() as server:
        yield server


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    """moto's S3 server on 127.0.0.1 for the session, with AWS_* set in the environment."""
    with moto_server() as server:
        yield server


@pytest.fixture(scope="module")
def gcs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GCSServer]:
    """gcp-storage-emulator on 127.0.0.1 for a module's tests, with STORAGE_EMULATOR_HOST
    and GOOGLE_APPLICATION_CREDENTIALS set only meanwhile."""
    with gcs_emulator(tmp_path_factory.mktemp("gcs")) as server:
        yield server


@pytest.fixture
def bucket(s3: S3Server) -> str:
    """A fresh bucket on the test S3 server, as an ``s3://`` URL."""
    return f"s3://{s3.bucket()}"
