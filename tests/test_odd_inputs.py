"""Odd inputs end as data problems with file and line, never as tracebacks: filesystem oddities
(symlink loops, over-long names, FIFOs, devices, folders, paths through missing folders or through
files), decoder failures with readable reasons and no ffmpeg/decord noise on the console, control
characters in captions, ambiguous listings, and LoRA files recognized by content, not by name."""

from __future__ import annotations

import os
import pickle
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cogvx.config import DataConfig
from cogvx.data.listing import read_samples
from cogvx.data.validation import apply_policy, validate_dataset
from cogvx.data.video import VideoError, probe_video, read_frames
from cogvx.errors import CogvxError
from tests.helpers import offline_env

FRAMES = 12
DATA = ("data.frames=9", "data.fps=native")  # the tiny model's 9-frame clips at each clip's own rate
DECODER_NOISE = ("moov atom", "[mov,mp4", "video_reader.cc", "Check failed", "@ 0x", "partial file")


def ffmpeg(*args: str) -> None:
    import imageio_ffmpeg

    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-y", *args], check=True, timeout=60)


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    """Real files, made once: a good clip, an audio-only mp4, a GIF, a text file and a PNG named
    .mp4, an mp4 cut in half, and one cut inside its video data (index at the front)."""
    from cogvx.data.synthetic import write_mp4

    folder = tmp_path_factory.mktemp("media")
    video = np.zeros((FRAMES, 64, 96, 3), dtype=np.uint8)  # [F, H, W, 3]
    video[:, 20:40, 30:60] = 200
    files = {"good": write_mp4(folder / "good.mp4", video, fps=8)}
    files["audio"] = folder / "audio.mp4"
    ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:duration=1", "-c:a", "aac", str(files["audio"]))
    files["gif"] = folder / "anim.gif"
    ffmpeg("-f", "lavfi", "-i", "testsrc=s=64x48:r=8:d=1", str(files["gif"]))
    files["png"] = folder / "frame.png"
    ffmpeg("-f", "lavfi", "-i", "testsrc=s=64x48:r=8:d=1", "-frames:v", "1", str(files["png"]))
    faststart = folder / "faststart.mp4"
    ffmpeg("-f", "lavfi", "-i", "testsrc=s=128x96:r=8:d=3", "-c:v", "libx264", "-pix_fmt", "yuv420p",
           "-movflags", "+faststart", str(faststart))
    files["cut-data"] = folder / "cut-data.mp4"
    files["cut-data"].write_bytes(faststart.read_bytes()[: faststart.stat().st_size * 2 // 3])
    files["cut-index"] = folder / "cut-index.mp4"
    files["cut-index"].write_bytes(files["good"].read_bytes()[: files["good"].stat().st_size // 2])
    files["text"] = folder / "text.mp4"
    files["text"].write_text("this is not a video\n" * 50, encoding="utf-8")
    return files


def txt_root(root: Path, pairs: list[tuple[str, str]]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "prompts.txt").write_text("".join(f"{c}\n" for c, _ in pairs), encoding="utf-8")
    (root / "videos.txt").write_text("".join(f"{v}\n" for _, v in pairs), encoding="utf-8")
    return root


def refused(result: subprocess.CompletedProcess) -> str:
    """The error of a refused `cogvx data validate`: exit 4, no traceback, no decoder noise."""
    assert result.returncode == 4, (result.stdout[-2000:], result.stderr[-3000:])
    assert "Traceback" not in result.stderr
    for noise in DECODER_NOISE:
        assert noise not in result.stdout + result.stderr, noise
    return result.stderr


# --------------------------------------------------------------------------- filesystem oddities


def odd_files_root(root: Path, media: dict[str, Path]) -> tuple[Path, dict[str, str]]:
    """A data set listing one good clip and every odd kind of file; expected reason by clip."""
    long_name = "x" * 300 + ".mp4"
    expected = {"good.mp4": None, "loop.mp4": "symlink loop",
                long_name: "file name too long for the filesystem (304 bytes in one name; the limit is 255)",
                "fifo.mp4": "a named pipe (FIFO), not a video file", "/dev/null": "clip path is absolute",
                "null-link.mp4": "clip resolves outside data_root", "missing/clip.mp4": "file not found (folder ",
                "good.mp4/inner.mp4": "good.mp4 is a file, not a folder", "clips": "a folder, not a video file",
                "dangling.mp4": "broken symlink (it points to ", "win\\clip.mp4":
                "file not found (the path contains '\\': use '/' as the path separator)"}
    txt_root(root, [(f"clip {i}", rel) for i, rel in enumerate(expected)])
    shutil.copyfile(media["good"], root / "good.mp4")
    (root / "loop.mp4").symlink_to("loop.mp4")
    os.mkfifo(root / "fifo.mp4")
    (root / "null-link.mp4").symlink_to("/dev/null")
    (root / "clips").mkdir()
    (root / "dangling.mp4").symlink_to("gone.mp4")
    if os.geteuid() == 0:  # a device node inside data_root (only root may make one)
        os.mknod(root / "device.mp4", 0o644 | stat.S_IFCHR, os.makedev(1, 3))
        expected["device.mp4"] = "a character device, not a video file"
        with open(root / "prompts.txt", "a") as p, open(root / "videos.txt", "a") as v:
            p.write("device\n"), v.write("device.mp4\n")
    return root, expected


def test_odd_files_listed_as_clips_are_problems_with_file_and_line(run_cli, media, tmp_path):
    root, expected = odd_files_root(tmp_path / "data", media)
    result = run_cli("data", "validate", f"data.data_root={root}", *DATA, timeout=120)  # a FIFO never blocks
    stderr = refused(result)
    bad = len(expected) - 1
    assert f"{bad} problems in data set {root} ({bad} of {len(expected)} samples affected)" in stderr
    for line, (rel, reason) in enumerate(expected.items(), start=1):
        if reason is not None:
            assert f"videos.txt:{line}: {rel}: " in stderr, rel
            assert reason in stderr.split(f"videos.txt:{line}: ")[1].split("\n")[0], (rel, stderr[-3000:])
    assert "train on the 1 valid one." in stderr


def test_odd_paths_in_process(media, tmp_path):
    """The same checks without the CLI: each reason, and no exception escapes."""
    root, expected = odd_files_root(tmp_path / "data", media)
    report = validate_dataset(DataConfig(data_root=root), min_frames=9)
    reasons = {p.video: p.message.removeprefix(f"{p.video}: ") for p in report.problems}
    for rel, reason in expected.items():
        assert (rel not in reasons) if reason is None else reason in reasons[rel], (rel, reasons.get(rel))
    assert reasons["missing/clip.mp4"] == "file not found (folder missing does not exist)"
    assert [s.video_rel for s in apply_policy(report, skip_invalid=True)] == ["good.mp4"]


def test_odd_data_root_and_listing_files(tmp_path):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    for data_root, reason in ((loop, "cannot be used: symlink loop"), (tmp_path / ("y" * 300), "cannot be used: file "
                              "name too long"), (tmp_path / "nowhere" / "data", "does not exist")):
        samples, problems = read_samples(DataConfig(data_root=data_root))
        assert samples == [] and len(problems) == 1 and reason in str(problems[0]), problems
    root = txt_root(tmp_path / "data", [("one", "a.mp4")])
    (root / "prompts.txt").unlink()
    os.mkfifo(root / "prompts.txt")
    assert [str(p) for p in read_samples(DataConfig(data_root=root))[1]] == [
        "prompts.txt: a named pipe (FIFO), not a listing file"]
    (root / "prompts.txt").unlink()
    (root / "prompts.txt").mkdir()
    assert [str(p) for p in read_samples(DataConfig(data_root=root))[1]] == [
        "prompts.txt: a folder, not a listing file"]
    (root / "metadata.csv").symlink_to("metadata.csv")
    problems = read_samples(DataConfig(data_root=root, format="csv"))[1]
    assert [str(p) for p in problems] == ["metadata.csv: symlink loop (a link on the path points back to itself)"]


def without_root_file_access() -> None:
    """preexec_fn: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the bounding set, so that
    the root process exec'd next obeys file permissions like any user."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def test_unreadable_files_and_folders(tmp_path, media):
    """chmod 000 on a clip, on a folder holding one and on a listing file. Root reads them all the
    same, so as root the validator runs without its capability to ignore file permissions."""
    root = txt_root(tmp_path / "data", [("good", "good.mp4"), ("locked", "locked.mp4"), ("inside", "locked/clip.mp4")])
    shutil.copyfile(media["good"], root / "good.mp4")
    shutil.copyfile(media["good"], root / "locked.mp4")
    (root / "locked").mkdir()
    shutil.copyfile(media["good"], root / "locked" / "clip.mp4")
    (root / "locked.mp4").chmod(0)
    (root / "locked").chmod(0)
    drop = without_root_file_access if os.geteuid() == 0 else None

    def validate():
        try:
            return subprocess.run([sys.executable, "-m", "cogvx", "data", "validate", f"data.data_root={root}", *DATA],
                                  cwd=tmp_path, env=offline_env(tmp_path), capture_output=True, text=True,
                                  timeout=120, preexec_fn=drop)
        except subprocess.SubprocessError as err:
            pytest.skip(f"cannot drop root's file access here: {err}")

    try:
        stderr = refused(validate())
        assert "videos.txt:2: locked.mp4: permission denied" in stderr
        assert "videos.txt:3: locked/clip.mp4: permission denied" in stderr
        (root / "prompts.txt").chmod(0)
        stderr = refused(validate())
        assert "prompts.txt: permission denied" in stderr and "no sample could be read" in stderr
    finally:
        (root / "locked").chmod(0o755)


# --------------------------------------------------------------------------- decoder messages


@pytest.mark.parametrize("name, reason", [
    ("audio", "no video stream (audio only)"),
    ("gif", "GIF is not a supported video; convert it to mp4, e.g. ffmpeg -i IN.gif -pix_fmt yuv420p OUT.mp4"),
    ("png", "it is a PNG image, not a video"),
    ("text", "it is a text file, not a video"),
    ("cut-index", "the mp4 has no index ('moov' atom): the file is truncated, or not an mp4"),
    ("cut-data", "the file is truncated (it ends before its video data does)"),
])
def test_decoder_failures_have_whole_reasons_and_print_nothing(media, capfd, name, reason):
    capfd.readouterr()
    with pytest.raises(VideoError) as info:
        probe_video(media[name])
    assert str(info.value) == f"{media[name]}: not a readable video: {reason}"
    with pytest.raises(VideoError) as info:
        read_frames(media[name], [0])
    assert str(info.value) == f"{media[name]}: cannot decode frames: {reason}"
    out, err = capfd.readouterr()
    assert out == "" and err == "", "the decoder printed to the console"


def test_decoder_noise_never_reaches_the_console(run_cli, media, tmp_path):
    names = ["good", "audio", "gif", "text", "cut-index", "cut-data"]
    root = txt_root(tmp_path / "data", [(name, f"{name}{media[name].suffix}") for name in names])
    for name in names:
        shutil.copyfile(media[name], root / f"{name}{media[name].suffix}")
    stderr = refused(run_cli("data", "validate", f"data.data_root={root}", *DATA))
    assert "videos.txt:2: audio.mp4: not a readable video: no video stream (audio only)" in stderr
    assert "videos.txt:3: gif.gif: not a readable video: GIF is not a supported video" in stderr
    assert "(5 of 6 samples affected)" in stderr


def test_a_damaged_clip_that_decodes_prints_nothing(media, tmp_path, capfd):
    """An AVI cut short decodes its first frames; what ffmpeg says about the damage stays captured."""
    clip = tmp_path / "clip.avi"
    ffmpeg("-f", "lavfi", "-i", "testsrc=s=128x96:r=8:d=5", "-c:v", "mpeg4", str(clip))
    clip.write_bytes(clip.read_bytes()[: clip.stat().st_size // 2])
    capfd.readouterr()
    info = probe_video(clip)
    frames = read_frames(clip, list(range(info.frames)))
    assert frames.shape[0] == info.frames > 0
    assert capfd.readouterr() == ("", "")


# --------------------------------------------------------------------------- captions and listings


def test_control_characters_in_captions_and_paths(run_cli, media, tmp_path):
    root = txt_root(tmp_path / "data", [("fine\twith a tab", "a.mp4"), ("nul\x00here", "b.mp4"),
                                        ("\x1b[31mred", "c.mp4"), ("path", "d\x00.mp4")])
    for name in "abc":
        shutil.copyfile(media["good"], root / f"{name}.mp4")
    stderr = refused(run_cli("data", "validate", f"data.data_root={root}", *DATA))
    assert ("prompts.txt:2: caption (prompts.txt line) for b.mp4 contains a control character (U+0000 NUL at "
            "character 4); remove it (tabs and line breaks are allowed)") in stderr
    assert "prompts.txt:3: caption (prompts.txt line) for c.mp4 contains a control character (U+001B ESC" in stderr
    assert "videos.txt:4: clip path (videos.txt line) contains a control character (U+0000 NUL" in stderr
    assert "prompts.txt:1" not in stderr and "(3 of 4 samples affected)" in stderr
    csv = tmp_path / "csv"
    csv.mkdir()
    shutil.copyfile(media["good"], csv / "a.mp4")
    (csv / "metadata.csv").write_text('caption,video\n"two\nlines",a.mp4\n"bell\x07",a.mp4\n', encoding="utf-8")
    problems = read_samples(DataConfig(data_root=csv))[1]
    assert [str(p) for p in problems] == ["metadata.csv:4: caption ('caption' column) for a.mp4 contains a control "
                                          "character (U+0007 at character 5); remove it (tabs and line breaks are allowed)"]


def test_metadata_beside_txt_listing_is_refused_naming_both(run_cli, media, tmp_path):
    root = txt_root(tmp_path / "data", [("one", "a.mp4")])
    shutil.copyfile(media["good"], root / "a.mp4")
    (root / "metadata.csv").write_text("caption,video\nother,a.mp4\n", encoding="utf-8")
    stderr = refused(run_cli("data", "validate", f"data.data_root={root}", *DATA)).replace("\n", " ")
    assert f"data.format: auto finds metadata.csv and prompts.txt + videos.txt in {root}" in stderr
    assert "set data.format=csv (or data.metadata_file=metadata.csv) to use metadata.csv, or data.format=txt" in stderr
    chosen = run_cli("data", "validate", f"data.data_root={root}", "data.format=txt", *DATA)
    assert chosen.returncode == 0 and "1 valid samples" in chosen.stdout, chosen.stderr[-2000:]


def test_whole_data_set_messages_read_naturally(run_cli, tmp_path):
    empty = txt_root(tmp_path / "empty", [])
    stderr = refused(run_cli("data", "validate", f"data.data_root={empty}", *DATA))
    assert f"1 problem in data set {empty}; no sample could be read:" in stderr
    assert "videos.txt: lists no samples" in stderr and "Fix the listed problems: no sample could be read." in stderr
    gone = txt_root(tmp_path / "gone", [("one", "a.mp4"), ("two", "b.mp4")])
    stderr = refused(run_cli("data", "validate", f"data.data_root={gone}", *DATA))
    assert f"2 problems in data set {gone} (all 2 samples affected):" in stderr
    assert "no sample is usable" in stderr
    for text in (stderr, refused(run_cli("data", "validate", f"data.data_root={empty}", "--skip-invalid", *DATA))):
        assert "0 of 0" not in text and "0 valid" not in text and "with data.skip_invalid=true to drop" not in text


# --------------------------------------------------------------------------- LoRA files


@pytest.fixture(scope="module")
def lora(tiny_models, tmp_path_factory) -> Path:
    """A real LoRA of the tiny text-to-video model (non-zero, so that it changes the output)."""
    import torch

    from cogvx.models.loader import load_pipeline
    from cogvx.models.specs import get_spec
    from cogvx.models.lora import add_lora, save_lora

    pipe = load_pipeline(str(tiny_models["tiny-t2v"]), get_spec("tiny-t2v"))
    add_lora(pipe.transformer, rank=4, alpha=8, target_modules=["to_q", "to_k", "to_v"])
    with torch.no_grad():
        for name, param in pipe.transformer.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    return save_lora(pipe.transformer, tmp_path_factory.mktemp("lora") / "lora", {"variant": "tiny-t2v"})


@pytest.mark.slow
def test_lora_with_any_name_is_loaded_as_safetensors(lora, tiny_models, run_cli, tmp_path):
    from cogvx.generate import attach_lora
    from cogvx.models.loader import load_pipeline
    from cogvx.models.specs import get_spec

    odd = tmp_path / "x.st"
    shutil.copyfile(lora, odd)
    adapters = []
    for path in (lora, odd):
        pipe = load_pipeline(str(tiny_models["tiny-t2v"]), get_spec("tiny-t2v"))
        assert attach_lora(pipe, path, 1.0, log=lambda *_: None)["rank"] == 4
        adapters.append({k: v.clone() for k, v in pipe.transformer.state_dict().items() if "lora" in k})
    assert adapters[0].keys() == adapters[1].keys() and len(adapters[0]) > 0
    assert all((adapters[0][k] == adapters[1][k]).all() for k in adapters[0])
    result = run_cli("generate", "--prompt", "x", "--lora", str(odd), "--steps", "1", "--frames", "9", "--out",
                     "out.mp4", f"model.path={tiny_models['tiny-t2v']}", "tracking.enabled=false", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LoRA rank 4, alpha 8" in result.stdout and "Traceback" not in result.stderr
    assert (tmp_path / "out.mp4").stat().st_size > 0


def test_lora_that_is_not_safetensors_is_refused_before_any_loader(tmp_path):
    """Whatever the name, the content decides; the pipeline (None here) is never touched."""
    import torch
    from safetensors.torch import save_file

    from cogvx.generate import attach_lora, resolve_weights
    from cogvx.config import Config
    from cogvx.generate import GenerateRequest

    files = {"notes.st": ("text", "header too large"), "weights.lora": ("pickle", "it is a pickle (.bin/.pt)"),
             "adapter.safetensors": ("zip", "it is a torch.save zip archive"), "cut.st": ("cut", "incomplete metadata"),
             "empty.safetensors": ("empty", "empty file (0 bytes)"), "pipe.st": ("fifo", "a named pipe (FIFO)")}
    for name, (kind, reason) in files.items():
        path = tmp_path / name
        if kind == "text":
            path.write_text("these are not weights\n" * 20, encoding="utf-8")
        elif kind == "pickle":
            path.write_bytes(pickle.dumps({"w": [1, 2, 3]}))
        elif kind == "zip":
            torch.save({"w": torch.zeros(2)}, path)
        elif kind == "cut":
            save_file({"transformer.a.lora_A.weight": torch.zeros(64, 4)}, str(path))
            path.write_bytes(path.read_bytes()[:-64])
        elif kind == "empty":
            path.write_bytes(b"")
        else:
            os.mkfifo(path)
        with pytest.raises(CogvxError) as info:
            attach_lora(None, path, 1.0, log=lambda *_: None)
        assert str(info.value).startswith(f"{path} is not a readable safetensors LoRA file ("), str(info.value)
        assert reason in str(info.value), str(info.value)
    with pytest.raises(CogvxError, match="no such LoRA file"):
        attach_lora(None, tmp_path / "nope.safetensors", 1.0)
    with pytest.raises(CogvxError, match="file name too long"):
        attach_lora(None, tmp_path / ("z" * 300), 1.0)
    request = GenerateRequest(prompt="x", out=tmp_path / "o.mp4", weights=tmp_path / "notes.st")
    assert resolve_weights(Config(), request) == (tmp_path / "notes.st", None)


@pytest.mark.parametrize("args", [("data", "synthetic", "--n", "0"), ("bench", "run", "--memory-cap-gib", "0.5"),
                                  ("bench", "run", "--processes", "0")])
def test_an_option_out_of_its_range_is_a_usage_error_not_a_traceback(run_cli, args):
    done = run_cli(*args)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Invalid value for" in done.stderr and "Traceback" not in done.stdout + done.stderr
