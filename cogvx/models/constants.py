"""Fixed facts of the CogVideoX family's VAE and text encoder, named once.

Every CogVideoX checkpoint (1.0 and 1.5, 2b and 5b, and the tiny stand-ins) shares one VAE layout
and one T5 text length: the VAE turns 8 x 8 pixels into one latent of 16 channels and every 4
frames after the first into one latent frame; T5 reads 226 tokens. Code that has a loaded model's
config at hand reads these from it (vae.config, transformer.config); the names here serve where no
model is loaded: latent shapes and counts in a manifest, the text key of a caption, the rotary
positions of a training step.
"""

from __future__ import annotations

VAE_SPATIAL_SCALE = 8  # pixels per latent, each way (the pipeline's vae_scale_factor_spatial)
VAE_TEMPORAL_COMPRESSION = 4  # frames per latent frame after the first (vae temporal_compression_ratio)
VAE_LATENT_CHANNELS = 16  # channels of a latent (vae latent_channels)
MAX_TEXT_TOKENS = 226  # T5 tokens per caption (transformer max_text_seq_length)


def latent_frame_count(frames: int) -> int:
    """Latent frames the VAE makes of ``frames`` pixel frames: one for the first frame, then one
    per VAE_TEMPORAL_COMPRESSION frames (49 -> 13, 81 -> 21, 9 -> 3)."""
    return (frames - 1) // VAE_TEMPORAL_COMPRESSION + 1
