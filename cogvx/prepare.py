"""`cogvx prepare`: encode every clip with the VAE and every caption with T5, once.

The data set is validated first (nothing is loaded for a broken data set). Each clip goes to its
resolution bucket; its latents file is named by a hash of everything that determines it (clip
bytes, image, bucket, sampling, crop and flip settings, VAE identity), each caption's by a hash of
the caption and the text encoder. So a re-run encodes only what is new or changed, a run killed
halfway resumes where it stopped (every file is written atomically), and a manifest written last
lists exactly the files that belong to this data set and config.
"""

from __future__ import annotations

import json
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cogvx.config import Config, write_resolved_config
from cogvx.data.buckets import Bucket, BucketBatchSampler, assign_bucket
from cogvx.data.latents import (TEXT_TENSORS, VIDEO_LATENT, LatentsError, build_manifest, is_complete,
                                manifest_entry, posterior_tensors, prune_unreferenced, remove_partial_files,
                                save_tensors, text_file, video_file, write_manifest)
from cogvx.hashing import content_key, file_sha256
from cogvx.io import atomic_write_text
from cogvx.models.conditioning import conditioning_for
from cogvx.models.constants import MAX_TEXT_TOKENS

TEXT_BATCH = 8


@dataclass(frozen=True)
class Plan:
    """One sample as it will be encoded: its bucket and the content keys of its two files."""

    origin: str
    video: Path
    video_rel: str
    image: Path | None
    caption: str
    bucket: Bucket
    video_key: str
    text_key: str
    crop_seed: int
    control: Path | None = None  # data.control = file: the sample's control video

    def manifest_entry(self) -> dict[str, Any]:
        """This sample's entry in the manifest."""
        return manifest_entry(origin=self.origin, video=self.video_rel, caption=self.caption, image=self.image,
                              bucket=self.bucket, video_key=self.video_key, text_key=self.text_key,
                              control=self.control)


@dataclass
class PrepareSummary:
    samples: int
    videos_encoded: int
    texts_encoded: int
    skipped: int
    dropped: int
    seconds: float
    clips_per_second: float
    peak_memory_gib: float
    memory_kind: str
    encode_seconds: float = 0.0  # decode + VAE + T5 + write, without validation and model load
    encode_clips_per_second: float = 0.0
    # The rate after each clip shape's first VAE batch (cuDNN autotuning, prepare.compile's compiling):
    # what a large data set runs at; 0.0 when every clip was in a first batch.
    steady_clips_per_second: float = 0.0
    phase_seconds: dict[str, float] = field(default_factory=dict)  # decode_wait, vae, write, t5 (slowest process)
    processes: int = 1
    frame_sampling: str = "start"  # data.frame_sampling: start, random or evenly
    sample_fps: int | None = None  # the rate frames were taken at; None: each clip's own (native, evenly)
    clips_resampled: int = 0  # clips faster than sample_fps, resampled to it
    clips_slower: int = 0  # clips slower than sample_fps: all their frames kept, they play faster
    clips_cut: int = 0  # clips longer than their bucket's window: the rest of the clip is unused

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def model_identity(folder: Path, component: str) -> dict[str, Any]:
    """What identifies a component's weights without hashing gigabytes: config and file stats."""
    sub = folder / component
    files = sorted(p for p in sub.glob("*") if p.is_file())
    return {"config": sub.joinpath("config.json").read_text(encoding="utf-8") if (sub / "config.json").is_file() else None,
            "files": [(p.name, p.stat().st_size) for p in files]}


def text_encoder_id(folder: Path) -> str:
    return content_key(**model_identity(folder, "text_encoder"), tokenizer=model_identity(folder, "tokenizer"))


def text_key(caption: str, encoder_id: str, config: Config) -> str:
    return content_key(caption=caption, encoder=encoder_id, tokens=MAX_TEXT_TOKENS, dtype=config.model.dtype)


