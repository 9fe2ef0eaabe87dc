"""One benchmark case, run in its own process: the project's own training, validation,
generation or prepare code on real-size (or tiny) models, timed and its memory measured."""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from cogvx.benchmark.assets import BENCH_CAPTION, write_assets, write_random_latents
from cogvx.benchmark.cases import Case
from cogvx.config import Config, load_config
from cogvx.errors import CogvxError
from cogvx.training.memory import GIB, MemoryMeter


def case_config(case: Case, workdir: Path, extra: tuple[str, ...] = ()) -> Config:
    """The config a case runs under: its model and size, bench folders, no tracking, no
    intermediate checkpoints; then the case's own overrides."""
    frames, height, width = case.size
    size_key = f"{case.variant}-{case.size_text}"
    base = [f"model.variant={case.variant}", f"model.path={workdir / 'models' / case.variant}",
            f"data.frames={frames}", f"data.height={height}", f"data.width={width}",
            f"prepare.output_dir={workdir / 'latents' / size_key}",
            f"train.output_dir={workdir / 'runs' / case.name}", "tracking.enabled=false",
            f"train.max_steps={case.warmup + case.steps + 1}", "train.checkpointing_steps=1000000",
            "train.lr_warmup_steps=0", "train.learning_rate=1e-4", "validate.every_n_steps=0",
            f"validate.prompts=[{BENCH_CAPTION!r}]"]
    return load_config(None, [*base, *case.overrides, *extra])


def device_facts(device: torch.device) -> dict[str, Any]:
    import diffusers

    facts = {"device": str(device), "torch": torch.__version__, "diffusers": diffusers.__version__}
    if device.type == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(device)
    return facts


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(run, batches, count: int) -> tuple[list[float], list[float]]:
    """Run ``count`` optimizer steps of the training loop; seconds and loss of each."""
    from cogvx.training.loop import optimizer_step

    device = run.accelerator.device
    scaling = run.dataset.manifest["model"]["vae_scaling_factor"]
    seconds, losses = [], []
    for _ in range(count):
        _sync(device)
        started = time.perf_counter()
        loss, _grad_norm = optimizer_step(run, batches, scaling)
        _sync(device)
        seconds.append(time.perf_counter() - started)
        losses.append(loss)
    return seconds, losses


def _validation_control(case: Case, workdir: Path, clips: Path | None) -> tuple[str, ...]:
    """A control model's validation render needs a control video: the first of ``clips`` (the
    GPU machine has no encoder to make one), else a synthetic clip of the case's size made here."""
    if case.kind != "validate" or case_config(case, workdir).data.control == "none":
        return ()
    from cogvx.benchmark.assets import make_bench_clips

    if clips is None:
        clips = workdir / "control-clips"
        if not (clips / "videos.txt").is_file():
            make_bench_clips(clips, 1, *case.size)
    first = (clips / "videos.txt").read_text(encoding="utf-8").split()[0]
    return (f"validate.control_videos=[{str(clips / first)!r}]",)


def _training_run(case: Case, config: Config, workdir: Path, device: torch.device):
    """Assets, random latents and a real-size random transformer, set up by the training code
    (under accelerate launch the main process writes the shared files, the others wait)."""
    from cogvx.distributed import Processes
    from cogvx.models.build import build_transformer
    from cogvx.models.loader import resolve_dtype
    from cogvx.training.setup import setup

    spec = config.spec
    processes = Processes()
    if processes.is_main:
        write_assets(spec, workdir / "models" / case.variant, device, weights=case.kind != "train")
        write_random_latents(config, Path(config.prepare.output_dir))
    processes.wait()
    transformer = build_transformer(spec, resolve_dtype(config.model.dtype, spec, device), device)
    run = setup(config, transformer=transformer)
    _release_cache(device)  # the fp32 build and the fp8 conversion leave cached blocks behind
    return run


