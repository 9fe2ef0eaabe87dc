"""The model matrix: {t2v, i2v} x {1.0, 1.5} x {lora, full} in one loop, and its conditioning."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cogvx.config import load_config
from cogvx.generate import attach_lora
from cogvx.inference import render
from cogvx.models.conditioning import pad_to_temporal_patch
from cogvx.models.loader import load_pipeline
from cogvx.models.specs import TINY_VARIANTS, get_spec
from cogvx.training.inputs import model_inputs
from cogvx.training.loop import train
from cogvx.training.optim import build_optimizer
from cogvx.training.objective import SampleRandom, rotary_embeddings

ONE_STEP = ("train.max_steps=1", "validate.num_inference_steps=1", "train.lora.rank=4", "train.lora.alpha=4",
            "train.learning_rate=1e-3")


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    from cogvx.data.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("matrix") / "raw", 2, seed=2)


@pytest.fixture(scope="module")
def latents(clips, tiny_models, tmp_path_factory) -> dict[str, Path]:
    """Each tiny variant's latents, prepared once."""
    from cogvx.prepare import run_prepare

    root = tmp_path_factory.mktemp("matrix-latents")
    for variant in TINY_VARIANTS:
        run_prepare(load_config(None, overrides(variant, clips, tiny_models, root / variant)), log=lambda *_: None)
    return {variant: root / variant for variant in TINY_VARIANTS}


def overrides(variant, clips, tiny_models, latents_dir: Path, *extra: str) -> list[str]:
    return [f"model.variant={variant}", f"model.path={tiny_models[variant]}", f"data.data_root={clips}",
            f"prepare.output_dir={latents_dir}", "prepare.num_workers=0", "tracking.enabled=false", *extra]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.parametrize("variant", TINY_VARIANTS)
def test_every_cell_trains_loads_and_generates(variant, method, clips, tiny_models, latents, tmp_path):
    spec = get_spec(variant)
    config = load_config(None, overrides(variant, clips, tiny_models, latents[variant], *ONE_STEP,
                                         f"train.method={method}", f"train.output_dir={tmp_path}"))
    report = train(config, log=lambda *_: None)
    assert report.steps == 1 and np.isfinite(report.final_loss)
    weights = Path(report.weights)
    if method == "lora":
        pipe = load_pipeline(str(tiny_models[variant]), spec)
        attach_lora(pipe, weights, scale=1.0, log=lambda *_: None)
    else:
        assert (weights / "config.json").is_file() and list(weights.glob("*.safetensors"))
        pipe = load_pipeline(str(tiny_models[variant]), spec, transformer=weights)
        base = load_pipeline(str(tiny_models[variant]), spec).transformer.state_dict()
        tuned = pipe.transformer.state_dict()
        assert any(not torch.equal(base[k], tuned[k]) for k in base)
    video = render(pipe, "a green ring", frames=spec.frames, height=spec.height, width=spec.width,
                   steps=2, guidance_scale=1.0, seed=0)
    assert video.shape == (spec.frames, spec.height, spec.width, 3)


def batch_for(mean_frames: int, batch: int = 2) -> dict:
    """A deterministic posterior (logvar -30: std ~ 0) so sampled latents equal the mean."""
    mean = torch.arange(batch * mean_frames * 16 * 8 * 12, dtype=torch.float32).reshape(
        batch, mean_frames, 16, 8, 12) / 1000  # [B, F, C, h, w]
    return {"latent_mean": mean, "latent_logvar": torch.full_like(mean, -30.0),
            "image_latent_mean": mean[:, :1] + 1.0, "image_latent_logvar": torch.full_like(mean[:, :1], -30.0),
            "prompt_embeds": torch.ones(batch, 226, 32)}


