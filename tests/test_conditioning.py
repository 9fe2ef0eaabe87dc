"""The per-task conditioning object, the latents format it writes through, and the one render-size rule."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

from cogvx.config import load_config
from cogvx.data.buckets import Bucket
from cogvx.data.latents import (IMAGE_TENSORS, MANIFEST_FORMAT, TEXT_TENSORS, VIDEO_TENSORS, LatentDataset,
                                build_manifest, manifest_entry, prune_unreferenced, read_manifest, save_tensors,
                                text_file, video_file, write_manifest)
from cogvx.inference import render_settings
from cogvx.models.conditioning import ImageToVideo, TextToVideo, conditioning_for
from cogvx.models.constants import latent_frame_count
from cogvx.models.specs import TINY_VARIANTS, get_spec


@pytest.fixture(scope="module")
def one_clip(tmp_path_factory) -> Path:
    from cogvx.data.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("conditioning") / "raw", 1, seed=4)


@pytest.mark.slow
@pytest.mark.parametrize("variant", TINY_VARIANTS)
def test_prepare_writes_exactly_the_tensors_the_conditioning_names(variant, one_clip, tiny_models, tmp_path):
    from cogvx.prepare import run_prepare

    spec = get_spec(variant)
    conditioning = conditioning_for(spec)
    assert isinstance(conditioning, ImageToVideo if spec.task == "i2v" else TextToVideo)
    assert conditioning.video_tensors == VIDEO_TENSORS + (IMAGE_TENSORS if spec.task == "i2v" else ())
    config = load_config(None, [f"model.variant={variant}", f"model.path={tiny_models[variant]}",
                                f"data.data_root={one_clip}", f"prepare.output_dir={tmp_path}",
                                "prepare.num_workers=0"])
    run_prepare(config, log=lambda *_: None)
    entry = read_manifest(tmp_path)["entries"][0]
    with safe_open(str(video_file(tmp_path, entry["video_key"])), framework="pt") as handle:
        assert set(handle.keys()) == set(conditioning.video_tensors)
        assert handle.metadata() == {"format": MANIFEST_FORMAT}
    assert entry["latent_frames"] == latent_frame_count(spec.frames) == spec.latent_frames
    dataset = LatentDataset(tmp_path, config)
    assert dataset.conditioning == conditioning and dataset.has_images == conditioning.makes_image


def test_content_key_fields_and_first_frame_pixels():
    data = load_config(None, ["data.image_noise=false"]).data
    video = torch.rand(9, 3, 64, 96) * 2 - 1  # [F, C, H, W]
    plan = SimpleNamespace(image=None, control=None, bucket=Bucket(9, 64, 96), crop_seed=0)
    unread = lambda path: pytest.fail(f"read {path}")  # noqa: E731: no other video is read here
    assert TextToVideo().key_fields(plan, data) == {"image": None, "image_noise": None}
    assert TextToVideo().make_pixels(video, plan, data, unread) == {}
    image_to_video = conditioning_for(get_spec("tiny-1.5-i2v"))
    assert image_to_video == ImageToVideo(invert_scale_latents=True) and image_to_video.makes_image
    assert image_to_video.key_fields(plan, data) == {"image": "first-frame", "image_noise": False}
    assert torch.equal(image_to_video.make_pixels(video, plan, data, unread)["image"], video[:1])
    noisy = load_config(None, ["data.image_noise=true"]).data
    seeded = SimpleNamespace(**{**vars(plan), "crop_seed": 7})
    first = image_to_video.make_pixels(video, seeded, noisy, unread)["image"]  # [1, C, H, W]
    assert first.shape == (1, 3, 64, 96) and not torch.equal(first, video[:1])
    assert torch.equal(first, image_to_video.make_pixels(video, seeded, noisy, unread)["image"])  # seeded


class RecordingDraws:
    """Draws like SampleRandom (batch of 2) and records the order of the calls."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.generator = torch.Generator().manual_seed(0)

    def randn(self, shape):
        self.calls.append(f"randn{tuple(shape)}")
        return torch.randn((2, *shape), generator=self.generator)

    def rand(self):
        self.calls.append("rand")
        return torch.rand(2, generator=self.generator)


