"""train.lora.kind: LoRA, DoRA, LoKr and LoHa adapters train, save, load the way `cogvx generate`
loads them, act at the asked strength and resume exactly, on the tiny model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cogvx.config import load_config
from cogvx.errors import CogvxError, ConfigError
from cogvx.generate import GenerateRequest, generation_pipeline, render_request
from cogvx.models.lora import add_lora, read_lora_metadata, trainable_state
from cogvx.training.checkpoint import list_checkpoints
from tests.helpers.training import base_overrides, cut_back_to_first_checkpoint, lora_tensors, run

KINDS = ["lora", "dora", "lokr", "loha"]
# A tensor name each kind's adapter must have (peft's parameter names).
KIND_TENSOR = {"lora": "lora_B", "dora": "lora_magnitude_vector", "lokr": "lokr_w1", "loha": "hada_w1_a"}
SMALL_RENDER = ("validate.num_inference_steps=2", "validate.frames=9", "validate.height=32", "validate.width=48",
                "validate.guidance_scale=1.0")
QUIET = {"log": lambda *_: None}


def kind_config(prepared, out: Path, kind: str, *extra: str):
    """A short, fast-learning run of ``kind`` into ``out`` on the ``prepared`` clips."""
    return load_config(None, [*base_overrides(prepared), f"train.output_dir={out}", f"train.lora.kind={kind}",
                              "train.max_steps=3", "train.learning_rate=1e-2", "train.checkpointing_steps=100",
                              *SMALL_RENDER, *extra])


def train_in_memory(config):
    """Set up and train ``config``'s run in this process, save its adapter like `cogvx train`
    does, and return (the run, the trainable tensors before training)."""
    from cogvx.training.loop import training_loop
    from cogvx.training.memory import MemoryMeter
    from cogvx.training.outputs import save_final
    from cogvx.training.setup import setup

    run_ = setup(config)
    before = {name: value.clone() for name, value in trainable_state(run_.model).items()}
    training_loop(run_, MemoryMeter(torch.device("cpu")), **QUIET)
    info = {"base_model": config.model_source, "variant": config.spec.key, "config": config.to_dict()}
    save_final(run_, Path(config.train.output_dir), info)
    return run_, before


def render(config, lora: Path | None = None, transformer=None, scale: float = 1.0) -> np.ndarray:
    """One clip rendered through `cogvx generate`'s code (its pipeline, its LoRA loading)."""
    request = GenerateRequest(prompt="a red circle", out=Path("unused.mp4"), lora=lora, lora_scale=scale)
    pipe, device = generation_pipeline(config, request, transformer_module=transformer, **QUIET)
    return render_request(pipe, config, request, device, **QUIET)


@pytest.mark.parametrize("kind", [pytest.param("lora", marks=pytest.mark.slow), "dora", "lokr", "loha"])
def test_kind_trains_saves_and_loads_like_the_trained_model(kind, prepared, tmp_path):
    config = kind_config(prepared, tmp_path / "run", kind)
    trained, before = train_in_memory(config)
    assert all(np.isfinite(loss) for _, loss in trained.state.losses)
    after = trainable_state(trained.model)
    assert any(KIND_TENSOR[kind] in name for name in after)
    assert all(not torch.equal(before[name], after[name]) for name in after)
    lora = tmp_path / "run" / "lora"
    meta = read_lora_metadata(lora / "pytorch_lora_weights.safetensors")
    assert (meta["kind"], meta["rank"], meta["alpha"]) == (kind, 8, 8)
    assert meta["cogvx"]["adapter_kind"] == kind
    trained.model.eval()
    in_memory = render(config, transformer=trained.model)
    loaded = render(config, lora=lora)
    assert np.array_equal(in_memory, loaded)
    base = render(config)
    assert np.abs(loaded.astype(int) - base.astype(int)).mean() > 0.1  # 3 steps of LoHa change the least
    if kind != "dora":  # DoRA's trained magnitude acts at any strength: scale 0 is not the base model
        assert np.array_equal(render(config, lora=lora, scale=0.0), base)


