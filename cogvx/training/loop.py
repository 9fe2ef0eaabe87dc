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

import json
import math
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from cogvx.config import Config, write_resolved_config
from cogvx.errors import CogvxError
from cogvx.io import atomic_write_text
from cogvx.training.checkpoint import checkpoint_dir, load_checkpoint, resolve_resume, save_checkpoint
from cogvx.training.sharded import SHARDED_TYPES, engine_dtype
from cogvx.training.memory import MemoryMeter, step_timing
from cogvx.training.inputs import model_inputs
from cogvx.training.optim import build_optimizer
from cogvx.training.objective import SampleRandom, diffusion_loss, rotary_embeddings


class TrainingInterrupted(CogvxError):
    """Stopped by SIGINT/SIGTERM after saving a checkpoint."""

    exit_code = 130


@dataclass
class TrainState:
    """Where the run is: optimizer steps done and micro-batches consumed."""

    step: int = 0
    micro_batches: int = 0
    losses: list[tuple[int, float]] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)  # per optimizer step, across resumes
    rates: list[tuple[int, float, float]] = field(default_factory=list)  # (step, lr used, grad norm)


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


def total_steps(config: Config, batches_per_epoch: int) -> int:
    """train.max_steps, or train.epochs worth of optimizer steps when epochs is set."""
    if config.train.epochs is None:
        return config.train.max_steps
    per_epoch = math.ceil(batches_per_epoch / config.train.gradient_accumulation_steps)
    return max(1, config.train.epochs * per_epoch)


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
        for global_batch in list(sampler)[offset:]:
            first_row, rows = rows_of_process(global_batch, process, processes)
            batch = torch.utils.data.default_collate([dataset[index] for index in rows])
            position += 1
            yield position, first_row, batch


def _device_and_dtype(config: Config, accelerator) -> tuple[torch.device, torch.dtype]:
    from cogvx.models.loader import resolve_dtype

    device = accelerator.device
    return device, resolve_dtype(config.model.dtype, config.spec, device)


@dataclass
class Run:
    """Everything a training run holds: accelerator, data, model, optimizer, schedulers, RNG."""

    config: Config
    accelerator: Any
    dataset: Any
    sampler: Any
    folder: Path
    transformer: Any
    optimizer: Any
    lr_scheduler: Any
    noise_scheduler: Any
    steps: int
    dtype: torch.dtype
    state: TrainState = field(default_factory=TrainState)
    rotary: dict[tuple, Any] = field(default_factory=dict)

    @property
    def model(self):
        """The transformer without accelerate's wrapper (what LoRA saving and pipelines use)."""
        return self.accelerator.unwrap_model(self.transformer)

    @property
    def checkpoints(self) -> Path:
        return Path(self.config.train.output_dir) / "checkpoints"

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def params_sharded(self) -> bool:
        """Whether each process holds only part of the weights (FSDP, DeepSpeed ZeRO-3): then
        every process must take part in each forward pass, validation's included."""
        from cogvx.training.sharded import params_sharded

        return params_sharded(self.accelerator)


def main_process_then_meet(run: Run, work, everyone: bool = False):
    """Run ``work()`` on the main process (on every process when ``everyone``), then let all
    processes meet; its error is raised after the meeting, so no process is left waiting for one
    that failed. Returns what ``work`` returned (None where it did not run)."""
    result, failure = None, None
    if run.is_main or everyone:
        try:
            result = work()
        except Exception as err:  # re-raised once the other processes are released
            failure = err
    run.accelerator.wait_for_everyone()
    if failure is not None:
        raise failure
    return result


def save_final(run: Run, out: Path, info: dict[str, Any]) -> Path:
    """LoRA file (method lora) or a diffusers transformer folder in safetensors shards (full),
    written by the main process (with the weights gathered from every process where sharded)."""
    from cogvx.io import atomic_directory
    from cogvx.models.lora import save_lora

    lora = run.config.train.method == "lora"
    target = out / ("lora" if lora else "full")
    # Collective under FSDP / DeepSpeed: every process must call it.
    state = run.accelerator.get_state_dict(run.transformer) if run.accelerator.distributed_type in SHARDED_TYPES else None

    def write() -> None:
        if lora:
            save_lora(run.model, target, info, state_dict=state)
            return
        with atomic_directory(target) as staging:
            save_transformer(run.model, staging, state)
            (staging / "cogvx-training.json").write_text(json.dumps(info, indent=1, default=str), encoding="utf-8")

    main_process_then_meet(run, write)
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


