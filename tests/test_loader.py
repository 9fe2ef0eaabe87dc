"""The shared model loader: local folders, the hub cache, and fast, actionable failures."""

from __future__ import annotations

import json
import shutil
import time

import pytest

from cogvx.errors import ConfigError, ModelNotAvailableError
from cogvx.hub import is_hub_id
from cogvx.models.loader import load_pipeline, resolve_source
from cogvx.models.specs import get_spec
from tests.helpers import offline_env

FAKE_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def test_hub_ids_and_paths_are_told_apart():
    assert is_hub_id("THUDM/CogVideoX-5b")
    for path in ("./models/x", "/abs/x", "~/x", "a/b/c", "plain", "a/"):
        assert not is_hub_id(path)


def test_missing_tiny_model_says_how_to_build_it(tmp_path):
    target = tmp_path / "models" / "tiny-i2v"
    with pytest.raises(ModelNotAvailableError) as info:
        load_pipeline(str(target), get_spec("tiny-i2v"))
    assert f"cogvx make-tiny-model --variant tiny-i2v --out {target}" in str(info.value)


def test_folder_that_is_not_a_model(tmp_path):
    with pytest.raises(ModelNotAvailableError, match="holds no model_index.json"):
        resolve_source(str(tmp_path))
    (tmp_path / "weights.safetensors").write_bytes(b"x")
    with pytest.raises(ModelNotAvailableError, match="is a file"):
        resolve_source(str(tmp_path / "weights.safetensors"))


def copy_model(source, target, index_update=None):
    shutil.copytree(source, target)
    if index_update is not None:
        index_file = target / "model_index.json"
        index = json.loads(index_file.read_text())
        index.update(index_update)
        index_file.write_text(json.dumps(index))
    return target


def test_foreign_pipeline_class_is_refused(tiny_models, tmp_path):
    folder = copy_model(tiny_models["tiny-t2v"], tmp_path / "m", {"_class_name": "SomeCustomPipeline"})
    with pytest.raises(ModelNotAvailableError, match="names pipeline 'SomeCustomPipeline'; cogvx loads"):
        load_pipeline(str(folder), get_spec("tiny-t2v"))
    (folder / "model_index.json").write_text("{not json")
    with pytest.raises(ModelNotAvailableError, match="is not valid JSON"):
        load_pipeline(str(folder), get_spec("tiny-t2v"))


def test_weights_that_contradict_the_variant_are_refused(tiny_models):
    with pytest.raises(ConfigError, match=r"holds a CogVideoX 1.0 i2v transformer .* but model.variant = 'tiny-t2v'"):
        load_pipeline(str(tiny_models["tiny-i2v"]), get_spec("tiny-t2v"))
    with pytest.raises(ConfigError, match="holds a CogVideoX 1.5 t2v transformer"):
        load_pipeline(str(tiny_models["tiny-1.5-t2v"]), get_spec("cogvideox-5b"))


def test_hub_id_is_served_from_the_hub_cache(tiny_models, tmp_path):
    """A snapshot in the Hugging Face cache layout loads by hub id, with no network."""
    repo = tmp_path / "hub" / "models--THUDM--CogVideoX-5b"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(FAKE_COMMIT)
    copy_model(tiny_models["tiny-t2v"], repo / "snapshots" / FAKE_COMMIT)
    pipe = load_pipeline("THUDM/CogVideoX-5b", get_spec("cogvideox-5b"), cache_dir=tmp_path / "hub")
    assert type(pipe).__name__ == "CogVideoXPipeline"
    assert resolve_source("THUDM/CogVideoX-5b", cache_dir=tmp_path / "hub").name == FAKE_COMMIT


@pytest.mark.slow
def test_uncached_hub_id_without_network_fails_fast(run_cli, tmp_path):
    started = time.monotonic()
    result = run_cli("check", "model.variant=cogvideox-5b")
    elapsed = time.monotonic() - started
    assert result.returncode == 3, result.stderr
    assert "cannot load model 'THUDM/CogVideoX-5b'" in result.stderr
    assert "cannot be reached" in result.stderr
    assert "hf download THUDM/CogVideoX-5b" in result.stderr
    assert "cogvx make-tiny-model" in result.stderr
    assert "Traceback" not in result.stderr
    assert elapsed < 60


@pytest.mark.slow
def test_offline_mode_is_named_in_the_message(run_cli, tmp_path):
    env = offline_env(tmp_path) | {"HF_HUB_OFFLINE": "1"}
    result = run_cli("check", "model.variant=THUDM/CogVideoX1.5-5B-I2V", env=env)
    assert result.returncode == 3
    assert "HF_HUB_OFFLINE is set" in result.stderr
    assert "hf download THUDM/CogVideoX1.5-5B-I2V" in result.stderr
