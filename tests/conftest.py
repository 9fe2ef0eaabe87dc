"""Shared fixtures: tiny models built once per session, and a runner for the real `cogvx` CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    """GPU-marked tests are skipped where torch sees no CUDA device."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """All four tiny variants, built and saved once for the whole session."""
    from cogvx.models.build import save_tiny_pipeline
    from cogvx.models.specs import TINY_VARIANTS

    root = tmp_path_factory.mktemp("tiny-models")
    return {variant: save_tiny_pipeline(variant, root / variant) for variant in TINY_VARIANTS}


def offline_env(tmp_path: Path) -> dict[str, str]:
    """Environment for CLI subprocesses: an empty HF cache and a hub endpoint that refuses at once."""
    env = dict(os.environ)
    env.update(HF_HOME=str(tmp_path / "hf-home"), HF_ENDPOINT="http://127.0.0.1:9",
               HF_HUB_DISABLE_TELEMETRY="1", NO_COLOR="1", COLUMNS="200")
    env.pop("HF_HUB_OFFLINE", None)
    return env


@pytest.fixture
def run_cli(tmp_path):
    """Run `python -m cogvx ARGS` in ``cwd`` (default: a temp folder) and return the result."""

    def run(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cogvx", *args], cwd=cwd or tmp_path,
                              env=env or offline_env(tmp_path), capture_output=True, text=True,
                              timeout=timeout)

    return run
