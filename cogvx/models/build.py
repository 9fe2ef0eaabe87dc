"""Build CogVideoX pipelines with random weights: tiny ones on disk, real-size ones in memory.

Tiny pipelines are saved in the exact diffusers layout (model_index.json, transformer/, vae/,
text_encoder/, tokenizer/, scheduler/), so the loader that reads real checkpoints reads them
too. Real-size builders construct the published architectures with random weights directly on
the target device, for memory and speed measurements where nothing can be downloaded.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKLCogVideoX,
    CogVideoXDDIMScheduler,
    CogVideoXImageToVideoPipeline,
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
)
from transformers import T5Config, T5EncoderModel

from cogvx.errors import CogvxError
from cogvx.io import atomic_directory
from cogvx.models import architectures as arch
from cogvx.models.tokenizer import train_t5_tokenizer
from cogvx.models.specs import ModelSpec, get_spec

PIPELINES = {"t2v": CogVideoXPipeline, "i2v": CogVideoXImageToVideoPipeline}


def build_transformer(spec: ModelSpec, dtype: torch.dtype = torch.float32,
                      device: str | torch.device | None = None) -> CogVideoXTransformer3DModel:
    """The spec's transformer with random weights, built on ``device`` (``"meta"`` allocates nothing)."""
    with _device_context(device):
        model = CogVideoXTransformer3DModel(**_plain(spec.transformer))
    return _cast(model, dtype, device)


def build_vae(spec: ModelSpec, dtype: torch.dtype = torch.float32,
              device: str | torch.device | None = None) -> AutoencoderKLCogVideoX:
    """The spec's VAE with random weights and the spec's scaling factor."""
    kwargs = dict(_plain(spec.vae), scaling_factor=spec.vae_scaling_factor)
    if spec.invert_scale_latents:
        kwargs["invert_scale_latents"] = True
    with _device_context(device):
        model = AutoencoderKLCogVideoX(**kwargs)
    return _cast(model, dtype, device)


def build_text_encoder(spec: ModelSpec, vocab_size: int, dtype: torch.dtype = torch.float32,
                       device: str | torch.device | None = None) -> T5EncoderModel:
    """The spec's T5 encoder with random weights and the given vocabulary size."""
    config = T5Config(**dict(_plain(spec.text_encoder), vocab_size=vocab_size))
    with _device_context(device):
        model = T5EncoderModel(config)
    return _cast(model, dtype, device)


def build_scheduler(spec: ModelSpec) -> CogVideoXDDIMScheduler:
    return CogVideoXDDIMScheduler(**_plain(arch.SCHEDULER), snr_shift_scale=spec.snr_shift_scale)


def build_pipeline(variant: str, seed: int = 0) -> CogVideoXPipeline | CogVideoXImageToVideoPipeline:
    """A complete random-weight pipeline for a tiny variant (deterministic given ``seed``)."""
    spec = get_spec(variant)
    if not spec.tiny:
        raise CogvxError(f"{spec.key} is a full-size model ({spec.hub_id}); build_pipeline makes "
                         f"tiny ones only. Use build_transformer/build_vae on a GPU for real sizes.")
    torch.manual_seed(seed)
    tokenizer = train_t5_tokenizer()
    parts: dict[str, Any] = dict(
        tokenizer=tokenizer,
        text_encoder=build_text_encoder(spec, vocab_size=len(tokenizer)),
        vae=build_vae(spec),
        transformer=build_transformer(spec),
        scheduler=build_scheduler(spec),
    )
    return PIPELINES[spec.task](**parts)


def save_tiny_pipeline(variant: str, out: str | Path, seed: int = 0, overwrite: bool = False) -> Path:
    """Build a tiny pipeline and save it in the diffusers layout, atomically (temp folder + rename)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise CogvxError(f"{out} already exists; pass --overwrite to replace it")
    pipe = build_pipeline(variant, seed=seed)
    with atomic_directory(out) as staging:
        pipe.save_pretrained(staging, safe_serialization=True)
    return out


def _cast(model, dtype: torch.dtype, device: str | torch.device | None):
    """Cast parameters and buffers to ``dtype`` (some buffers are built in float64).

    diffusers warns on every ``.to(dtype)`` of a model that has no fp32-only modules; that
    warning does not apply to a freshly built model, so it is silenced for this call only.
    """
    if device == "meta":
        return model
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        return model.to(dtype=dtype)
    finally:
        diffusers_logging.set_verbosity(verbosity)


def _device_context(device: str | torch.device | None):
    return torch.device(device) if device is not None else nullcontext()


def _plain(config: Any) -> dict[str, Any]:
    """A mutable dict with tuples turned into lists, as diffusers' configs store them."""
    return {key: list(value) if isinstance(value, tuple) else value for key, value in dict(config).items()}
