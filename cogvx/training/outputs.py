"""What a finished training run leaves: the weights (a LoRA file or a diffusers transformer
folder), the typed report, and the metrics files DVC and dashboards read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from cogvx.io import atomic_write_text
from cogvx.reports import MemoryReport, StepTiming, TrainingReport
from cogvx.training.checkpointing import TrainState
from cogvx.training.collective import main_process_then_meet, replica_digests


def save_final(run, out: Path, info: dict[str, Any]) -> Path:
    """LoRA file (method lora) or a diffusers transformer folder in safetensors shards (full),
    written by the main process (with the weights gathered from every process where sharded)."""
    from cogvx.io import atomic_directory
    from cogvx.models.lora import save_lora

    lora = run.config.train.method == "lora"
    target = out / ("lora" if lora else "full")
    state = run.checkpointer.full_state(run)  # a collective where sharded: every process calls it

    def write() -> None:
        if lora:
            save_lora(run.model, target, info, state_dict=state)
            return
        with atomic_directory(target) as staging:
            save_transformer(run.model, staging, state)
            (staging / "cogvx-training.json").write_text(json.dumps(info, indent=1, default=str), encoding="utf-8")

    main_process_then_meet(run.accelerator, write)
    return target


def save_transformer(model, folder: Path, state: dict[str, torch.Tensor] | None) -> None:
    """The transformer in diffusers' layout (config + safetensors shards of at most 5 GB); from
    ``state``, the weights gathered from every process, where the module holds only a shard
    (diffusers' save_pretrained would save the shard)."""
    if state is None:
        model.save_pretrained(folder, safe_serialization=True, max_shard_size="5GB")
        return
    from huggingface_hub import save_torch_state_dict

    model.save_config(folder)
    save_torch_state_dict(state, folder, filename_pattern="diffusion_pytorch_model{suffix}.safetensors",
                          max_shard_size="5GB")


def run_digests(run) -> list[str] | None:
    """Under DDP every process must end with the same weights: one digest per process (None on
    one process and where weights are sharded)."""
    from cogvx.models.lora import trainable_state

    if run.accelerator.num_processes == 1 or run.checkpointer.sharded:
        return None
    return replica_digests(run.accelerator, trainable_state(run.model))


def build_report(run, weights: Path, videos: list[Path], memory: MemoryReport, timing: StepTiming,
                 resumed_from_step: int, setup_s: float) -> TrainingReport:
    """The report of a finished run (tracking is added once MLflow has it)."""
    state, train = run.state, run.config.train
    return TrainingReport(
        steps=state.step, resumed_from_step=resumed_from_step, setup_s=setup_s,
        final_loss=state.losses[-1][1] if state.losses else None, weights=str(weights), method=train.method,
        validation_videos=[str(p) for p in videos], processes=run.accelerator.num_processes,
        engine=run.accelerator.distributed_type.value, global_batch=global_batch(run),
        replica_digests=run_digests(run), memory=memory, timing=timing, losses=state.losses)


def global_batch(run) -> int:
    """Samples per optimizer step over all processes."""
    train = run.config.train
    return train.batch_size * train.gradient_accumulation_steps * run.accelerator.num_processes


def write_metrics(report: TrainingReport, state: TrainState, out: Path) -> None:
    """The run's figures for DVC and dashboards, in four files under ``out``.

    metrics.json (final loss, steps) and curves.csv (loss, lr and grad norm per step) depend only
    on the data and the config: an identical re-run writes the same bytes. What depends on the
    machine and the moment goes to resources.json (s/step, samples/s, peak memory per phase) and
    step_time.csv (seconds per step).
    """
    phases = report.memory.phases
    metrics = {"final_loss": report.final_loss, "steps": report.steps}
    resources = {**report.to_dict()["timing"], "setup_s": report.setup_s,
                 **{f"{phase}_peak_allocated_gib": values.peak_allocated_gib for phase, values in phases.items()},
                 **{f"{phase}_peak_reserved_gib": values.peak_reserved_gib for phase, values in phases.items()}}
    by_step = {step: (lr, grad) for step, lr, grad in state.rates}
    curve_rows = "".join(f"{step},{loss},{_csv_number(by_step.get(step, (None, None))[0])},"
                         f"{_csv_number(by_step.get(step, (None, None))[1])}\n" for step, loss in state.losses)
    time_rows = "".join(f"{step},{seconds:.4f}\n" for step, seconds in enumerate(state.seconds, start=1))
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=1) + "\n")
    atomic_write_text(out / "resources.json", json.dumps(resources, indent=1) + "\n")
    atomic_write_text(out / "curves.csv", "step,loss,lr,grad_norm\n" + curve_rows)
    atomic_write_text(out / "step_time.csv", "step,s_per_step\n" + time_rows)


def _csv_number(value: float | None) -> str:
    """A CSV cell: empty for a value not recorded (a checkpoint of an older version), else repr."""
    return "" if value is None else repr(float(value))