@pytest.mark.parametrize("variant, frames, padded", [("tiny-i2v", 3, 3), ("tiny-1.5-i2v", 5, 6)])
def test_image_conditioning_shapes_padding_scaling_and_ofs(variant, frames, padded, tiny_models):
    from cogvx.models.loader import load_transformer

    spec = get_spec(variant)
    transformer = load_transformer(str(tiny_models[variant]), spec)
    config = load_config(None, [f"model.variant={variant}", "train.image_dropout=0"])
    batch = batch_for(frames)
    latents, prompt, extra = model_inputs(batch, config, transformer, 0.7, SampleRandom(0, 1, range(2)),
                                          torch.device("cpu"), torch.float32)
    image = extra["image_latents"]
    assert latents.shape == image.shape == (2, padded, 16, 8, 12)
    scale = 1 / 0.7 if spec.invert_scale_latents else 0.7  # 1.5: the pipeline's 1/scaling_factor
    expected_first = (batch["image_latent_mean"][:, 0]) * scale
    lead = padded - frames + 1  # 1.5 prepends a copy of the first frame, as the pipeline does
    for index in range(lead):
        torch.testing.assert_close(image[:, index], expected_first, rtol=1e-4, atol=1e-4)
    assert image[:, lead:].abs().sum() == 0
    torch.testing.assert_close(latents[:, padded - frames:], batch["latent_mean"] * 0.7, rtol=1e-4, atol=1e-4)
    if spec.generation == "1.5":
        torch.testing.assert_close(latents[:, 0], latents[:, 1])
        assert extra["ofs"].tolist() == [2.0, 2.0]
    else:
        assert "ofs" not in extra
    assert transformer(hidden_states=torch.cat([latents, image], dim=2), encoder_hidden_states=prompt,
                       timestep=torch.tensor([10, 20]), return_dict=False, **({"ofs": extra["ofs"]} if "ofs" in extra else {}),
                       image_rotary_emb=rotary_embeddings(transformer, 64, 96, padded, torch.device("cpu")))[0].shape == (2, padded, 16, 8, 12)


def test_padding_matches_the_pipeline_rule():
    latents = torch.randn(1, 5, 4, 2, 2)  # [B, F, C, h, w]
    padded = pad_to_temporal_patch(latents, 2)
    assert padded.shape[1] == 6 and torch.equal(padded[:, 0], latents[:, 0]) and torch.equal(padded[:, 1:], latents)
    assert pad_to_temporal_patch(latents[:, :4], 2).shape[1] == 4
    assert pad_to_temporal_patch(latents, None) is latents


def test_image_and_caption_dropout(tiny_models):
    from cogvx.models.loader import load_transformer

    transformer = load_transformer(str(tiny_models["tiny-i2v"]), get_spec("tiny-i2v"))
    config = load_config(None, ["model.variant=tiny-i2v", "train.image_dropout=1", "train.caption_dropout=1"])
    empty = torch.zeros(226, 32)
    _, prompt, extra = model_inputs(batch_for(3), config, transformer, 0.7, SampleRandom(0, 1, range(2)), torch.device("cpu"),
                                    torch.float32, empty)
    assert extra["image_latents"].abs().sum() == 0 and prompt.abs().sum() == 0


@pytest.mark.slow
def test_bucketed_batches_of_two_train_with_per_bucket_rotary(clips, tiny_models, tmp_path):
    from cogvx.prepare import run_prepare

    extra = ("data.buckets=[[9, 64, 96], [9, 96, 64]]", "train.batch_size=2", "train.max_steps=2",
             "validate.num_inference_steps=1", f"train.output_dir={tmp_path / 'run'}")
    config = load_config(None, overrides("tiny-t2v", clips, tiny_models, tmp_path / "latents", *extra))
    run_prepare(config, log=lambda *_: None)
    report = train(config, log=lambda *_: None)
    assert report.steps == 2
    transformer = load_pipeline(str(tiny_models["tiny-t2v"]), get_spec("tiny-t2v")).transformer
    cos, sin = rotary_embeddings(transformer, 96, 64, 3, torch.device("cpu"))
    assert cos.shape == sin.shape == (3 * 6 * 4, 16)  # [F * h/2 * w/2, head_dim] for a 96x64 bucket


