"""Synthetic clips and video decoding, on real mp4 files: writing, probing, sampling, fitting."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cogvx.data.synthetic import (COLOUR_RGB, LENGTHS, SIZES, SYNTHETIC_MOTIONS, SYNTHETIC_SHAPES,
                                  make_synthetic_dataset, plan_clips, render_clip)
from cogvx.data.video import (VideoError, VideoInfo, fit_to_size, frame_step, load_clip,
                              probe_video, read_frames, sample_frame_indices)
from cogvx.models.tokenizer import COLOURS, MOTIONS, SHAPES, caption_corpus

N_CLIPS = 8
SEED = 3


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("synthetic") / "data", N_CLIPS, seed=SEED)


def lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def first_frame(path: Path) -> np.ndarray:
    return read_frames(path, [0])[0].numpy().astype(np.int16)  # [H, W, 3]


# ----------------------------------------------------------------------------- the data set


def test_dataset_lists_n_clips(dataset):
    prompts, videos = lines(dataset / "prompts.txt"), lines(dataset / "videos.txt")
    assert len(prompts) == len(videos) == N_CLIPS
    assert videos == [f"videos/clip_{i:03d}.mp4" for i in range(N_CLIPS)]
    assert sorted(p.name for p in (dataset / "videos").iterdir()) == [Path(v).name for v in videos]
    assert sorted(p.name for p in dataset.iterdir()) == ["prompts.txt", "videos", "videos.txt"]
    assert not [p for p in dataset.parent.iterdir() if p.name.startswith(".")], "staging left behind"


def test_every_clip_probes_with_its_size_length_and_fps(dataset):
    specs = plan_clips(N_CLIPS, SEED)
    for spec, video in zip(specs, lines(dataset / "videos.txt")):
        info = probe_video(dataset / video)
        assert (info.height, info.width, info.frames) == (spec.height, spec.width, spec.frames)
        assert info.frames >= 20 and info.height % 16 == 0 and info.width % 16 == 0
        assert info.fps == pytest.approx(8.0)
    assert {(s.height, s.width) for s in specs} == set(SIZES)
    assert {s.frames for s in specs} == set(LENGTHS)


def test_fps_parameter_is_the_written_rate(tmp_path):
    out = make_synthetic_dataset(tmp_path / "fast", 1, seed=0, fps=12)
    assert probe_video(out / "videos" / "clip_000.mp4").fps == pytest.approx(12.0)


def test_captions_name_colour_shape_and_motion_in_the_tokenizer_corpus_words(dataset):
    vocabulary = set(" ".join(caption_corpus()).lower().replace(".", "").split())
    vocabulary |= {"an", "gradient"}  # the only words the tokenizer's corpus lacks
    for spec, caption in zip(plan_clips(N_CLIPS, SEED), lines(dataset / "prompts.txt")):
        assert caption == spec.caption and caption.strip()
        assert caption.lower().split()[1:3] == [spec.colour, spec.shape]
        assert spec.motion in caption and all(c in caption for c in spec.background)
        assert set(caption.lower().rstrip(".").split()) <= vocabulary, caption


def test_decoded_clips_show_the_rendered_frames(dataset):
    for spec in plan_clips(N_CLIPS, SEED)[:4]:
        decoded = read_frames(dataset / spec.path, list(range(spec.frames))).numpy()
        assert decoded.shape == (spec.frames, spec.height, spec.width, 3)
        error = np.abs(decoded.astype(np.int16) - spec.render().astype(np.int16)).mean()
        assert error < 6, f"{spec.path}: mean abs error {error:.1f} against the rendered frames"


def test_same_seed_same_captions_and_frames_other_seed_differs(dataset, tmp_path):
    again = make_synthetic_dataset(tmp_path / "again", 2, seed=SEED)
    assert lines(again / "prompts.txt") == lines(dataset / "prompts.txt")[:2]
    for video in lines(again / "videos.txt"):
        assert np.abs(first_frame(again / video) - first_frame(dataset / video)).max() <= 2
    for a, b in zip(plan_clips(2, SEED), plan_clips(2, SEED)):
        np.testing.assert_array_equal(a.render(), b.render())
    other = [s.caption for s in plan_clips(N_CLIPS, SEED + 1)]
    assert other != lines(dataset / "prompts.txt")


def test_failed_build_leaves_the_previous_dataset_untouched(tmp_path):
    out = tmp_path / "data"
    with pytest.raises(ValueError, match="hexagon"):
        make_synthetic_dataset(out, 3, shapes=("circle", "hexagon"))  # clip 0 is written first
    assert list(tmp_path.iterdir()) == [], "a failed build must leave no folder, staged or not"
    out.mkdir()
    (out / "old.txt").write_text("previous data set")
    with pytest.raises(ValueError, match="hexagon"):
        make_synthetic_dataset(out, 3, shapes=("circle", "hexagon"))
    assert [p.name for p in tmp_path.iterdir()] == ["data"]
    assert [p.name for p in out.iterdir()] == ["old.txt"]


# ----------------------------------------------------------------------------- rendering


def shape_mask(frame: np.ndarray, colour: str) -> np.ndarray:
    """Pixels within a small RGB distance of ``colour``: the shape (backgrounds contrast)."""
    return np.linalg.norm(frame.astype(float) - COLOUR_RGB[colour], axis=-1) < 40


@pytest.mark.parametrize("shape", SYNTHETIC_SHAPES)
def test_render_clip_draws_the_shape_in_its_colour(shape):
    frames = render_clip(shape, "red", "growing", 64, 96, 5, np.random.default_rng(0),
                         background="blue")
    assert frames.shape == (5, 64, 96, 3) and frames.dtype == np.uint8
    areas = [shape_mask(frame, "red").sum() for frame in frames]
    assert areas[0] > 20 and areas == sorted(areas), areas  # visible, and growing
    assert tuple(frames[0, 0, 0]) == COLOUR_RGB["blue"]


@pytest.mark.parametrize("motion, axis, sign", [
    ("moving left to right", 1, 1), ("moving right to left", 1, -1),
    ("falling down", 0, 1), ("rising up", 0, -1)])
def test_render_clip_moves_the_way_the_caption_says(motion, axis, sign):
    frames = render_clip("square", "yellow", motion, 64, 64, 9, np.random.default_rng(1),
                         background=("blue", "black"))
    centres = [np.argwhere(shape_mask(frame, "yellow")).mean(axis=0)[axis] for frame in frames]
    steps = np.diff(centres) * sign
    assert (steps > 0).all(), centres


def test_render_clip_rejects_unknown_names():
    for args in (("hexagon", "red", "growing"), ("circle", "mauve", "growing"),
                 ("circle", "red", "teleporting")):
        with pytest.raises(ValueError, match="unknown"):
            render_clip(*args, 64, 64, 2, np.random.default_rng(0))


def test_synthetic_words_are_tokenizer_words():
    assert set(SYNTHETIC_SHAPES) <= set(SHAPES) and set(SYNTHETIC_MOTIONS) <= set(MOTIONS)
    assert set(COLOUR_RGB) == set(COLOURS)


# ----------------------------------------------------------------------------- frame sampling


def test_frame_sampling_strides_to_the_target_fps_and_skips():
    info = VideoInfo(frames=90, fps=30.0, height=64, width=64)
    assert frame_step(30.0, 8) == 3.75 and frame_step(30.0, None) == 1 and frame_step(8.0, 30) == 1
    assert frame_step(29.97, 30) == 1 and frame_step(0.0, 8) == 1  # within 1%; unknown rate
    assert sample_frame_indices(info, 5, target_fps=8) == [0, 4, 8, 11, 15]  # frames at i / 8 s
    assert sample_frame_indices(info, 3, target_fps=15, skip_start=10) == [10, 12, 14]
    assert sample_frame_indices(info, 80, skip_start=5, skip_end=5)[-1] == 84
    with pytest.raises(VideoError, match="needs 81 frames"):
        sample_frame_indices(info, 81, skip_start=5, skip_end=5)
    assert sample_frame_indices(info, 24, target_fps=8)[-1] == 86  # 23 * 3.75 = 86.25; 24 * 3.75 = 90
    with pytest.raises(VideoError, match="needs 25 frames, the clip gives 24"):
        sample_frame_indices(info, 25, target_fps=8)


def test_load_clip_samples_strided_frames_of_a_real_clip(dataset):
    spec = plan_clips(N_CLIPS, SEED)[3]  # 40 frames at 8 fps
    path = dataset / spec.path
    info = probe_video(path)
    clip = load_clip(path, info, 9, 32, 48, target_fps=4, skip_start=3)
    expected = fit_to_size(read_frames(path, [3 + 2 * i for i in range(9)]), 32, 48, "center_crop")
    torch.testing.assert_close(clip, expected)
    with pytest.raises(VideoError, match="needs 17 frames"):
        load_clip(path, info, 17, 32, 48, target_fps=4, skip_start=3, skip_end=10)


def test_read_frames_names_the_clip_it_cannot_decode(tmp_path, dataset):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    for path in (bad, tmp_path / "missing.mp4"):
        with pytest.raises(VideoError, match=path.name):
            read_frames(path, [0])
    with pytest.raises(VideoError, match="outside"):
        read_frames(dataset / "videos" / "clip_000.mp4", [0, 1000])


# ----------------------------------------------------------------------------- fitting to a size

INPUTS = {"portrait": (48, 32), "landscape": (32, 48), "square": (40, 40)}
TARGETS = [(16, 32), (32, 16), (32, 32), (64, 48)]


@pytest.mark.parametrize("mode", ["center_crop", "random_crop", "resize"])
@pytest.mark.parametrize("source", INPUTS)
def test_fit_to_size_shapes_and_range(mode, source):
    gen = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (3, *INPUTS[source], 3), dtype=torch.uint8, generator=gen)
    for height, width in TARGETS:
        out = fit_to_size(frames, height, width, mode, generator=gen)
        assert out.shape == (3, 3, height, width) and out.dtype == torch.float32
        assert out.min() >= -1.0 and out.max() <= 1.0
    white = torch.full((2, *INPUTS[source], 3), 255, dtype=torch.uint8)
    black = torch.zeros_like(white)
    assert torch.allclose(fit_to_size(white, 16, 32, mode), torch.ones(2, 3, 16, 32))
    assert torch.allclose(fit_to_size(black, 16, 32, mode), -torch.ones(2, 3, 16, 32))


def halves(height: int, width: int, vertical: bool = False) -> torch.Tensor:
    """One frame, 0 on the left (top) half and 255 on the right (bottom) half: ``[1, H, W, 3]``."""
    frame = torch.zeros(1, height, width, 3, dtype=torch.uint8)
    if vertical:
        frame[:, height // 2:] = 255
    else:
        frame[:, :, width // 2:] = 255
    return frame


@pytest.mark.parametrize("size", [(16, 32), (32, 64)])  # exact crop, and scaled 2:1 down first
def test_center_crop_cuts_out_the_middle(size):
    out = fit_to_size(halves(*size), 16, 16, "center_crop")[0, 0]  # [H, W] of channel 0
    assert (out[:, :7] < -0.9).all() and (out[:, 9:] > 0.9).all()
    portrait = fit_to_size(halves(size[1], size[0], vertical=True), 16, 16, "center_crop")[0, 0]
    assert (portrait[:7] < -0.9).all() and (portrait[9:] > 0.9).all()
    middle = torch.zeros(1, 16, 48, 3, dtype=torch.uint8)  # [F, H, W, 3]
    middle[:, :, 16:32] = 255  # [0 | 255 | 0] thirds
    assert torch.equal(fit_to_size(middle, 16, 16, "center_crop"), torch.ones(1, 3, 16, 16))


def test_resize_keeps_the_whole_picture():
    middle = torch.zeros(1, 16, 48, 3, dtype=torch.uint8)  # [F, H, W, 3]
    middle[:, :, 16:32] = 255  # [0 | 255 | 0] thirds
    out = fit_to_size(middle, 16, 24, "resize")[0, 0]  # [H, W]
    assert (out[:, :6] < -0.9).all() and (out[:, 10:14] > 0.9).all() and (out[:, 18:] < -0.9).all()


def test_random_crop_varies_with_the_seed_and_repeats_with_it():
    ramp = torch.arange(64, dtype=torch.uint8).mul(4).expand(1, 16, 64)[..., None].expand(1, 16, 64, 3)
    crops = {}
    for seed in range(10):
        out = fit_to_size(ramp, 16, 16, "random_crop", torch.Generator().manual_seed(seed))
        again = fit_to_size(ramp, 16, 16, "random_crop", torch.Generator().manual_seed(seed))
        assert torch.equal(out, again)
        left = round((out[0, 0, 0, 0].item() + 1) * 127.5 / 4)
        expected = fit_to_size(ramp[:, :, left:left + 16], 16, 16, "center_crop")
        torch.testing.assert_close(out, expected)  # a true window of the source
        crops[seed] = left
    assert len(set(crops.values())) > 3, crops


# ----------------------------------------------------------------------------- load_clip


def test_load_clip_end_to_end_and_flip(dataset):
    spec = plan_clips(N_CLIPS, SEED)[3]  # 80 x 128, 40 frames
    path = dataset / spec.path
    info = probe_video(path)
    clip = load_clip(path, info, 17, 32, 48, generator=torch.Generator().manual_seed(0))
    assert clip.shape == (17, 3, 32, 48) and clip.dtype == torch.float32
    assert -1.0 <= clip.min() < clip.max() <= 1.0
    flipped = load_clip(path, info, 17, 32, 48, flip_probability=1.0,
                        generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(flipped, clip.flip(-1))
    for mode in ("random_crop", "resize"):
        out = load_clip(path, info, 9, 48, 48, mode=mode, flip_probability=0.5,
                        generator=torch.Generator().manual_seed(1))
        again = load_clip(path, info, 9, 48, 48, mode=mode, flip_probability=0.5,
                          generator=torch.Generator().manual_seed(1))
        assert out.shape == (9, 3, 48, 48) and torch.equal(out, again)
