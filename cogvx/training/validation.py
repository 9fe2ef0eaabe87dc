"""Rendering the validation prompts with the model being trained, into the run's folder."""

from __future__ import annotations

from pathlib import Path

import torch

from cogvx.config import Config


def render_validation(config: Config, folder: Path, transformer, step: int, out_dir: Path,
                      device: torch.device, dtype: torch.dtype, writer=None) -> list[Path]:
    """One mp4 per validation prompt under ``out_dir/validation/step-NNNNNN``.

    The pipeline is assembled around the training transformer (LoRA, fp8 storage and compiled
    blocks included) from the base model's other parts. On a GPU, validate.offload decides what
    stays on the device (model: one component at a time, so validation adds one component's
    memory to training's; text_encoder: the transformer stays, T5 streams in, the VAE comes
    and goes); the hooks are removed and the transformer put back afterwards.
    validate.cache (diffusers' caching hooks) goes on before the offload hooks and comes off
    after them, in a finally, so training gets its transformer back without a hook.
    ``writer(frames, path, fps)`` replaces the mp4 writer (benchmarks on machines without ffmpeg).
    A control model (data.control) renders each prompt with its control video
    (:func:`validation_controls`) through the control pipeline.
    """
    from cogvx.inference import (apply_render_cache, as_control_pipeline, control_frames, prepare_for_device,
                                 remove_render_cache, render, render_settings, validation_controls, write_video)
    from cogvx.models.loader import load_pipeline

    spec, writer = config.spec, writer or write_video
    validate = config.validate_
    size = render_settings(config)
    controls = [control_frames(path, config.data.control, size, config) for path in validation_controls(config)]
    pipe = load_pipeline(str(folder), spec, dtype=dtype, skip=("transformer",))
    pipe.transformer = transformer
    if controls:
        pipe = as_control_pipeline(pipe)
    was_training = transformer.training
    transformer.eval()
    written = []
    try:
        apply_render_cache(transformer, config, lambda: pipe.current_timestep, validate.guidance_scale)
        prepare_for_device(pipe, device, validate.offload, validate.vae_tiling)
        for index, prompt in enumerate(validate.prompts):
            video = render(pipe, prompt, frames=size.frames, height=size.height, width=size.width,
                           steps=validate.num_inference_steps, guidance_scale=validate.guidance_scale,
                           seed=validate.seed + index, control=controls[index] if controls else None,
                           vae_tiles=validate.vae_tiles)
            written.append(writer(video, out_dir / "validation" / f"step-{step:06d}" / f"prompt-{index:02d}.mp4",
                                  size.fps))
    finally:
        if device.type == "cuda" and validate.offload in ("model", "sequential"):
            pipe.remove_all_hooks()
            transformer.to(device)
        elif device.type == "cuda" and validate.offload == "text_encoder":
            pipe.vae.to("cpu")  # training gets the GPU back without waiting for the pipeline's collection
        remove_render_cache(transformer)
        transformer.train(was_training)
    return written

