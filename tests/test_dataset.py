"""Reading and validating data sets: every layout, every problem, and the skip_invalid policy.

All tests use real files: small mp4 clips written once per module with imageio (libx264) and
copied into each test's data_root, so decord probes real (and really broken) videos.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from cogvx.config import DataConfig
from cogvx.data.listing import Problem, Sample, read_samples
from cogvx.data.validation import DataValidationError, ValidationReport, apply_policy, validate_dataset
from cogvx.errors import CogvxError

FRAMES = 20
FPS = 8


def write_clip(path: Path, frames: int) -> Path:
    """A real 64x96 H.264 clip of ``frames`` frames at 8 fps."""
    import imageio

    writer = imageio.v2.get_writer(path, fps=FPS, codec="libx264", macro_block_size=1)
    for index in range(frames):
        writer.append_data(np.full((64, 96, 3), index * 10 % 256, dtype=np.uint8))
    writer.close()
    return path


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory) -> dict[str, Path]:
    """The source clips, written once: a 20-frame clip and a 5-frame one."""
    folder = tmp_path_factory.mktemp("clips")
    return {"long": write_clip(folder / "long.mp4", FRAMES),
            "short": write_clip(folder / "short.mp4", 5)}


@pytest.fixture
def make_data(tmp_path, clip_files):
    """Build a data_root: ``clips`` maps relative paths to 'long', 'short' or raw bytes; ``files``
    maps listing names to text (str) or raw bytes. Returns a DataConfig for it."""

    def make(clips: dict[str, str | bytes] | None = None, files: dict[str, str | bytes] | None = None,
             **config) -> DataConfig:
        root = tmp_path / "data"
        root.mkdir(exist_ok=True)
        for rel, kind in (clips or {}).items():
            target = root / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(kind, bytes):
                target.write_bytes(kind)
            else:
                shutil.copyfile(clip_files[kind], target)
        for name, content in (files or {}).items():
            target = root / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                target.write_bytes(content)
            else:
                target.write_text(content, encoding="utf-8")
        return DataConfig(data_root=root, **config)

    return make


def txt_data(make_data, pairs: list[tuple[str, str]], clips=None, **config) -> DataConfig:
    """A txt data set from (caption, clip) pairs."""
    files = {"prompts.txt": "".join(f"{c}\n" for c, _ in pairs),
             "videos.txt": "".join(f"{v}\n" for _, v in pairs)}
    return make_data(clips, files, **config)


def lines(report: ValidationReport) -> list[str]:
    return [str(problem) for problem in report.problems]


def only_problem(report: ValidationReport) -> str:
    assert len(report.problems) == 1, report.format()
    return str(report.problems[0])


# --------------------------------------------------------------------------- formats


def test_txt_layout(make_data):
    data = txt_data(make_data, [("a red ball", "clips/a.mp4"), ("  a blue cube ", "clips/b.mp4")],
                    clips={"clips/a.mp4": "long", "clips/b.mp4": "long"})
    samples, problems = read_samples(data)
    assert problems == []
    root = Path(data.data_root).resolve()
    assert samples == [
        Sample("a red ball", root / "clips/a.mp4", None, "videos.txt:1", "clips/a.mp4"),
        Sample("a blue cube", root / "clips/b.mp4", None, "videos.txt:2", "clips/b.mp4"),
    ]
    assert all(s.video.is_absolute() for s in samples)


def test_txt_layout_with_images(make_data):
    data = make_data({"v/a.mp4": "long", "v/b.mp4": "long", "v/c.mp4": "long"},
                     {"prompts.txt": "one\ntwo\nthree\n", "videos.txt": "v/a.mp4\nv/b.mp4\nv/c.mp4\n",
                      "images.txt": "i/a.png\n\ni/c.png\n", "i/a.png": b"png", "i/c.png": b"png"})
    samples, problems = read_samples(data)
    assert problems == []
    root = Path(data.data_root).resolve()
    assert [s.image for s in samples] == [root / "i/a.png", None, root / "i/c.png"]
    assert [s.image_rel for s in samples] == ["i/a.png", None, "i/c.png"]
    report = validate_dataset(data, min_frames=FRAMES)
    assert report.problems == [] and len(report.valid) == 3


def test_csv_layout_with_custom_columns(make_data):
    csv_text = ('text,path,first_frame\n'
                '"a cat, walking",clips/a.mp4,\n'
                '"a dog\nrunning",clips/b.mp4,img/b.png\n'
                '\n'
                'a bird,clips/c.mp4,\n')
    data = make_data({"clips/a.mp4": "long", "clips/b.mp4": "long", "clips/c.mp4": "long"},
                     {"lists/train.csv": csv_text, "img/b.png": b"png"},
                     metadata_file="lists/train.csv", caption_column="text",
                     video_column="path", image_column="first_frame")
    samples, problems = read_samples(data)
    assert problems == []
    assert [s.caption for s in samples] == ["a cat, walking", "a dog\nrunning", "a bird"]
    assert [s.origin for s in samples] == ["lists/train.csv:2", "lists/train.csv:3",
                                           "lists/train.csv:6"]
    assert [s.video_rel for s in samples] == ["clips/a.mp4", "clips/b.mp4", "clips/c.mp4"]
    assert samples[0].image is None
    assert samples[1].image == Path(data.data_root).resolve() / "img/b.png"


def test_json_list_layout(make_data):
    records = [{"caption": "one", "video": "a.mp4"},
               {"caption": "two", "video": "b.mp4", "image": None},
               {"caption": "three", "video": "c.mp4", "image": "c.png"}]
    data = make_data({"a.mp4": "long"}, {"metadata.json": json.dumps(records, indent=2)})
    samples, problems = read_samples(data)
    assert problems == []
    assert [s.origin for s in samples] == ["metadata.json[0]", "metadata.json[1]",
                                           "metadata.json[2]"]
    assert [s.image_rel for s in samples] == [None, None, "c.png"]


def test_jsonl_layout_is_found_automatically(make_data):
    text = ('{"caption": "one", "video": "a.mp4"}\n'
            '\n'
            '{"caption": "two", "video": "b.mp4"}\n')
    data = make_data({}, {"metadata.jsonl": text})
    samples, problems = read_samples(data)
    assert problems == []
    assert [(s.caption, s.origin) for s in samples] == [("one", "metadata.jsonl:1"),
                                                         ("two", "metadata.jsonl:3")]


def test_metadata_file_beside_a_txt_listing_is_refused_in_auto_mode(make_data):
    """auto does not guess between two listings of one data_root; data.format picks one."""
    data = make_data({}, {"metadata.jsonl": '{"caption": "one", "video": "a.mp4"}\n',
                          "prompts.txt": "x\n", "videos.txt": "x.mp4\n"})
    samples, problems = read_samples(data)
    assert samples == [] and len(problems) == 1
    assert str(problems[0]).startswith("data.format: auto finds metadata.jsonl and prompts.txt + videos.txt")
    assert "data.format=json (or data.metadata_file=metadata.jsonl) to use metadata.jsonl" in str(problems[0])
    assert "data.format=txt to use prompts.txt + videos.txt" in str(problems[0])
    json_samples, _ = read_samples(data.model_copy(update={"format": "json"}))
    assert [s.origin for s in json_samples] == ["metadata.jsonl:1"]
    named, _ = read_samples(data.model_copy(update={"metadata_file": "metadata.jsonl"}))
    assert [s.origin for s in named] == ["metadata.jsonl:1"]
    txt_samples, _ = read_samples(data.model_copy(update={"format": "txt"}))
    assert [s.origin for s in txt_samples] == ["videos.txt:1"]
    both = make_data({}, {"metadata.csv": "caption,video\nx,a.mp4\n"})
    assert "auto finds metadata.csv and metadata.jsonl" in str(read_samples(both)[1][0])


def test_valid_data_set_passes_and_keeps_probe_results(make_data):
    data = txt_data(make_data, [("one", "a.mp4"), ("two", "b.mp4")],
                    clips={"a.mp4": "long", "b.mp4": "long"})
    report = validate_dataset(data, min_frames=FRAMES)
    assert report.problems == [] and report.invalid == {}
    assert report.valid == report.samples
    assert report.infos[report.samples[0].video].frames == FRAMES
    assert report.infos[report.samples[0].video].width == 96
    assert apply_policy(report, skip_invalid=False, report_path=None) == report.samples


# --------------------------------------------------------------------------- parse problems


def test_count_mismatch(make_data):
    data = make_data({"a.mp4": "long", "b.mp4": "long"},
                     {"prompts.txt": "one\ntwo\nthree\n", "videos.txt": "a.mp4\nb.mp4\n"})
    report = validate_dataset(data, min_frames=2)
    assert only_problem(report).startswith("videos.txt: prompts.txt has 3 lines, videos.txt has 2")
    assert len(report.valid) == 2


def test_empty_caption(make_data):
    data = txt_data(make_data, [("one", "a.mp4"), ("   ", "b.mp4")],
                    clips={"a.mp4": "long", "b.mp4": "long"})
    report = validate_dataset(data, min_frames=2)
    assert only_problem(report).startswith("prompts.txt:2: empty caption")
    assert "b.mp4" in only_problem(report)
    assert [s.video_rel for s in report.valid] == ["a.mp4"]


def test_non_utf8_prompts_names_line_and_offset(make_data):
    prompts = "one\n".encode() + b"caf\xe9 au lait\n" + "three\n".encode()
    data = make_data({"a.mp4": "long", "b.mp4": "long", "c.mp4": "long"},
                     {"prompts.txt": prompts, "videos.txt": "a.mp4\nb.mp4\nc.mp4\n"})
    report = validate_dataset(data, min_frames=2)
    assert only_problem(report) == ("prompts.txt:2: not valid UTF-8 (byte 0xe9 at offset 7); "
                                    "save the file as UTF-8")
    assert [s.video_rel for s in report.valid] == ["a.mp4", "c.mp4"]


def test_csv_with_bom_crlf_and_a_non_utf8_row(make_data):
    raw = b"\xef\xbb\xbfcaption,video\r\nh\xe9llo,a.mp4\r\nfine,b.mp4\r\n"
    data = make_data({"a.mp4": "long", "b.mp4": "long"}, {"metadata.csv": raw})
    report = validate_dataset(data, min_frames=2)
    assert only_problem(report) == ("metadata.csv:2: not valid UTF-8 (byte 0xe9 at offset 19); "
                                    "save the file as UTF-8")
    assert [(s.caption, s.origin) for s in report.valid] == [("fine", "metadata.csv:3")]


def test_missing_data_root(tmp_path):
    report = validate_dataset(DataConfig(data_root=tmp_path / "nowhere"), min_frames=2)
    message = only_problem(report)
    assert message.startswith(f"data.data_root: {tmp_path / 'nowhere'} does not exist")
    assert report.samples == []


def test_missing_listing_files(make_data):
    data = make_data({}, {"prompts.txt": "one\n"})
    assert only_problem(validate_dataset(data, min_frames=2)).startswith(
        "videos.txt: not found in")
    empty = make_data({}, {})
    (Path(empty.data_root) / "prompts.txt").unlink()
    assert only_problem(validate_dataset(empty, min_frames=2)).startswith(
        "prompts.txt + videos.txt: not found in")
    named = make_data({}, {}, metadata_file="meta.csv")
    assert only_problem(validate_dataset(named, min_frames=2)).startswith("meta.csv: not found in")


def test_csv_missing_video_column(make_data):
    data = make_data({}, {"metadata.csv": "caption,file\nhello,a.mp4\n"}, video_column="path")
    assert only_problem(validate_dataset(data, min_frames=2)) == (
        "metadata.csv:1: no 'path' (video, data.video_column) column; "
        "the columns are: caption, file")


def test_malformed_jsonl_line(make_data):
    text = ('{"caption": "one", "video": "a.mp4"}\n'
            '{"caption": "two", "video": "b.mp4"\n'
            '{"caption": "three"}\n'
            '["not", "an", "object"]\n')
    data = make_data({"a.mp4": "long"}, {"metadata.jsonl": text})
    report = validate_dataset(data, min_frames=2)
    assert lines(report)[0].startswith("metadata.jsonl:2: not valid JSON: Expecting ',' delimiter")
    assert lines(report)[1].startswith("metadata.jsonl:3: no 'video' key (keys: caption)")
    assert lines(report)[2].startswith("metadata.jsonl:4: expected an object")
    assert len(lines(report)) == 3
    assert [s.origin for s in report.valid] == ["metadata.jsonl:1"]


def test_malformed_json_list(make_data):
    data = make_data({}, {"metadata.json": '[\n  {"caption": "one", "video": "a.mp4"},\n  oops\n]'})
    assert only_problem(validate_dataset(data, min_frames=2)).startswith(
        "metadata.json:3: not valid JSON: Expecting value")
    data = make_data({}, {"metadata.json": '{"caption": "one", "video": "a.mp4"}'})
    assert only_problem(validate_dataset(data, min_frames=2)).startswith(
        "metadata.json: expected a list of objects, got dict")


# --------------------------------------------------------------------------- clip problems


@pytest.mark.parametrize("content, expected", [
    (None, "file not found"),
    (b"", "empty file (0 bytes)"),
    (os.urandom(4096), "not a readable video"),
    (b"this is a caption file, not a video\n" * 20, "not a readable video"),
])
def test_broken_clip(make_data, content, expected):
    clips = {"clips/ok.mp4": "long"}
    if content is not None:
        clips["clips/bad.mp4"] = content
    data = txt_data(make_data, [("good", "clips/ok.mp4"), ("bad", "clips/bad.mp4")], clips=clips)
    report = validate_dataset(data, min_frames=2)
    assert only_problem(report).startswith(f"videos.txt:2: clips/bad.mp4: {expected}")
    assert [s.video_rel for s in report.valid] == ["clips/ok.mp4"]
    assert set(report.invalid) == {1}


def test_truncated_clip(make_data, clip_files):
    data_bytes = clip_files["long"].read_bytes()
    data = txt_data(make_data, [("cut", "cut.mp4")], clips={"cut.mp4": data_bytes[: len(data_bytes) // 2]})
    assert "cut.mp4: not a readable video" in only_problem(validate_dataset(data, min_frames=2))


def test_clip_shorter_than_min_frames(make_data):
    data = txt_data(make_data, [("long", "long.mp4"), ("short", "short.mp4")],
                    clips={"long.mp4": "long", "short.mp4": "short"})
    report = validate_dataset(data, min_frames=9)
    assert only_problem(report) == ("videos.txt:2: short.mp4: too short: 5 usable frames, "
                                    "needs 9 (5 frames at 8 fps)")


def test_clip_short_only_after_skipping_and_fps_sampling(make_data):
    pairs = [("long", "long.mp4")]
    clips = {"long.mp4": "long"}
    assert validate_dataset(txt_data(make_data, pairs, clips=clips), min_frames=10).problems == []
    # 20 frames at 8 fps, 2 skipped -> 18, every 2nd frame for 4 fps -> 9 < 10
    data = txt_data(make_data, pairs, clips=clips, fps=4, skip_frames_start=2)
    assert only_problem(validate_dataset(data, min_frames=10)) == (
        "videos.txt:1: long.mp4: too short: 9 usable frames, needs 10 (20 frames at 8 fps, "
        "less 2 skipped at the start and 0 at the end, sampled at 4 fps)")
    data = txt_data(make_data, pairs, clips=clips, skip_frames_end=15)
    assert "too short: 5 usable frames, needs 10" in only_problem(validate_dataset(data, min_frames=10))


def test_path_with_dotdot(make_data, tmp_path, clip_files):
    shutil.copyfile(clip_files["long"], tmp_path / "outside.mp4")
    data = txt_data(make_data, [("up", "../outside.mp4")])
    assert only_problem(validate_dataset(data, min_frames=2)).startswith(
        "videos.txt:1: ../outside.mp4: clip path contains '..'")


def test_absolute_path(make_data, tmp_path, clip_files):
    outside = tmp_path / "outside.mp4"
    shutil.copyfile(clip_files["long"], outside)
    data = txt_data(make_data, [("abs", str(outside))])
    assert only_problem(validate_dataset(data, min_frames=2)).startswith(
        f"videos.txt:1: {outside}: clip path is absolute")


def test_symlink_outside_data_root(make_data, tmp_path, clip_files):
    outside = tmp_path / "elsewhere" / "clip.mp4"
    outside.parent.mkdir()
    shutil.copyfile(clip_files["long"], outside)
    data = txt_data(make_data, [("inside", "clips/in.mp4"), ("link", "clips/out.mp4"),
                                ("inner link", "clips/in-link.mp4")], clips={"clips/in.mp4": "long"})
    root = Path(data.data_root)
    (root / "clips/out.mp4").symlink_to(outside)
    (root / "clips/in-link.mp4").symlink_to(root / "clips/in.mp4")
    report = validate_dataset(data, min_frames=2)
    # a link inside data_root is fine, but names the same clip as line 1
    assert lines(report) == [
        f"videos.txt:2: clips/out.mp4: clip resolves outside data_root (through a symlink, "
        f"to {outside.resolve()})",
        "videos.txt:3: clips/in-link.mp4: listed twice (first at videos.txt:1)",
    ]


def test_duplicate_entries(make_data):
    data = txt_data(make_data, [("one", "a.mp4"), ("two", "b.mp4"), ("again", "a.mp4"),
                                ("dotted", "./b.mp4")], clips={"a.mp4": "long", "b.mp4": "long"})
    report = validate_dataset(data, min_frames=2)
    assert lines(report) == ["videos.txt:3: a.mp4: listed twice (first at videos.txt:1)",
                             "videos.txt:4: ./b.mp4: listed twice (first at videos.txt:2)"]
    assert [s.origin for s in report.valid] == ["videos.txt:1", "videos.txt:2"]


def test_image_problems(make_data, tmp_path):
    (tmp_path / "secret.png").write_bytes(b"png")
    records = [{"caption": "missing", "video": "a.mp4", "image": "img/none.png"},
               {"caption": "escape", "video": "b.mp4", "image": "../secret.png"},
               {"caption": "fine", "video": "c.mp4", "image": "img/c.png"}]
    data = make_data({"a.mp4": "long", "b.mp4": "long", "c.mp4": "long"},
                     {"metadata.jsonl": "\n".join(json.dumps(r) for r in records),
                      "img/c.png": b"png"})
    report = validate_dataset(data, min_frames=2)
    assert lines(report) == [
        "metadata.jsonl:1: a.mp4: image img/none.png: file not found",
        "metadata.jsonl:2: b.mp4: image ../secret.png: path contains '..'; paths must stay "
        f"inside data_root ({Path(data.data_root).resolve()})",
    ]
    assert [s.origin for s in report.valid] == ["metadata.jsonl:3"]


def test_probe_false_checks_files_but_does_not_decode(make_data):
    data = txt_data(make_data, [("bad", "bad.mp4"), ("gone", "gone.mp4")],
                    clips={"bad.mp4": b"not a video"})
    report = validate_dataset(data, min_frames=1000, probe=False)
    assert lines(report) == ["videos.txt:2: gone.mp4: file not found"]
    assert report.infos == {}


# --------------------------------------------------------------------------- reporting and policy


@pytest.fixture
def five_problems(make_data):
    """One valid clip and five broken ones, each broken differently."""
    pairs = [("ok", "ok.mp4"), ("gone", "gone.mp4"), ("noise", "noise.mp4"), ("empty", "empty.mp4"),
             ("short", "short.mp4"), ("again", "ok.mp4")]
    clips = {"ok.mp4": "long", "noise.mp4": os.urandom(2048), "empty.mp4": b"", "short.mp4": "short"}
    return txt_data(make_data, pairs, clips=clips)


def test_all_problems_are_reported_at_once(five_problems):
    report = validate_dataset(five_problems, min_frames=9)
    text = report.format().splitlines()
    assert text[0] == (f"5 problems in data set {Path(five_problems.data_root).resolve()} "
                       "(5 of 6 samples affected):")
    assert text[1:] == [
        "  - videos.txt:2: gone.mp4: file not found",
        "  - videos.txt:3: noise.mp4: not a readable video" + text[2].split("not a readable video")[1],
        "  - videos.txt:4: empty.mp4: empty file (0 bytes)",
        "  - videos.txt:5: short.mp4: too short: 5 usable frames, needs 9 (5 frames at 8 fps)",
        "  - videos.txt:6: ok.mp4: listed twice (first at videos.txt:1)",
    ]
    assert sorted(report.invalid) == [1, 2, 3, 4, 5]
    assert all(isinstance(p, Problem) for ps in report.invalid.values() for p in ps)


def test_policy_stops_with_every_problem(five_problems, tmp_path):
    report = validate_dataset(five_problems, min_frames=9)
    with pytest.raises(DataValidationError) as info:
        apply_policy(report, skip_invalid=False, report_path=tmp_path / "skipped.json")
    assert isinstance(info.value, CogvxError) and info.value.exit_code == 4
    message = str(info.value)
    for problem in report.problems:
        assert str(problem) in message
    assert message.splitlines()[-1].startswith("Fix the listed problems, or set "
                                               "data.skip_invalid=true")
    assert not (tmp_path / "skipped.json").exists()


def test_skip_invalid_writes_report_and_keeps_the_rest(make_data, tmp_path):
    data = make_data({"a.mp4": "long", "b.mp4": "long"},
                     {"prompts.txt": "one\n\nthree\nfour\n",
                      "videos.txt": "a.mp4\nb.mp4\nmissing.mp4\na.mp4\nextra.mp4\n"})
    report = validate_dataset(data, min_frames=2)
    out = tmp_path / "reports" / "skipped.json"
    kept = apply_policy(report, skip_invalid=True, report_path=out)
    assert [s.origin for s in kept] == ["videos.txt:1"]
    written = json.loads(out.read_text(encoding="utf-8"))
    assert written == {
        "dropped": [
            {"origin": "videos.txt:3", "video": "missing.mp4", "reasons": ["file not found"]},
            {"origin": "videos.txt:4", "video": "a.mp4",
             "reasons": ["listed twice (first at videos.txt:1)"]},
            {"origin": "prompts.txt:2", "video": "b.mp4",
             "reasons": ["empty caption (prompts.txt line) for b.mp4"]},
        ],
        "kept": 1,
        "problems_without_sample": [
            "videos.txt: prompts.txt has 4 lines, videos.txt has 5; only the first 4 pairs are read"],
    }
    assert report.format().startswith("4 problems in data set ")
    assert "(3 of 4 samples affected)" in report.format().splitlines()[0]
    assert [p.name for p in out.parent.iterdir()] == ["skipped.json"]  # no temp file left


def test_skip_invalid_with_nothing_left(make_data, tmp_path):
    data = txt_data(make_data, [("gone", "gone.mp4"), ("noise", "noise.mp4")],
                    clips={"noise.mp4": b"\x00" * 100})
    report = validate_dataset(data, min_frames=2)
    out = tmp_path / "skipped.json"
    with pytest.raises(DataValidationError, match="No valid sample is left") as info:
        apply_policy(report, skip_invalid=True, report_path=out)
    assert info.value.exit_code == 4
    assert json.loads(out.read_text())["kept"] == 0
    assert len(json.loads(out.read_text())["dropped"]) == 2