def plan_samples(samples, infos, config: Config, folder: Path) -> list[Plan]:
    """Assign each valid sample its bucket and content keys."""
    from cogvx.data.video import usable_frame_count

    data, fps = config.data, config.sample_fps
    vae_id = content_key(**model_identity(folder, "vae"))
    encoder_id = text_encoder_id(folder)
    conditioning = conditioning_for(config.spec, data)
    plans = []
    for sample in samples:
        info = infos[sample.video]
        usable = usable_frame_count(info, fps, data.skip_frames_start, data.skip_frames_end)
        bucket = assign_bucket(usable, info.height, info.width, config.buckets)
        # Seeds the crop, the flip and the random frame window: the same clip, the same draws.
        crop_seed = int(content_key(seed=data.seed, video=sample.video_rel)[:8], 16)
        video_key = content_key(
            clip=file_sha256(sample.video), bucket=str(bucket), fps=fps, sampling=data.frame_sampling,
            skip=(data.skip_frames_start, data.skip_frames_end), mode=data.resize_mode,
            flip=data.random_flip, crop_seed=crop_seed, vae=vae_id, dtype=config.model.dtype,
            **conditioning.key_fields(sample, data))
        caption = f"{data.id_token} {sample.caption}" if data.id_token else sample.caption
        plans.append(Plan(origin=sample.origin, video=sample.video, video_rel=sample.video_rel,
                          image=sample.image, caption=caption, bucket=bucket, video_key=video_key,
                          text_key=text_key(caption, encoder_id, config), crop_seed=crop_seed,
                          control=getattr(sample, "control", None)))
    return plans


@dataclass(frozen=True)
class SamplingReport:
    """How the clips' frames were chosen: the mode, the rate, and the clips it changed (each
    named with a detail, e.g. "videos/a.mp4 (30 fps)"), for the summary and the notice."""

    mode: str
    fps: int | None
    resampled: tuple[str, ...] = ()  # faster than fps: resampled to it
    slower: tuple[str, ...] = ()  # slower than fps: every frame kept, so they play faster
    cut: tuple[str, ...] = ()  # longer than their bucket's window
    rates: tuple[float, ...] = ()  # the distinct rates of the clips

    def counts(self) -> dict[str, Any]:
        """The PrepareSummary fields."""
        return {"frame_sampling": self.mode, "sample_fps": self.fps, "clips_resampled": len(self.resampled),
                "clips_slower": len(self.slower), "clips_cut": len(self.cut)}


def sampling_report(plans: list[Plan], infos, config: Config) -> SamplingReport:
    """Which planned clips sampling resamples from another rate, and which it cuts."""
    from cogvx.data.video import RATE_TOLERANCE, frame_step, usable_frame_count

    data, fps = config.data, config.sample_fps
    resampled, slower, cut = [], [], []
    for plan in plans:
        info = infos[plan.video]
        if frame_step(info.fps, fps) > 1.0:
            resampled.append(f"{plan.video_rel} ({info.fps:g} fps)")
        elif fps and 0 < info.fps < fps * (1 - RATE_TOLERANCE):
            slower.append(f"{plan.video_rel} ({info.fps:g} fps)")
        usable = usable_frame_count(info, fps, data.skip_frames_start, data.skip_frames_end)
        if data.frame_sampling != "evenly" and usable > plan.bucket.frames:
            cut.append(f"{plan.video_rel} ({plan.bucket.frames} of {usable} frames)")
    rates = tuple(sorted({round(infos[plan.video].fps, 3) for plan in plans}))
    return SamplingReport(data.frame_sampling, fps, tuple(resampled), tuple(slower), tuple(cut), rates)


def sampling_notice(report: SamplingReport, clips: int) -> str | None:
    """One line saying what sampling did to the clips' rates and lengths; None when nothing."""
    rate = f"{report.fps} fps" if report.fps else ("whole clips" if report.mode == "evenly" else "native rates")
    parts = []
    if report.resampled:
        parts.append(f"{_count(report.resampled, clips)} resampled to {report.fps} fps ({_examples(report.resampled)})")
    if report.slower:
        parts.append(f"{_count(report.slower, clips)} slower than {report.fps} fps keep every frame and "
                     f"play faster ({_examples(report.slower)})")
    if report.fps is None and report.mode != "evenly" and len(report.rates) > 1:
        parts.append(f"clips keep their own rates ({', '.join(f'{r:g}' for r in report.rates)} fps), so "
                     "their motion speeds differ")
    if report.cut:
        where = "from the start" if report.mode == "start" else "at a seeded random offset"
        parts.append(f"{_count(report.cut, clips)} longer than their window were cut, frames taken {where} "
                     f"({_examples(report.cut)}; data.frame_sampling=evenly spreads frames over whole clips)")
    if not parts:
        return None
    return f"notice: frame sampling {report.mode!r} at {rate}: " + "; ".join(parts)


def _count(names: tuple[str, ...], clips: int) -> str:
    return f"{len(names)} of {clips} clips"


def _examples(names: tuple[str, ...], limit: int = 2) -> str:
    """'e.g. a, b' for the first ``limit`` names, with how many more."""
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return "e.g. " + ", ".join(names[:limit]) + more


