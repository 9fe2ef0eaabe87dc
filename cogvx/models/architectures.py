"""Architecture kwargs of the CogVideoX family and of the project's tiny stand-ins.

The real values are the published configs (see shared/reference/cogvideox-models.md); they are
used to build real-size models with random weights on machines that cannot download checkpoints.
The tiny values keep every architectural feature of the real ones (rotary embeddings, learned
positional embeddings, patch_size_t, ofs) at a size that runs on a CPU in milliseconds.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Mapping

from cogvx.models.constants import MAX_TEXT_TOKENS, VAE_TEMPORAL_COMPRESSION


def _frozen(**kwargs: Any) -> Mapping[str, Any]:
    return MappingProxyType(dict(kwargs))


_COMMON = dict(
    attention_head_dim=64, out_channels=16, time_embed_dim=512, text_embed_dim=4096,
    max_text_seq_length=MAX_TEXT_TOKENS, temporal_compression_ratio=VAE_TEMPORAL_COMPRESSION, patch_size=2,
    attention_bias=True,
    activation_fn="gelu-approximate", timestep_activation_fn="silu", flip_sin_to_cos=True,
    freq_shift=0, norm_elementwise_affine=True, norm_eps=1e-5, dropout=0.0,
    spatial_interpolation_scale=1.875, temporal_interpolation_scale=1.0,
)
_TX_2B = dict(_COMMON, num_attention_heads=30, num_layers=30, in_channels=16, sample_frames=49,
              sample_height=60, sample_width=90, use_rotary_positional_embeddings=False)
_TX_5B = dict(_TX_2B, num_attention_heads=48, num_layers=42, use_rotary_positional_embeddings=True)
_TX_5B_I2V = dict(_TX_5B, in_channels=32, use_learned_positional_embeddings=True)
_TX_15_5B = dict(_COMMON, num_attention_heads=48, num_layers=42, in_channels=16, patch_size_t=2,
                 patch_bias=False, sample_frames=81, sample_height=300, sample_width=300,
                 use_rotary_positional_embeddings=True, use_learned_positional_embeddings=False)
_TX_15_5B_I2V = dict(_TX_15_5B, in_channels=32, ofs_embed_dim=512)

TRANSFORMER_2B = _frozen(**_TX_2B)
TRANSFORMER_5B = _frozen(**_TX_5B)
TRANSFORMER_5B_I2V = _frozen(**_TX_5B_I2V)
TRANSFORMER_15_5B = _frozen(**_TX_15_5B)
TRANSFORMER_15_5B_I2V = _frozen(**_TX_15_5B_I2V)

VAE = _frozen(
    in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 512), latent_channels=16,
    layers_per_block=3, act_fn="silu", norm_eps=1e-6, norm_num_groups=32,
    temporal_compression_ratio=VAE_TEMPORAL_COMPRESSION, sample_height=480, sample_width=720, force_upcast=True,
    use_quant_conv=False, use_post_quant_conv=False,
    down_block_types=("CogVideoXDownBlock3D",) * 4, up_block_types=("CogVideoXUpBlock3D",) * 4,
)

T5_XXL = _frozen(
    d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128,
    feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", relative_attention_num_buckets=32,
    relative_attention_max_distance=128, layer_norm_epsilon=1e-6, is_encoder_decoder=False,
)

SCHEDULER = _frozen(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="v_prediction", rescale_betas_zero_snr=True, set_alpha_to_one=True,
    clip_sample=False, timestep_spacing="trailing", steps_offset=0,
)

# Tiny stand-ins. Rotary embeddings need attention_head_dim % 16 == 0; text_embed_dim must equal
# the tiny T5's d_model; the 1.5 I2V ofs_embed_dim must equal time_embed_dim. sample_* match the
# tiny default clip (9 or 17 frames x 64 x 96) so learned positional embeddings fit it.
_TINY = dict(
    _COMMON, num_attention_heads=2, attention_head_dim=16, time_embed_dim=32, text_embed_dim=32,
    num_layers=2, in_channels=16,
)
_TINY_T2V = dict(_TINY, sample_frames=9, sample_height=8, sample_width=12,
                 use_rotary_positional_embeddings=True)
_TINY_I2V = dict(_TINY_T2V, in_channels=32, use_learned_positional_embeddings=True)
_TINY_15_T2V = dict(_TINY, patch_size_t=2, patch_bias=False, sample_frames=17, sample_height=8,
                    sample_width=12, use_rotary_positional_embeddings=True,
                    use_learned_positional_embeddings=False)
_TINY_15_I2V = dict(_TINY_15_T2V, in_channels=32, ofs_embed_dim=32)

TINY_TRANSFORMER_T2V = _frozen(**_TINY_T2V)
TINY_TRANSFORMER_I2V = _frozen(**_TINY_I2V)
TINY_TRANSFORMER_15_T2V = _frozen(**_TINY_15_T2V)
TINY_TRANSFORMER_15_I2V = _frozen(**_TINY_15_I2V)

# Leave sample_height/width at the real defaults: tiny values make tiny tiles and break tiling.
TINY_VAE = _frozen(**{
    **VAE, "block_out_channels": (16, 16, 32, 32), "layers_per_block": 1, "norm_num_groups": 4,
})

TINY_T5 = _frozen(
    d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2, feed_forward_proj="gated-gelu",
    dense_act_fn="gelu_new", relative_attention_num_buckets=8, relative_attention_max_distance=32,
    layer_norm_epsilon=1e-6, is_encoder_decoder=False,
)
