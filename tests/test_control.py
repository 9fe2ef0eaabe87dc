"""Control training (data.control) on the tiny text-to-video models, 1.0 and 1.5: the widened
input leaves the base model's render untouched at step 0, training on a control clip lowers the
loss and moves the control weights, the one saved file renders what the trained model renders,
the render follows the control, and the CLI and bad inputs behave."""

from __future__ import annotations

import hashlib
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cogvx.config import load_config
from cogvx.data.synthetic import make_synthetic_dataset
from cogvx.generate import GenerateRequest, generation_pipeline, render_request
from cogvx.inference import as_control_pipeline, control_frames, render, render_settings
from cogvx.models.control import ControlInput, widen_for_control
from cogvx.models.loader import load_pipeline
from cogvx.models.lora import add_lora, read_lora_metadata, trainable_state
from cogvx.models.specs import get_spec

QUIET = {"log": lambda *_: None}
SMALL = ("validate.num_inference_steps=2", "validate.height=32", "validate.width=48")  # frames: the model's rule
FRAMES = {"tiny-t2v": 9, "tiny-1.5-t2v": 17}
T2V = ["tiny-t2v", "tiny-1.5-t2v"]


@pytest.fixture(scope="module")
def control_data(tmp_path_factory) -> Path:
    """Three synthetic clips, each with a control video (control_videos.txt)."""
    return make_synthetic_dataset(tmp_path_factory.mktemp("control") / "raw", 3, seed=3, control=True)


def control_config(variant: str, model: Path, data: Path, out: Path, *extra: str):
    return load_config(None, [f"model.variant={variant}", f"model.path={model}", f"data.data_root={data}",
                              f"prepare.output_dir={out / 'latents'}", f"train.output_dir={out / 'run'}",
                              "prepare.num_workers=0", "tracking.enabled=false", "data.control=file",
                              "train.lora.rank=8", "train.lora.alpha=8", "train.learning_rate=1e-2",
                              "train.max_steps=3", "train.checkpointing_steps=100", *SMALL,
                              f"validate.frames={FRAMES[variant]}", *extra])


def frames_of(video: np.ndarray) -> list[Image.Image]:
    return [Image.fromarray(frame) for frame in video]


