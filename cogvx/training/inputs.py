"""What one micro-batch feeds the transformer: fresh latents drawn from the stored posteriors,
text embeddings with caption dropout, and the task's conditioning (image latents, ofs)."""

from __future__ import annotations

from typing import Any

import torch

from cogvx.config import Config
from cogvx.data.latents import TEXT_TENSORS, VIDEO_TENSORS, sample_latents
from cogvx.models.conditioning import conditioning_for, pad_to_temporal_patch
from cogvx.training.objective import SampleRandom


def model_inputs(batch: dict[str, Any], run_config: Config, transformer, scaling: float,
                 random: SampleRandom, device: torch.device, dtype: torch.dtype,
                 empty_prompt: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Clean latents [B, F, C, h, w], text embeddings (caption dropout applied), and the
    conditioning the model needs (the task's, e.g. image latents with dropout, ofs). Each sample
    draws its latent noise, its caption dropout, then the conditioning's numbers; dropout draws
    even at p = 0, so the random stream, and with it exact resume, does not depend on the setting."""
    spec, train = run_config.spec, run_config.train
    mean_name, logvar_name = VIDEO_TENSORS
    mean = batch[mean_name]  # [B, F, C, h, w]
    latents = sample_latents(mean, batch[logvar_name], scaling, noise=random.randn(tuple(mean.shape[1:]))).to(device)
    prompt_embeds = batch[TEXT_TENSORS[0]]  # [B, L, D]
    dropped = random.rand() < train.caption_dropout  # [B]
    if empty_prompt is not None and dropped.any():
        prompt_embeds = torch.where(dropped.view(-1, 1, 1), empty_prompt.expand_as(prompt_embeds),
                                    prompt_embeds)  # dropped: [B, 1, 1]; result [B, L, D]
    extra = conditioning_for(spec, run_config.data).transformer_inputs(batch, latents, transformer, scaling,
                                                                       random, train, device)
    latents = pad_to_temporal_patch(latents, transformer.config.patch_size_t)  # [B, F', C, h, w]
    return latents, prompt_embeds.to(device, dtype), extra