def _release_cache(device: torch.device) -> None:
    _sync(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _step_figures(seconds: list[float], warmup: int, batch: int) -> dict[str, Any]:
    timed = seconds[warmup:] or seconds
    median = statistics.median(timed)
    return {"s_per_step_median": round(median, 3), "s_min": round(min(timed), 3),
            "samples_per_s": round(batch / median, 3), "warmup_s": [round(s, 2) for s in seconds[:warmup]],
            "step_s": [round(s, 3) for s in timed]}


def run_train(case: Case, workdir: Path, device: torch.device, clips: Path | None = None) -> dict[str, Any]:
    from cogvx.training.loop import batches_from

    config = case_config(case, workdir, _validation_control(case, workdir, clips))
    run = _training_run(case, config, workdir, device)
    batches = batches_from(run.dataset, run.sampler, 0, run.accelerator.process_index, run.accelerator.num_processes)
    meter = MemoryMeter(device)
    weights = torch.cuda.memory_allocated(device) / GIB if device.type == "cuda" else 0.0
    meter.start("train")
    seconds, losses = timed_steps(run, batches, case.warmup + case.steps)
    if case.profile and device.type == "cuda":
        from cogvx.benchmark.profiling import profile_kernels

        profile = profile_kernels(lambda: timed_steps(run, batches, 1))
    meter.stop("train")
    if not all(math.isfinite(loss) for loss in losses):
        raise CogvxError(f"{case.name}: non-finite loss {losses}")
    model = run.model
    result = {"weights_gib": round(weights, 3), "loss": losses[-1], "phases": meter.phases,
              # what really trained: a control model's widened input shows as in_channels (16 -> 32)
              "in_channels": int(getattr(model, "_orig_mod", model).config.in_channels),
              "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
              **_step_figures(seconds, case.warmup, config.train.batch_size * run.accelerator.num_processes)}
    if case.profile and device.type == "cuda":
        result["profile"] = profile
    if case.kind == "validate":
        result |= _validate_then_step(run, batches, meter, workdir)
    phases = meter.phases.values()
    peaks = _per_process([max(p["peak_allocated_gib"] for p in phases), max(p["peak_reserved_gib"] for p in phases)])
    result["peak_allocated_gib"] = max(allocated for allocated, _ in peaks)
    result["peak_reserved_gib"] = max(reserved for _, reserved in peaks)
    if len(peaks) > 1:
        result["distributed_type"] = run.accelerator.distributed_type.value
        result["peak_allocated_gib_per_process"] = [allocated for allocated, _ in peaks]
    return result


def _per_process(value):
    """``value`` of every process of a launched case (just this one's otherwise)."""
    from cogvx.distributed import Processes

    return Processes().gather(value)


def _no_write(frames, path, fps):
    """Validation clips are rendered but not encoded (the GPU machine has no ffmpeg)."""
    return Path(path)


def _validate_then_step(run, batches, meter: MemoryMeter, workdir: Path) -> dict[str, Any]:
    """One in-training validation render, then one more training step (memory after it)."""
    from cogvx.training.validation import render_validation

    device = run.accelerator.device
    meter.start("validation")
    started = time.perf_counter()
    render_validation(run.config, run.folder, run.model, run.state.step, workdir / "validation", device,
                      run.dtype, writer=_no_write)
    _sync(device)
    render_s = time.perf_counter() - started
    meter.stop("validation")
    meter.start("train_after_validation")
    seconds, _ = timed_steps(run, batches, 1)
    meter.stop("train_after_validation")
    return {"validation_s": round(render_s, 2), "step_after_validation_s": round(seconds[0], 3)}


def run_generate(case: Case, workdir: Path, device: torch.device) -> dict[str, Any]:
    """`cogvx generate`'s pipeline and render around a random real-size transformer: a short
    warm-up render (compiles), then the timed full render."""
    from cogvx.generate import GenerateRequest, generation_pipeline, render_request
    from cogvx.models.build import build_transformer
    from cogvx.models.loader import resolve_dtype

    config = case_config(case, workdir)
    spec = config.spec
    write_assets(spec, workdir / "models" / case.variant, device, weights=True)
    transformer = build_transformer(spec, resolve_dtype(config.model.dtype, spec, device), device).eval()
    request = GenerateRequest(prompt=BENCH_CAPTION, out=workdir / "generated.mp4")
    pipe, device = generation_pipeline(config, request, log=lambda *_: None, transformer_module=transformer)
    _release_cache(device)
    started = time.perf_counter()
    render_request(pipe, config, GenerateRequest(prompt=BENCH_CAPTION, out=request.out, steps=2), device)
    warmup_s = time.perf_counter() - started
    from contextlib import nullcontext

    from cogvx.benchmark.profiling import RenderPhases

    meter = MemoryMeter(device)
    meter.start("generate")
    # With profile, each component call is bracketed by a synchronization (one per step: noise).
    with RenderPhases(pipe, device) if case.profile else nullcontext() as phases:
        started = time.perf_counter()
        video = render_request(pipe, config, request, device)
        seconds = time.perf_counter() - started
    meter.stop("generate")
    phase = meter.phases["generate"]
    result = {"seconds": round(seconds, 2), "warmup_render_s": round(warmup_s, 2), "frames": int(video.shape[0]),
              "steps": config.validate_.num_inference_steps, "peak_allocated_gib": phase["peak_allocated_gib"],
              "peak_reserved_gib": phase["peak_reserved_gib"], "phases": meter.phases}
    if phases is not None:
        result["render_phases"] = phases.summary(seconds)
        result["profile"] = _render_kernels(pipe, config, request, device)
    if config.validate_.cache != "none":
        result.update(_uncached_comparison(pipe, config, request, device, video, seconds))
    return result


def _uncached_comparison(pipe, config: Config, request, device: torch.device, cached, cached_seconds: float):
    """validate.cache's price and gain: the same render (prompt, seed) with the cache off, in the
    same process after its own warm-up (the compiled blocks recompile without the cache's
    hooks): its seconds, the speedup, and the relative difference of the cached frames."""
    from dataclasses import replace

    from cogvx.generate import render_request
    from cogvx.inference import prepare_for_device, relative_difference, remove_render_cache

    validate = config.validate_
    if device.type == "cuda" and validate.offload in ("model", "sequential"):
        pipe.remove_all_hooks()  # the cache comes off between the offload hooks (apply_render_cache)
    remove_render_cache(pipe.transformer)
    prepare_for_device(pipe, device, validate.offload, validate.vae_tiling, validate.compile, validate.compile_vae)
    render_request(pipe, config, replace(request, steps=2), device)
    started = time.perf_counter()
    video = render_request(pipe, config, request, device)
    seconds = time.perf_counter() - started
    return {"uncached_seconds": round(seconds, 2), "cache_speedup": round(seconds / cached_seconds, 3),
            "cache_relative_difference": round(relative_difference(cached.astype("float64"), video.astype("float64")), 4)}


def _render_kernels(pipe, config: Config, request, device: torch.device) -> dict[str, Any]:
    """The kernels of a 2-step render (compiled already): which attention kernels the pipeline's
    transformer really runs, under its offload hooks."""
    from dataclasses import replace

    from cogvx.benchmark.profiling import profile_kernels
    from cogvx.generate import render_request

    if device.type != "cuda":
        return {}
    return profile_kernels(lambda: render_request(pipe, config, replace(request, steps=2), device))


def run_prepare_case(case: Case, workdir: Path, device: torch.device, clips: Path | None) -> dict[str, Any]:
    """`cogvx prepare` over ``clips`` (made here when not given) into a fresh latents folder."""
    import shutil

    from cogvx.benchmark.assets import make_bench_clips
    from cogvx.prepare import run_prepare

    from cogvx.distributed import Processes

    frames, height, width = case.size
    processes = Processes()
    clips = clips or workdir / "clips"
    out = workdir / "prepared" / case.name
    config = case_config(case, workdir, (f"data.data_root={clips}", f"prepare.output_dir={out}",
                                         "prepare.num_workers=4"))
    if processes.is_main:
        if not (clips / "videos.txt").is_file():
            make_bench_clips(clips, case.steps, frames, height, width)
        shutil.rmtree(out, ignore_errors=True)
        write_assets(config.spec, workdir / "models" / case.variant, device, weights=True)
    processes.wait()
    summary = run_prepare(config, log=lambda *_: None).as_dict()
    # The steady rate (after each shape's warm-up batch) is what a data set of many clips runs at.
    return {**summary, "clips_per_s": summary["steady_clips_per_second"] or summary["encode_clips_per_second"],
            "peak_allocated_gib": summary["peak_memory_gib"]}


def case_device() -> torch.device:
    """This process's GPU (cuda:LOCAL_RANK under accelerate launch), else the CPU."""
    import os

    from cogvx.inference import pick_device

    if torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        return device
    return pick_device()


MEMORY_CAP_ENV = "COGVX_BENCH_MEMORY_CAP_GIB"


def apply_memory_cap(device: torch.device) -> float | None:
    """A simulated smaller card: cap this process's CUDA caching allocator at the GiB that
    ``COGVX_BENCH_MEMORY_CAP_GIB`` names (set by `bench run --memory-cap-gib`), before any
    allocation; the CUDA context a real card also holds stays outside the cap."""
    import os

    cap = os.environ.get(MEMORY_CAP_ENV)
    if not cap or device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, float(cap) * GIB / total), index)
    return float(cap)


def run_case(case: Case, workdir: Path, clips: Path | None = None) -> dict[str, Any]:
    """Measure one case in this process; the result dict the suite collects."""
    device = case_device()
    cap = apply_memory_cap(device)
    workdir = Path(workdir)
    started = time.perf_counter()
    if case.kind in ("train", "validate"):
        result = run_train(case, workdir, device, clips)
    elif case.kind == "generate":
        result = run_generate(case, workdir, device)
    elif case.kind == "quality":
        from cogvx.benchmark.quality import run_quality

        result = run_quality(case, workdir, device)
    else:
        result = run_prepare_case(case, workdir, device, clips)
    if cap is not None:
        result["memory_cap_gib"] = cap
        if "peak_reserved_gib" in result:
            result["fits_memory_cap"] = result["peak_reserved_gib"] <= cap
    return {"case": case.name, "kind": case.kind, "variant": case.variant, "size": case.size_text,
            "overrides": list(case.overrides), "note": case.note, **device_facts(device), **result,
            "wall_s": round(time.perf_counter() - started, 1)}