@pytest.mark.parametrize("kind", ["lokr", "loha"])
def test_lycoris_file_is_byte_reproducible(kind, prepared, tmp_path):
    from cogvx.models.lora import save_lora

    config = kind_config(prepared, tmp_path / "run", kind)
    trained, _ = train_in_memory(config)
    again = save_lora(trained.model, tmp_path / "again", {"variant": config.spec.key})
    first = save_lora(trained.model, tmp_path / "first", {"variant": config.spec.key})
    assert first.read_bytes() == again.read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_resumes_exactly(kind, prepared, tmp_path):
    settings = (f"train.lora.kind={kind}", "train.max_steps=4", "train.checkpointing_steps=2",
                "train.learning_rate=1e-3", *SMALL_RENDER)
    run(prepared, tmp_path / "straight", *settings)
    run(prepared, tmp_path / "resumed", *settings)
    cut_back_to_first_checkpoint(tmp_path / "resumed")
    resumed = run(prepared, tmp_path / "resumed", *settings, resume="latest")
    assert resumed.steps == 4 and resumed.resumed_from_step == 2
    straight, again = lora_tensors(tmp_path / "straight"), lora_tensors(tmp_path / "resumed")
    assert straight.keys() == again.keys() and any(KIND_TENSOR[kind] in name for name in straight)
    assert all(torch.equal(straight[k], again[k]) for k in straight)


def test_resume_refuses_a_checkpoint_of_another_kind(prepared, tmp_path):
    run(prepared, tmp_path / "run", "train.max_steps=1", "train.lora.kind=lokr", *SMALL_RENDER)
    saved = list_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    with pytest.raises(CogvxError, match="other training settings or data"):
        run(prepared, tmp_path / "run", "train.max_steps=1", "train.lora.kind=loha", *SMALL_RENDER,
            resume=str(saved))


@pytest.mark.parametrize("kind", ["lokr", "loha"])
def test_fp8_storage_keeps_lycoris_factors_trainable_in_float32(kind):
    from cogvx.models.build import build_transformer
    from cogvx.models.performance import Fp8StorageLinear, store_base_weights_in_fp8
    from cogvx.models.specs import get_spec

    torch.manual_seed(0)
    model = build_transformer(get_spec("tiny-t2v"))
    add_lora(model, 4, 4.0, ["to_q", "to_k", "to_v", "to_out.0"], kind=kind)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert store_base_weights_in_fp8(model, torch.float32) > 0
    layers = dict(model.named_modules())
    assert isinstance(layers["transformer_blocks.0.attn1.to_q.base_layer"], Fp8StorageLinear)
    params = dict(model.named_parameters())
    assert {name for name, p in params.items() if p.requires_grad} == trainable
    assert all(params[name].dtype == torch.float32 and KIND_TENSOR[kind].split("_")[0] in name for name in trainable)


def test_fp8_training_of_lycoris_runs(prepared, tmp_path):
    report = run(prepared, tmp_path / "run", "train.max_steps=2", "train.lora.kind=loha",
                 "train.fp8_base_weights=true", *SMALL_RENDER)
    assert report.steps == 2 and np.isfinite(report.final_loss)
    assert any("hada_w1_a" in name for name in lora_tensors(tmp_path / "run"))


