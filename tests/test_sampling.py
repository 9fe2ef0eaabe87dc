"""Frames sampled the way the model was trained: the model's rate by default, start / random /
evenly windows, what prepare says about them, and training at the buckets the latents record."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from cogvx.config import load_config
from cogvx.data.synthetic import make_synthetic_dataset, plan_clips, render_clip, write_mp4
from cogvx.data.video import (VideoError, VideoInfo, fit_to_size, frame_step, load_clip, probe_video, read_frames,
                              sample_frame_indices, usable_frame_count)


def write_clip(path: Path, fps: int, seconds: float, *, height: int = 32, width: int = 128,
               motion: str = "moving left to right") -> Path:
    """A real H.264 clip of a white circle on black, ``seconds`` long at ``fps``."""
    frames = render_clip("circle", "white", motion, height, width, round(fps * seconds),
                         np.random.default_rng(0), background="black")  # [F, H, W, 3]
    return write_mp4(path, frames, fps)


def centre_x(clip: torch.Tensor) -> np.ndarray:
    """Horizontal centre of the bright shape in each frame of a ``[F, 3, H, W]`` clip in [-1, 1]."""
    light = (clip.mean(dim=1) + 1).clamp(min=0).numpy()  # [F, H, W]
    light = np.where(light > 0.5, light, 0.0)
    columns = np.arange(light.shape[-1]) + 0.5
    return (light.sum(axis=1) * columns).sum(axis=1) / light.sum(axis=(1, 2))


# ----------------------------------------------------------------------------- the rate


def test_null_fps_is_the_models_rate_a_number_overrides_native_keeps_the_clips():
    assert load_config(None, ["model.variant=cogvideox-5b"]).sample_fps == 8
    assert load_config(None, ["model.variant=cogvideox1.5-5b"]).sample_fps == 16
    assert load_config(None, []).sample_fps == 8  # tiny-t2v's own rate
    assert load_config(None, ["model.variant=cogvideox1.5-5b", "data.fps=24"]).sample_fps == 24
    assert load_config(None, ["data.fps=native"]).sample_fps is None
    assert load_config(None, ["data.fps=12", "data.frame_sampling=evenly"]).sample_fps is None


def test_a_60fps_clip_at_the_default_rate_spans_the_models_six_seconds(tmp_path):
    info = probe_video(write_clip(tmp_path / "fast.mp4", 60, 6.5, height=16, width=16))
    assert (info.frames, info.fps) == (390, pytest.approx(60.0))
    for variant, seconds in (("cogvideox-5b", 6.0), ("cogvideox1.5-5b", 5.0)):
        config = load_config(None, [f"model.variant={variant}"])
        indices = sample_frame_indices(info, config.frames, config.sample_fps)
        assert (indices[-1] - indices[0]) / info.fps == pytest.approx(seconds, abs=1 / 60)
    # Taking the clip's own rate, the same 49 frames would hold 0.8 s of motion.
    native = sample_frame_indices(info, 49, load_config(None, ["data.fps=native"]).sample_fps)
    assert (native[-1] - native[0]) / info.fps == pytest.approx(0.8)


def test_clips_at_24_30_and_60_fps_move_at_the_same_speed(tmp_path):
    """The same 3 s motion written at three rates, sampled at 8 fps: the shape is at the same
    place in every sampled frame (a whole stride of 4 or 8 frames would drift by ~4 px)."""
    tracks = {}
    for fps in (24, 30, 60):
        path = write_clip(tmp_path / f"clip-{fps}.mp4", fps, 3.0)
        clip = load_clip(path, probe_video(path), 17, 32, 128, target_fps=8, mode="resize")  # [F, 3, H, W]
        tracks[fps] = centre_x(clip)
    assert tracks[24][-1] - tracks[24][0] > 50  # it moves: two thirds of the way across
    np.testing.assert_allclose(tracks[30], tracks[24], atol=1.5)
    np.testing.assert_allclose(tracks[60], tracks[24], atol=1.5)
    native = load_clip(tmp_path / "clip-60.mp4", probe_video(tmp_path / "clip-60.mp4"), 17, 32, 128, mode="resize")
    assert centre_x(native)[-1] - centre_x(native)[0] < 0.5 * (tracks[60][-1] - tracks[60][0])


def test_time_stamped_steps_keep_the_average_rate():
    info = VideoInfo(frames=300, fps=30.0, height=64, width=64)
    indices = sample_frame_indices(info, 41, target_fps=8)
    assert indices[-1] == 150 and len(set(np.diff(indices))) == 2  # 5 s; steps of 4 and 3
    assert usable_frame_count(info, 8) == 80  # frames at 0, 1/8, ..., 79/8 s
    slow = VideoInfo(frames=40, fps=4.0, height=64, width=64)
    assert frame_step(slow.fps, 8) == 1.0 and sample_frame_indices(slow, 9, 8) == list(range(9))


# ----------------------------------------------------------------------------- the modes


def test_evenly_spans_the_whole_usable_clip_whatever_its_rate():
    info = VideoInfo(frames=100, fps=60.0, height=64, width=64)
    indices = sample_frame_indices(info, 9, target_fps=8, skip_start=2, skip_end=3, mode="evenly")
    assert indices[0] == 2 and indices[-1] == 96 and indices == sorted(set(indices))
    assert max(np.diff(indices)) - min(np.diff(indices)) <= 1
    assert sample_frame_indices(info, 95, skip_start=2, skip_end=3, mode="evenly") == list(range(2, 97))
    with pytest.raises(VideoError, match="needs 96 frames, the clip gives 95"):
        sample_frame_indices(info, 96, skip_start=2, skip_end=3, mode="evenly")
    with pytest.raises(ValueError, match="unknown frame sampling 'middle'"):
        sample_frame_indices(info, 9, mode="middle")


def test_evenly_reads_those_frames_of_a_real_clip(tmp_path):
    spec = plan_clips(4, 3)[3]  # 40 frames at 8 fps
    root = make_synthetic_dataset(tmp_path / "data", 4, seed=3)
    path = root / spec.path
    info = probe_video(path)
    clip = load_clip(path, info, 9, 32, 48, frame_sampling="evenly")
    indices = [0, 5, 10, 15, 20, 24, 29, 34, 39]  # i * 39 / 8, to the nearest frame: first to last
    assert sample_frame_indices(info, 9, mode="evenly") == indices
    expected = fit_to_size(read_frames(path, indices), 32, 48, "center_crop")
    torch.testing.assert_close(clip, expected)


def test_random_windows_are_seeded_inside_the_clip_and_keep_the_rate():
    info = VideoInfo(frames=200, fps=24.0, height=64, width=64)
    start = sample_frame_indices(info, 9, 8, skip_start=5, skip_end=5)
    draws = {seed: sample_frame_indices(info, 9, 8, skip_start=5, skip_end=5, mode="random", seed=seed)
             for seed in range(20)}
    assert draws[7] == sample_frame_indices(info, 9, 8, skip_start=5, skip_end=5, mode="random", seed=7)
    assert len({indices[0] for indices in draws.values()}) > 10  # another seed, another window
    for indices in draws.values():
        assert 5 <= indices[0] and indices[-1] <= 194
        assert [i - indices[0] for i in indices] == [i - start[0] for i in start]  # 8 fps, like start
    exact = VideoInfo(frames=25, fps=24.0, height=64, width=64)  # the window fills the clip
    assert sample_frame_indices(exact, 9, 8, mode="random", seed=3) == list(range(0, 25, 3))


# ----------------------------------------------------------------------------- prepare


def mixed_dataset(root: Path) -> Path:
    """Two synthetic 8 fps clips (20 and 24 frames), one at 24 fps (2 s), one at 4 fps (5 s)."""
    make_synthetic_dataset(root, 2, seed=3)
    specs = plan_clips(4, 3)
    write_clip(root / "videos" / "fast.mp4", 24, 2.0, height=64, width=96)
    write_clip(root / "videos" / "slow.mp4", 4, 5.0, height=64, width=96)
    with open(root / "prompts.txt", "a", encoding="utf-8") as prompts:
        prompts.write(f"{specs[2].caption}\n{specs[3].caption}\n")
    with open(root / "videos.txt", "a", encoding="utf-8") as videos:
        videos.write("videos/fast.mp4\nvideos/slow.mp4\n")
    return root


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    return mixed_dataset(tmp_path_factory.mktemp("mixed") / "raw")


def prepare_config(data_root: Path, model: Path, out: Path, *extra: str):
    return load_config(None, ["model.variant=tiny-t2v", f"model.path={model}", f"data.data_root={data_root}",
                              f"prepare.output_dir={out}", "prepare.num_workers=0", *extra])


def video_digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((out / "videos").glob("*.safetensors"))}


@pytest.mark.slow
def test_prepare_says_how_clips_were_sampled(mixed, tiny_models, tmp_path):
    from cogvx.prepare import run_prepare

    lines: list[str] = []
    summary = run_prepare(prepare_config(mixed, tiny_models["tiny-t2v"], tmp_path / "latents"), log=lines.append)
    assert (summary.frame_sampling, summary.sample_fps) == ("start", 8)
    assert (summary.clips_resampled, summary.clips_slower, summary.clips_cut) == (1, 1, 4)
    assert summary.as_dict()["clips_cut"] == 4
    notices = [line for line in lines if line.startswith("notice: frame sampling")]
    assert len(notices) == 1, lines
    assert "1 of 4 clips resampled to 8 fps (e.g. videos/fast.mp4 (24 fps))" in notices[0]
    assert "videos/slow.mp4 (4 fps)" in notices[0] and "4 of 4 clips longer than their window" in notices[0]

    lines.clear()
    evenly = run_prepare(prepare_config(mixed, tiny_models["tiny-t2v"], tmp_path / "evenly",
                                        "data.frame_sampling=evenly"), log=lines.append)
    assert (evenly.frame_sampling, evenly.sample_fps, evenly.clips_resampled, evenly.clips_cut) == ("evenly", None, 0, 0)
    assert not [line for line in lines if line.startswith("notice:")]


def test_the_sampling_enters_the_content_key(mixed, tiny_models):
    from cogvx.data.validation import validate_dataset
    from cogvx.prepare import plan_samples

    def keys(*extra: str) -> list[str]:
        config = prepare_config(mixed, tiny_models["tiny-t2v"], Path("unused"), *extra)
        report = validate_dataset(config.data, min_frames=9, model_fps=config.spec.fps)
        return [plan.video_key for plan in plan_samples(report.valid, report.infos, config, tiny_models["tiny-t2v"])]

    start, evenly = keys(), keys("data.frame_sampling=evenly")
    random, fast = keys("data.frame_sampling=random"), keys("data.fps=12")
    assert start == keys("data.fps=8")  # the model's rate, spelled out: the same latents
    for other in (evenly, random, fast, keys("data.fps=native")):
        assert not set(other) & set(start)
    assert random != keys("data.frame_sampling=random", "data.seed=1")


@pytest.mark.slow
def test_random_windows_give_byte_identical_latents_on_a_rerun(mixed, tiny_models, tmp_path):
    from cogvx.prepare import run_prepare

    for out in ("first", "second"):
        run_prepare(prepare_config(mixed, tiny_models["tiny-t2v"], tmp_path / out, "data.frame_sampling=random"),
                    log=lambda *_: None)
    assert video_digests(tmp_path / "first") == video_digests(tmp_path / "second")
    assert len(video_digests(tmp_path / "first")) == 4


# ----------------------------------------------------------------------------- training's buckets


@pytest.mark.slow
def test_training_takes_the_manifests_buckets_when_the_config_names_none(tiny_models, tmp_path):
    from cogvx.data.buckets import Bucket
    from cogvx.data.latents import LatentDataset, LatentsError
    from cogvx.prepare import run_prepare
    from cogvx.training.loop import train

    data = make_synthetic_dataset(tmp_path / "raw", 4, seed=3)  # 64x96, 96x64, 64x64, 80x128 clips
    base = ("tracking.enabled=false", "train.max_steps=1", "validate.num_inference_steps=1",
            "train.lora.rank=4", "train.lora.alpha=4", f"train.output_dir={tmp_path / 'run'}")
    named = prepare_config(data, tiny_models["tiny-t2v"], tmp_path / "latents",
                           "data.buckets=[[9, 64, 96], [9, 96, 64]]", *base)
    run_prepare(named, log=lambda *_: None)

    unnamed = prepare_config(data, tiny_models["tiny-t2v"], tmp_path / "latents", *base)
    assert set(LatentDataset(tmp_path / "latents", unnamed).buckets) == {Bucket(9, 64, 96), Bucket(9, 96, 64)}
    assert train(unnamed, log=lambda *_: None).steps == 1

    other = prepare_config(data, tiny_models["tiny-t2v"], tmp_path / "latents", "data.buckets=[[9, 64, 96]]", *base)
    with pytest.raises(LatentsError, match=r"buckets 9x96x64 are not among this run's buckets \(9x64x96\); name"):
        LatentDataset(tmp_path / "latents", other)
    longer = prepare_config(data, tiny_models["tiny-t2v"], tmp_path / "latents", "data.frames=13", *base)
    with pytest.raises(LatentsError, match="not among this run's buckets"):
        LatentDataset(tmp_path / "latents", longer)
