"""The bad-input corpus: malformed params files, data sets and LoRA files, each with the
command that must refuse it and what the refusal must say.

    python tests/data/make_bad_corpus.py tests/data/bad   # write it (git-ignored) to look at

Tests build it in a temp folder (tests/test_bad_inputs.py) and run every command for real.
"""

from __future__ import annotations

import json
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class BadInput:
    """One bad input: the `cogvx` arguments that read it, the exit code and message expected."""

    name: str
    args: tuple[str, ...]
    exit_code: int
    message: str  # a fragment the error must contain (it names the input)


def _params(root: Path) -> list[BadInput]:
    folder = root / "params"
    folder.mkdir(parents=True)
    files = {
        "wrong-types.yaml": ("train:\n  max_steps: many\n  lora:\n    rank: -3\n", "train.max_steps = 'many'"),
        "unknown-key.yaml": ("train:\n  lr: 0.001\n", "did you mean 'learning_rate'"),
        "yaml-bomb.yaml": ("a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
                           "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n",
                           "alias"),
        "not-a-mapping.yaml": ("- just\n- a list\n", "params"),
        "huge.yaml": ("train:\n  seed: 1\n# " + "x" * (2 << 20) + "\n", "a params file may be at most"),
    }
    cases = []
    for name, (text, message) in files.items():
        (folder / name).write_text(text, encoding="utf-8")
        cases.append(BadInput(f"params/{name}", ("config", "show", "--params", str(folder / name)), 2, message))
    (folder / "latin1.yaml").write_bytes("train:\n  output_dir: caf\xe9\n".encode("latin-1"))
    cases.append(BadInput("params/latin1.yaml", ("config", "show", "--params", str(folder / "latin1.yaml")), 2,
                          "UTF-8"))
    return cases


def _write_clip(path: Path, frames: int) -> None:
    from cogvx.data.synthetic import write_mp4

    video = np.zeros((frames, 64, 96, 3), dtype=np.uint8)  # [F, H, W, 3]
    video[:, 20:40, 30:60] = 200
    write_mp4(path, video, fps=8)


def _write_huge_clip(path: Path) -> None:
    """Two black 8640x8640 frames (74.6 MP each: above 8K), small on disk."""
    import subprocess

    import imageio_ffmpeg

    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-y", "-f", "lavfi", "-i",
                    "color=c=black:s=8640x8640:r=8", "-frames:v", "2", "-c:v", "libx264", "-preset", "ultrafast",
                    "-pix_fmt", "yuv420p", str(path)], check=True, timeout=120)


def _dataset(root: Path, name: str, captions: list[str], clips: list[str]) -> Path:
    folder = root / "data" / name
    (folder / "videos").mkdir(parents=True)
    _write_clip(folder / "videos" / "good.mp4", 24)
    (folder / "prompts.txt").write_text("".join(f"{c}\n" for c in captions), encoding="utf-8")
    (folder / "videos.txt").write_text("".join(f"{c}\n" for c in clips), encoding="utf-8")
    return folder


def _datasets(root: Path) -> list[BadInput]:
    one_frame = _dataset(root, "one-frame", ["a good clip", "one frame"], ["videos/good.mp4", "videos/one.mp4"])
    _write_clip(one_frame / "videos" / "one.mp4", 1)
    text_mp4 = _dataset(root, "text-as-mp4", ["a good clip", "text"], ["videos/good.mp4", "videos/text.mp4"])
    (text_mp4 / "videos" / "text.mp4").write_text("this is not a video\n" * 50, encoding="utf-8")
    empty_mp4 = _dataset(root, "empty-mp4", ["a good clip", "empty"], ["videos/good.mp4", "videos/empty.mp4"])
    (empty_mp4 / "videos" / "empty.mp4").write_bytes(b"")
    long_caption = _dataset(root, "megabyte-caption", ["a good clip", "word " * 200_000],
                            ["videos/good.mp4", "videos/good.mp4"])
    huge = _dataset(root, "huge-resolution", ["a good clip", "huge"], ["videos/good.mp4", "videos/huge.mp4"])
    _write_huge_clip(huge / "videos" / "huge.mp4")
    traversal = _dataset(root, "traversal", ["a good clip", "escape"], ["videos/good.mp4", "../../outside.mp4"])
    _write_clip(traversal.parent.parent / "outside.mp4", 24)
    absolute = _dataset(root, "absolute", ["a good clip", "absolute"],
                        ["videos/good.mp4", str(traversal.parent.parent / "outside.mp4")])
    expected = {one_frame: "one.mp4", text_mp4: "text.mp4", empty_mp4: "empty.mp4",
                long_caption: "characters; over 10,000 is refused", huge: "8640x8640 frames are larger than 8K",
                traversal: "../../outside.mp4",
                absolute: "outside.mp4"}
    expected.update(_odd_datasets(root))
    cases = [BadInput(f"data/{folder.name}", ("data", "validate", f"data.data_root={folder}"), 4, message)
             for folder, message in expected.items()]
    secret = root / "data" / "secret.txt"
    secret.write_text("do-not-echo-this\n", encoding="utf-8")
    for key, value in (("prompts_file", "../secret.txt"), ("videos_file", "../../data/secret.txt"),
                       ("images_file", str(secret)), ("metadata_file", "/etc/passwd")):
        cases.append(BadInput(f"data/listing-{key}", ("data", "validate", f"data.data_root={one_frame}",
                                                      f"data.{key}={value}"), 2,
                              f"data.{key} = '{value}': must be a path inside data.data_root"))
    return cases