@pytest.mark.parametrize("kind", ["lokr", "loha"])
def test_loaded_lycoris_adapter_fuses_and_refuses_another_base(kind, tiny_models, tmp_path):
    """validate.fp8_compute fuses the adapter into the base weights first (diffusers' fuse_lora,
    which merges peft's LyCORIS layers too): the fused model computes what the adapter did. A
    file recorded as trained on another kind of model is refused before peft loads anything."""
    from cogvx.generate import attach_lora
    from cogvx.models.loader import load_pipeline
    from cogvx.models.lora import save_lora
    from cogvx.models.specs import get_spec

    spec, generator = get_spec("tiny-t2v"), torch.manual_seed(0)
    trained = load_pipeline(str(tiny_models["tiny-t2v"]), spec).transformer
    add_lora(trained, 4, 4.0, ["to_q", "to_v"], kind=kind)
    with torch.no_grad():
        for param in trained.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)
    save_lora(trained, tmp_path / "lora", {"variant": spec.key})
    pipe = load_pipeline(str(tiny_models["tiny-t2v"]), spec)
    attach_lora(pipe, tmp_path / "lora", 0.7, spec=spec, **QUIET)
    latents, text = torch.randn(1, 3, 16, 8, 12, generator=generator), torch.randn(1, 7, 32, generator=generator)
    inputs = dict(hidden_states=latents, encoder_hidden_states=text, timestep=torch.tensor([500]))
    with torch.no_grad():
        adapted = pipe.transformer(**inputs).sample
        pipe.fuse_lora(components=["transformer"])
        pipe.unload_lora_weights()
        fused = pipe.transformer(**inputs).sample
    assert type(pipe.transformer.transformer_blocks[0].attn1.to_q) is torch.nn.Linear
    assert torch.allclose(adapted, fused, atol=1e-5)
    save_lora(trained, tmp_path / "other", {"variant": "tiny-i2v"})  # same shapes, another model
    fresh = load_pipeline(str(tiny_models["tiny-t2v"]), spec)
    with pytest.raises(CogvxError, match="was trained on tiny-i2v"):
        attach_lora(fresh, tmp_path / "other", 1.0, spec=spec, **QUIET)
    assert not getattr(fresh.transformer, "peft_config", None)  # refused before anything was loaded


def test_impossible_combinations_are_refused_with_the_fix():
    with pytest.raises(ConfigError, match="kind = dora.*fp8_base_weights = false"):
        load_config(None, ["train.lora.kind=dora", "train.fp8_base_weights=true"])
    with pytest.raises(ConfigError, match="kind = dora"):
        load_config(None, ["train.lora.kind=dora", "train.preset=balanced"])
    with pytest.raises(ConfigError, match="init = pissa.*kind = lokr.*gaussian"):
        load_config(None, ["train.lora.kind=lokr", "train.lora.init=pissa"])
    with pytest.raises(ConfigError, match="train.lora.kind"):
        load_config(None, ["train.lora.kind=ia3"])
    assert load_config(None, ["train.lora.kind=loha", "train.fp8_base_weights=true"]).train.lora.kind == "loha"


def test_files_without_a_kind_read_as_lora(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "old.safetensors"
    save_file({"transformer.x.lora_A.weight": torch.zeros(2, 2)}, str(path),
              metadata={"lora_adapter_metadata": '{"r": 2, "lora_alpha": 2}', "cogvx": '{"variant": "tiny-t2v"}'})
    assert read_lora_metadata(path)["kind"] == "lora"


@pytest.mark.slow
def test_loha_trains_and_generates_through_the_cli(run_cli, prepared, tmp_path):
    import decord

    out = tmp_path / "run"
    trained = run_cli("train", *base_overrides(prepared), f"train.output_dir={out}", "train.lora.kind=loha",
                      "train.max_steps=2", *SMALL_RENDER)
    assert trained.returncode == 0, trained.stderr
    result = run_cli("generate", "--prompt", "a blue square", "--weights", str(out / "lora"), "--frames", "9",
                     "--height", "32", "--width", "48", "--steps", "2", "--lora-scale", "0.5", "--out", "clip.mp4",
                     f"model.path={prepared['model']}")
    assert result.returncode == 0, result.stderr
    assert "LoHa rank 8, alpha 8: strength 0.5" in result.stdout
    assert len(decord.VideoReader(str(tmp_path / "clip.mp4"))) == 9