def configure_transformer(transformer, config: Config, dtype: torch.dtype, buckets) -> None:
    """Everything the config does to the transformer before training: checkpointing, learned
    positions, LoRA or full training, fp8 storage, regional compile (in this order: fp8 must
    see the LoRA base layers, compile must see the final modules)."""
    from cogvx.models.lora import add_lora
    from cogvx.models.performance import compile_blocks, enable_checkpointing, store_base_weights_in_fp8
    from cogvx.models.positions import check_learned_positions, ignore_learned_positions

    train, lora = config.train, config.train.lora
    if train.gradient_checkpointing:
        enable_checkpointing(transformer, offload=train.activation_offload)
    if train.ignore_learned_positional_embeddings:
        ignore_learned_positions(transformer)
    check_learned_positions(transformer, buckets)
    if train.method == "lora":
        add_lora(transformer, lora.rank, lora.alpha, lora.target_modules or list(config.spec.lora_target_modules),
                 lora.dropout, lora.init)
    else:
        transformer.requires_grad_(True)
    if train.fp8_base_weights:
        store_base_weights_in_fp8(transformer, dtype)
    if train.compile == "blocks":
        compile_blocks(transformer)


def setup(config: Config, transformer=None, dataset=None) -> Run:
    """Build a run: data, transformer with LoRA, optimizer and schedulers, under accelerate.

    ``transformer`` and ``dataset`` replace the ones loaded from model.path and
    prepare.output_dir (the benchmarks pass real-size random-weight models and latents).
    """
    from diffusers import CogVideoXDDIMScheduler
    from diffusers.optimization import get_scheduler

    from cogvx.data.latents import LatentDataset
    from cogvx.models.loader import load_transformer, resolve_source

    from cogvx.training.sharded import accelerator_for

    accelerator = accelerator_for(config)
    torch.manual_seed(config.train.seed)
    dataset = dataset if dataset is not None else LatentDataset(config.prepare.output_dir, config)
    device, dtype = _device_and_dtype(config, accelerator)
    dtype = engine_dtype(accelerator, dtype)
    spec = config.spec
    folder = resolve_source(config.model_source, config.model.revision, config.model.cache_dir, spec)
    if transformer is None:
        transformer = load_transformer(str(folder), spec, dtype=dtype)
    configure_transformer(transformer, config, dtype, dataset.buckets)
    optimizer = build_optimizer([p for p in transformer.parameters() if p.requires_grad], config, device)
    # Global batches: batch_size rows for each process (see the module docstring).
    sampler = dataset.batch_sampler(config.train.batch_size * accelerator.num_processes, seed=config.train.seed)
    steps = total_steps(config, len(sampler))
    lr_scheduler = get_scheduler(config.train.lr_scheduler, optimizer,
                                 num_warmup_steps=config.train.lr_warmup_steps, num_training_steps=steps)
    transformer, optimizer = accelerator.prepare(transformer, optimizer)
    return Run(config=config, accelerator=accelerator, dataset=dataset, sampler=sampler, folder=folder,
               transformer=transformer, optimizer=optimizer, lr_scheduler=lr_scheduler,
               noise_scheduler=CogVideoXDDIMScheduler.from_pretrained(folder, subfolder="scheduler"),
               steps=steps, dtype=dtype)


# Settings that change neither the weights a step produces nor the data order.
NEUTRAL_TRAIN_KEYS = ("output_dir", "checkpointing_steps", "checkpoints_total_limit", "accelerate_config",
                      "process_group_timeout_minutes")


def fingerprint(config: Config, manifest: dict[str, Any]) -> str:
    """A hash of everything that shapes the trained weights: model, training settings, data, and
    the number of processes (it sets the global batch; left out for one, as before it counted)."""
    from cogvx.distributed import world_size
    from cogvx.hashing import content_key

    train = config.train.model_dump(mode="json", exclude=set(NEUTRAL_TRAIN_KEYS))
    processes = {"processes": world_size()} if world_size() > 1 else {}
    return content_key(model=config.model.model_dump(mode="json"), train=train,
                       entries=manifest["entries"], model_record=manifest["model"], **processes)