@pytest.mark.parametrize("optimizer", ["adamw", "adam", "adamw8bit", "prodigy"])
def test_lr_follows_warmup_with_every_optimizer(optimizer):
    from diffusers.optimization import get_scheduler

    config = load_config(None, [f"train.optimizer={optimizer}", "train.learning_rate=0.01"])
    params = [torch.nn.Parameter(torch.randn(64))]
    opt = build_optimizer(params, config, torch.device("cpu"))
    scheduler = get_scheduler("linear", opt, num_warmup_steps=4, num_training_steps=8)
    seen = []
    for _ in range(6):
        params[0].square().sum().backward()
        opt.step()
        scheduler.step()
        opt.zero_grad()
        seen.append(round(opt.param_groups[0]["lr"], 6))
    assert seen == [0.0025, 0.005, 0.0075, 0.01, 0.0075, 0.005]


@pytest.mark.slow
def test_id_token_prefixes_every_caption(clips, tiny_models, tmp_path):
    from cogvx.data.latents import read_manifest
    from cogvx.prepare import run_prepare

    config = load_config(None, overrides("tiny-t2v", clips, tiny_models, tmp_path / "latents", "data.id_token=sks"))
    run_prepare(config, log=lambda *_: None)
    manifest = read_manifest(tmp_path / "latents")
    assert all(entry["caption"].startswith("sks ") for entry in manifest["entries"])
    assert manifest["empty_text_key"]


@pytest.mark.slow
def test_i2v_learned_positions_can_be_ignored_to_train_and_generate_at_other_sizes(clips, tiny_models, tmp_path):
    """tiny-i2v's learned positional embeddings fit 64x96 only (like 5b-I2V's 480x720)."""
    from cogvx.errors import CogvxError
    from cogvx.prepare import run_prepare

    other = ("data.buckets=[[9, 96, 64]]", f"train.output_dir={tmp_path / 'run'}", *ONE_STEP)
    config = load_config(None, overrides("tiny-i2v", clips, tiny_models, tmp_path / "latents", *other))
    run_prepare(config, log=lambda *_: None)
    with pytest.raises(CogvxError, match="fit 64x96 only, but buckets 9x96x64 differ; set train.ignore_learned"):
        train(config, log=lambda *_: None)
    ignoring = load_config(None, overrides("tiny-i2v", clips, tiny_models, tmp_path / "latents", *other,
                                           "train.ignore_learned_positional_embeddings=true"))
    report = train(ignoring, log=lambda *_: None)
    pipe = load_pipeline(str(tiny_models["tiny-i2v"]), get_spec("tiny-i2v"))
    attach_lora(pipe, Path(report.weights), scale=1.0, log=lambda *_: None)
    assert pipe.transformer.config.use_learned_positional_embeddings is False
    video = render(pipe, "a red star", frames=9, height=96, width=64, steps=2, guidance_scale=1.0, seed=0)
    assert video.shape == (9, 96, 64, 3)


@pytest.mark.parametrize("variant", ["tiny-i2v", "tiny-1.5-i2v"])
def test_training_conditioning_has_the_layout_the_pipeline_builds(variant, tiny_models):
    """Same frame count, same copied-first-frame / zero-frame pattern as diffusers' own
    CogVideoXImageToVideoPipeline.prepare_latents at inference."""
    spec = get_spec(variant)
    pipe = load_pipeline(str(tiny_models[variant]), spec)
    image = torch.rand(1, 3, spec.height, spec.width) * 2 - 1  # [B, C, H, W] in [-1, 1]
    noise, pipeline_image = pipe.prepare_latents(image, 1, 16, spec.frames, spec.height, spec.width,
                                                 torch.float32, torch.device("cpu"), torch.Generator().manual_seed(0))
    frames = (spec.frames - 1) // 4 + 1
    config = load_config(None, [f"model.variant={variant}", "train.image_dropout=0"])
    latents, _, extra = model_inputs(batch_for(frames, batch=1), config, pipe.transformer, 0.7,
                                     SampleRandom(0, 1, range(1)), torch.device("cpu"), torch.float32)
    ours = extra["image_latents"]
    assert ours.shape == pipeline_image.shape and latents.shape[1] == noise.shape[1]
    pattern = lambda t: [bool(t[:, i].abs().sum() > 0) for i in range(t.shape[1])]  # noqa: E731
    assert pattern(ours) == pattern(pipeline_image)
    copies = lambda t: [torch.equal(t[:, i], t[:, 0]) for i in range(t.shape[1])]  # noqa: E731
    assert copies(ours) == copies(pipeline_image)