class ClipDataset(torch.utils.data.Dataset):
    """Decodes, samples, crops and flips the clips to encode (run in DataLoader workers)."""

    def __init__(self, plans: list[Plan], infos, config: Config) -> None:
        self.plans, self.infos, self.data = plans, infos, config.data
        self.fps = config.sample_fps
        self.conditioning = conditioning_for(config.spec, config.data)

    def __len__(self) -> int:
        return len(self.plans)

    def __getitem__(self, index: int) -> dict[str, Any]:
        plan = self.plans[index]
        video = self._read_like(plan, plan.video)  # [F, C, H, W]
        extras = self.conditioning.make_pixels(video, plan, self.data, lambda path: self._read_like(plan, path))
        return {"key": plan.video_key, "video": video, **extras}  # extras: e.g. image [1, C, H, W]

    def _read_like(self, plan: Plan, path: Path) -> torch.Tensor:
        """A video of ``plan`` (its clip, or its control video) as the clip is read: the same frame
        window, crop and flip (a fresh generator with the plan's seed draws the same numbers)."""
        from cogvx.data.video import load_clip

        data = self.data
        generator = torch.Generator().manual_seed(plan.crop_seed)
        return load_clip(path, self.infos[path], plan.bucket.frames, plan.bucket.height,
                         plan.bucket.width, target_fps=self.fps, skip_start=data.skip_frames_start,
                         skip_end=data.skip_frames_end, mode=data.resize_mode,
                         flip_probability=data.random_flip, generator=generator,
                         frame_sampling=data.frame_sampling, sample_seed=plan.crop_seed)  # [F, C, H, W]


def encode_videos(pipe, plans: list[Plan], infos, config: Config, out: Path, device, dtype, progress,
                  seconds: dict[str, float] | None = None) -> tuple[int, int]:
    """Encode the clips of ``plans`` into videos/<key>.safetensors; returns how many, and how many
    of them were in the first VAE batch of their shape (the warm-up: autotuning, compiling).

    ``seconds`` collects where the time went: waiting for decoded clips, the VAE, writing; and,
    within the VAE's time, "warmup": that of the first batch of each shape.
    """
    if not plans:
        return 0, 0
    seconds = seconds if seconds is not None else {}
    dataset = ClipDataset(plans, infos, config)
    extra_latents = dataset.conditioning.extra_latents
    sampler = BucketBatchSampler([p.bucket for p in plans], config.prepare.batch_size, shuffle=False)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler,
                                         num_workers=config.prepare.num_workers,
                                         persistent_workers=False, pin_memory=device.type == "cuda")
    encoded = warmup_clips = 0
    shapes: set[tuple[int, ...]] = set()
    clock = time.perf_counter()
    for batch in loader:
        clock = vae_started = _lap(seconds, "decode_wait", clock)
        with torch.no_grad():
            posteriors = {VIDEO_LATENT: _encode(pipe.vae, batch["video"], device, dtype)}
            for pixels, latent in extra_latents:
                posteriors[latent] = _encode(pipe.vae, batch[pixels], device, dtype)
        clock = _lap(seconds, "vae", clock)
        shape = tuple(batch["video"].shape)  # [B, F, C, H, W]
        if shape not in shapes:  # cuDNN autotuning and, with prepare.compile, compiling happen here
            shapes.add(shape)
            warmup_clips += len(batch["key"])
            seconds["warmup"] = round(seconds.get("warmup", 0.0) + clock - vae_started, 3)
        for row, key in enumerate(batch["key"]):
            save_tensors(video_file(out, key), {name: value[row] for latent, pair in posteriors.items()
                                                for name, value in zip(posterior_tensors(latent), pair)})
        encoded += len(batch["key"])
        progress.update(len(batch["key"]))
        clock = _lap(seconds, "write", clock)
    return encoded, warmup_clips


def _lap(seconds: dict[str, float], name: str, since: float) -> float:
    now = time.perf_counter()
    seconds[name] = round(seconds.get(name, 0.0) + now - since, 3)
    return now