def restore(run: Run, checkpoint: Path) -> None:
    """Continue ``run`` from a checkpoint: weights, optimizer, LR schedule, data position
    (every process reads it)."""
    from cogvx.models.lora import load_trainable_state
    from cogvx.training.sharded import load_sharded_checkpoint

    if run.accelerator.distributed_type in SHARDED_TYPES:
        saved = load_sharded_checkpoint(run.accelerator, checkpoint, run.lr_scheduler)
    else:
        tensors, saved = load_checkpoint(checkpoint, run.optimizer, run.lr_scheduler)
        load_trainable_state(run.model, tensors)
    progress = saved["progress"]
    run.state = TrainState(step=saved["step"], micro_batches=progress["micro_batches"],
                           losses=[tuple(x) for x in progress["losses"]], seconds=progress.get("seconds", []),
                           rates=[tuple(x) for x in progress.get("rates", [])])


def checkpoint(run: Run) -> Path:
    """Save a checkpoint: written by the main process (by every process, each its shard, under
    FSDP / DeepSpeed); every process returns once it is complete on disk."""
    from cogvx.models.lora import trainable_state
    from cogvx.training.sharded import save_sharded_checkpoint

    progress = {"micro_batches": run.state.micro_batches, "losses": run.state.losses, "seconds": run.state.seconds,
                "rates": run.state.rates,
                "fingerprint": fingerprint(run.config, run.dataset.manifest)}
    limit = run.config.train.checkpoints_total_limit
    if run.accelerator.distributed_type in SHARDED_TYPES:
        return save_sharded_checkpoint(run.accelerator, run.checkpoints, run.state.step, run.lr_scheduler,
                                       progress, limit)
    main_process_then_meet(run, lambda: save_checkpoint(run.checkpoints, run.state.step, trainable_state(run.model),
                                                       run.optimizer, run.lr_scheduler, progress, limit=limit))
    return checkpoint_dir(run.checkpoints, run.state.step)


def micro_step(run: Run, position: int, first_row: int, batch: dict[str, Any], scaling: float) -> float:
    """Forward and backward of one micro-batch (rows ``first_row``... of global batch ``position``);
    returns its loss. accelerate scales the loss for gradient accumulation."""
    device = run.accelerator.device
    random = SampleRandom(run.config.train.seed, position, range(first_row, first_row + len(batch["bucket"])))
    latents, prompt_embeds, extra = model_inputs(batch, run.config, run.model, scaling, random,
                                                 device, run.dtype, run.dataset.empty_prompt_embeds)
    key = tuple(latents.shape)
    if key not in run.rotary:
        height, width = latents.shape[-2] * 8, latents.shape[-1] * 8
        run.rotary[key] = rotary_embeddings(run.model, height, width, latents.shape[1], device)
    with run.accelerator.autocast():
        loss = diffusion_loss(run.transformer, run.noise_scheduler, latents, prompt_embeds, random,
                              run.rotary[key], extra)
    run.accelerator.backward(loss)
    return loss.detach().item()


def optimizer_step(run: Run, batches: Iterator, scaling: float) -> tuple[float, float]:
    """One optimizer step over gradient_accumulation_steps micro-batches: (mean loss, grad norm)."""
    from cogvx.models.performance import attention_backend

    accumulation = run.config.train.gradient_accumulation_steps
    loss = 0.0
    with attention_backend(run.config.train.attention_backend, run.accelerator.device):
        for _ in range(accumulation):
            run.state.micro_batches, first_row, batch = next(batches)
            # Gradients are synchronised across processes on the cycle's last micro-batch only.
            with run.accelerator.accumulate(run.transformer):
                loss += micro_step(run, run.state.micro_batches, first_row, batch, scaling) / accumulation
    loss = mean_across_processes(run.accelerator, loss)
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


def mean_across_processes(accelerator, value: float) -> float:
    """The mean of ``value`` over all processes (the loss of the global batch)."""
    if accelerator.num_processes == 1:
        return value
    return float(accelerator.reduce(torch.tensor([value], device=accelerator.device), reduction="mean").item())


