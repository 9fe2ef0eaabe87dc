"""Hugging Face Hub reachability, without importing torch (cheap for the CLI and data commands)."""

from __future__ import annotations

import os
import socket
import threading
from urllib.parse import urlparse

HUB_PROBE_TIMEOUT_S = 3.0


def is_hub_id(source: str) -> bool:
    """True for ``org/name`` strings that are not an existing or explicitly local path."""
    if source.startswith((".", "/", "~")) or source.count("/") != 1 or os.sep != "/" and os.sep in source:
        return False
    org, name = source.split("/")
    return bool(org) and bool(name)


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether the hub endpoint accepts a TCP connection within ``timeout`` seconds (DNS included)."""
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((url.hostname, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    worker = threading.Thread(target=probe, daemon=True)
    worker.start()
    worker.join(timeout)
    return bool(result and result[0])
