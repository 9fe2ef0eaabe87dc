"""`cogvx train`: one training loop for every model, over precomputed latents, with accelerate.

Resumable exactly: the data order is a pure function of (seed, epoch), each sample's noise,
timestep and dropout come from its own generator seeded by its place in that order, and the
optimizer and LR scheduler state are restored, so N steps straight and N/2 + resume N/2 give the
same weights (bit-identical on CPU). SIGINT/SIGTERM save a checkpoint at the next step boundary
and exit with code 130.

On several processes (accelerate launch: DDP, FSDP, DeepSpeed) ``train.batch_size`` is per
process: each global batch of batch_size x processes samples is split by rows, so N processes
with batch b train like one process with batch N x b (same samples, same random draws; DDP
averages the gradients). Checkpoints, validation clips, the final weights and the report are
written by the main process; the others wait for it.
"""

from __future__ import annotations

import math
import signal
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from cogvx.config import Config, write_resolved_config
from cogvx.errors import CogvxError
from cogvx.io import atomic_write_text
from cogvx.models.constants import VAE_SPATIAL_SCALE
from cogvx.reports import REPORT_NAME, TrainingReport
from cogvx.training.checkpoint import resolve_resume
from cogvx.training.checkpointing import fingerprint, restore, save_run_checkpoint
from cogvx.training.collective import main_process_then_meet, mean_across_processes, stop_requested_anywhere
from cogvx.training.inputs import model_inputs
from cogvx.training.memory import MemoryMeter, step_timing
from cogvx.training.objective import SampleRandom, diffusion_loss, rotary_embeddings
from cogvx.training.optim import clip_streamed_gradients
from cogvx.training.outputs import build_report, global_batch, save_final, write_metrics
from cogvx.training.setup import Run, setup


class TrainingInterrupted(CogvxError):
    """Stopped by SIGINT/SIGTERM after saving a checkpoint."""

    exit_code = 130


@contextmanager
def stop_requests() -> Iterator[dict[str, int]]:
    """Turn SIGINT/SIGTERM into a flag the loop checks between steps (restored afterwards)."""
    flag: dict[str, int] = {}
    handlers = {}

    def request(signum, _frame):
        flag["signal"] = signum

    for sig in (signal.SIGINT, signal.SIGTERM):
        handlers[sig] = signal.signal(sig, request)
    try:
        yield flag
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def rows_of_process(batch: list[int], process: int, processes: int) -> tuple[int, list[int]]:
    """Process ``process``'s rows of a global batch: (index of its first row, sample indices).

    With several processes a short global batch (the last of a bucket) is filled up by repeating
    its samples, as torch's DistributedSampler does, so every process gets the same number of
    rows and none waits for a gradient another never computes.
    """
    if processes == 1:
        return 0, list(batch)
    per_process = math.ceil(len(batch) / processes)
    filled = (batch * processes)[:per_process * processes]
    first = process * per_process
    return first, filled[first:first + per_process]


def batches_from(dataset, sampler, start: int, process: int = 0,
                 processes: int = 1) -> Iterator[tuple[int, int, dict[str, Any]]]:
    """(position, first row, micro-batch) from position ``start`` on, epoch after epoch, each
    epoch's order fixed by its number; ``sampler`` yields global batches, this process gets its rows."""
    per_epoch = len(sampler)
    position = start
    while True:
        epoch, offset = divmod(position, per_epoch)
        sampler.set_epoch(epoch)
        for batch_indices in list(sampler)[offset:]:
            first_row, rows = rows_of_process(batch_indices, process, processes)
            batch = torch.utils.data.default_collate([dataset[index] for index in rows])
            position += 1
            yield position, first_row, batch


def micro_step(run: Run, position: int, first_row: int, batch: dict[str, Any], scaling: float) -> float:
    """Forward and backward of one micro-batch (rows ``first_row``... of global batch ``position``);
    returns its loss. accelerate scales the loss for gradient accumulation."""
    device = run.accelerator.device
    random = SampleRandom(run.config.train.seed, position, range(first_row, first_row + len(batch["bucket"])))
    latents, prompt_embeds, extra = model_inputs(batch, run.config, run.model, scaling, random,
                                                 device, run.dtype, run.dataset.empty_prompt_embeds)
    key = tuple(latents.shape)
    if key not in run.rotary:
        height, width = latents.shape[-2] * VAE_SPATIAL_SCALE, latents.shape[-1] * VAE_SPATIAL_SCALE
        run.rotary[key] = rotary_embeddings(run.model, height, width, latents.shape[1], device)
    with run.accelerator.autocast():
        loss = diffusion_loss(run.transformer, run.noise_scheduler, latents, prompt_embeds, random,
                              run.rotary[key], extra)
    run.accelerator.backward(loss)
    return loss.detach().item()


