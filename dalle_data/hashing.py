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


def sha256_tree(root: str | os.PathLike[str]) -> tuple[str, int]:
    """Hex sha256 and total size of a folder's files: the sha256 of its sorted listing of
    relative path, size and sha256 per file, so any added, removed or changed file shows."""
    digest = hashlib.sha256()
    total = 0
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(folder, name)
            size = os.path.getsize(path)
            total += size
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            digest.update(f"{rel}\t{size}\t{sha256_file(path)}\n".encode())
    return digest.hexdigest(), total
