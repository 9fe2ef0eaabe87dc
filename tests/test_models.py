"""Tiny pipelines: built in the diffusers layout, loaded by the same code as real checkpoints."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from cogvx.models.build import build_pipeline, save_tiny_pipeline
from cogvx.models.loader import load_pipeline, load_transformer
from cogvx.models.constants import MAX_TEXT_TOKENS
from cogvx.errors import CogvxError
from cogvx.models.specs import TINY_VARIANTS, get_spec

LAYOUT = {"model_index.json", "transformer", "vae", "text_encoder", "tokenizer", "scheduler"}


def transformer_inputs(config, seed: int = 0) -> dict:
    """Random inputs at the transformer's own sample size; 2 latent frames for patch_size_t=2."""
    gen = torch.Generator().manual_seed(seed)
    frames = 2 if config.patch_size_t else (config.sample_frames - 1) // 4 + 1
    latents = torch.randn(1, frames, config.in_channels, config.sample_height, config.sample_width,
                          generator=gen)  # [B, F, C, H, W]
    inputs = dict(hidden_states=latents,
                  encoder_hidden_states=torch.randn(1, MAX_TEXT_TOKENS, config.text_embed_dim, generator=gen),
                  timestep=torch.tensor([500]), return_dict=False)
    if config.ofs_embed_dim:
        inputs["ofs"] = torch.full((1,), 2.0)
    return inputs


@pytest.mark.parametrize("variant", TINY_VARIANTS)
def test_saved_layout_is_the_diffusers_one(tiny_models, variant):
    folder = tiny_models[variant]
    assert LAYOUT <= {p.name for p in folder.iterdir()}
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == get_spec(variant).pipeline_class
    assert index["tokenizer"] == ["transformers", "T5Tokenizer"]
    assert list(folder.glob("**/*.bin")) == [] and list(folder.glob("**/*.pt")) == []
    assert len(list(folder.glob("**/*.safetensors"))) == 3


@pytest.mark.parametrize("variant", TINY_VARIANTS)
def test_loaded_transformer_computes_what_the_built_one_did(tiny_models, variant):
    spec = get_spec(variant)
    built = build_pipeline(variant, seed=0).transformer.eval()
    pipe = load_pipeline(str(tiny_models[variant]), spec)
    loaded = pipe.transformer.eval()
    assert type(pipe).__name__ == spec.pipeline_class
    inputs = transformer_inputs(loaded.config)
    with torch.no_grad():
        expected, actual = built(**inputs)[0], loaded(**inputs)[0]
    assert actual.shape == inputs["hidden_states"][:, :, :16].shape
    assert torch.isfinite(actual).all() and actual.abs().sum() > 0
    # Same bits in every weight; outputs equal up to fp32 kernel-choice noise (memory alignment).
    built_state, loaded_state = built.state_dict(), loaded.state_dict()
    assert built_state.keys() == loaded_state.keys()
    assert all(torch.equal(built_state[key], loaded_state[key]) for key in built_state)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", TINY_VARIANTS)
def test_architecture_facts_come_from_the_loaded_config(tiny_models, variant):
    spec = get_spec(variant)
    config = load_transformer(str(tiny_models[variant]), spec).config
    assert config.use_rotary_positional_embeddings
    assert (config.patch_size_t == 2) == (spec.generation == "1.5")
    assert (config.ofs_embed_dim is not None) == (spec.generation == "1.5" and spec.task == "i2v")
    assert config.use_learned_positional_embeddings == (variant == "tiny-i2v")
    vae_config = json.loads((tiny_models[variant] / "vae" / "config.json").read_text())
    assert vae_config["scaling_factor"] == spec.vae_scaling_factor
    assert vae_config.get("invert_scale_latents", False) == spec.invert_scale_latents


def test_tokenizer_pads_to_226_with_t5_ids(tiny_models):
    pipe = load_pipeline(str(tiny_models["tiny-t2v"]), get_spec("tiny-t2v"))
    tok = pipe.tokenizer
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert "<extra_id_0>" in tok.get_vocab() and "<extra_id_99>" in tok.get_vocab()
    ids = tok("a red circle bouncing", padding="max_length", max_length=MAX_TEXT_TOKENS,
              truncation=True).input_ids
    assert len(ids) == MAX_TEXT_TOKENS and 1 in ids and ids[-1] == 0
    assert tok.decode(ids, skip_special_tokens=True).strip() == "a red circle bouncing"
    embeds, _ = pipe.encode_prompt("a red circle bouncing", do_classifier_free_guidance=False)
    assert embeds.shape == (1, MAX_TEXT_TOKENS, pipe.transformer.config.text_embed_dim)  # [B, L, D]


def folder_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_build_is_reproducible_byte_for_byte(tiny_models, tmp_path):
    """Same seed, same files: DVC sees an unchanged output when it rebuilds the tiny model."""
    again = save_tiny_pipeline("tiny-t2v", tmp_path / "again", seed=0)
    assert folder_digest(again) == folder_digest(tiny_models["tiny-t2v"])
    other = save_tiny_pipeline("tiny-t2v", tmp_path / "other", seed=1)
    assert folder_digest(other) != folder_digest(again)


def test_save_refuses_to_clobber_and_leaves_no_staging(tmp_path):
    target = save_tiny_pipeline("tiny-t2v", tmp_path / "m")
    with pytest.raises(CogvxError, match="already exists; pass --overwrite"):
        save_tiny_pipeline("tiny-t2v", target)
    save_tiny_pipeline("tiny-t2v", target, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_real_variants_are_not_built_as_pipelines():
    with pytest.raises(CogvxError, match="full-size model"):
        build_pipeline("cogvideox-5b")
