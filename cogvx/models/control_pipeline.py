"""Rendering with a control model: diffusers' CogVideoXFunControlPipeline, padded in time for
CogVideoX 1.5.

The pipeline refuses a control video whose latent frame count does not divide the transformer's
``patch_size_t`` (1.5 models patch frames in pairs; 49 or 81 frames give an odd count), where
CogVideoXPipeline pads. :class:`ControlPipeline` pads the way training does
(:func:`cogvx.models.conditioning.pad_to_temporal_patch`): copies of the first control latent
frame before the others, as many extra noise frames, and the first frames dropped before the
decode, as CogVideoXPipeline drops its padding. Its loop steps the scheduler the DDIM way only,
so a DPM scheduler (5b, 1.5) is swapped for DDIM of the same configuration. Everything else,
classifier-free guidance included, is the diffusers pipeline's own.
"""

from __future__ import annotations

import torch
from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler, CogVideoXFunControlPipeline

from cogvx.models.conditioning import pad_to_temporal_patch


class ControlPipeline(CogVideoXFunControlPipeline):
    """CogVideoXFunControlPipeline with the 1.5 temporal padding of training (see the module),
    sampling with DDIM: the pipeline's loop calls ``scheduler.step`` the DDIM way, so the
    CogVideoXDPMScheduler the official 5b and 1.5 checkpoints ship would be called with the
    wrong arguments; it is replaced by a CogVideoXDDIMScheduler of the same configuration."""

    def __init__(self, tokenizer, text_encoder, vae, transformer, scheduler) -> None:
        if isinstance(scheduler, CogVideoXDPMScheduler):
            scheduler = CogVideoXDDIMScheduler.from_config(scheduler.config)
        super().__init__(tokenizer, text_encoder, vae, transformer, scheduler)

    _padding = 0  # latent frames prepended for this call
    control_record: dict | None = None  # what the model's file says of its control (kind, canny thresholds)

    def __call__(self, prompt=None, negative_prompt=None, control_video=None, **kwargs):
        """As the pipeline's, for one control video given as a list of frames (what cogvx renders)."""
        frames = len(control_video or [])
        patch_t = self.transformer.config.patch_size_t
        latent_frames = (frames - 1) // self.vae_scale_factor_temporal + 1
        self._padding = (-latent_frames) % patch_t if patch_t and frames else 0
        if self._padding:
            # The frame count decides the noise's length: lengthen it by the padding (the extra
            # frames' content is never encoded: prepare_control_latents drops them).
            extra = [control_video[-1]] * (self._padding * self.vae_scale_factor_temporal)
            control_video = control_video + extra
        try:
            return super().__call__(prompt, negative_prompt, control_video, **kwargs)
        finally:
            self._padding = 0

    def prepare_control_latents(self, mask=None, masked_image=None):
        if self._padding and masked_image is not None:
            masked_image = masked_image[:, :, :-self._padding * self.vae_scale_factor_temporal]  # [B, C, F, H, W]
        mask, latents = super().prepare_control_latents(mask, masked_image)
        if self._padding and latents is not None:
            frames_first = latents.permute(0, 2, 1, 3, 4)  # [B, F, C, h, w]
            padded = pad_to_temporal_patch(frames_first, self.transformer.config.patch_size_t)  # [B, F', C, h, w]
            latents = padded.permute(0, 2, 1, 3, 4)  # [B, C, F', h, w]: the layout the pipeline expects
        return mask, latents

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return super().decode_latents(latents[:, self._padding:])  # [B, F, C, h, w] without the padding
