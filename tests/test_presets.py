"""train.preset: how a preset resolves into the config, where training refuses one, the peak-memory
estimate behind that refusal (checked against measured peaks), and doctor's suggestion."""

from __future__ import annotations

import json

import pytest
import torch

from cogvx.config import PRESETS, load_config, write_resolved_config
from cogvx.errors import CogvxError, ConfigError
from cogvx.models.specs import SPECS
from cogvx.training.presets import (
    check_preset_for_device,
    check_preset_runs,
    estimate_training_allocated_gib,
    estimate_training_peak_gib,
    suggest_preset,
    transformer_parameters,
    with_preset,
)
from tests.helpers import REPO

H200 = ((9, 0), 139.8)  # compute capability, GiB
A100_80 = ((8, 0), 79.3)
LORA_FIELDS = ("fp8_base_weights", "compile", "attention_backend", "fp8_compute", "keep_attention_outputs",
               "activation_offload", "optimizer")
EXPECTED = {  # train fields after resolution, in LORA_FIELDS order
    ("lora", "none"): (False, "none", "auto", False, False, False, "adamw"),
    ("lora", "balanced"): (True, "blocks", "cudnn", False, False, False, "adamw"),
    ("lora", "speed"): (True, "blocks", "cudnn", True, True, False, "adamw"),
    ("lora", "lean"): (True, "blocks", "cudnn", True, False, True, "adamw"),
    ("full", "balanced"): (False, "blocks", "cudnn", False, False, False, "cpu_offload_adamw"),
    ("full", "speed"): (False, "blocks", "cudnn", False, False, False, "cpu_offload_adamw"),
    ("full", "lean"): (False, "blocks", "cudnn", False, False, True, "cpu_offload_adamw"),
}


def resolved(*overrides: str) -> tuple:
    train = load_config(None, overrides).train
    return tuple(getattr(train, name) for name in LORA_FIELDS)


def five_b(*overrides: str):
    return load_config(None, ["model.variant=cogvideox-5b", *overrides])


# ----------------------------------------------------------------------------- resolution


@pytest.mark.parametrize("method, preset", EXPECTED, ids="-".join)
def test_each_preset_sets_its_fields(method, preset):
    assert resolved(f"train.method={method}", f"train.preset={preset}") == EXPECTED[method, preset]


def test_a_non_default_value_the_user_set_wins():
    train = load_config(None, ["train.preset=speed", "train.attention_backend=flash",
                               "train.compile=none"]).train
    assert train.attention_backend == "flash"  # set by the user: kept
    assert train.compile == "blocks"  # 'none' is the default, so the preset sets it
    assert train.fp8_compute and train.keep_attention_outputs


def test_resolution_is_what_the_repo_params_file_gives_and_survives_a_round_trip(tmp_path):
    config = load_config(REPO / "params.yaml", ["train.preset=lean"])
    assert config.train.activation_offload and config.train.fp8_base_weights
    written = write_resolved_config(config, tmp_path)
    assert load_config(written) == config  # resolving a resolved config changes nothing


def test_an_unknown_preset_is_a_config_error_listing_the_names():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["train.preset=fast"])
    message = str(info.value)
    assert "train.preset = 'fast'" in message
    assert all(name in message for name in ("'none'", "'speed'", "'balanced'", "'lean'"))


def test_a_preset_value_breaking_a_consistency_rule_names_the_preset():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["train.preset=speed", "train.gradient_checkpointing=false"])
    assert "keep_attention_outputs" in str(info.value) and "set by train.preset = speed" in str(info.value)
    with pytest.raises(ConfigError, match="set by train.preset = balanced"):
        load_config(None, ["train.method=full", "train.preset=balanced", "train.gradient_accumulation_steps=2"])


def test_switching_preset_undoes_the_old_one():
    lean = with_preset(five_b("train.preset=speed", "train.attention_backend=flash"), "lean")
    assert lean.train.preset == "lean" and lean.train.activation_offload
    assert not lean.train.keep_attention_outputs and lean.train.attention_backend == "flash"
    assert set(PRESETS) == {(m, p) for m in ("lora", "full") for p in ("speed", "balanced", "lean")}


# ----------------------------------------------------------------------------- refusals


def refusal(config, device_type="cuda", capability=(9, 0), memory=139.8) -> str:
    with pytest.raises(CogvxError) as info:
        check_preset_runs(config, device_type, capability, memory)
    return str(info.value)


def test_a_preset_on_a_cpu_is_refused():
    message = refusal(five_b("train.preset=speed"), "cpu", None, None)
    assert message.startswith("train.preset = speed is a GPU setting") and "train.preset = none" in message
    with pytest.raises(CogvxError, match="GPU setting"):
        check_preset_for_device(load_config(None, ["train.preset=balanced"]), torch.device("cpu"))


