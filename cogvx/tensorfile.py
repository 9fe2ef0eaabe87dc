"""safetensors files whose bytes depend only on their content.

safetensors' writer keeps the header's ``__metadata__`` in a hash map, so a file with two or more
metadata keys comes out with its keys in a different order in every process: equal tensors,
different bytes, and DVC and MLflow see a new artifact after every identical re-run. Here the
library writes the file and the header is then re-emitted with its keys sorted; the tensor data
and the offsets (which count from the end of the header) are untouched.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

HEADER_ALIGNMENT = 8  # safetensors pads its JSON header with spaces to a multiple of 8 bytes


def canonical_header(blob: bytes) -> bytes:
    """``blob`` (a whole safetensors file) with its JSON header's keys in sorted order."""
    (length,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + length].decode("utf-8"))
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % HEADER_ALIGNMENT)
    return struct.pack("<Q", len(text)) + text + blob[8 + length:]


def save_tensors_reproducibly(tensors: dict[str, torch.Tensor], path: Path,
                              metadata: dict[str, str] | None = None) -> Path:
    """Write ``tensors`` (and string ``metadata``) to ``path`` as safetensors, byte-identical for
    equal inputs in any process. The caller provides atomicity (``path`` is a staging file)."""
    from safetensors.torch import save

    blob = save({name: tensor.contiguous() for name, tensor in tensors.items()}, metadata=metadata)
    Path(path).write_bytes(canonical_header(blob))
    return Path(path)
