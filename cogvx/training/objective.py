"""The CogVideoX training objective (shared/reference/training-objective.md), on diffusers' code.

v-prediction turned into an x0 prediction with the scheduler's ``get_velocity``, weighted by
1 / (1 - alphas_cumprod[t]), which equals plain v-prediction MSE. Rotary embeddings come from the
pipeline's own method, so training and generation use exactly the same positions.
"""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import torch

from cogvx.models.conditioning import CHANNEL_INPUTS
from cogvx.models.constants import VAE_SPATIAL_SCALE


def rotary_embeddings(transformer, height: int, width: int, latent_frames: int,
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Rotary (cos, sin) for a bucket, as the pipeline computes them; None for sincos models (2b)."""
    from diffusers import CogVideoXPipeline

    if not transformer.config.use_rotary_positional_embeddings:
        return None
    host = SimpleNamespace(transformer=transformer, vae_scale_factor_spatial=VAE_SPATIAL_SCALE)
    return CogVideoXPipeline._prepare_rotary_positional_embeddings(host, height, width, latent_frames, device)


class SampleRandom:
    """Random numbers drawn per sample, each from its own CPU generator seeded by (seed, position
    of the micro-batch in the data order, row of the sample in the global batch).

    A sample's latent draw, dropout, timestep and noise therefore depend neither on the batch
    size nor on how a global batch is split across processes: 2 processes with batch 1 draw what
    1 process with batch 2 draws, and a resumed run draws what an uninterrupted one would.
    """

    def __init__(self, seed: int, position: int, rows: range) -> None:
        self.generators = [torch.Generator().manual_seed(_row_seed(seed, position, row)) for row in rows]

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, shape: tuple[int, ...]) -> torch.Tensor:
        """Standard normal noise of ``shape`` per sample: [B, *shape]."""
        return torch.stack([torch.randn(shape, generator=g) for g in self.generators])

    def rand(self) -> torch.Tensor:
        """One uniform [0, 1) number per sample: [B]."""
        return torch.cat([torch.rand(1, generator=g) for g in self.generators])

    def randint(self, high: int) -> torch.Tensor:
        """One integer in [0, high) per sample: [B]."""
        return torch.cat([torch.randint(0, high, (1,), generator=g) for g in self.generators])


def _row_seed(seed: int, position: int, row: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{position}:{row}".encode()).digest()[:8], "little") >> 1


def diffusion_loss(transformer, scheduler, latents: torch.Tensor, prompt_embeds: torch.Tensor,
                   random: SampleRandom, rotary=None, extra_inputs: dict | None = None) -> torch.Tensor:
    """One training loss: noise clean latents [B, F, C, h, w] at random timesteps, predict, compare.

    ``random`` draws each sample's timestep and noise (on the CPU, so any device and any split
    of the batch across processes draws the same numbers); ``extra_inputs`` carries the latents
    concatenated after the noisy video along channels (image, control: CHANNEL_INPUTS) and ofs.
    """
    batch = latents.shape[0]
    steps = scheduler.config.num_train_timesteps
    timesteps = random.randint(steps).to(latents.device)
    noise = random.randn(tuple(latents.shape[1:])).to(latents.device, latents.dtype)  # [B, F, C, h, w]
    noisy = scheduler.add_noise(latents, noise, timesteps)  # [B, F, C, h, w]
    extra = dict(extra_inputs or {})
    channel_inputs = [extra.pop(name) for name in CHANNEL_INPUTS if name in extra]
    model_input = torch.cat([noisy, *channel_inputs], dim=2)  # [B, F, C x (1 + inputs), h, w]
    output = transformer(hidden_states=model_input.to(prompt_embeds.dtype), encoder_hidden_states=prompt_embeds,
                         timestep=timesteps, image_rotary_emb=rotary, return_dict=False, **extra)[0]
    predicted = scheduler.get_velocity(output.float(), noisy.float(), timesteps)  # x0 estimate
    alphas = scheduler.alphas_cumprod.to(latents.device)[timesteps].float()
    weights = (1.0 / (1.0 - alphas)).view(batch, 1, 1, 1, 1)  # [B, 1, 1, 1, 1]
    per_sample = (weights * (predicted - latents.float()) ** 2).reshape(batch, -1).mean(dim=1)  # [B]
    return per_sample.mean()
