"""A real GCS-compatible server for tests: gcp-storage-emulator in this process, on 127.0.0.1.

google-cloud-storage (Snakemake's GCS storage plugin) and gcsfs reach it the standard way,
through ``STORAGE_EMULATOR_HOST``; the plugin's one required setting, the project, comes
from ``SNAKEMAKE_STORAGE_GCS_PROJECT``. Against an emulator the client sends no
credentials, so the secret tests grep for is the private key of a service-account file in
``GOOGLE_APPLICATION_CREDENTIALS``: it must reach no output either.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.helpers.buckets import assert_secret_nowhere, environment
from tests.helpers.http import free_port


@dataclass(frozen=True)
class GCSServer:
    """A running emulator: its endpoint, the environment it is reached with, and the
    secret that must appear nowhere."""

    endpoint: str
    credentials_file: Path
    secret: str
    server: Any  # gcp_storage_emulator.server.Server

    scheme = "gs"

    @property
    def env(self) -> dict[str, str]:
        return {
            "STORAGE_EMULATOR_HOST": self.endpoint,
            "SNAKEMAKE_STORAGE_GCS_PROJECT": "dalle-data-test",
            "GOOGLE_CLOUD_PROJECT": "dalle-data-test",
            "GOOGLE_APPLICATION_CREDENTIALS": str(self.credentials_file),
        }

    def client(self):  # type: ignore[no-untyped-def]
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        return storage.Client(
            project="dalle-data-test",
            credentials=AnonymousCredentials(),
            client_options={"api_endpoint": self.endpoint},
        )

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """The names of the objects of ``bucket`` under ``prefix``."""
        return [b.name for b in self.client().list_blobs(bucket, prefix=prefix)]

    def objects(self, bucket: str, prefix: str = "") -> dict[str, bytes]:
        """Every object of ``bucket`` under ``prefix``, by name without the prefix."""
        return {
            b.name.removeprefix(prefix): b.download_as_bytes()
            for b in self.client().list_blobs(bucket, prefix=prefix)
        }

    def unfinished_uploads(self, bucket: str) -> list[str]:
        """Resumable uploads begun in ``bucket`` and never finished (the emulator's record:
        GCS itself has no call that lists them)."""
        return [k for k in self.server._storage.resumable if k.startswith(f"{bucket}:")]

    def assert_secret_nowhere(self, bucket: str, folders: list[Path], printed: str) -> None:
        """The credentials file's secret is in no object of ``bucket``, no file below
        ``folders``, and not in ``printed``."""
        assert_secret_nowhere(self.secret, self.objects(bucket), folders, printed)

    def bucket(self) -> str:
        """A fresh empty bucket; returns its name."""
        bucket = f"test-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(bucket)
        return bucket


@contextmanager
def gcs_emulator(tmp_dir: Path) -> Iterator[GCSServer]:
    """Start gcp-storage-emulator (in memory) on a free 127.0.0.1 port, set the environment,
    stop it after."""
    from gcp_storage_emulator.server import create_server

    port = free_port()
    secret = f"dalle-data-test-secret-{uuid.uuid4().hex}"
    credentials = tmp_dir / "service-account.json"
    credentials.write_text(
        json.dumps(
            {
                "type": "service_account",
                "project_id": "dalle-data-test",
                "client_email": "test@dalle-data-test.iam.gserviceaccount.com",
                "private_key_id": "test",
                "private_key": secret,
                "token_uri": "http://127.0.0.1:1/token",
            }
        )
    )
    server = create_server("127.0.0.1", port, in_memory=True)
    server.start()
    gcs = GCSServer(f"http://127.0.0.1:{port}", credentials, secret, server)
    try:
        with environment(gcs.env):
            yield gcs
    finally:
        server.stop()
