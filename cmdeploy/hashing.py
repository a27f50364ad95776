"""SHA-256 of files: the one implementation used by the runtime, training, export and calibration.

Model cards, engine sidecars, reports and calibration caches key artifacts by the hex SHA-256 of
their bytes. Pure Python (hashlib); files are read in chunks, so any size fits in memory.
"""

from __future__ import annotations

import hashlib
import os

CHUNK_BYTES = 1 << 20  # 1 MiB


def file_sha256(path: str | os.PathLike[str], chunk_bytes: int = CHUNK_BYTES) -> str:
    """Hex SHA-256 (64 lower-case hex digits) of the file's bytes, read ``chunk_bytes`` at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


__all__ = ["CHUNK_BYTES", "file_sha256"]