def optimizer_step(run: Run, batches: Iterator, scaling: float) -> tuple[float, float]:
    """One optimizer step over gradient_accumulation_steps micro-batches: (mean loss, grad norm)."""
    accumulation = run.config.train.gradient_accumulation_steps
    loss = 0.0
    for _ in range(accumulation):
        run.state.micro_batches, first_row, batch = next(batches)
        # Gradients are synchronised across processes on the cycle's last micro-batch only.
        with run.accelerator.accumulate(run.transformer):
            loss += micro_step(run, run.state.micro_batches, first_row, batch, scaling) / accumulation
    loss = mean_across_processes(run.accelerator, loss)
    norm = clip_streamed_gradients(run.optimizer, run.config.train.max_grad_norm)
    if norm is None:
        norm = run.accelerator.clip_grad_norm_(run.transformer.parameters(), run.config.train.max_grad_norm)
    grad_norm = float(norm) if norm is not None else float("nan")  # DeepSpeed clips inside its engine
    lr = run.lr_scheduler.get_last_lr()[0]
    run.optimizer.step()
    run.lr_scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.state.step += 1
    run.state.losses.append((run.state.step, round(loss, 6)))
    run.state.rates.append((run.state.step, lr, round(grad_norm, 6)))
    return loss, grad_norm


def validate(run: Run, meter: MemoryMeter) -> list[Path]:
    """Render the validation clips. The main process renders and writes them while the others
    wait; where the weights are sharded every process renders in step (each forward pass needs
    them all) and only the main process writes."""
    from cogvx.training.validation import render_validation

    meter.start("validation")
    writer = None if run.is_main else (lambda frames, path, fps: path)
    written = main_process_then_meet(run.accelerator, lambda: render_validation(
        run.config, run.folder, run.model, run.state.step, Path(run.config.train.output_dir), run.accelerator.device,
        run.dtype, writer=writer), everyone=run.params_sharded)
    meter.stop("validation")
    return written or []


def training_loop(run: Run, meter: MemoryMeter, on_step=None, log=print) -> None:
    """Steps until the end (or a stop request); checkpoints and validation on schedule."""
    from cogvx.training.progress import StepProgress

    train, every = run.config.train, run.config.validate_.every_n_steps
    scaling = run.dataset.manifest["model"]["vae_scaling_factor"]
    batches = batches_from(run.dataset, run.sampler, run.state.micro_batches,
                           run.accelerator.process_index, run.accelerator.num_processes)
    seconds = run.state.seconds
    with stop_requests() as stop, StepProgress(run.steps, run.state.step, log=log, enabled=run.is_main) as progress:
        while run.state.step < run.steps:
            started = time.perf_counter()
            loss, grad_norm = optimizer_step(run, batches, scaling)
            seconds.append(time.perf_counter() - started)
            step, lr = run.state.step, run.state.rates[-1][1]
            progress.update(step, loss, lr, grad_norm, seconds[-1])
            if on_step is not None and run.is_main:
                on_step(step, loss, lr, grad_norm, seconds[-1])
            stopping = stop_requested_anywhere(run.accelerator, bool(stop))
            if step % train.checkpointing_steps == 0 or step == run.steps or stopping:
                save_run_checkpoint(run)
            if stopping:
                raise TrainingInterrupted(f"interrupted at step {step}; checkpoint saved in "
                                          f"{run.checkpoints}; continue with --resume latest")
            if every and step % every == 0 and step < run.steps:
                meter.stop("train")
                validate(run, meter)
                meter.start("train")


def train(config: Config, resume: str | None = None, log=print, on_step=None,
          metrics_dir: Path | None = None) -> TrainingReport:
    """:func:`tracked_train` holding train.output_dir's run lock, after removing what dead runs
    left there. The main process takes it (once per launch) before tracking starts, so a second
    writer is refused before it creates an MLflow run."""
    from cogvx.distributed import is_main_process
    from cogvx.runlock import run_lock
    from cogvx.training.checkpoint import remove_dead_writes

    if not is_main_process():
        return tracked_train(config, resume, log, on_step, metrics_dir)
    out = Path(config.train.output_dir)
    with run_lock(out, "train.output_dir", log=log):
        if removed := remove_dead_writes(out):
            log(f"removed {len(removed)} unfinished writes of an earlier run (e.g. {removed[0]})")
        return tracked_train(config, resume, log, on_step, metrics_dir)


