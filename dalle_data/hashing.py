"""Content hashes recorded in manifests, lineage and build records."""

from __future__ import annotations

import hashlib
import os
from typing import IO

_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks so multi-GB sources fit in memory."""
    with open(path, "rb") as fh:
        return sha256_stream(fh)


def sha256_stream(fh: IO[bytes]) -> str:
    """Hex sha256 of what is left in a binary file object (local or remote), in 1 MiB chunks."""
    digest = hashlib.sha256()
    while chunk := fh.read(_CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of bytes."""
    return hashlib.sha256(data).hexdigest()
