"""What one micro-batch feeds the transformer: fresh latents drawn from the stored posteriors,
text embeddings with caption dropout, and the task's conditioning (image latents, ofs)."""

from __future__ import annotations

from typing import Any

import torch

from cogvx.config import Config
from cogvx.training.objective import SampleRandom, pad_to_temporal_patch


def model_inputs(batch: dict[str, Any], run_config: Config, transformer, scaling: float,
                 random: SampleRandom, device: torch.device, dtype: torch.dtype,
                 empty_prompt: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Clean latents [B, F, C, h, w], text embeddings (caption dropout applied), and the
    conditioning the model needs (image latents with dropout, ofs). Dropout draws even at p = 0,
    so the random stream, and with it exact resume, does not depend on the setting."""
    from cogvx.data.latents import sample_latents

    spec, train = run_config.spec, run_config.train
    mean = batch["latent_mean"]  # [B, F, C, h, w]
    latents = sample_latents(mean, batch["latent_logvar"], scaling, noise=random.randn(tuple(mean.shape[1:]))).to(device)
    prompt_embeds = batch["prompt_embeds"]  # [B, L, D]
    dropped = random.rand() < train.caption_dropout
    if empty_prompt is not None and dropped.any():
        prompt_embeds = torch.where(dropped.view(-1, 1, 1), empty_prompt.expand_as(prompt_embeds), prompt_embeds)
    patch_t = transformer.config.patch_size_t
    extra: dict[str, Any] = {}
    if spec.task == "i2v":
        # The pipeline's conditioning: first-frame latents, zero frames after them, then the same
        # temporal padding as the video latents; 1.5 scales them by 1/scaling_factor.
        image_scale = 1.0 / scaling if spec.invert_scale_latents else scaling
        image_mean = batch["image_latent_mean"]  # [B, 1, C, h, w]
        image = sample_latents(image_mean, batch["image_latent_logvar"], image_scale,
                               noise=random.randn(tuple(image_mean.shape[1:]))).to(device)  # [B, 1, C, h, w]
        keep = ~(random.rand() < train.image_dropout)
        image = image * keep.to(device, image.dtype).view(-1, 1, 1, 1, 1)
        zeros = image.new_zeros(image.shape[0], latents.shape[1] - 1, *image.shape[2:])  # [B, F-1, C, h, w]
        extra["image_latents"] = pad_to_temporal_patch(torch.cat([image, zeros], dim=1), patch_t)
        if transformer.config.ofs_embed_dim:
            extra["ofs"] = torch.full((latents.shape[0],), 2.0, device=device)
    latents = pad_to_temporal_patch(latents, patch_t)  # [B, F', C, h, w]
    return latents, prompt_embeds.to(device, dtype), extra
