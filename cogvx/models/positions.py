"""Learned positional embeddings (CogVideoX-5b-I2V): they only fit the size they were learned at.

Training at another size turns them off (rotary embeddings still give positions) and records that
in the saved config; generation with such a LoRA turns them off the same way, so it renders the
model that was trained.
"""

from __future__ import annotations

from cogvx.errors import CogvxError
from cogvx.models.constants import VAE_SPATIAL_SCALE


def ignore_learned_positions(transformer) -> None:
    """Stop adding the 5b-I2V positional embeddings learned for 480x720 (rotary still gives
    positions), so other sizes train; the saved config says so, for generation to match."""
    transformer.patch_embed.use_learned_positional_embeddings = False
    transformer.register_to_config(use_learned_positional_embeddings=False)
    transformer.patch_embed._non_persistent_buffers_set.add("pos_embedding")


def check_learned_positions(transformer, buckets) -> None:
    """Learned positional embeddings (5b-I2V) only fit their own size: say so before training."""
    cfg = transformer.config
    if not cfg.use_learned_positional_embeddings:
        return
    native = (cfg.sample_height * VAE_SPATIAL_SCALE, cfg.sample_width * VAE_SPATIAL_SCALE)
    other = sorted({str(b) for b in buckets if (b.height, b.width) != native})
    if other:
        raise CogvxError(f"this model's learned positional embeddings fit {native[0]}x{native[1]} only, "
                         f"but buckets {', '.join(other)} differ; set "
                         "train.ignore_learned_positional_embeddings=true to train at other sizes")