def _encode(vae, pixels: torch.Tensor, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE posterior of pixels [B, F, C, H, W] in [-1, 1]; mean and logvar as [B, F', C', h, w]."""
    posterior = vae.encode(pixels.to(device, dtype).permute(0, 2, 1, 3, 4)).latent_dist  # in: [B, C, F, H, W]
    mean = posterior.mean.permute(0, 2, 1, 3, 4)  # [B, F', C', h, w]
    logvar = posterior.logvar.permute(0, 2, 1, 3, 4)  # [B, F', C', h, w]
    return mean.float().cpu(), logvar.float().cpu()


def encode_texts(pipe, captions: dict[str, str], out: Path, device, dtype) -> int:
    """Encode each caption (by text key) into texts/<key>.safetensors; returns how many."""
    items = sorted(captions.items())
    for start in range(0, len(items), TEXT_BATCH):
        chunk = items[start:start + TEXT_BATCH]
        with torch.no_grad():
            embeds, _ = pipe.encode_prompt([caption for _, caption in chunk],
                                           do_classifier_free_guidance=False,
                                           max_sequence_length=MAX_TEXT_TOKENS, device=device,
                                           dtype=dtype)  # [B, L, D]
        for row, (key, _) in enumerate(chunk):
            save_tensors(text_file(out, key), {TEXT_TENSORS[0]: embeds[row].float().cpu()})
    return len(items)


def _peak_memory(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "cuda peak allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "process peak RSS"


def _device(config: Config) -> torch.device:
    from cogvx.inference import pick_device

    return pick_device() if config.prepare.device == "auto" else torch.device(config.prepare.device)


def run_prepare(config: Config, prune: bool = False, log=print) -> PrepareSummary:
    """:func:`prepare_latents` holding prepare.output_dir's run lock (the main process takes it,
    once per launch): a second prepare there would delete the first one's files in the middle
    of their writes (the leftovers cleanup) or still needed (``prune``)."""
    from cogvx.distributed import is_main_process
    from cogvx.runlock import run_lock

    if not is_main_process():
        return prepare_latents(config, prune, log)
    with run_lock(config.prepare.output_dir, "prepare.output_dir", log=log):
        return prepare_latents(config, prune, log)


def prepare_latents(config: Config, prune: bool = False, log=print) -> PrepareSummary:
    """Validate the data set, encode what is missing, write the manifest; return a summary.

    Launched on several processes (accelerate launch), each encodes its share of the missing
    clips and captions into the shared folders (files are named by content, so shares never
    collide); the main process checks that every planned file is there and writes the manifest.
    """
    from cogvx.data.validation import dropped_report_path, validated_samples
    from cogvx.distributed import Processes, shard
    from cogvx.models.loader import resolve_source

    started = time.perf_counter()
    processes = Processes(config.train.process_group_timeout_minutes)
    out = Path(config.prepare.output_dir)
    report, samples = validated_samples(config, dropped_report_path(config) if processes.is_main else None)
    spec = config.spec
    folder = resolve_source(config.model_source, config.model.revision, config.model.cache_dir, spec)
    plans = plan_samples(samples, report.infos, config, folder)
    sampling = sampling_report(plans, report.infos, config)
    if processes.is_main:
        notice = sampling_notice(sampling, len(plans))
        if notice:
            log(notice)
        (out / "videos").mkdir(parents=True, exist_ok=True)
        (out / "texts").mkdir(parents=True, exist_ok=True)
        remove_partial_files(out)
    processes.wait()  # no process looks for missing files before the leftovers are gone
    names = conditioning_for(spec, config.data).video_tensors
    todo_videos = list({p.video_key: p for p in plans if not is_complete(video_file(out, p.video_key), names)}.values())
    empty_key = text_key("", text_encoder_id(folder), config)  # for caption dropout
    captions = {empty_key: "", **{p.text_key: p.caption for p in plans}}
    todo_texts = sorted((k, c) for k, c in captions.items() if not is_complete(text_file(out, k), TEXT_TENSORS))
    device = processes.device if processes.device is not None and config.prepare.device == "auto" else _device(config)
    work = encode_share(config, folder, shard(todo_videos, processes.index, processes.count),
                        dict(shard(todo_texts, processes.index, processes.count)), report.infos, out, device)
    shares = processes.gather(work)
    processes.wait()  # every share is on disk
    if processes.is_main:
        check_complete(out, plans, names)
        write_manifest(out, build_manifest(config, [p.manifest_entry() for p in plans], config.model_source, empty_key))
        write_resolved_config(config, out)
        if prune:
            log(f"pruned {prune_unreferenced(out)} unreferenced latent files")
    processes.wait()
    return summarize(shares, len(plans), len(todo_videos), len(report.samples) - len(samples),
                     time.perf_counter() - started, sampling)


def encode_share(config: Config, folder: Path, videos: list[Plan], texts: dict[str, str], infos, out: Path,
                 device: torch.device) -> dict[str, Any]:
    """Encode this process's clips and captions; what it did, for the summary."""
    from tqdm.auto import tqdm

    from cogvx.models.loader import load_pipeline, resolve_dtype

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    work: dict[str, Any] = {"videos": 0, "warmup_clips": 0, "texts": 0, "encode_seconds": 0.0, "phases": {}}
    if videos or texts:
        spec = config.spec
        dtype = resolve_dtype(config.model.dtype, spec, device)
        pipe = load_pipeline(str(folder), spec, dtype=dtype, skip=("transformer",))
        pipe.vae.to(device)
        pipe.text_encoder.to(device)
        if config.prepare.vae_slicing:
            pipe.vae.enable_slicing()
        if config.prepare.vae_tiling:
            pipe.vae.enable_tiling()
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # one clip shape per bucket: tuned convolutions pay off
            if config.prepare.compile:
                # Static shapes: one graph per bucket for the first frame batch, one for the rest.
                pipe.vae.encoder = torch.compile(pipe.vae.encoder, dynamic=False)
        encode_started = time.perf_counter()
        with tqdm(total=len(videos), unit="clip", desc="encoding clips", disable=None) as bar:
            work["videos"], work["warmup_clips"] = encode_videos(pipe, videos, infos, config, out, device, dtype,
                                                                  bar, work["phases"])
        text_started = time.perf_counter()
        work["texts"] = encode_texts(pipe, texts, out, device, dtype)
        _lap(work["phases"], "t5", text_started)
        work["encode_seconds"] = time.perf_counter() - encode_started
    work["peak"], work["memory_kind"] = _peak_memory(device)
    return work