@pytest.mark.parametrize("variant", TINY_VARIANTS)
def test_transformer_inputs_draw_in_a_fixed_order(variant, tiny_models):
    from cogvx.models.loader import load_transformer

    spec = get_spec(variant)
    transformer = load_transformer(str(tiny_models[variant]), spec)
    frames = latent_frame_count(spec.frames)
    latents = torch.zeros(2, frames, 16, 8, 12)  # [B, F, C, h, w]
    batch = {"image_latent_mean": torch.ones(2, 1, 16, 8, 12), "image_latent_logvar": torch.full((2, 1, 16, 8, 12), -30.0)}
    draws = RecordingDraws()
    train = load_config(None, []).train  # image_dropout 0.05: the draw happens whatever the value
    extra = conditioning_for(spec).transformer_inputs(batch, latents, transformer, 0.7, draws, train, torch.device("cpu"))
    if spec.task == "t2v":
        assert extra == {} and draws.calls == []
        return
    assert draws.calls == ["randn(1, 16, 8, 12)", "rand"]  # image noise, then image dropout (even at p = 0)
    padded = frames + (-frames) % (transformer.config.patch_size_t or 1)
    assert extra["image_latents"].shape == (2, padded, 16, 8, 12)
    assert ("ofs" in extra) == bool(transformer.config.ofs_embed_dim)


def test_render_settings_request_beats_validate_beats_the_first_bucket():
    config = load_config(None, ["model.variant=tiny-t2v", "data.buckets=[[17, 64, 96], [9, 96, 64]]"])
    assert render_settings(config) == render_settings(config, None, None, None, None)
    default = render_settings(config)
    assert (default.frames, default.height, default.width) == (17, 64, 96)
    validated = load_config(None, ["model.variant=tiny-t2v", "data.buckets=[[17, 64, 96]]", "validate.frames=9",
                                   "validate.height=32"])
    assert (render_settings(validated).frames, render_settings(validated).height) == (9, 32)
    asked = render_settings(validated, frames=13, height=48, width=80)
    assert (asked.frames, asked.height, asked.width) == (13, 48, 80)


def test_render_fps_request_then_validate_then_sampling_then_model():
    def fps(*overrides: str, asked: int | None = None) -> int:
        return render_settings(load_config(None, ["model.variant=tiny-t2v", *overrides]), fps=asked).fps

    assert fps() == get_spec("tiny-t2v").fps
    assert fps("data.fps=12") == 12
    assert fps("data.fps=native") == get_spec("tiny-t2v").fps  # no sampling rate: the model's
    assert fps("data.fps=12", "validate.fps=10") == 10
    assert fps("data.fps=12", "validate.fps=10", asked=24) == 24


def test_prune_keeps_what_the_manifest_references(tmp_path):
    config = load_config(None, ["model.variant=tiny-t2v"])
    bucket = Bucket(9, 64, 96)
    for key in ("kept", "stale"):
        save_tensors(video_file(tmp_path, key), {name: torch.zeros(3, 16, 8, 12) for name in VIDEO_TENSORS})
        save_tensors(text_file(tmp_path, key), {TEXT_TENSORS[0]: torch.zeros(226, 32)})
    save_tensors(text_file(tmp_path, "empty"), {TEXT_TENSORS[0]: torch.zeros(226, 32)})
    entry = manifest_entry(origin="o", video="a.mp4", caption="c", image=None, bucket=bucket, video_key="kept",
                           text_key="kept")
    assert entry["latent_frames"] == 3 and entry["bucket"] == "9x64x96"
    write_manifest(tmp_path, build_manifest(config, [entry], "models/tiny-t2v", "empty"))
    assert prune_unreferenced(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.glob("*/*.safetensors")) == ["empty.safetensors", "kept.safetensors",
                                                                          "kept.safetensors"]
