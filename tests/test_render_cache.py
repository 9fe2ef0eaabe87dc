"""validate.cache: diffusers' caching hooks on the tiny model's renders (cogvx generate and
in-training validation). Each kind renders close to, but not exactly, the uncached clip; a
first-block threshold nothing passes renders the same clip; validation gives the training
transformer back without a hook; FasterCache on compiled blocks is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cogvx.config import load_config
from cogvx.errors import CogvxError, ConfigError
from cogvx.generate import GenerateRequest, generation_pipeline, render_request
from cogvx.inference import apply_render_cache, relative_difference, remove_render_cache
from cogvx.models.loader import load_transformer
from cogvx.models.specs import get_spec
from cogvx.training.validation import render_validation

STEPS = 8  # the caches skip work only after a few steps
# The tiny model's random first block changes its output by 0.2-0.45 (relative) from step to
# step: 0.35 lets first-block cache skip some steps, 1e-6 none.
SKIPPING_THRESHOLD = 0.35


def tiny_config(model, *extra: str):
    return load_config(None, ["model.variant=tiny-t2v", f"model.path={model}", f"validate.num_inference_steps={STEPS}",
                              "tracking.enabled=false", *extra])


def generated(model, tmp_path, *extra: str) -> np.ndarray:
    """The frames `cogvx generate` renders with ``extra`` overrides."""
    config = tiny_config(model, *extra)
    request = GenerateRequest(prompt="a red circle", out=tmp_path / "clip.mp4")
    pipe, device = generation_pipeline(config, request, log=lambda *_: None)
    return render_request(pipe, config, request, device, log=lambda *_: None)


def validation_clips(model, transformer, out, *extra: str, device: str = "cpu") -> list[np.ndarray]:
    """The frames in-training validation renders with ``transformer`` and ``extra`` overrides."""
    clips = []
    render_validation(tiny_config(model, *extra), model, transformer, 1, out, torch.device(device), torch.float32,
                      writer=lambda frames, path, fps: clips.append(frames) or path)
    return clips


@pytest.fixture(scope="module")
def uncached(tiny_models, tmp_path_factory) -> np.ndarray:
    return generated(tiny_models["tiny-t2v"], tmp_path_factory.mktemp("uncached"))


@pytest.fixture(scope="module")
def uncached_validation(tiny_models, tmp_path_factory) -> np.ndarray:
    model = tiny_models["tiny-t2v"]
    return validation_clips(model, load_transformer(str(model), get_spec("tiny-t2v")), tmp_path_factory.mktemp("val"))[0]


@pytest.mark.parametrize("kind", ["first_block", "pyramid_broadcast", "faster"])
def test_each_cache_renders_close_to_the_uncached_clip(tiny_models, uncached, tmp_path, kind):
    cached = generated(tiny_models["tiny-t2v"], tmp_path, f"validate.cache={kind}",
                       f"validate.cache_threshold={SKIPPING_THRESHOLD}")
    assert cached.shape == uncached.shape
    assert 0.0 < relative_difference(cached, uncached) < 0.05


def test_faster_cache_without_guidance_reuses_attention_only(tiny_models, tmp_path):
    """At guidance_scale 1 the pipeline builds no [uncond, cond] batch for FasterCache to split."""
    plain = generated(tiny_models["tiny-t2v"], tmp_path, "validate.guidance_scale=1.0")
    cached = generated(tiny_models["tiny-t2v"], tmp_path, "validate.guidance_scale=1.0", "validate.cache=faster")
    assert 0.0 < relative_difference(cached, plain) < 0.05


def test_a_threshold_nothing_passes_renders_the_uncached_clip(tiny_models, uncached, tmp_path):
    cached = generated(tiny_models["tiny-t2v"], tmp_path, "validate.cache=first_block", "validate.cache_threshold=1e-6")
    assert np.array_equal(cached, uncached)


def transformer_inputs(transformer) -> dict[str, torch.Tensor]:
    """Fixed inputs at the transformer's sample size (latent frames, height, width)."""
    c = transformer.config
    generator = torch.Generator().manual_seed(0)
    frames = (c.sample_frames - 1) // c.temporal_compression_ratio + 1
    return dict(hidden_states=torch.randn(1, frames, c.in_channels, c.sample_height, c.sample_width, generator=generator),
                encoder_hidden_states=torch.randn(1, 8, c.text_embed_dim, generator=generator),
                timestep=torch.tensor([500]))


def hooked_modules(transformer) -> list[str]:
    """Modules that still carry a diffusers hook or an instance forward in place of their class's."""
    return [name for name, module in transformer.named_modules()
            if getattr(module, "_diffusers_hook", None) is not None and module._diffusers_hook.hooks
            or "forward" in vars(module)]


@pytest.mark.parametrize("kind", ["first_block", "pyramid_broadcast", "faster"])
def test_validation_gives_the_training_transformer_back_unchanged(tiny_models, uncached_validation, tmp_path, kind):
    model = tiny_models["tiny-t2v"]
    transformer = load_transformer(str(model), get_spec("tiny-t2v")).train()
    inputs = transformer_inputs(transformer)
    with torch.no_grad():
        before = transformer(**inputs, return_dict=False)[0]
    clips = validation_clips(model, transformer, tmp_path, f"validate.cache={kind}",
                             f"validate.cache_threshold={SKIPPING_THRESHOLD}", "validate.prompts=[a red circle, a blue square]")
    assert len(clips) == 2 and 0.0 < relative_difference(clips[0], uncached_validation) < 0.05  # the cache was on
    assert transformer.training and not transformer.is_cache_enabled and hooked_modules(transformer) == []
    with torch.no_grad():
        after = transformer(**inputs, return_dict=False)[0]
    assert torch.equal(after, before)


