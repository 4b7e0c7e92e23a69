"""SHA-256 of bytes and files: the identity of model weights, datasets and golden sets.

Standard library only, because two environments import it: the gateway (the adapter catalog checks weights
against their lineage) and the model recipe, which runs in the engine's virtualenv without the gateway's
dependencies and writes the lineage the catalog later checks.
"""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
