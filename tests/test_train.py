"""Training on the tiny model: it learns, resumes exactly, and leaves a LoRA diffusers can load."""

from __future__ import annotations

import json
import signal
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cogvx.config import load_config
from cogvx.generate import attach_lora
from cogvx.inference import render
from cogvx.models.loader import load_pipeline
from cogvx.models.specs import get_spec
from cogvx.training.checkpoint import list_checkpoints
from cogvx.models.lora import read_lora_metadata
from cogvx.training.loop import train
from tests.helpers.training import base_overrides, cut_back_to_first_checkpoint, lora_tensors, run, train_process


@pytest.mark.slow
def test_loss_goes_down_when_overfitting_one_clip(prepared, tmp_path):
    report = run(prepared, tmp_path / "run", "train.max_steps=30", "train.learning_rate=1e-2",
                 "train.checkpointing_steps=100")
    losses = [loss for _, loss in report.losses]
    assert len(losses) == 30 and all(np.isfinite(losses))
    assert statistics.mean(losses[-10:]) < 0.9 * statistics.mean(losses[:5])


@pytest.mark.slow
def test_resumed_run_is_bit_identical_to_a_straight_one(prepared, tmp_path):
    settings = ("train.max_steps=8", "train.checkpointing_steps=4", "train.gradient_accumulation_steps=2",
                "train.lr_warmup_steps=3", "train.learning_rate=1e-3")
    run(prepared, tmp_path / "straight", *settings)
    # A second run, cut back to its step-4 checkpoint (as if it had stopped there), resumed.
    run(prepared, tmp_path / "resumed", *settings)
    cut_back_to_first_checkpoint(tmp_path / "resumed")
    resumed = run(prepared, tmp_path / "resumed", *settings, resume="latest")
    assert resumed.steps == 8
    straight, again = lora_tensors(tmp_path / "straight"), lora_tensors(tmp_path / "resumed")
    assert straight.keys() == again.keys()
    assert all(torch.equal(straight[k], again[k]) for k in straight)
    assert any(t.abs().sum() > 0 for k, t in straight.items() if "lora_B" in k)