def check_complete(out: Path, plans: list[Plan], names: tuple[str, ...]) -> None:
    """Every planned latent file is on disk, complete (what the manifest will promise)."""
    missing = sorted({str(video_file(out, p.video_key)) for p in plans if not is_complete(video_file(out, p.video_key), names)}
                     | {str(text_file(out, p.text_key)) for p in plans if not is_complete(text_file(out, p.text_key), TEXT_TENSORS)})
    if missing:
        raise LatentsError(f"{len(missing)} latent files are missing after encoding (e.g. {missing[0]}); "
                           "a process failed: run `cogvx prepare` again, it encodes only what is missing")


def summarize(shares: list[dict[str, Any]], samples: int, todo: int, dropped: int, seconds: float,
              sampling: SamplingReport | None = None) -> PrepareSummary:
    """One summary over every process's share: counts added, time of the slowest, peak of any."""
    videos = sum(share["videos"] for share in shares)
    encode_seconds = max(share["encode_seconds"] for share in shares)
    steady_clips = videos - sum(share.get("warmup_clips", 0) for share in shares)
    steady_seconds = max(share["encode_seconds"] - share["phases"].get("warmup", 0.0) for share in shares)
    phases: dict[str, float] = {}
    for share in shares:
        for name, value in share["phases"].items():
            phases[name] = round(max(phases.get(name, 0.0), value), 3)
    return PrepareSummary(samples=samples, videos_encoded=videos, texts_encoded=sum(share["texts"] for share in shares),
                          skipped=samples - todo, dropped=dropped, seconds=round(seconds, 2),
                          clips_per_second=round(videos / seconds, 3) if videos else 0.0,
                          peak_memory_gib=round(max(share["peak"] for share in shares), 3),
                          memory_kind=shares[0]["memory_kind"], encode_seconds=round(encode_seconds, 2),
                          encode_clips_per_second=round(videos / encode_seconds, 3) if videos else 0.0,
                          steady_clips_per_second=round(steady_clips / steady_seconds, 3) if steady_clips else 0.0,
                          phase_seconds=phases, processes=len(shares), **(sampling.counts() if sampling else {}))


# What a re-run on the same data and config reproduces exactly (the rest depends on the machine,
# the moment, and what earlier runs already encoded).
REPRODUCIBLE_SUMMARY = ("samples", "dropped", "frame_sampling", "sample_fps", "clips_resampled", "clips_slower",
                        "clips_cut")


def write_prepare_metrics(summary: PrepareSummary, folder: Path) -> None:
    """DVC's metrics of a prepare run: metrics.json (identical for identical inputs) and
    resources.json (speed, memory, files encoded this time)."""
    figures = summary.as_dict()
    metrics = {key: figures[key] for key in REPRODUCIBLE_SUMMARY if key in figures}
    resources = {key: value for key, value in figures.items() if key not in metrics}
    atomic_write_text(Path(folder) / "metrics.json", json.dumps(metrics, indent=1) + "\n")
    atomic_write_text(Path(folder) / "resources.json", json.dumps(resources, indent=1) + "\n")
