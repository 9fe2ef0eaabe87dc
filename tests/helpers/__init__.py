"""Helpers the test modules share, so that no test module imports another.

This package holds what several modules need: the repository's root and the environment of CLI
subprocesses here; prepare and training runs on the tiny model in ``training``; starting and
stopping processes in ``processes``; the compose files in ``compose``; MLflow and Prefect servers
in ``servers``. Fixtures are in tests/conftest.py.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def offline_env(tmp_path: Path) -> dict[str, str]:
    """Environment for CLI subprocesses: an empty HF cache and a hub endpoint that refuses at once."""
    env = dict(os.environ)
    env.update(HF_HOME=str(tmp_path / "hf-home"), HF_ENDPOINT="http://127.0.0.1:9",
               HF_HUB_DISABLE_TELEMETRY="1", NO_COLOR="1", COLUMNS="200")
    env.pop("HF_HUB_OFFLINE", None)
    return env
