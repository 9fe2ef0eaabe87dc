"""Model specs (cogvx.models.specs) and the real-size architectures they describe."""

from __future__ import annotations

import pytest
import torch

from cogvx.errors import ConfigError
from cogvx.models.build import build_text_encoder, build_transformer, build_vae
from cogvx.models.specs import REAL_VARIANTS, SPECS, TINY_VARIANTS, get_spec, resolve_key

# Published parameter counts (shared/reference/cogvideox-models.md).
PARAMS_2B = 1_693_783_872
PARAMS_5B = 5_570_283_072


def test_registry_holds_the_family_and_four_tiny_stand_ins():
    assert set(REAL_VARIANTS) == {"cogvideox-2b", "cogvideox-5b", "cogvideox-5b-i2v",
                                  "cogvideox1.5-5b", "cogvideox1.5-5b-i2v"}
    assert set(TINY_VARIANTS) == {"tiny-t2v", "tiny-i2v", "tiny-1.5-t2v", "tiny-1.5-i2v"}
    hub_ids = {SPECS[key].hub_id for key in REAL_VARIANTS}
    assert hub_ids == {"THUDM/CogVideoX-2b", "THUDM/CogVideoX-5b", "THUDM/CogVideoX-5b-I2V",
                       "THUDM/CogVideoX1.5-5B", "THUDM/CogVideoX1.5-5B-I2V"}


@pytest.mark.parametrize("key", list(SPECS))
def test_specs_are_self_consistent(key):
    spec = SPECS[key]
    assert spec.frame_rule.accepts(spec.frames)
    assert spec.height % 16 == 0 and spec.width % 16 == 0
    arch = spec.transformer
    assert arch["in_channels"] == (32 if spec.task == "i2v" else 16)
    assert (arch.get("patch_size_t") == 2) == (spec.generation == "1.5")
    assert spec.invert_scale_latents == (spec.generation == "1.5")
    assert (spec.frame_rule.multiple == 16) == (spec.generation == "1.5")
    assert spec.pipeline_class == ("CogVideoXImageToVideoPipeline" if spec.task == "i2v" else "CogVideoXPipeline")
    if arch.get("use_rotary_positional_embeddings"):
        assert arch["attention_head_dim"] % 16 == 0
    if "ofs_embed_dim" in arch:
        assert arch["ofs_embed_dim"] == arch["time_embed_dim"]
    assert arch["text_embed_dim"] == spec.text_encoder["d_model"]


def test_lookup_by_key_or_hub_id_in_any_case():
    assert resolve_key("THUDM/CogVideoX-5b-I2V") == "cogvideox-5b-i2v"
    assert resolve_key("thudm/cogvideox1.5-5b") == "cogvideox1.5-5b"
    assert get_spec("Tiny-T2V").key == "tiny-t2v"
    with pytest.raises(ConfigError, match="unknown model variant 'CogVideoX-9b'; known variants: cogvideox-2b"):
        get_spec("CogVideoX-9b")


def test_frame_rules():
    rule_10, rule_15 = get_spec("cogvideox-5b").frame_rule, get_spec("cogvideox1.5-5b").frame_rule
    assert [f for f in range(1, 60) if rule_10.accepts(f)] == list(range(5, 60, 4))
    assert [f for f in range(1, 170) if rule_15.accepts(f)] == [17, 33, 49, 65, 81, 97, 113, 129, 145, 161]
    assert rule_10.nearest(50) == (49, 53) and rule_15.nearest(80) == (65, 81)
    assert (str(rule_10), str(rule_15)) == ("4k+1", "16N+1")


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("key, expected", [
    ("cogvideox-2b", PARAMS_2B), ("cogvideox-5b", PARAMS_5B), ("cogvideox-5b-i2v", PARAMS_5B),
    ("cogvideox1.5-5b", PARAMS_5B), ("cogvideox1.5-5b-i2v", PARAMS_5B),
])
def test_real_size_transformers_match_the_published_sizes(key, expected):
    """Built on the meta device: the full architecture, no memory."""
    model = build_transformer(get_spec(key), device="meta")
    assert abs(count(model) - expected) / expected < 0.001
    if key in ("cogvideox-2b", "cogvideox-5b"):
        assert count(model) == expected


def test_real_size_vae_and_t5():
    spec = get_spec("cogvideox-5b")
    vae = build_vae(spec, device="meta")
    assert 210e6 < count(vae) < 220e6 and vae.config.scaling_factor == 0.7
    assert build_vae(get_spec("cogvideox1.5-5b"), device="meta").config.invert_scale_latents
    assert abs(count(build_text_encoder(spec, vocab_size=32128, device="meta")) - 4.76e9) < 0.01e9


@pytest.mark.gpu
def test_real_size_2b_transformer_on_gpu_in_bf16():
    model = build_transformer(get_spec("cogvideox-2b"), dtype=torch.bfloat16, device="cuda")
    assert next(model.parameters()).device.type == "cuda"
    assert next(model.parameters()).dtype == torch.bfloat16
    assert abs(torch.cuda.memory_allocated() / 2**30 - 3.15) < 0.2
