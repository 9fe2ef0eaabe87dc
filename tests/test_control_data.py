"""Control videos on the data side (data.control): listing them (txt, CSV, JSON/JSONL), validating them
against their clips on real mp4 files (every problem at once, with file and line), synthetic control
clips, and Canny edge maps (cogvx.data.control)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cogvx.config import load_config
from cogvx.data.control import canny_frames, canny_video
from cogvx.data.listing import read_samples
from cogvx.data.synthetic import make_synthetic_dataset, plan_clips, write_mp4
from cogvx.data.validation import validate_dataset
from cogvx.data.video import probe_video, read_frames
from cogvx.errors import CogvxError

N_CLIPS = 6
SEED = 3
MIN_FRAMES = 17
# plan_clips(6, seed=3): (height, width, frames) of clips 0..5, what the expected messages name.
CLIPS = [(64, 96, 20), (96, 64, 24), (64, 64, 33), (80, 128, 40), (64, 96, 24), (96, 64, 33)]
NO_CONTROL_HINT = ("data.control=file needs one control video per clip, or set data.control=canny to "
                   "compute them from the clips")


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """Six synthetic clips with control videos, made once; tests change copies of it."""
    return make_synthetic_dataset(tmp_path_factory.mktemp("control") / "raw", N_CLIPS, seed=SEED, control=True)


@pytest.fixture
def root(source, tmp_path) -> Path:
    return Path(shutil.copytree(source, tmp_path / "data"))


def data_config(root: Path, *overrides: str):
    return load_config(None, [f"data.data_root={root}", "data.control=file", *overrides]).data


def write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")


def control_lines(root: Path) -> list[str]:
    return (root / "control_videos.txt").read_text(encoding="utf-8").splitlines()


def square_video(path: Path, frames: int, height: int, width: int, fps: int = 8) -> Path:
    """A white square on black, ``frames`` frames of ``height`` x ``width`` (a stand-in control video)."""
    video = np.zeros((frames, height, width, 3), dtype=np.uint8)  # [F, H, W, 3]
    video[:, height // 4: height // 2, width // 4: width // 2] = 255
    return write_mp4(path, video, fps)


def test_clip_plan_is_the_one_the_messages_name():
    assert [(s.height, s.width, s.frames) for s in plan_clips(N_CLIPS, SEED)] == CLIPS


# --------------------------------------------------------------------------- synthetic control clips


def test_synthetic_control_videos_are_listed_and_match_their_clips_frame_for_frame(source):
    assert sorted(p.name for p in source.iterdir()) == [
        "control_videos.txt", "controls", "prompts.txt", "videos", "videos.txt"]
    assert control_lines(source) == [f"controls/clip_{i:03d}.mp4" for i in range(N_CLIPS)]
    videos = (source / "videos.txt").read_text(encoding="utf-8").splitlines()
    for (height, width, frames), video, control in zip(CLIPS, videos, control_lines(source)):
        clip_info, control_info = probe_video(source / video), probe_video(source / control)
        assert (control_info.height, control_info.width, control_info.frames) == (height, width, frames)
        assert control_info == clip_info
    edges = read_frames(source / "controls/clip_000.mp4", [0, 19]).numpy()  # [2, H, W, 3]
    assert edges.max() > 200 and 0.002 < (edges > 128).mean() < 0.1, "an outline, not a blank or a fill"


def test_synthetic_control_frames_are_edges_and_a_pure_function_of_the_seed():
    first, again = plan_clips(2, SEED)[1].render_control(), plan_clips(2, SEED)[1].render_control()
    assert first.shape == (24, 96, 64, 3) and first.dtype == np.uint8
    assert np.array_equal(first, again)
    assert set(np.unique(first)) == {0, 255}
    assert all(frame.any() for frame in first), "every frame shows the shape's outline"
    other = plan_clips(2, SEED + 1)[1].render_control()
    assert not np.array_equal(first, other)


# --------------------------------------------------------------------------- listings


def test_txt_listing_gives_each_sample_its_control_video(root):
    samples, problems = read_samples(data_config(root))
    assert problems == []
    assert [s.control_rel for s in samples] == [f"controls/clip_{i:03d}.mp4" for i in range(N_CLIPS)]
    assert [s.control for s in samples] == [root.resolve() / f"controls/clip_{i:03d}.mp4" for i in range(N_CLIPS)]
    assert samples[2].video_rel == "videos/clip_002.mp4" and samples[2].origin == "videos.txt:3"


@pytest.mark.parametrize("control", ["none", "canny"])
def test_without_control_files_no_control_listing_is_read(root, control):
    (root / "control_videos.txt").unlink()
    samples, problems = read_samples(data_config(root, f"data.control={control}"))
    assert problems == [] and len(samples) == N_CLIPS
    assert {(s.control, s.control_rel) for s in samples} == {(None, None)}


def test_missing_control_videos_txt_is_one_problem_saying_what_it_must_hold(root):
    (root / "control_videos.txt").unlink()
    samples, problems = read_samples(data_config(root))
    assert samples == []
    assert [str(p) for p in problems] == [
        f"control_videos.txt: not found in {root}; data.control=file needs control_videos.txt with one "
        "control video path per line (relative to data_root), on the same line as its clip in videos.txt; "
        "or set data.control=canny to compute Canny edge controls from the clips"]


def test_control_listing_named_by_config_is_read(root):
    (root / "control_videos.txt").rename(root / "depth.txt")
    samples, problems = read_samples(data_config(root, "data.control_videos_file=depth.txt"))
    assert problems == [] and samples[5].control_rel == "controls/clip_005.mp4"


def test_short_control_list_is_a_count_problem_and_one_problem_per_clip_left_without(root):
    write_lines(root / "control_videos.txt", control_lines(root)[:4])
    samples, problems = read_samples(data_config(root))
    assert [s.video_rel for s in samples] == [f"videos/clip_{i:03d}.mp4" for i in range(4)]
    assert [str(p) for p in problems] == [
        "control_videos.txt: control_videos.txt has 4 lines, videos.txt has 6; it must list one control "
        "video per clip, on the clip's line",
        "control_videos.txt:5: no control video for videos/clip_004.mp4 (control_videos.txt line 5 is empty "
        f"or missing); {NO_CONTROL_HINT}",
        "control_videos.txt:6: no control video for videos/clip_005.mp4 (control_videos.txt line 6 is empty "
        f"or missing); {NO_CONTROL_HINT}"]
    report = validate_dataset(data_config(root), MIN_FRAMES, probe=False)
    assert report.format().splitlines()[0] == f"3 problems in data set {root.resolve()} (2 of 6 samples affected):"


def test_empty_line_and_control_character_drop_only_their_samples(root):
    lines = control_lines(root)
    lines[1], lines[2] = "  ", "controls/clip\x1b_002.mp4"
    write_lines(root / "control_videos.txt", lines)
    samples, problems = read_samples(data_config(root))
    assert [s.origin for s in samples] == ["videos.txt:1", "videos.txt:4", "videos.txt:5", "videos.txt:6"]
    assert [(p.origin, p.message, p.video) for p in problems] == [
        ("control_videos.txt:2", "no control video for videos/clip_001.mp4 (control_videos.txt line 2 is "
         f"empty or missing); {NO_CONTROL_HINT}", "videos/clip_001.mp4"),
        ("control_videos.txt:3", "control video path (control_videos.txt line 3) contains a control "
         "character (U+001B ESC at character 14); remove it", "videos/clip_002.mp4")]


def test_undecodable_control_line_is_reported_once_with_its_clip(root):
    raw = (root / "control_videos.txt").read_bytes().replace(b"controls/clip_003", b"controls/clip\xff003")
    (root / "control_videos.txt").write_bytes(raw)
    samples, problems = read_samples(data_config(root))
    assert len(samples) == 5 and "videos/clip_003.mp4" not in {s.video_rel for s in samples}
    assert [(p.origin, p.video) for p in problems] == [("control_videos.txt:4", "videos/clip_003.mp4")]
    assert problems[0].message.startswith("not valid UTF-8 (byte 0xff")


def test_csv_listing_reads_the_control_column(root):
    write_lines(root / "metadata.csv", [
        "caption,video,control",
        "A red circle.,videos/clip_000.mp4,controls/clip_000.mp4",
        "A blue square.,videos/clip_001.mp4,",
        "A ring.,videos/clip_002.mp4",
        "A star.,videos/clip_003.mp4, controls/clip_003.mp4 "])
    samples, problems = read_samples(data_config(root, "data.format=csv"))
    assert [(s.video_rel, s.control_rel) for s in samples] == [
        ("videos/clip_000.mp4", "controls/clip_000.mp4"), ("videos/clip_003.mp4", "controls/clip_003.mp4")]
    assert samples[1].control == root.resolve() / "controls/clip_003.mp4"
    assert [str(p) for p in problems] == [
        f"metadata.csv:3: no control video for videos/clip_001.mp4 ('control' column is empty or missing); "
        f"{NO_CONTROL_HINT}",
        f"metadata.csv:4: no control video for videos/clip_002.mp4 ('control' column is empty or missing); "
        f"{NO_CONTROL_HINT}"]


def test_csv_without_the_control_column_says_which_column_is_needed(root):
    write_lines(root / "metadata.csv", ["caption,video", "A red circle.,videos/clip_000.mp4"])
    samples, problems = read_samples(data_config(root, "data.format=csv"))
    assert samples == []
    assert [str(p) for p in problems] == [
        "metadata.csv:1: no 'control' (control, data.control_column) column; the columns are: caption, video"]
    without_control = read_samples(load_config(None, [f"data.data_root={root}", "data.format=csv"]).data)
    assert [s.control for s in without_control[0]] == [None] and without_control[1] == []


def test_jsonl_control_key_values_that_are_not_paths_are_problems_not_crashes(root):
    records = [{"caption": "A.", "video": "videos/clip_000.mp4", "depth": "controls/clip_000.mp4"},
               {"caption": "B.", "video": "videos/clip_001.mp4", "depth": 5},
               {"caption": "C.", "video": "videos/clip_002.mp4"},
               {"caption": "D.", "video": "videos/clip_003.mp4", "depth": ["x"]},
               {"caption": "E.", "video": "videos/clip_004.mp4", "depth": "controls/\x1b.mp4"},
               {"caption": "F.", "video": "videos/clip_005.mp4", "depth": None}]
    write_lines(root / "metadata.jsonl", [json.dumps(r) for r in records])
    samples, problems = read_samples(data_config(root, "data.format=json", "data.control_column=depth"))
    assert [(s.origin, s.control_rel) for s in samples] == [("metadata.jsonl:1", "controls/clip_000.mp4")]
    assert [str(p) for p in problems] == [
        "metadata.jsonl:2: 'depth' key for videos/clip_001.mp4 must be a string (a control video path), got 5",
        f"metadata.jsonl:3: no control video for videos/clip_002.mp4 ('depth' key is empty or missing); "
        f"{NO_CONTROL_HINT}",
        "metadata.jsonl:4: 'depth' key for videos/clip_003.mp4 must be a string (a control video path), "
        'got ["x"]',
        "metadata.jsonl:5: control video path ('depth' key) contains a control character (U+001B ESC at "
        "character 10); remove it",
        f"metadata.jsonl:6: no control video for videos/clip_005.mp4 ('depth' key is empty or missing); "
        f"{NO_CONTROL_HINT}"]


def test_json_list_control_problem_is_located_by_index(root):
    records = [{"caption": "A.", "video": "videos/clip_000.mp4", "control": "controls/clip_000.mp4"},
               {"caption": "B.", "video": "videos/clip_001.mp4", "control": ""}]
    (root / "metadata.json").write_text(json.dumps(records), encoding="utf-8")
    samples, problems = read_samples(data_config(root, "data.format=json"))
    assert [s.control_rel for s in samples] == ["controls/clip_000.mp4"]
    assert [p.origin for p in problems] == ["metadata.json[1]"]


# --------------------------------------------------------------------------- validating control videos


def test_every_control_video_problem_of_a_data_set_is_reported_at_once(root):
    (root / "controls/clip_000.mp4").unlink()
    square_video(root / "controls/clip_001.mp4", 12, 96, 64)  # clip: 24 frames of 96x64
    square_video(root / "controls/clip_002.mp4", 33, 64, 96)  # clip: 33 frames of 64x64
    square_video(root / "controls/clip_003.mp4", 40, 80, 128, fps=16)  # clip: 40 frames at 8 fps
    (root / "controls/clip_004.mp4").write_text("not a video\n", encoding="utf-8")
    report = validate_dataset(data_config(root), MIN_FRAMES, probe=True, model_fps=8)
    lines = [str(p) for p in report.problems]
    assert lines == [
        "videos.txt:1: videos/clip_000.mp4: control video controls/clip_000.mp4: file not found",
        "videos.txt:2: videos/clip_001.mp4: control video controls/clip_001.mp4: too short: 12 usable frames, "
        "needs 17 (12 frames at 8 fps, sampled at 8 fps)",
        "videos.txt:2: videos/clip_001.mp4: control video controls/clip_001.mp4: 12 frames, its clip has 24; "
        "a control video must have one frame per clip frame",
        "videos.txt:3: videos/clip_002.mp4: control video controls/clip_002.mp4: 96x64 (aspect ratio 1.500), "
        "its clip is 64x64 (1.000); a control video must have its clip's aspect ratio (any size; it is "
        "resized with the clip)",
        "videos.txt:4: videos/clip_003.mp4: control video controls/clip_003.mp4: 16 fps, its clip has 8 fps; "
        "a control video must have its clip's frame rate",
        "videos.txt:5: videos/clip_004.mp4: control video controls/clip_004.mp4: not a readable video: it is "
        "a text file, not a video"]
    assert sorted(report.invalid) == [0, 1, 2, 3, 4]
    assert [s.video_rel for s in report.valid] == ["videos/clip_005.mp4"]
    assert report.format().splitlines()[0] == f"6 problems in data set {root.resolve()} (5 of 6 samples affected):"
    control = report.valid[0].control
    assert (report.infos[control].frames, report.infos[control].height, report.infos[control].width) == (33, 96, 64)
    assert report.infos[root.resolve() / "controls/clip_003.mp4"].fps == pytest.approx(16.0)


def test_control_sizes_with_the_clips_aspect_ratio_are_accepted(root):
    square_video(root / "controls/clip_003.mp4", 40, 160, 256)  # clip 80x128: twice the size, same shape
    report = validate_dataset(data_config(root), MIN_FRAMES, probe=True, model_fps=8)
    assert report.problems == [] and len(report.valid) == N_CLIPS
    assert report.infos[root.resolve() / "controls/clip_003.mp4"].width == 256


def test_control_paths_must_stay_inside_data_root_and_files_are_checked_without_probing(root):
    outside = square_video(root.parent / "outside.mp4", 20, 64, 96)
    (root / "controls/escape.mp4").symlink_to(outside)
    lines = control_lines(root)
    lines[:4] = ["../outside.mp4", str(outside), "controls\\clip_002.mp4", "controls/escape.mp4"]
    write_lines(root / "control_videos.txt", lines)
    (root / "controls/clip_004.mp4").write_bytes(b"")
    square_video(root / "controls/clip_005.mp4", 3, 96, 64)  # too short, but not probed
    report = validate_dataset(data_config(root), MIN_FRAMES, probe=False)
    data_root = root.resolve()
    assert [str(p) for p in report.problems] == [
        f"videos.txt:1: videos/clip_000.mp4: control video ../outside.mp4: path contains '..'; paths must stay "
        f"inside data_root ({data_root})",
        f"videos.txt:2: videos/clip_001.mp4: control video {outside}: path is absolute; list it relative to "
        f"data_root ({data_root})",
        "videos.txt:3: videos/clip_002.mp4: control video controls\\clip_002.mp4: file not found (the path "
        "contains '\\': use '/' as the path separator)",
        f"videos.txt:4: videos/clip_003.mp4: control video controls/escape.mp4: resolves outside data_root "
        f"(through a symlink, to {outside.resolve()})",
        "videos.txt:5: videos/clip_004.mp4: control video controls/clip_004.mp4: empty file (0 bytes)"]
    assert [s.video_rel for s in report.valid] == ["videos/clip_005.mp4"] and report.infos == {}


def test_cli_refuses_a_data_set_with_a_bad_control_video_naming_file_and_line(root, run_cli):
    square_video(root / "controls/clip_001.mp4", 12, 96, 64)
    result = run_cli("data", "validate", f"data.data_root={root}", "data.control=file", "data.frames=9",
                     "data.fps=native", timeout=180)
    assert result.returncode == 4, (result.stdout[-2000:], result.stderr[-3000:])
    stderr = " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr + result.stdout
    assert ("videos.txt:2: videos/clip_001.mp4: control video controls/clip_001.mp4: 12 frames, its clip has "
            "24; a control video must have one frame per clip frame") in stderr
    assert "(1 of 6 samples affected)" in stderr and "train on the 5 valid ones." in stderr


# --------------------------------------------------------------------------- Canny edges


def step_frame(height: int = 32, width: int = 32) -> torch.Tensor:
    """One RGB frame, black left half and white right half: [3, H, W] in [-1, 1]."""
    frame = torch.full((3, height, width), -1.0)
    frame[:, :, width // 2:] = 1.0
    return frame


def test_canny_video_marks_a_sharp_edge_and_nothing_on_a_flat_frame():
    video = torch.stack([step_frame(), torch.full((3, 32, 32), 0.3)])  # [2, 3, 32, 32]
    edges = canny_video(video, 100, 200)
    assert edges.shape == (2, 3, 32, 32) and edges.dtype == torch.float32
    assert set(edges.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(edges[:, 0], edges[:, 1]) and torch.equal(edges[:, 0], edges[:, 2])
    columns = (edges[0, 0] > 0).any(dim=0).nonzero().flatten().tolist()
    assert columns and set(columns) <= {15, 16}, columns
    assert (edges[0, 0] > 0).any(dim=1).all(), "the edge runs down every row"
    assert torch.equal(edges[1], torch.full((3, 32, 32), -1.0))


def test_canny_video_is_deterministic_and_keeps_dtype_on_a_real_clip():
    frames = plan_clips(1, SEED)[0].render()  # [20, 64, 96, 3] uint8
    video = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # [F, 3, H, W]
    first, second = canny_video(video, 50, 150), canny_video(video.clone(), 50, 150)
    assert first.shape == (20, 3, 64, 96) and torch.equal(first, second)
    assert (first > 0).any() and (first > 0).float().mean() < 0.2
    expected = torch.from_numpy(canny_frames(frames, 50, 150)).permute(0, 3, 1, 2)  # [F, 3, H, W]
    assert torch.equal(first > 0, expected > 0)
    half = canny_video(video.to(torch.bfloat16), 50, 150)
    assert half.dtype == torch.bfloat16 and torch.equal(half.float(), first)


def test_canny_frames_thresholds_and_input_are_checked():
    frames = np.zeros((1, 16, 16, 3), dtype=np.uint8)  # [F, H, W, 3]
    with pytest.raises(CogvxError, match="0 <= low < high <= 255"):
        canny_frames(frames, 200, 100)
    with pytest.raises(ValueError, match=r"\[F, H, W, 3\]"):
        canny_frames(frames[..., 0], 100, 200)
    with pytest.raises(ValueError, match=r"\[F, 3, H, W\]"):
        canny_video(torch.zeros(1, 1, 16, 16), 100, 200)


def test_missing_opencv_is_an_error_with_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)  # `import cv2` now raises ImportError
    with pytest.raises(CogvxError, match="pip install opencv-python-headless"):
        canny_video(step_frame()[None], 100, 200)
