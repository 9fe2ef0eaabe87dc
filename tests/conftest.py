"""Shared fixtures: tiny models built once per session, synthetic clips and their latents once per
module, and a runner for the real `cogvx` CLI. Plain helpers are in tests/helpers/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import offline_env
from tests.helpers.training import N_CLIPS, base_overrides


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


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    """N_CLIPS synthetic clips with captions (seed 3), made once per module that uses them."""
    from cogvx.data.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("synthetic") / "raw", N_CLIPS, seed=3)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_models) -> dict[str, Path]:
    """Two synthetic clips, encoded with the tiny t2v model once per module that trains on them:
    the paths ``raw``, ``latents`` and ``model`` that tests.helpers.training's runs take."""
    from cogvx.config import load_config
    from cogvx.data.synthetic import make_synthetic_dataset
    from cogvx.prepare import run_prepare

    root = tmp_path_factory.mktemp("train-data")
    make_synthetic_dataset(root / "raw", 2, seed=5)
    paths = {"raw": root / "raw", "latents": root / "latents", "model": tiny_models["tiny-t2v"]}
    run_prepare(load_config(None, base_overrides(paths)), log=lambda *_: None)
    return paths


@pytest.fixture
def run_cli(tmp_path):
    """Run `python -m cogvx ARGS` in ``cwd`` (default: a temp folder) and return the result."""

    def run(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cogvx", *args], cwd=cwd or tmp_path,
                              env=env or offline_env(tmp_path), capture_output=True, text=True,
                              timeout=timeout)

    return run