def tracked_train(config: Config, resume: str | None = None, log=print, on_step=None,
                  metrics_dir: Path | None = None) -> TrainingReport:
    """Run (or resume) a fine-tune, tracked in MLflow when tracking.enabled; returns the report.

    The tracking store is checked before any model loads (a dead server fails the run at once);
    once training is under way, a logging failure never loses the trained weights. With several
    processes only the main one tracks, logs and registers.
    """
    from cogvx.distributed import is_main_process
    from cogvx.tracking import NullTracker, register_lora, tracker_for

    main = is_main_process()
    tracker = (tracker_for(config) if main else NullTracker()).start(config)
    log = log if main else (lambda *args, **kwargs: None)

    def step_done(*figures) -> None:
        tracker.log_step(*figures)
        if on_step is not None:
            on_step(*figures)

    try:
        report = _train(config, resume, log, on_step=step_done, metrics_dir=metrics_dir)
    except TrainingInterrupted as err:
        tracker.fail(str(err), status="KILLED")
        raise
    except BaseException as err:
        tracker.fail(f"{type(err).__name__}: {err}")
        raise
    tracking = report.tracking = tracker.finish(report, Path(config.train.output_dir))
    if main and tracking.complete and tracking.run_id and config.train.method == "lora":
        tracking.registered = register_lora(Path(report.weights), config, tracking.run_id)
    if main and tracking.run_id:  # what a launcher's caller reads back (Prefect)
        atomic_write_text(Path(config.train.output_dir) / REPORT_NAME, report.to_json())
    return report


def check_validation_controls(config: Config) -> None:
    """A control model's validation controls, checked before the run starts (not at its first
    validation, steps later): each must exist and give the validation render's frames."""
    from cogvx.inference import check_control_video, render_settings, validation_controls

    for path in validation_controls(config):
        check_control_video(path, render_settings(config), config)


def control_record(config: Config) -> dict[str, Any]:
    """What a control model's file records of its control (kind, channels, which input weights
    trained, Canny thresholds): what generate and the registry read; nothing without control."""
    data = config.data
    if data.control == "none":
        return {}
    channels = config.spec.vae["latent_channels"]
    record = {"kind": data.control, "channels": channels, "in_channels": 2 * channels,
              "weights": config.train.control_weights}
    if data.control == "canny":
        record["canny"] = [data.canny_low, data.canny_high]
    return {"control": record}


def _train(config: Config, resume: str | None = None, log=print, on_step=None,
           metrics_dir: Path | None = None) -> TrainingReport:
    """The training run itself; writes output_dir/report.json and the metrics files
    (:func:`~cogvx.training.outputs.write_metrics`) into ``metrics_dir`` (default: output_dir)."""
    out = Path(config.train.output_dir)
    check_validation_controls(config)
    started = time.perf_counter()
    meter = MemoryMeter(torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    meter.start("load")
    run = setup(config)
    resume_from = resolve_resume(out / "checkpoints", resume, fingerprint(config, run.dataset.manifest))
    if resume is not None and resume_from is None:
        log("no checkpoint of this run to resume from; starting at step 0")
    if resume_from is not None:
        restore(run, resume_from)
        log(f"resumed from {resume_from} at step {run.state.step}")
    meter.stop("load")
    setup_s, resumed_from_step = round(time.perf_counter() - started, 2), run.state.step
    if run.is_main:
        write_resolved_config(config, out)
    meter.start("train")
    training_loop(run, meter, on_step, log)
    meter.stop("train")
    videos = validate(run, meter)
    info = {"base_model": config.model_source, "variant": config.spec.key, "steps": run.state.step,
            "processes": run.accelerator.num_processes, "config": config.to_dict(), **control_record(config)}
    weights = save_final(run, out, info)
    report = build_report(run, weights, videos, meter.report(), step_timing(run.state.seconds, global_batch(run)),
                          resumed_from_step, setup_s)

    def write() -> None:
        atomic_write_text(out / REPORT_NAME, report.to_json())
        write_metrics(report, run.state, Path(metrics_dir) if metrics_dir else out)

    main_process_then_meet(run.accelerator, write)
    return report
