"""Rendering the validation prompts with the model being trained, into the run's folder."""

from __future__ import annotations

from pathlib import Path

import torch

from cogvx.config import Config


def render_validation(config: Config, folder: Path, transformer, step: int, out_dir: Path,
                      device: torch.device, dtype: torch.dtype) -> list[Path]:
    """One mp4 per validation prompt under ``out_dir/validation/step-NNNNNN``.

    The pipeline is assembled around the training transformer (LoRA included) from the base
    model's other parts. On a GPU the parts are offloaded to the CPU between uses, so validation
    adds one component's memory to training's instead of all of them; the hooks are removed and
    the transformer put back on the device afterwards.
    """
    from cogvx.inference import render, write_video
    from cogvx.models.loader import load_pipeline

    spec = config.spec
    pipe = load_pipeline(str(folder), spec, dtype=dtype, skip=("transformer",))
    pipe.transformer = transformer
    was_training = transformer.training
    transformer.eval()
    if device.type == "cuda":
        pipe.enable_model_cpu_offload(device=device)
        pipe.vae.enable_tiling()
    else:
        pipe.to(device)
    bucket = config.buckets[0]
    fps = config.validate_.fps or config.data.fps or spec.fps
    written = []
    try:
        for index, prompt in enumerate(config.validate_.prompts):
            video = render(pipe, prompt, frames=config.validate_.frames or bucket.frames,
                           height=config.validate_.height or bucket.height,
                           width=config.validate_.width or bucket.width,
                           steps=config.validate_.num_inference_steps,
                           guidance_scale=config.validate_.guidance_scale,
                           seed=config.validate_.seed + index)
            written.append(write_video(video, out_dir / "validation" / f"step-{step:06d}" / f"prompt-{index:02d}.mp4", fps))
    finally:
        if device.type == "cuda":
            pipe.remove_all_hooks()
            transformer.to(device)
        transformer.train(was_training)
    return written
