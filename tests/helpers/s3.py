"""A real S3-compatible server for tests: moto's standalone server on 127.0.0.1.

s3fs, boto3 and Snakemake's S3 storage plugin reach it the standard way, through
``AWS_ENDPOINT_URL``/``AWS_ENDPOINT_URL_S3`` and an ``AWS_*`` key pair in the environment;
nothing in dalle-data is told about it. The secret key is a unique string that tests
grep for in every output to prove credentials are never written down.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.helpers.buckets import assert_secret_nowhere, environment
from tests.helpers.http import free_port


@dataclass(frozen=True)
class S3Server:
    """A running moto server: its endpoint and the credentials put in the environment."""

    endpoint: str
    access_key: str
    secret_key: str

    scheme = "s3"

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def client(self):  # type: ignore[no-untyped-def]
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
        )

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """The keys of the objects of ``bucket`` under ``prefix``."""
        listed = self.client().list_objects_v2(Bucket=bucket, Prefix=prefix)
        return [o["Key"] for o in listed.get("Contents", [])]

    def unfinished_uploads(self, bucket: str) -> list[str]:
        """Multipart uploads begun in ``bucket`` and neither completed nor aborted."""
        uploads = self.client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])
        return [u["Key"] for u in uploads]

    def objects(self, bucket: str, prefix: str = "") -> dict[str, bytes]:
        """Every object of ``bucket`` (a name or an ``s3://`` URL) under ``prefix``, by key
        without the prefix."""
        client, name = self.client(), bucket.removeprefix("s3://")
        listed = client.list_objects_v2(Bucket=name, Prefix=prefix).get("Contents", [])
        return {
            o["Key"].removeprefix(prefix): client.get_object(Bucket=name, Key=o["Key"])[
                "Body"
            ].read()
            for o in listed
        }

    def assert_secret_nowhere(self, bucket: str, folders: list[Path], printed: str) -> None:
        """The secret key is in no object of ``bucket``, no file below ``folders``, and not
        in ``printed``."""
        assert_secret_nowhere(self.secret_key, self.objects(bucket), folders, printed)

    def bucket(self) -> str:
        """A fresh empty bucket; returns its name."""
        bucket = f"test-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=bucket)
        return bucket


@contextmanager
def moto_server() -> Iterator[S3Server]:
    """Start ``moto_server`` on a free 127.0.0.1 port, set the AWS_* environment, stop it after."""
    port = free_port()
    exe = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen(
        [str(exe), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server = S3Server(
        endpoint=f"http://127.0.0.1:{port}",
        access_key="testing",
        secret_key=f"dalle-data-test-secret-{uuid.uuid4().hex}",
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"moto_server did not start on port {port}")
            time.sleep(0.1)
        with environment(server.env):
            yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