def test_fp8_compute_needs_compute_capability_8_9():
    message = refusal(five_b("train.preset=speed"), "cuda", *A100_80)
    assert "8.9+ (Ada, Hopper)" in message and "this GPU is 8.0" in message and "preset balanced" in message
    own = five_b("train.fp8_base_weights=true", "train.fp8_compute=true")  # no preset: refused as well
    assert "set train.fp8_compute = false" in refusal(own, "cuda", *A100_80)
    assert "this is a CPU" in refusal(own, "cpu", None, None)


def test_too_little_memory_says_the_estimate_the_gpu_and_what_fits():
    message = refusal(five_b("train.preset=speed"), "cuda", (8, 9), 14.0)
    need = estimate_training_peak_gib(five_b("train.preset=speed"))
    assert f"needs an estimated {need:.1f} GiB" in message and "the GPU has 14.0 GiB" in message
    assert "train.preset = lean would fit" in message
    assert "no preset fits" in refusal(five_b("train.preset=lean"), "cuda", (8, 9), 8.0)


def test_runs_that_fit_pass():
    for preset in ("speed", "balanced", "lean"):
        check_preset_runs(five_b(f"train.preset={preset}"), "cuda", *H200)
    check_preset_runs(five_b("train.preset=balanced"), "cuda", *A100_80)  # no fp8 compute in balanced
    check_preset_runs(five_b(), "cpu", None, None)  # no preset, nothing to refuse
    check_preset_for_device(load_config(), torch.device("cpu"))
    sharded = five_b("train.preset=speed", "train.accelerate_config=configs/accelerate/fsdp2.yaml")
    check_preset_runs(sharded, "cuda", (9, 0), 16.0)  # memory is not judged for sharded runs


# ----------------------------------------------------------------------------- estimate

FP8_COMPILE = ("train.fp8_base_weights=true", "train.compile=blocks", "train.attention_backend=cudnn")
# Peak allocated / reserved GiB of one training step on an H200 (torch.cuda.max_memory_allocated /
# _reserved; batch 1, LoRA rank 64, 49x480x720 unless given; README "Memory and speed" and
# bench/results): the estimate must land within 15% of each allocated figure.
MEASURED = {
    "5b bf16 eager": (("model.variant=cogvideox-5b",), 18.20, 19.76),
    "5b fp8 + compile": (("model.variant=cogvideox-5b", *FP8_COMPILE), 13.43, 14.58),
    "5b fp8 + compile + offload": (("model.variant=cogvideox-5b", *FP8_COMPILE, "train.activation_offload=true"),
                                   9.59, 10.76),
    "2b fp8 + compile": (("model.variant=cogvideox-2b", *FP8_COMPILE), 5.75, 6.42),
    "2b bf16": (("model.variant=cogvideox-2b",), 7.31, 8.58),
    "1.5-5b 81x768x1360 fp8 + compile + offload": (("model.variant=cogvideox1.5-5b", *FP8_COMPILE,
                                                    "train.activation_offload=true"), 13.25, 15.02),
    "5b full, streamed-gradient CPU-offload AdamW + compile": (
        ("model.variant=cogvideox-5b", "train.method=full", "train.optimizer=cpu_offload_adamw",
         "train.compile=blocks", "train.attention_backend=cudnn"), 17.27, 18.98),
}


@pytest.mark.parametrize("case", MEASURED)
def test_estimate_matches_the_measured_peaks(case):
    overrides, allocated, reserved = MEASURED[case]
    config = load_config(None, overrides)
    assert estimate_training_allocated_gib(config) == pytest.approx(allocated, rel=0.15)
    assert estimate_training_peak_gib(config) >= reserved  # the margin covers the allocator's reserve


def test_parameter_count_matches_the_real_size_models():
    rows = json.loads((REPO / "bench/results/real_size_build.json").read_text())["rows"]
    for row in rows:
        if row["module"] in SPECS:
            assert sum(transformer_parameters(SPECS[row["module"]])) == pytest.approx(row["parameters"], rel=1e-3)


def test_estimate_grows_with_the_clip_and_the_batch():
    base = estimate_training_allocated_gib(five_b())
    assert estimate_training_allocated_gib(five_b("train.batch_size=2")) > base
    assert estimate_training_allocated_gib(five_b("data.frames=81")) > base
    assert estimate_training_allocated_gib(five_b("train.optimizer=adamw8bit")) < base


# ----------------------------------------------------------------------------- doctor


def test_suggested_preset_is_the_fastest_that_fits_and_runs():
    assert suggest_preset(*H200)[0] == "speed"
    assert suggest_preset(*A100_80)[0] == "balanced"  # no fp8 compute before 8.9
    assert suggest_preset((8, 9), 14.0)[0] == "lean"  # balanced needs ~15.6
    name, need = suggest_preset((8, 9), 8.0)
    assert name == "none" and need > 8.0


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU answer")
def test_doctor_suggests_no_preset_on_a_cpu():
    from cogvx.doctor import preset_report

    assert preset_report() == "none (presets are GPU settings)"


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the preset may run")
def test_cli_train_refuses_a_preset_on_a_cpu(run_cli):
    result = run_cli("train", "train.preset=speed", "tracking.enabled=false")
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "train.preset = speed is a GPU setting" in output and "Traceback" not in output
