"""The `cogvx` command line, run as a real subprocess the way a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from cogvx.config import load_config, schema_rows
from cogvx.models.specs import SPECS
from tests.helpers import REPO

COMMANDS = (["config", "show"], ["config", "schema"], ["models"], ["doctor"],
            ["make-tiny-model"], ["check"], ["data", "validate"], ["data", "synthetic"],
            ["data", "download"], ["prepare"], ["train"], ["generate"], ["registry", "list"],
            ["registry", "promote"], ["flow", "run"], ["flow", "serve"])


def test_top_level_help_lists_every_command(run_cli):
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("config", "models", "doctor", "make-tiny-model", "check", "data", "prepare",
                    "train", "generate"):
        assert command in result.stdout


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_has_help(run_cli, command):
    result = run_cli(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout


def test_help_does_not_import_torch(tmp_path):
    """--help answers at once: nothing on its way (the end of a command included) imports torch."""
    probe = ("import runpy, sys\nsys.argv = ['cogvx', 'train', '--help']\ntry:\n"
             "    runpy.run_module('cogvx', run_name='__main__')\nexcept SystemExit:\n    pass\n"
             "print('torch imported' if 'torch' in sys.modules else 'torch not imported', file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert "Usage:" in done.stdout and done.stderr.strip().endswith("torch not imported"), done.stderr


def test_version(run_cli):
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.startswith("cogvx ")


def test_models_lists_the_registry(run_cli):
    table = run_cli("models")
    assert table.returncode == 0
    for key, spec in SPECS.items():
        assert key in table.stdout and spec.default_source in table.stdout
    rows = json.loads(run_cli("models", "--json").stdout)
    assert {row["variant"] for row in rows} == set(SPECS)
    assert next(r for r in rows if r["variant"] == "cogvideox1.5-5b")["frame_rule"] == "16N+1"


def test_doctor_reports_versions_and_device(run_cli):
    result = run_cli("doctor")
    assert result.returncode == 0, result.stderr
    for item in ("torch", "diffusers", "peft", "device", "hub", "flash-attn-4"):
        assert item in result.stdout


def test_config_show_reads_params_yaml_from_the_working_folder(run_cli):
    result = run_cli("config", "show", "train.lora.rank=8", cwd=REPO)
    assert result.returncode == 0, result.stderr
    shown = yaml.safe_load(result.stdout)
    assert shown["train"]["lora"]["rank"] == 8
    assert shown == load_config(REPO / "params.yaml", ["train.lora.rank=8"]).to_dict()


def test_config_show_json_and_explicit_params(run_cli, tmp_path):
    params = tmp_path / "mine.yaml"
    params.write_text("model:\n  variant: THUDM/CogVideoX-2b\n")
    result = run_cli("config", "show", "--json", "--params", str(params))
    assert json.loads(result.stdout)["model"]["variant"] == "cogvideox-2b"


def test_config_schema_documents_every_key(run_cli):
    result = run_cli("config", "schema")
    assert result.returncode == 0
    for key, _, _, description in schema_rows():
        assert f"  {key}:" in result.stdout and description in result.stdout


@pytest.mark.parametrize("content, overrides, expected", [
    ("train:\n  lora:\n    rank: 0\n", [], "train.lora.rank = 0: Input should be greater than or equal to 1"),
    ("data:\n  frames: 48\n", [], "data.frames = 48: tiny-t2v needs 4k+1 frames"),
    ("train:\n  max_steps: 10\n", ["train.optimiser=adamw"], "train.optimiser = 'adamw': unknown key; did you mean 'optimizer'?"),
    ("train: [1, 2\n", [], "not valid YAML"),
])
def test_bad_config_gives_one_message_and_exit_2(run_cli, tmp_path, content, overrides, expected):
    params = tmp_path / "params.yaml"
    params.write_text(content)
    for command in (["config", "show"], ["check"], ["make-tiny-model"]):
        result = run_cli(*command, "--params", str(params), *overrides)
        assert result.returncode == 2, (command, result.stderr)
        assert result.stderr.startswith("error: ")
        assert expected in result.stderr
        assert "Traceback" not in result.stderr + result.stdout
        assert not (tmp_path / "models").exists() and not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_make_tiny_model_refuses_real_variants_and_existing_folders(run_cli, tmp_path):
    result = run_cli("make-tiny-model", "--variant", "cogvideox-5b", "--out", "m")
    assert result.returncode == 1 and "is a full-size model" in result.stderr
    (tmp_path / "m").mkdir()
    result = run_cli("make-tiny-model", "--variant", "tiny-t2v", "--out", "m")
    assert result.returncode == 1 and "already exists; pass --overwrite" in result.stderr


def read_video(path: Path) -> np.ndarray:
    import decord

    reader = decord.VideoReader(str(path))
    return reader.get_batch(list(range(len(reader)))).asnumpy()  # [F, H, W, 3]


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["tiny-t2v", "tiny-1.5-i2v"])
def test_build_then_check_end_to_end(run_cli, tmp_path, variant):
    """The main job today: build the tiny model, load it, render a clip, record the config."""
    built = run_cli("make-tiny-model", "--variant", variant, "--out", "model")
    assert built.returncode == 0, built.stderr
    assert (tmp_path / "model" / "model_index.json").is_file()
    assert load_config(tmp_path / "model" / "cogvx-config.yaml").model.variant == variant

    checked = run_cli("check", f"model.variant={variant}", "model.path=model", "--out", "check")
    assert checked.returncode == 0, checked.stderr
    spec = SPECS[variant]
    report = json.loads((tmp_path / "check" / "report.json").read_text())
    assert (report["frames"], report["height"], report["width"]) == (spec.frames, spec.height, spec.width)
    assert report["transformer_parameters"] > 0 and report["pixel_std"] > 0
    video = read_video(tmp_path / "check" / "sample.mp4")
    assert video.shape == (spec.frames, spec.height, spec.width, 3)
    resolved = load_config(tmp_path / "check" / "cogvx-config.yaml")
    assert resolved.model.path == "model" and resolved.model.variant == variant