@pytest.mark.slow
def test_first_block_and_pyramid_caches_render_the_same_on_compiled_blocks(tiny_models, tmp_path):
    """train.compile = blocks: the hooks run inside each compiled block (graph breaks at their
    decisions) and render what they render eagerly; the blocks come back without a hook."""
    from cogvx.models.performance import compile_blocks

    model, spec = tiny_models["tiny-t2v"], get_spec("tiny-t2v")
    compiled = load_transformer(str(model), spec)
    compile_blocks(compiled)
    for kind in ("first_block", "pyramid_broadcast"):
        extra = (f"validate.cache={kind}", f"validate.cache_threshold={SKIPPING_THRESHOLD}")
        eager = validation_clips(model, load_transformer(str(model), spec), tmp_path, *extra)[0]
        assert relative_difference(validation_clips(model, compiled, tmp_path, *extra)[0], eager) < 1e-3
        assert not compiled.is_cache_enabled and hooked_modules(compiled) == []


@pytest.mark.gpu
def test_faster_cache_survives_model_offload_across_prompts(tiny_models, tmp_path):
    """validate.offload = model: the pipeline takes accelerate's hooks off and puts them back
    after every prompt; FasterCache, under them, still skips the second prompt's unconditional
    branch (were its hook lost, its attention hooks would skip nothing and the clip would be
    the uncached one), and the transformer comes back on the GPU, unhooked, computing the same."""
    model, spec = tiny_models["tiny-t2v"], get_spec("tiny-t2v")
    prompts = ("validate.offload=model", "validate.prompts=[a red circle, a blue square]")
    plain = validation_clips(model, load_transformer(str(model), spec).cuda(), tmp_path, *prompts, device="cuda")
    transformer = load_transformer(str(model), spec).cuda().train()
    inputs = {name: value.cuda() for name, value in transformer_inputs(transformer).items()}
    with torch.no_grad():
        before = transformer(**inputs, return_dict=False)[0]
    cached = validation_clips(model, transformer, tmp_path, *prompts, "validate.cache=faster", device="cuda")
    assert all(0.0 < relative_difference(c, p) < 0.05 for c, p in zip(cached, plain))
    assert not transformer.is_cache_enabled and hooked_modules(transformer) == []
    with torch.no_grad():
        assert torch.equal(transformer(**inputs, return_dict=False)[0], before)


def test_faster_cache_with_compiled_blocks_is_refused(tiny_models):
    model = tiny_models["tiny-t2v"]
    for compile_option, named in (("validate.compile=true", "validate.compile = true"),
                                  ("train.compile=blocks", "train.compile = blocks")):
        with pytest.raises(ConfigError, match=f"{named} does not go with validate.cache = faster"):
            tiny_config(model, "validate.cache=faster", compile_option)
    transformer = load_transformer(str(model), get_spec("tiny-t2v"))
    for block in transformer.transformer_blocks:
        block.compile(dynamic=False)  # compiles lazily, at the first call: nothing runs here
    with pytest.raises(CogvxError, match="validate.cache = faster cannot render with torch.compile'd"):
        apply_render_cache(transformer, tiny_config(model, "validate.cache=faster"), lambda: None, 6.0)
    remove_render_cache(transformer)
    assert not transformer.is_cache_enabled and hooked_modules(transformer) == []


def test_relative_difference():
    b = np.array([3.0, 4.0])
    assert relative_difference(b, b) == 0.0
    assert relative_difference(np.array([3.0, 5.0]), b) == pytest.approx(0.2)
    assert relative_difference(torch.tensor([3.0, 5.0], dtype=torch.bfloat16), torch.tensor(b)) == pytest.approx(0.2)
    assert relative_difference(np.zeros(2), np.zeros(2)) == 0.0
    with pytest.raises(ValueError, match="shapes"):
        relative_difference(np.zeros(2), np.zeros(3))


def test_fp8_render_with_offload_hooks_is_refused_before_loading(tiny_models):
    """torchao's fp8 weights cannot be moved by the offload hooks (a crash at the first move on a
    GPU): the combination is a config error naming the way out."""
    model = tiny_models["tiny-t2v"]
    for offload in ("model", "sequential"):
        with pytest.raises(ConfigError, match=f"validate.offload = {offload}: .* set validate.offload = text_encoder"):
            tiny_config(model, "validate.fp8_compute=true", f"validate.offload={offload}")
    assert tiny_config(model, "validate.fp8_compute=true", "validate.offload=none").validate_.fp8_compute


@pytest.mark.slow
def test_compiled_vae_decoder_renders_the_uncached_clip(tiny_models, uncached, tmp_path):
    """validate.compile_vae (not a cache, a render option beside them): the pipeline's decoder
    is compiled, and decodes what the eager one does up to the rounding of fused kernels."""
    config = tiny_config(tiny_models["tiny-t2v"], "validate.compile_vae=true")
    request = GenerateRequest(prompt="a red circle", out=tmp_path / "clip.mp4")
    pipe, device = generation_pipeline(config, request, log=lambda *_: None)
    assert pipe.vae.decoder._compiled_call_impl is not None
    compiled = render_request(pipe, config, request, device, log=lambda *_: None)
    assert relative_difference(compiled, uncached) < 1e-3