@pytest.mark.slow
def test_checkpoint_limit_keeps_the_newest(prepared, tmp_path):
    run(prepared, tmp_path / "run", "train.max_steps=5", "train.checkpointing_steps=1",
        "train.checkpoints_total_limit=2")
    names = [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")]
    assert names == ["checkpoint-000004", "checkpoint-000005"]
    (tmp_path / "run" / "checkpoints" / "checkpoint-000009").mkdir()  # torn: no state.json
    assert list_checkpoints(tmp_path / "run" / "checkpoints")[-1].name == "checkpoint-000005"


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained")
    run(prepared, out, "train.max_steps=12", "train.learning_rate=1e-2", "train.checkpointing_steps=100")
    return out


@pytest.mark.slow
def test_lora_file_records_what_it_is(trained, prepared):
    meta = read_lora_metadata(trained / "lora" / "pytorch_lora_weights.safetensors")
    assert (meta["rank"], meta["alpha"]) == (8, 8)
    assert set(meta["target_modules"]) == {"to_q", "to_k", "to_v", "to_out.0"}
    assert meta["cogvx"]["base_model"] == str(prepared["model"])
    assert meta["cogvx"]["config"]["train"]["lora"]["rank"] == 8
    report = json.loads((trained / "report.json").read_text())
    assert set(report["memory"]["phases"]) == {"load", "train", "validation"}
    assert report["timing"]["s_per_step"] > 0
    assert (trained / "validation" / "step-000012" / "prompt-00.mp4").stat().st_size > 0


@pytest.mark.slow
def test_lora_loads_in_diffusers_and_changes_generation(trained, prepared):
    pipe = load_pipeline(str(prepared["model"]), get_spec("tiny-t2v"))

    def sample():
        return render(pipe, "a red circle", frames=9, height=64, width=96, steps=3, guidance_scale=1.0, seed=0)

    base = sample()
    attach_lora(pipe, trained / "lora", scale=1.0, log=lambda *_: None)
    with_lora = sample()
    pipe.set_adapters(["cogvx"], [0.0])
    scale_zero = sample()
    assert np.abs(with_lora.astype(int) - base.astype(int)).mean() > 1.0
    assert np.array_equal(scale_zero, base)


@pytest.mark.slow
def test_generate_cli_writes_the_asked_clip(run_cli, trained, prepared, tmp_path):
    import decord

    result = run_cli("generate", "--prompt", "a blue square", "--lora", str(trained / "lora"),
                     "--frames", "17", "--height", "48", "--width", "80", "--steps", "2", "--out", "clip.mp4",
                     f"model.path={prepared['model']}")
    assert result.returncode == 0, result.stderr
    assert "LoRA rank 8, alpha 8" in result.stdout
    reader = decord.VideoReader(str(tmp_path / "clip.mp4"))
    assert len(reader) == 17 and reader[0].shape == (48, 80, 3)
    bad = run_cli("generate", "--prompt", "x", "--lora", str(tmp_path / "nope"), f"model.path={prepared['model']}")
    assert bad.returncode == 1 and "no such LoRA file" in bad.stderr


def wait_for_checkpoint(out: Path, step: int, process: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if any(p.name >= f"checkpoint-{step:06d}" for p in list_checkpoints(out / "checkpoints")):
            return
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint {step} (exit {process.poll()})")


@pytest.mark.slow
def test_sigkill_then_resume_finishes_like_a_straight_run(prepared, tmp_path):
    settings = ("train.max_steps=40", "train.checkpointing_steps=1", "train.checkpoints_total_limit=2")
    run(prepared, tmp_path / "straight", *settings)
    out = tmp_path / "killed"
    out.mkdir()
    process = train_process(prepared, out, *settings)
    wait_for_checkpoint(out, 3, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "lora").exists()
    finished = run(prepared, out, *settings, resume="latest")
    assert finished.steps == 40
    straight, resumed = lora_tensors(tmp_path / "straight"), lora_tensors(out)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_130(prepared, tmp_path):
    out = tmp_path / "stopped"
    out.mkdir()
    process = train_process(prepared, out, "train.max_steps=400", "train.checkpointing_steps=1000")
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not (out / "cogvx-config.yaml").exists():
        time.sleep(0.05)
    time.sleep(1.0)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "continue with --resume latest" in stderr
    saved = list_checkpoints(out / "checkpoints")
    assert len(saved) == 1 and 0 < int(saved[0].name.split("-")[1]) < 400


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["tiny-i2v", "tiny-1.5-t2v", "tiny-1.5-i2v"])
def test_other_families_train_a_few_steps(variant, tiny_models, tmp_path):
    """Image conditioning, 1.5 temporal padding and ofs go through the same loop."""
    from cogvx.data.synthetic import make_synthetic_dataset
    from cogvx.prepare import run_prepare

    make_synthetic_dataset(tmp_path / "raw", 1, seed=1)
    paths = {"raw": tmp_path / "raw", "latents": tmp_path / "latents", "model": tiny_models[variant]}
    overrides = [*base_overrides(paths), f"model.variant={variant}", f"train.output_dir={tmp_path / 'run'}",
                 "train.max_steps=2", "validate.num_inference_steps=1"]
    config = load_config(None, overrides)
    run_prepare(config, log=lambda *_: None)
    report = train(config, log=lambda *_: None)
    assert report.steps == 2 and np.isfinite(report.final_loss)
    meta = read_lora_metadata(Path(report.weights) / "pytorch_lora_weights.safetensors")
    assert meta["cogvx"]["variant"] == variant


@pytest.mark.slow
def test_resume_refuses_checkpoints_of_other_settings(prepared, tmp_path):
    from cogvx.errors import CogvxError

    run(prepared, tmp_path / "run", "train.max_steps=2", "train.learning_rate=1e-3")
    saved = list_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    # 'latest' ignores the other run's checkpoints and starts afresh.
    fresh = run(prepared, tmp_path / "run", "train.max_steps=3", "train.learning_rate=2e-3", resume="latest")
    assert fresh.steps == 3 and len(fresh.losses) == 3
    with pytest.raises(CogvxError, match="other training settings or data"):
        run(prepared, tmp_path / "run", "train.max_steps=2", "train.learning_rate=5e-3", resume=str(saved))


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adam", "adamw8bit", "prodigy"])
def test_other_optimizers_step(prepared, tmp_path, optimizer):
    report = run(prepared, tmp_path / "run", "train.max_steps=2", f"train.optimizer={optimizer}",
                 "train.lr_scheduler=cosine", "train.lr_warmup_steps=1")
    assert report.steps == 2 and np.isfinite(report.final_loss)


@pytest.mark.slow
def test_gpu_only_optimizer_is_refused_on_cpu(prepared, tmp_path):
    from cogvx.errors import CogvxError

    if torch.cuda.is_available():
        pytest.skip("runs on a CPU-only machine")
    with pytest.raises(CogvxError, match="cpu_offload_adamw .* needs a CUDA device"):
        run(prepared, tmp_path / "run", "train.max_steps=1", "train.optimizer=cpu_offload_adamw")


def test_8bit_adamw_state_survives_a_checkpoint(tmp_path):
    """bitsandbytes nests tensors in its state; a round trip through the checkpoint keeps them all."""
    import bitsandbytes as bnb
    from diffusers.optimization import get_scheduler

    from cogvx.training.checkpoint import load_checkpoint, save_checkpoint

    def make():
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(5000)), torch.nn.Parameter(torch.randn(10))]
        optimizer = bnb.optim.AdamW8bit(params, lr=1e-3)
        return params, optimizer, get_scheduler("constant", optimizer)

    params, optimizer, scheduler = make()
    for _ in range(2):
        sum(p.square().sum() for p in params).backward()
        optimizer.step()
        optimizer.zero_grad()
    saved = save_checkpoint(tmp_path, 2, {"w": params[0]}, optimizer, scheduler, {})
    _, fresh, fresh_scheduler = make()
    load_checkpoint(saved, fresh, fresh_scheduler)
    before, after = optimizer.state_dict()["state"], fresh.state_dict()["state"]
    for pid in before:
        quant_before = before[pid]["__bnb_optimizer_quant_state__"]
        quant_after = after[pid]["__bnb_optimizer_quant_state__"]
        assert quant_before.keys() == quant_after.keys() and before[pid]["step"] == after[pid]["step"]
        for name, value in quant_before.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value.cpu(), quant_after[name].cpu()), name


@pytest.mark.slow
@pytest.mark.parametrize("damaged", ["trainable.safetensors", "optimizer.safetensors"])
def test_truncated_checkpoint_file_is_named_in_a_clear_error(prepared, tmp_path, damaged):
    from cogvx.errors import CogvxError

    settings = ("train.max_steps=2", "train.checkpointing_steps=1")
    run(prepared, tmp_path / "run", *settings)
    saved = list_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    target = saved / damaged
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])  # torn after it was complete
    with pytest.raises(CogvxError, match=f"checkpoint {saved} is damaged"):
        run(prepared, tmp_path / "run", *settings, resume=str(saved))