def validate(run: Run, meter: MemoryMeter) -> list[Path]:
    """Render the validation clips. The main process renders and writes them while the others
    wait; where the weights are sharded every process renders in step (each forward pass needs
    them all) and only the main process writes."""
    from cogvx.training.validation import render_validation

    meter.start("validation")
    writer = None if run.is_main else (lambda frames, path, fps: path)
    written = main_process_then_meet(run, lambda: render_validation(
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
                checkpoint(run)
            if stopping:
                raise TrainingInterrupted(f"interrupted at step {step}; checkpoint saved in "
                                          f"{run.checkpoints}; continue with --resume latest")
            if every and step % every == 0 and step < run.steps:
                meter.stop("train")
                validate(run, meter)
                meter.start("train")


def stop_requested_anywhere(accelerator, here: bool) -> bool:
    """Whether any process got SIGINT/SIGTERM, so that all of them checkpoint and stop together."""
    if accelerator.num_processes == 1:
        return here
    flag = torch.tensor([1.0 if here else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


def train(config: Config, resume: str | None = None, log=print, on_step=None,
          metrics_dir: Path | None = None) -> dict[str, Any]:
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
                  metrics_dir: Path | None = None) -> dict[str, Any]:
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
    report["tracking"] = tracker.finish(report, Path(config.train.output_dir))
    if main and report["tracking"]["complete"] and report["tracking"]["run_id"] and config.train.method == "lora":
        report["tracking"]["registered"] = register_lora(Path(report["weights"]), config,
                                                         report["tracking"]["run_id"])
    if main and report["tracking"].get("run_id"):  # what a launcher's caller reads back (Prefect)
        atomic_write_text(Path(config.train.output_dir) / "report.json", json.dumps(report, indent=1) + "\n")
    return report


def _train(config: Config, resume: str | None = None, log=print, on_step=None,
           metrics_dir: Path | None = None) -> dict[str, Any]:
    """The training run itself; writes output_dir/report.json and the metrics files
    (:func:`write_metrics`) into ``metrics_dir`` (default: output_dir)."""
    out = Path(config.train.output_dir)
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
    setup_s = round(time.perf_counter() - started, 2)
    resumed_from_step = run.state.step
    if run.is_main:
        write_resolved_config(config, out)
    meter.start("train")
    training_loop(run, meter, on_step, log)
    meter.stop("train")
    samples = validate(run, meter)
    info = {"base_model": config.model_source, "variant": config.spec.key, "steps": run.state.step,
            "processes": run.accelerator.num_processes, "config": config.to_dict()}
    weights = save_final(run, out, info)
    digests = replica_digests(run)
    global_batch = config.train.batch_size * config.train.gradient_accumulation_steps * run.accelerator.num_processes
    report = {"steps": run.state.step, "resumed_from_step": resumed_from_step, "setup_s": setup_s, "final_loss": run.state.losses[-1][1] if run.state.losses else None,
              "weights": str(weights), "method": config.train.method, "validation_videos": [str(p) for p in samples],
              "processes": run.accelerator.num_processes, "engine": run.accelerator.distributed_type.value,
              "global_batch": global_batch, "replica_digests": digests,
              "memory": meter.report(), "timing": step_timing(run.state.seconds, global_batch),
              "losses": run.state.losses}

    def write() -> None:
        atomic_write_text(out / "report.json", json.dumps(report, indent=1) + "\n")
        write_metrics(report, run.state, Path(metrics_dir) if metrics_dir else out)

    main_process_then_meet(run, write)
    return report


def replica_digests(run: Run) -> list[str] | None:
    """Under DDP every process must end with the same weights: one digest per process (None on
    one process and where weights are sharded); processes that diverged fail the run."""
    import hashlib

    from accelerate.utils import gather_object

    from cogvx.models.lora import trainable_state

    if run.accelerator.num_processes == 1 or run.accelerator.distributed_type in SHARDED_TYPES:
        return None
    digest = hashlib.sha256()
    for name, tensor in sorted(trainable_state(run.model).items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    digests = gather_object([digest.hexdigest()])
    if len(set(digests)) > 1:
        raise CogvxError(f"the {len(digests)} processes ended with different weights ({', '.join(d[:12] for d in digests)}); "
                         "the saved weights are the main process's. Report this with the accelerate config used")
    return digests


def write_metrics(report: dict[str, Any], state: TrainState, out: Path) -> None:
    """The run's figures for DVC and dashboards, in four files under ``out``.

    metrics.json (final loss, steps) and curves.csv (loss, lr and grad norm per step) depend only
    on the data and the config: an identical re-run writes the same bytes. What depends on the
    machine and the moment goes to resources.json (s/step, samples/s, peak memory per phase) and
    step_time.csv (seconds per step).
    """
    phases = report["memory"]["phases"]
    metrics = {"final_loss": report["final_loss"], "steps": report["steps"]}
    resources = {**report["timing"], "setup_s": report["setup_s"],
                 **{f"{phase}_peak_allocated_gib": values["peak_allocated_gib"] for phase, values in phases.items()},
                 **{f"{phase}_peak_reserved_gib": values["peak_reserved_gib"] for phase, values in phases.items()}}
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