def _odd_datasets(root: Path) -> dict[Path, str]:
    """Data sets whose odd files must not crash, hang or print decoder noise: a symlink loop, a
    FIFO listed as a clip, an audio-only mp4, a caption with a NUL, two listings in one folder."""
    import os
    import subprocess

    import imageio_ffmpeg

    loop = _dataset(root, "symlink-loop", ["a good clip", "loop"], ["videos/good.mp4", "videos/loop.mp4"])
    (loop / "videos" / "loop.mp4").symlink_to("loop.mp4")
    fifo = _dataset(root, "fifo-clip", ["a good clip", "pipe"], ["videos/good.mp4", "videos/pipe.mp4"])
    os.mkfifo(fifo / "videos" / "pipe.mp4")
    audio = _dataset(root, "audio-only", ["a good clip", "sound"], ["videos/good.mp4", "videos/sound.mp4"])
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-y", "-f", "lavfi", "-i",
                    "sine=frequency=440:duration=1", "-c:a", "aac", str(audio / "videos" / "sound.mp4")],
                   check=True, timeout=60)
    nul = _dataset(root, "nul-caption", ["a good clip", "a\x00b"], ["videos/good.mp4", "videos/good.mp4"])
    both = _dataset(root, "two-listings", ["a good clip"], ["videos/good.mp4"])
    (both / "metadata.csv").write_text("caption,video\nother,videos/good.mp4\n", encoding="utf-8")
    return {loop: "videos/loop.mp4: symlink loop", fifo: "videos/pipe.mp4: a named pipe (FIFO), not a video file",
            audio: "videos/sound.mp4: not a readable video: no video stream (audio only)",
            nul: "prompts.txt:2: caption (prompts.txt line) for videos/good.mp4 contains a control character",
            both: "data.format: auto finds metadata.csv and prompts.txt + videos.txt"}


class _Payload:
    """Unpickling this would create a file next to it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _loras(root: Path, tiny_model: Path) -> list[BadInput]:
    import torch
    from safetensors.torch import save_file

    folder = root / "lora"
    folder.mkdir(parents=True)
    save_file({"transformer.no_such_block.lora_A.weight": torch.zeros(4, 32),
               "transformer.no_such_block.lora_B.weight": torch.zeros(32, 4)}, str(folder / "mismatch.safetensors"))
    (folder / "pickle.bin").write_bytes(pickle.dumps({"w": _Payload(str(folder / "CODE-RAN"))}))
    (folder / "truncated.safetensors").write_bytes((folder / "mismatch.safetensors").read_bytes()[:40])
    (folder / "pickle-named.st").write_bytes(pickle.dumps({"w": _Payload(str(folder / "CODE-RAN"))}))
    other = {"format": "pt", "cogvx": json.dumps({"variant": "tiny-1.5-i2v", "base_model": "elsewhere"})}
    save_file({"transformer.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 32)},
              str(folder / "other-base.safetensors"), metadata=other)
    generate = ("generate", "--prompt", "x", "--steps", "1", "--frames", "9", "--out", "outputs/never.mp4",
                f"model.path={tiny_model}", "model.variant=tiny-t2v")
    expected = {"mismatch.safetensors": "does not fit this model", "pickle.bin": "not a readable safetensors",
                "truncated.safetensors": "not a readable safetensors", "other-base.safetensors": "trained on tiny-1.5-i2v",
                "pickle-named.st": "is not a readable safetensors LoRA file (it is a pickle"}
    return [BadInput(f"lora/{name}", (*generate, "--lora", str(folder / name)), 1, message)
            for name, message in expected.items()]


def make_corpus(root: Path, tiny_model: Path) -> list[BadInput]:
    """Write every bad input under ``root``; return them with their expected refusals."""
    root = Path(root)
    return [*_params(root), *_datasets(root), *_loras(root, tiny_model)]


if __name__ == "__main__":
    from cogvx.models.build import save_tiny_pipeline

    out = Path(sys.argv[1] if len(sys.argv) > 1 else "tests/data/bad")
    model = save_tiny_pipeline("tiny-t2v", out / "tiny-t2v", overwrite=True)
    for case in make_corpus(out, model):
        print(f"{case.name:40} exit {case.exit_code}  cogvx {' '.join(case.args)[:100]}")
