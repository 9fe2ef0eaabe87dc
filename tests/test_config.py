"""The typed config: loading, dotted overrides, and one clear message for every bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cogvx.config import (
    RESOLVED_CONFIG_NAME,
    Config,
    apply_overrides,
    load_config,
    schema_rows,
    write_resolved_config,
)
from cogvx.errors import ConfigError
from tests.helpers import REPO


def config_error(*overrides: str, params: Path | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(params, overrides)
    return str(info.value)


def test_defaults_are_valid_and_take_the_model_geometry():
    config = load_config()
    assert config.model.variant == "tiny-t2v"
    assert (config.frames, config.height, config.width) == (9, 64, 96)
    assert config.model_source == "models/tiny-t2v"


def test_repo_params_file_is_valid_and_lists_every_key():
    """DVC tracks params by key, so params.yaml must spell out every documented field."""
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    load_config(REPO / "params.yaml")
    flat = set()

    def walk(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                flat.add(f"{prefix}{key}")

    walk(data)
    assert flat == {row[0] for row in schema_rows()}


def test_overrides_are_typed_and_nested():
    config = load_config(None, ["train.lora.rank=8", "train.learning_rate=3e-5",
                                "train.gradient_checkpointing=false", "data.frames=49",
                                "validate.prompts=[a cat, a dog]", "train.checkpoints_total_limit=",
                                "model.variant=THUDM/CogVideoX-5b"])
    assert config.train.lora.rank == 8
    assert config.train.learning_rate == pytest.approx(3e-5)
    assert config.train.gradient_checkpointing is False
    assert config.validate_.prompts == ["a cat", "a dog"]
    assert config.train.checkpoints_total_limit is None
    assert config.model.variant == "cogvideox-5b"
    assert config.model_source == "THUDM/CogVideoX-5b"
    assert config.frames == 49


def test_overrides_apply_on_top_of_the_params_file(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  max_steps: 7\n  lora:\n    rank: 4\n")
    config = load_config(params, ["train.lora.alpha=2"])
    assert (config.train.max_steps, config.train.lora.rank, config.train.lora.alpha) == (7, 4, 2.0)


def test_apply_overrides_leaves_its_input_alone():
    data = {"train": {"lora": {"rank": 4}}}
    merged = apply_overrides(data, ["train.lora.rank=9"])
    assert data["train"]["lora"]["rank"] == 4 and merged["train"]["lora"]["rank"] == 9


@pytest.mark.parametrize("override, expected", [
    ("train.lora.rank=0", "train.lora.rank = 0: Input should be greater than or equal to 1"),
    ("data.frames=50", "data.frames = 50: tiny-t2v needs 4k+1 frames (e.g. 49 or 53)"),
    ("data.height=100", "data.height = 100: must be a multiple of 16 (e.g. 96 or 112)"),
    ("data.width=730", "data.width = 730: must be a multiple of 16 (e.g. 720 or 736)"),
    ("train.max_steps=many", "train.max_steps = 'many': Input should be a valid integer"),
    ("train.mixed_precision=fp8", "train.mixed_precision = 'fp8': Input should be 'auto', 'no', 'bf16' or 'fp16'"),
    ("train.lr=1e-4", "train.lr = '1e-4': unknown key; did you mean 'learning_rate'? train accepts: method"),
    ("train.lora_rank=8", "train.lora_rank = 8: unknown key; did you mean 'lora.rank'?"),
    ("trian.max_steps=3", "trian = {'max_steps': 3}: unknown key; did you mean 'train'? the top level accepts: data, model"),
    ("model.variant=cogvideox-7b", "model.variant = 'cogvideox-7b': unknown model; known variants: cogvideox-2b"),
    ("train.lora.dropout=1.5", "train.lora.dropout = 1.5: Input should be less than 1"),
    ("train.gradient_checkpointing=perhaps", "train.gradient_checkpointing = 'perhaps': Input should be a valid boolean"),
])
def test_bad_values_name_key_value_and_what_is_allowed(override, expected):
    message = config_error(override)
    assert message.startswith("invalid configuration (defaults + 1 override), 1 problem:")
    assert expected in message


def test_frame_rule_follows_the_model_generation():
    assert "cogvideox1.5-5b needs 16N+1 frames (e.g. 81 or 97)" in config_error(
        "model.variant=cogvideox1.5-5b", "data.frames=85")
    assert load_config(None, ["model.variant=cogvideox1.5-5b", "data.frames=161"]).frames == 161
    assert "validate.frames = 12: tiny-t2v needs 4k+1" in config_error("validate.frames=12")


def test_all_problems_are_reported_at_once():
    message = config_error("train.lora.rank=0", "data.frames=10", "tracking.experiment=")
    assert "3 problems" in message
    for key in ("train.lora.rank = 0", "data.frames = 10", "tracking.experiment = None"):
        assert key in message


def test_typo_gets_a_suggestion():
    assert "did you mean 'learning_rate'?" in config_error("train.learning_rat=1")


@pytest.mark.parametrize("text", ["train=", "=3", "train..rank=3", "rank"])
def test_malformed_override_is_refused(text):
    message = config_error(text)
    assert ("not of the form section.key=value" in message
            or "train = None: Input should be a valid dictionary" in message)


def test_override_into_a_value_is_refused(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  max_steps: 5\n")
    assert "train.max_steps is a value (5), not a section" in config_error("train.max_steps.x=1", params=params)
    assert "train.max_steps = {'x': 1}: Input should be a valid integer" in config_error("train.max_steps.x=1")


@pytest.mark.parametrize("content, expected", [
    (b"train: [unclosed\n", "not valid YAML"),
    (b"- a\n- b\n", "the top level must be a mapping of sections"),
    (b"train:\n  max_steps: \xff\xfe\n", "not UTF-8 text (byte 0xff at offset 20)"),
    (b"a: &x [1, 2]\nb: *x\n", "line 2: YAML aliases (*name) are not allowed"),
    (b"train:\n  max_steps: 0\n", "train.max_steps = 0: Input should be greater than or equal to 1"),
])
def test_bad_params_files(tmp_path, content, expected):
    params = tmp_path / "params.yaml"
    params.write_bytes(content)
    assert expected in config_error(params=params)


def test_missing_and_oversized_params_files(tmp_path):
    assert "not found" in config_error(params=tmp_path / "nope.yaml")
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * (1 << 20) + "\n")
    assert "a params file may be at most" in config_error(params=big)


def test_resolved_config_round_trips(tmp_path):
    config = load_config(None, ["train.lora.rank=4", "validate.prompts=[x]"])
    written = write_resolved_config(config, tmp_path / "run")
    assert written.name == RESOLVED_CONFIG_NAME
    assert load_config(written) == config
    assert [p.name for p in written.parent.iterdir()] == [RESOLVED_CONFIG_NAME]


def test_every_field_is_documented():
    rows = schema_rows()
    assert len(rows) > 40
    undocumented = [key for key, _, _, description in rows if len(description) < 10]
    assert undocumented == []
    assert {key.split(".")[0] for key, *_ in rows} == {
        "data", "model", "prepare", "train", "validate", "tracking"}


def test_json_schema_names_the_sections_by_their_yaml_names():
    schema = Config.model_json_schema(by_alias=True)
    assert set(schema["properties"]) == {"data", "model", "prepare", "train", "validate", "tracking"}