def noise_control(seed: int, frames: int = 9, height: int = 32, width: int = 48) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return frames_of(rng.integers(0, 256, (frames, height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("variant", T2V)
def test_widened_model_renders_the_base_model_exactly_until_trained(variant, tiny_models):
    spec = get_spec(variant)
    pipe = load_pipeline(str(tiny_models[variant]), spec)
    settings = dict(frames=9, height=32, width=48, steps=2, guidance_scale=6.0, seed=5)
    base = render(pipe, "a red circle", **settings)
    add_lora(pipe.transformer, 8, 8, list(spec.lora_target_modules))
    control_input = widen_for_control(pipe.transformer)
    assert isinstance(control_input, ControlInput) and pipe.transformer.config.in_channels == 32
    control = as_control_pipeline(pipe)
    # diffusers' control pipeline halves in_channels for the noise: the layout it was built for
    assert control.transformer.config.in_channels // 2 == spec.vae["latent_channels"]
    assert np.array_equal(render(control, "a red circle", control=noise_control(1), **settings), base)
    with torch.no_grad():
        control_input.control.weight.normal_(std=0.1)
    steered = render(control, "a red circle", control=noise_control(1), **settings)
    assert np.abs(steered.astype(int) - base.astype(int)).mean() > 0.5
    assert np.array_equal(render(control, "a red circle", control=noise_control(1), **settings), steered)
    other = render(control, "a red circle", control=noise_control(2), **settings)
    assert np.abs(other.astype(int) - steered.astype(int)).mean() > 0.5


def test_only_the_control_weights_train_beside_the_adapter_by_default(tiny_models):
    spec = get_spec("tiny-1.5-t2v")
    pipe = load_pipeline(str(tiny_models["tiny-1.5-t2v"]), spec)
    add_lora(pipe.transformer, 8, 8, list(spec.lora_target_modules))
    widen_for_control(pipe.transformer)
    trainable = set(trainable_state(pipe.transformer))
    assert "patch_embed.proj.control.weight" in trainable
    assert not any("patch_embed.proj.base" in name for name in trainable)
    assert all("lora" in name or name.startswith("patch_embed.proj.control") for name in trainable)


@pytest.fixture(scope="module")
def trained(control_data, tiny_models, tmp_path_factory):
    """A 1.5 control LoRA trained 3 steps in this process (file controls), saved like `cogvx train`."""
    from cogvx.prepare import run_prepare
    from cogvx.training.loop import control_record, training_loop
    from cogvx.training.memory import MemoryMeter
    from cogvx.training.outputs import save_final
    from cogvx.training.setup import setup

    out = tmp_path_factory.mktemp("control-run")
    config = control_config("tiny-1.5-t2v", tiny_models["tiny-1.5-t2v"], control_data, out)
    run_prepare(config, **QUIET)
    run = setup(config)
    base_input = run.model.patch_embed.proj.base.weight.detach().clone()
    training_loop(run, MemoryMeter(torch.device("cpu")), **QUIET)
    info = {"base_model": config.model_source, "variant": config.spec.key, **control_record(config)}
    save_final(run, Path(config.train.output_dir), info)
    run.model.eval()
    return {"config": config, "run": run, "base_input": base_input, "lora": out / "run" / "lora"}


def generate_with(config, lora: Path | None, control: Path | None = None, transformer=None, kind=None) -> np.ndarray:
    request = GenerateRequest(prompt="a red circle", out=Path("unused.mp4"), lora=lora, control=control,
                              control_kind=kind)
    pipe, device = generation_pipeline(config, request, transformer_module=transformer, **QUIET)
    return render_request(pipe, config, request, device, **QUIET)


def test_training_moves_the_control_weights_and_the_file_renders_like_the_trained_model(trained, control_data):
    config, run = trained["config"], trained["run"]
    control_input = run.model.patch_embed.proj
    assert control_input.control.weight.abs().sum() > 0
    assert torch.equal(control_input.base.weight, trained["base_input"])  # control_weights = new
    meta = read_lora_metadata(trained["lora"] / "pytorch_lora_weights.safetensors")
    assert meta["control"] == {"kind": "file", "channels": 16, "in_channels": 32, "weights": "new"}
    control = control_data / "controls" / "clip_001.mp4"
    loaded = generate_with(config, trained["lora"], control)
    # The trained model itself, in the same control pipeline: the saved file renders what it renders.
    size = render_settings(config)
    pipe = load_pipeline(str(config.model_source), config.spec, skip=("transformer",))
    pipe.transformer = run.model
    in_memory = render(as_control_pipeline(pipe), "a red circle", frames=size.frames, height=size.height,
                       width=size.width, steps=2, guidance_scale=config.validate_.guidance_scale,
                       seed=config.validate_.seed, control=control_frames(control, "file", size, config))
    assert np.abs(loaded.astype(int) - in_memory.astype(int)).max() <= 1
    assert np.array_equal(generate_with(config, trained["lora"], control), loaded)
    other = generate_with(config, trained["lora"], control_data / "controls" / "clip_002.mp4")
    assert not np.array_equal(other, loaded)


def test_the_control_lora_file_is_byte_reproducible(trained, tmp_path):
    from cogvx.models.lora import save_lora

    model, info = trained["run"].model, {"variant": "tiny-1.5-t2v", "control": {"kind": "file"}}
    first = save_lora(model, tmp_path / "a", info).read_bytes()
    again = save_lora(model, tmp_path / "b", info).read_bytes()
    assert hashlib.sha256(first).hexdigest() == hashlib.sha256(again).hexdigest()


def test_overfitting_a_control_clip_lowers_the_loss(trained):
    """The same sample, timestep and noise every step (one position of the data order): the
    control model fits it, and the control input's weights take part."""
    from cogvx.training.loop import optimizer_step

    run = trained["run"]
    run.model.train()
    batch = torch.utils.data.default_collate([run.dataset[0]])
    scaling = run.dataset.manifest["model"]["vae_scaling_factor"]
    same = itertools.repeat((1, 0, batch))
    control_before = run.model.patch_embed.proj.control.weight.detach().clone()
    losses = [optimizer_step(run, same, scaling)[0] for _ in range(12)]
    run.model.eval()
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.9 * losses[0], losses
    assert not torch.equal(run.model.patch_embed.proj.control.weight, control_before)


def test_generate_refuses_control_mismatches_before_loading(trained, control_data, tiny_models):
    from cogvx.errors import CogvxError

    config = trained["config"]
    plain = load_config(None, ["model.variant=tiny-1.5-t2v", f"model.path={tiny_models['tiny-1.5-t2v']}",
                               "tracking.enabled=false", "validate.frames=17", *SMALL])
    with pytest.raises(CogvxError, match="is a control model .* --control VIDEO"):
        generate_with(plain, trained["lora"])
    with pytest.raises(CogvxError, match="--control needs a control model"):
        generate_with(plain, None, control_data / "controls" / "clip_000.mp4")
    other = load_config(None, ["model.variant=tiny-t2v", f"model.path={tiny_models['tiny-t2v']}",
                               "tracking.enabled=false", "validate.frames=9", *SMALL])
    with pytest.raises(CogvxError, match="trained on tiny-1.5-t2v"):
        generate_with(other, trained["lora"], control_data / "controls" / "clip_000.mp4")
    # With data.control set, the config's first validation control is the default.
    assert generate_with(config, trained["lora"]).shape == (17, 32, 48, 3)


@pytest.mark.slow
def test_generate_cli_names_a_bad_control_video(run_cli, trained, tiny_models, control_data):
    """The DVC and flow tests run canny control through `cogvx prepare/train/generate`; here, a
    control video that does not exist, or is not a video, is one message and exit code 1."""
    common = ["model.variant=tiny-1.5-t2v", f"model.path={tiny_models['tiny-1.5-t2v']}", "tracking.enabled=false",
              *SMALL, "validate.frames=17"]
    missing = run_cli("generate", "--weights", str(trained["lora"]), "--control", "nope.mp4", *common)
    assert missing.returncode == 1 and "control video nope.mp4: file not found" in missing.stderr
    assert "Traceback" not in missing.stderr
    short = run_cli("generate", "--weights", str(trained["lora"]), "--frames", "33", "--control",
                    str(control_data / "controls" / "clip_000.mp4"), *common)
    assert short.returncode == 1 and "the render needs 33" in short.stderr and "Traceback" not in short.stderr


@pytest.mark.slow
def test_control_training_resumes_to_the_same_bytes(control_data, tiny_models, tmp_path):
    from cogvx.prepare import run_prepare
    from cogvx.training.loop import train
    from tests.helpers.training import cut_back_to_first_checkpoint

    def config(name: str):
        return control_config("tiny-t2v", tiny_models["tiny-t2v"], control_data, tmp_path, "train.max_steps=4",
                              "train.checkpointing_steps=2", "train.control_dropout=0.3",
                              "train.control_weights=all", f"train.output_dir={tmp_path / name}")

    run_prepare(config("straight"), **QUIET)
    train(config("straight"), **QUIET)
    train(config("resumed"), **QUIET)
    cut_back_to_first_checkpoint(tmp_path / "resumed")
    resumed = train(config("resumed"), resume="latest", **QUIET)
    assert resumed.resumed_from_step == 2 and resumed.steps == 4
    from safetensors.torch import load_file

    # The files differ in their recorded output_dir only: compare every tensor's bytes.
    straight, again = (load_file(str(tmp_path / name / "lora" / "pytorch_lora_weights.safetensors"))
                       for name in ("straight", "resumed"))
    assert straight.keys() == again.keys() and "transformer.patch_embed.proj.weight" in straight
    assert all(straight[key].numpy().tobytes() == again[key].numpy().tobytes() for key in straight)


def test_prepare_encodes_each_control_video_beside_its_clip(trained, control_data):
    from safetensors.torch import load_file

    from cogvx.data.latents import CONTROL_TENSORS, VIDEO_TENSORS, LatentDataset, LatentsError, read_manifest, video_file

    config = trained["config"]
    root = Path(config.prepare.output_dir)
    manifest = read_manifest(root)
    assert manifest["control"] == "file" and len(manifest["entries"]) == 3
    entry = manifest["entries"][0]
    assert entry["control"].endswith("controls/clip_000.mp4")
    tensors = load_file(str(video_file(root, entry["video_key"])))
    assert set(tensors) == {*VIDEO_TENSORS, *CONTROL_TENSORS}
    assert tensors[CONTROL_TENSORS[0]].shape == tensors[VIDEO_TENSORS[0]].shape  # [F, C, h, w]: frame for frame
    assert not torch.equal(tensors[CONTROL_TENSORS[0]], tensors[VIDEO_TENSORS[0]])
    # Latents prepared with controls are refused by a run without them (and the other way round).
    plain = config.model_copy(update={"data": config.data.model_copy(update={"control": "none"})})
    with pytest.raises(LatentsError, match="data.control: latents were prepared with 'file'"):
        LatentDataset(root, plain)


def test_control_content_keys_follow_the_control(trained, control_data, tmp_path):
    import shutil

    from cogvx.data.validation import validated_samples
    from cogvx.models.loader import resolve_source
    from cogvx.prepare import plan_samples

    config = trained["config"]
    folder = resolve_source(config.model_source, None, None, config.spec)

    def keys(cfg):
        report, samples = validated_samples(cfg, None)
        return [plan.video_key for plan in plan_samples(samples, report.infos, cfg, folder)]

    copy = tmp_path / "raw"
    shutil.copytree(control_data, copy)
    moved = config.model_copy(update={"data": config.data.model_copy(update={"data_root": copy})})
    before = keys(moved)
    import decord

    from cogvx.data.synthetic import write_mp4

    control = copy / "controls" / "clip_000.mp4"
    reader = decord.VideoReader(str(control))
    frames = reader.get_batch(list(range(len(reader)))).asnumpy()  # [F, H, W, 3]
    del reader
    write_mp4(control, frames[::-1].copy(), fps=8)  # the same shape and rate, played backwards
    after = keys(moved)
    assert after[0] != before[0] and after[1:] == before[1:]
    canny = moved.model_copy(update={"data": moved.data.model_copy(update={"control": "canny"})})
    assert set(keys(canny)).isdisjoint(after)


def test_the_registry_tags_a_control_model_with_its_kind(trained):
    from cogvx.tracking.registry import version_tags

    meta = read_lora_metadata(trained["lora"] / "pytorch_lora_weights.safetensors")
    tags = version_tags(meta, trained["config"])
    assert tags["control"] == "file" and tags["variant"] == "tiny-1.5-t2v" and tags["rank"] == "8"


@pytest.mark.slow
def test_a_control_video_is_sampled_cropped_and_flipped_exactly_like_its_clip(tiny_models, tmp_path):
    """Each clip listed as its own control, under random frame windows, random crops and flips:
    the control latents equal the clip's, tensor for tensor."""
    import shutil

    from safetensors.torch import load_file

    from cogvx.data.latents import CONTROL_TENSORS, VIDEO_TENSORS, read_manifest, video_file
    from cogvx.prepare import run_prepare

    raw = make_synthetic_dataset(tmp_path / "raw", 3, seed=8)
    shutil.copy(raw / "videos.txt", raw / "control_videos.txt")
    config = control_config("tiny-t2v", tiny_models["tiny-t2v"], raw, tmp_path, "data.resize_mode=random_crop",
                            "data.random_flip=0.5", "data.frame_sampling=random", "data.height=48",
                            "data.width=48", "data.frames=9")
    run_prepare(config, **QUIET)
    for entry in read_manifest(tmp_path / "latents")["entries"]:
        tensors = load_file(str(video_file(tmp_path / "latents", entry["video_key"])))
        for video_name, control_name in zip(VIDEO_TENSORS, CONTROL_TENSORS):
            assert torch.equal(tensors[video_name], tensors[control_name]), entry["video"]
