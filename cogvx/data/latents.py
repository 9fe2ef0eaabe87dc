"""Precomputed latents on disk: the manifest, its shards, and the dataset training reads.

Layout of ``prepare.output_dir``::

    manifest.json              what was prepared, for which model and buckets (see build_manifest)
    videos/<key>.safetensors   VAE posterior of one clip: latent_mean, latent_logvar [F, C, h, w]
                               (+ the task's conditioning, e.g. image_latent_mean,
                               image_latent_logvar [1, C, h, w] for I2V, control_latent_mean,
                               control_latent_logvar [F, C, h, w] with data.control:
                               cogvx.models.conditioning)
    texts/<key>.safetensors    T5 embedding of one caption: prompt_embeds [L, D]

Keys are content hashes of everything that went into a file, so a file is reused exactly when
its inputs are unchanged and a stale file can never be served for changed data. The posterior's
mean and log-variance are stored unscaled, so training draws a fresh latent each step and applies
the VAE scaling factor recorded in the manifest.

This module owns the format: tensor and file names, writing, reading, the manifest, and the
clean-up of partial and unreferenced files; `cogvx prepare` and the benchmarks write through it,
training reads through it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from cogvx import __version__
from cogvx.config import Config
from cogvx.data.buckets import Bucket, BucketBatchSampler
from cogvx.errors import CogvxError
from cogvx.io import atomic_file, atomic_write_text
from cogvx.models.constants import latent_frame_count

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "cogvx-latents/1"


def posterior_tensors(latent: str) -> tuple[str, str]:
    """The two tensors a VAE posterior named ``latent`` is stored as: its mean and log-variance."""
    return f"{latent}_mean", f"{latent}_logvar"


VIDEO_LATENT = "latent"  # the clip, in every videos/ file
IMAGE_LATENT = "image_latent"  # the first-frame image, image-to-video only
CONTROL_LATENT = "control_latent"  # the control video, control training only (data.control)
VIDEO_TENSORS = posterior_tensors(VIDEO_LATENT)
IMAGE_TENSORS = posterior_tensors(IMAGE_LATENT)
CONTROL_TENSORS = posterior_tensors(CONTROL_LATENT)
TEXT_TENSORS = ("prompt_embeds",)  # the caption, in every texts/ file


class LatentsError(CogvxError):
    """Precomputed latents are missing, corrupt, or do not match the run asking for them."""

    exit_code = 4


def video_file(root: Path, key: str) -> Path:
    return Path(root) / "videos" / f"{key}.safetensors"


def text_file(root: Path, key: str) -> Path:
    return Path(root) / "texts" / f"{key}.safetensors"


def is_complete(path: Path, names: tuple[str, ...]) -> bool:
    """Whether ``path`` is a readable safetensors file holding at least the tensors ``names``."""
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as handle:
            return set(names) <= set(handle.keys())
    except (SafetensorError, OSError, ValueError):
        return False


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write tensors to a safetensors file atomically, tagged with the latents format; a failed
    write (full disk, quota) leaves no partial file and says how to continue."""
    from safetensors.torch import save_file

    try:
        with atomic_file(path, suffix=".safetensors") as tmp:
            save_file({name: t.contiguous() for name, t in tensors.items()}, str(tmp),
                      metadata={"format": MANIFEST_FORMAT})
    except (OSError, SafetensorError) as err:
        raise LatentsError(f"could not write {path} ({err}); the latents already written are kept. "
                           "Free disk space, then run `cogvx prepare` again: it encodes only what is missing") from None


def remove_partial_files(root: Path) -> None:
    """Temporary files a killed run left behind (atomic writes that never got renamed)."""
    for folder in (Path(root) / "videos", Path(root) / "texts"):
        for leftover in folder.glob(".*.safetensors"):
            leftover.unlink()


def prune_unreferenced(root: Path) -> int:
    """Delete the latent files the folder's manifest does not use; returns how many."""
    root = Path(root)
    manifest = read_manifest(root)
    entries = manifest["entries"]
    keep = {video_file(root, e["video_key"]) for e in entries} | {text_file(root, e["text_key"]) for e in entries}
    keep.add(text_file(root, manifest["empty_text_key"]))
    removed = 0
    for path in [*(root / "videos").glob("[!.]*.safetensors"), *(root / "texts").glob("[!.]*.safetensors")]:
        if path not in keep:
            path.unlink()
            removed += 1
    return removed


def manifest_entry(*, origin: str, video: str, caption: str, image: Path | None, bucket: Bucket,
                   video_key: str, text_key: str, control: Path | None = None) -> dict[str, Any]:
    """One sample's manifest entry: where it came from, its bucket, and the keys of its two files."""
    entry = {"origin": origin, "video": video, "caption": caption, "image": str(image) if image else None,
             "bucket": str(bucket), "frames": bucket.frames, "latent_frames": latent_frame_count(bucket.frames),
             "video_key": video_key, "text_key": text_key}
    if control is not None:
        entry["control"] = str(control)
    return entry


def build_manifest(config: Config, entries: list[dict[str, Any]], source: str, empty_key: str) -> dict[str, Any]:
    """Everything training needs to trust the files: model, buckets, config, one entry per sample
    (:func:`manifest_entry`); ``empty_key`` names the empty caption's file (caption dropout)."""
    spec = config.spec
    return {
        "format": MANIFEST_FORMAT,
        "created_by": f"cogvx {__version__}",
        "model": {"variant": spec.key, "source": source, "task": spec.task,
                  "generation": spec.generation, "vae_scaling_factor": spec.vae_scaling_factor,
                  "invert_scale_latents": spec.invert_scale_latents},
        "buckets": sorted({entry["bucket"] for entry in entries}),
        "empty_text_key": empty_key,
        "control": config.data.control,
        "prepare": config.prepare.model_dump(mode="json"),
        "data": config.data.model_dump(mode="json"),
        "entries": entries,
    }


