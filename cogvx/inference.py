"""Rendering videos with a loaded CogVideoX pipeline and writing them as mp4."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from cogvx.io import atomic_file

if TYPE_CHECKING:
    from cogvx.config import Config


@dataclass(frozen=True)
class RenderSettings:
    """The size of a rendered clip and the rate its mp4 plays at."""

    frames: int
    height: int
    width: int
    fps: int


def render_settings(config: Config, frames: int | None = None, height: int | None = None,
                    width: int | None = None, fps: int | None = None) -> RenderSettings:
    """What a render uses, by one rule for `cogvx generate`, in-training validation and `cogvx check`.

    Size: the value asked for (a generate request), else validate.frames/height/width, else the
    first training bucket: the shape the model is trained at, so a LoRA is seen at its own size.
    Rate: the one asked for, else validate.fps, else the rate training took the clips' frames at
    (data.fps, Config.sample_fps), else the model's own, so motion plays at the speed training saw.
    One rule, because the clip `cogvx check` proves runs before training, the clips validation
    writes during it and the one generate renders afterwards should have the same size and speed
    for the same config; they used three different fallbacks before. An unset (None or 0) value
    falls through to the next.
    """
    validate, bucket = config.validate_, config.buckets[0]
    return RenderSettings(frames=frames or validate.frames or bucket.frames,
                          height=height or validate.height or bucket.height,
                          width=width or validate.width or bucket.width,
                          fps=fps or validate.fps or config.sample_fps or config.spec.fps)


def pick_device() -> torch.device:
    """The first CUDA device when there is one, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def prepare_for_device(pipe, device: torch.device, offload: str = "model", vae_tiling: bool = True,
                       compile_blocks: bool = False) -> None:
    """Place the pipeline for rendering (validate.offload / vae_tiling / compile).

    CPU: everything on the CPU. GPU: ``model`` offload keeps one component (T5, transformer,
    VAE) on the GPU at a time, ``sequential`` one layer, ``none`` all of them; tiling decodes
    the video in spatial tiles so the VAE needs a few GiB instead of tens.
    """
    if compile_blocks and not _blocks_compiled(pipe.transformer):
        from cogvx.models.performance import compile_blocks as compile_transformer_blocks

        compile_transformer_blocks(pipe.transformer)
    if device.type != "cuda":
        pipe.to(device)
        return
    if offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe.to(device)
    if vae_tiling:
        pipe.vae.enable_tiling()
    pipe.vae.enable_slicing()


def _blocks_compiled(transformer) -> bool:
    return any(getattr(block, "_compiled_call_impl", None) is not None for block in transformer.transformer_blocks)


def placeholder_image(height: int, width: int) -> Image.Image:
    """A smooth colour gradient used as the first frame when an image-to-video check has no image."""
    ys = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    xs = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    rgb = np.stack([np.broadcast_to(xs, (height, width)), np.broadcast_to(ys, (height, width)),
                    np.full((height, width), 128, np.float32)], axis=-1)  # [H, W, 3]
    return Image.fromarray(rgb.astype(np.uint8))


def render(pipe, prompt: str, *, frames: int, height: int, width: int, steps: int,
           guidance_scale: float, seed: int, image: Image.Image | None = None) -> np.ndarray:
    """Sample one video; returns uint8 frames shaped [F, H, W, 3]."""
    kwargs = dict(prompt=prompt, num_frames=frames, height=height, width=width,
                  num_inference_steps=steps, guidance_scale=guidance_scale,
                  generator=torch.Generator("cpu").manual_seed(seed), output_type="np")
    if "image" in inspect.signature(pipe.__call__).parameters:
        kwargs["image"] = image if image is not None else placeholder_image(height, width)
    with torch.inference_mode():
        video = pipe(**kwargs).frames[0]  # [F, H, W, 3] floats in [0, 1]
    return (np.clip(video, 0.0, 1.0) * 255).round().astype(np.uint8)


def write_video(frames: np.ndarray, path: str | Path, fps: int) -> Path:
    """Write [F, H, W, 3] uint8 frames as an H.264 mp4, atomically (temp file + rename)."""
    import imageio.v2 as imageio

    with atomic_file(path, suffix=".mp4") as tmp:
        with imageio.get_writer(tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264",
                                quality=8, macro_block_size=1, ffmpeg_log_level="error") as writer:
            for frame in frames:
                writer.append_data(frame)
    return Path(path)
