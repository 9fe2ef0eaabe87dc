"""Prepare and training runs on the tiny model, shared by the prepare, training, fault and lock tests."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from cogvx.config import load_config

if TYPE_CHECKING:
    import torch

    from cogvx.reports import TrainingReport

N_CLIPS = 4  # clips of the `synthetic` fixture's data set


def make_config(data_root: Path, model: Path, out: Path, variant: str = "tiny-t2v", *extra: str):
    """The config of a `cogvx prepare` of ``data_root`` with ``model`` into ``out`` (no workers)."""
    return load_config(None, [f"model.variant={variant}", f"model.path={model}",
                              f"data.data_root={data_root}", f"prepare.output_dir={out}",
                              "prepare.num_workers=0", *extra])


def digests(out: Path) -> dict[str, str]:
    """SHA-256 of every latent file of a prepare output folder, by path relative to it."""
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.glob("*/*.safetensors"))}


def finished_files(out: Path) -> list[Path]:
    """Renamed (complete) latent files; hidden names are atomic writes still in flight."""
    return [p for p in (out / "videos").glob("*.safetensors") if not p.name.startswith(".")]


def base_overrides(paths: dict[str, Path]) -> list[str]:
    """Overrides of a small, untracked training run on the ``prepared`` fixture's paths."""
    return [f"model.path={paths['model']}", f"data.data_root={paths['raw']}",
            f"prepare.output_dir={paths['latents']}", "prepare.num_workers=0",
            "validate.num_inference_steps=2", "train.lora.rank=8", "train.lora.alpha=8",
            "tracking.enabled=false"]


def run(paths, out: Path, *extra: str, resume: str | None = None) -> TrainingReport:
    """Train in this process into ``out`` with the base overrides plus ``extra``; the training report."""
    from cogvx.training.loop import train

    config = load_config(None, [*base_overrides(paths), f"train.output_dir={out}", *extra])
    return train(config, resume=resume, log=lambda *_: None)


def cut_back_to_first_checkpoint(out: Path) -> None:
    """Make a finished run look as if it had stopped at its first checkpoint: later checkpoints
    and the final weights go, so that ``resume="latest"`` continues from there."""
    import shutil

    from cogvx.training.checkpoint import list_checkpoints

    for later in list_checkpoints(out / "checkpoints")[1:]:
        shutil.rmtree(later)
    shutil.rmtree(out / "lora")


def lora_tensors(out: Path) -> dict[str, torch.Tensor]:
    """The LoRA weights a training run wrote into ``out``, by name."""
    from safetensors.torch import load_file

    return load_file(str(out / "lora" / "pytorch_lora_weights.safetensors"))


def train_process(prepared, out: Path, *extra: str) -> subprocess.Popen:
    """`cogvx train` into ``out`` in a child process (stderr piped), for tests that signal it."""
    args = [sys.executable, "-m", "cogvx", "train", *base_overrides(prepared), f"train.output_dir={out}", *extra]
    return subprocess.Popen(args, cwd=out.parent, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
