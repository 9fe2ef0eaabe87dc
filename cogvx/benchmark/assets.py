"""What a benchmark needs on disk, made locally: a pipeline folder and latents with random values.

Memory and time do not depend on weight values, so real-size models are built with random
weights (nothing is downloaded). The pipeline folder has the diffusers layout the loader reads
(model_index.json, scheduler/, tokenizer/, transformer/config.json, and for the cases that
render or encode, vae/ and text_encoder/ weights); the transformer itself is built in memory on
the GPU and handed to the training and generation code. Latents follow `cogvx prepare`'s
layout, so the training loop reads them through its own dataset class.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from cogvx.config import Config
from cogvx.io import atomic_directory, atomic_write_text
from cogvx.models.specs import ModelSpec

WEIGHTS_MARKER = ".cogvx-bench-weights"
BENCH_CAPTION = "a red circle moving left to right on a blue background"


def write_assets(spec: ModelSpec, folder: Path, device: torch.device, weights: bool) -> Path:
    """A pipeline folder for ``spec`` at ``folder`` (kept between cases); VAE and T5 weights
    (random, bf16 on GPU) only when ``weights``. Tiny variants get the complete tiny pipeline."""
    from cogvx.models.build import save_tiny_pipeline

    folder = Path(folder)
    if spec.tiny:
        if not (folder / "model_index.json").is_file():
            save_tiny_pipeline(spec.key, folder)
        return folder
    if not (folder / "model_index.json").is_file():
        _write_skeleton(spec, folder)
    if weights and not (folder / WEIGHTS_MARKER).is_file():
        _write_encoder_weights(spec, folder, device)
    return folder


def _write_skeleton(spec: ModelSpec, folder: Path) -> None:
    """model_index, scheduler, tokenizer and the transformer's config: what training loads."""
    from cogvx.models.build import build_scheduler, build_transformer
    from cogvx.models.tokenizer import train_t5_tokenizer

    tokenizer = train_t5_tokenizer()
    scheduler = build_scheduler(spec)
    transformer = build_transformer(spec, device="meta")
    with atomic_directory(folder) as staging:
        tokenizer.save_pretrained(staging / "tokenizer")
        scheduler.save_pretrained(staging / "scheduler")
        transformer.save_config(staging / "transformer")
        index = {"_class_name": spec.pipeline_class, "_diffusers_version": _diffusers_version(),
                 "scheduler": ["diffusers", type(scheduler).__name__],
                 "text_encoder": ["transformers", "T5EncoderModel"],
                 "tokenizer": ["transformers", type(tokenizer).__name__],
                 "transformer": ["diffusers", "CogVideoXTransformer3DModel"],
                 "vae": ["diffusers", "AutoencoderKLCogVideoX"]}
        (staging / "model_index.json").write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")


def _write_encoder_weights(spec: ModelSpec, folder: Path, device: torch.device) -> None:
    """Real-size VAE and T5-XXL with random weights, saved in bf16 safetensors."""
    from transformers import AutoTokenizer

    from cogvx.models.build import build_text_encoder, build_vae

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    vocab = len(AutoTokenizer.from_pretrained(folder / "tokenizer"))
    for name, build in (("vae", lambda: build_vae(spec, dtype, device)),
                        ("text_encoder", lambda: build_text_encoder(spec, max(vocab, 32128), dtype, device))):
        module = build()
        with atomic_directory(folder / name) as staging:
            module.save_pretrained(staging, safe_serialization=True)
        del module
        if device.type == "cuda":
            torch.cuda.empty_cache()
    atomic_write_text(folder / WEIGHTS_MARKER, "vae + text_encoder written\n")


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def write_random_latents(config: Config, root: Path, samples: int = 2, seed: int = 0) -> Path:
    """``samples`` entries of random latents at the config's first bucket, in prepare's layout
    (the latents format's own writer and manifest): the clip's posterior, the conditioning's
    (one latent frame for the first-frame image, every frame for a control video), and a caption
    embedding per sample."""
    from cogvx.data.latents import (TEXT_TENSORS, VIDEO_LATENT, build_manifest, manifest_entry, posterior_tensors,
                                    save_tensors, text_file, video_file, write_manifest)
    from cogvx.hashing import content_key
    from cogvx.models.conditioning import conditioning_for
    from cogvx.models.constants import VAE_SPATIAL_SCALE, latent_frame_count

    root, spec, bucket = Path(root), config.spec, config.buckets[0]
    generator = torch.Generator().manual_seed(seed)
    latent_shape = (latent_frame_count(bucket.frames), spec.vae["latent_channels"],
                    bucket.height // VAE_SPATIAL_SCALE, bucket.width // VAE_SPATIAL_SCALE)  # [F', C, h, w]
    text_shape = (spec.transformer["max_text_seq_length"], spec.transformer["text_embed_dim"])  # [L, D]
    (text_name,) = TEXT_TENSORS
    empty_key = content_key(bench="empty", shape=text_shape)
    save_tensors(text_file(root, empty_key), {text_name: torch.zeros(text_shape)})
    conditioning = conditioning_for(spec, config.data)
    latents = [VIDEO_LATENT, *(latent for _, latent in conditioning.extra_latents)]
    per_frame = {VIDEO_LATENT, *(latent for pixels, latent in conditioning.extra_latents if pixels != "image")}
    entries = []
    for index in range(samples):
        key = content_key(bench=index, seed=seed, shape=latent_shape, task=spec.task)
        tensors = {}
        for latent in latents:
            shape = latent_shape if latent in per_frame else (1, *latent_shape[1:])  # [F', C, h, w] or [1, C, h, w]
            mean_name, logvar_name = posterior_tensors(latent)
            tensors |= {mean_name: torch.randn(shape, generator=generator), logvar_name: torch.full(shape, -6.0)}
        save_tensors(video_file(root, key), tensors)
        save_tensors(text_file(root, key), {text_name: torch.randn(text_shape, generator=generator)})
        entries.append(manifest_entry(origin=f"bench:{index}", video=f"bench-{index}.mp4", caption=BENCH_CAPTION,
                                      image=None, bucket=bucket, video_key=key, text_key=key))
    write_manifest(root, build_manifest(config, entries, config.model_source, empty_key))
    return root


def make_bench_clips(out: Path, clips: int, frames: int, height: int, width: int, fps: int = 8) -> Path:
    """``clips`` synthetic mp4 clips of one size with captions (txt layout), for prepare."""
    from dataclasses import replace

    from cogvx.data.synthetic import plan_clips, write_mp4

    specs = [replace(spec, frames=frames, height=height, width=width) for spec in plan_clips(clips)]
    with atomic_directory(Path(out)) as staging:
        (staging / "videos").mkdir()
        for spec in specs:
            write_mp4(staging / spec.path, spec.render(), fps)
        (staging / "prompts.txt").write_text("".join(f"{s.caption}\n" for s in specs), encoding="utf-8")
        (staging / "videos.txt").write_text("".join(f"{s.path}\n" for s in specs), encoding="utf-8")
    return Path(out)