def write_manifest(root: Path, manifest: dict[str, Any]) -> Path:
    return atomic_write_text(Path(root) / MANIFEST_NAME, json.dumps(manifest, indent=1) + "\n")


def read_manifest(root: Path) -> dict[str, Any]:
    """The manifest of a latents folder; LatentsError saying how to make one otherwise."""
    path = Path(root) / MANIFEST_NAME
    if not path.is_file():
        raise LatentsError(f"no precomputed latents in {root} (no {MANIFEST_NAME}); run `cogvx prepare` first")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LatentsError(f"{path} is not valid JSON ({err}); run `cogvx prepare` again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise LatentsError(f"{path} is not a {MANIFEST_FORMAT} manifest; run `cogvx prepare` again")
    return manifest


def check_manifest(manifest: dict[str, Any], config: Config, root: Path) -> None:
    """Refuse latents prepared for another model or other buckets, naming the mismatch.

    A config that names its shapes (data.buckets, data.frames/height/width) trains at those
    only; one that names none trains at the buckets the manifest records, which must still
    follow the model's frame rule.
    """
    spec = config.spec
    model = manifest["model"]
    problems = []
    for key, wanted in (("variant", spec.key), ("vae_scaling_factor", spec.vae_scaling_factor),
                        ("invert_scale_latents", spec.invert_scale_latents), ("task", spec.task)):
        if model.get(key) != wanted:
            problems.append(f"model {key}: latents have {model.get(key)!r}, this run needs {wanted!r}")
    control = manifest.get("control", "none")
    if control != config.data.control:
        problems.append(f"data.control: latents were prepared with {control!r}, this run has {config.data.control!r}")
    recorded = {entry["bucket"] for entry in manifest["entries"]}
    if config.names_buckets:
        allowed = {str(bucket) for bucket in config.buckets}
        foreign = sorted(recorded - allowed)
        if foreign:
            problems.append(f"buckets {', '.join(foreign)} are not among this run's buckets "
                            f"({', '.join(sorted(allowed))}); name the same data.buckets, or leave "
                            "data.buckets, frames, height and width unset to train at the latents' buckets")
    else:
        problems += _bucket_problems(sorted(recorded), spec)
    if problems:
        raise LatentsError(f"the latents in {root} do not match this run:\n"
                           + "\n".join(f"  - {p}" for p in problems)
                           + "\n  run `cogvx prepare` with the same params to re-encode")


def _bucket_problems(buckets: list[str], spec) -> list[str]:
    """Manifest buckets that are malformed or break the model's frame rule."""
    problems = []
    for text in buckets:
        try:
            frames = Bucket.parse(text).frames
        except ValueError as err:
            problems.append(f"bucket {err}")
            continue
        if not spec.frame_rule.accepts(frames):
            problems.append(f"bucket {text}: {spec.key} needs {spec.frame_rule} frames")
    return problems


class LatentDataset(torch.utils.data.Dataset):
    """The training-side view of a latents folder: one item per manifest entry."""

    def __init__(self, root: str | Path, config: Config) -> None:
        self.root = Path(root)
        manifest = read_manifest(self.root)
        check_manifest(manifest, config, self.root)
        self.manifest = manifest
        self.entries: list[dict[str, Any]] = manifest["entries"]
        if not self.entries:
            raise LatentsError(f"{self.root / MANIFEST_NAME} lists no samples; run `cogvx prepare`")
        # Lazily: the conditioning module reads this module's tensor names.
        from cogvx.models.conditioning import conditioning_for

        # check_manifest: the latents' task and control are the run's
        self.conditioning = conditioning_for(config.spec, config.data)
        self.has_images = self.conditioning.makes_image
        self.empty_prompt_embeds = self._load(text_file(self.root, manifest["empty_text_key"]))["prompt_embeds"]

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def buckets(self) -> list[Bucket]:
        return [Bucket.parse(entry["bucket"]) for entry in self.entries]

    def batch_sampler(self, batch_size: int, seed: int, shuffle: bool = True) -> BucketBatchSampler:
        """Batches drawn from one bucket at a time, in an order fixed by (seed, epoch)."""
        return BucketBatchSampler(self.buckets, batch_size=batch_size, shuffle=shuffle, seed=seed)

    def __getitem__(self, index: int) -> dict[str, Any]:
        entry = self.entries[index]
        item: dict[str, Any] = {**self._load(video_file(self.root, entry["video_key"])),
                                **self._load(text_file(self.root, entry["text_key"]))}
        item["bucket"] = entry["bucket"]
        return item

    def _load(self, path: Path) -> dict[str, torch.Tensor]:
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise LatentsError(f"cannot read {path} ({err}); run `cogvx prepare` again to re-encode it") from None


def sample_latents(mean: torch.Tensor, logvar: torch.Tensor, scaling_factor: float,
                   generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
    """A fresh draw from the stored VAE posterior, scaled the way training expects; ``noise``
    (standard normal, the shape of ``mean``) is drawn from ``generator`` unless given."""
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    if noise is None:
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    noise = noise.to(mean.device, mean.dtype)
    return (mean + std * noise) * scaling_factor
