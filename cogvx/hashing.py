"""Content keys: names derived from everything that determines a file, so a re-run reuses a file
exactly when its inputs are unchanged (latents) and a resumed run finds only checkpoints of its own
settings (the training fingerprint)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """The sha256 of a file's bytes, read in chunks (clips can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def content_key(**parts: Any) -> str:
    """A stable hash of named inputs (JSON with sorted keys), 32 hex characters."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:32]
