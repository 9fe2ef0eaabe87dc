"""Faults injected for real into `cogvx` processes: SIGKILL at random moments of prepare and
training, a full disk while writing latents or checkpoints."""

from __future__ import annotations

import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cogvx.training.checkpoint import list_checkpoints
from tests.helpers.training import (N_CLIPS, base_overrides, digests, finished_files, lora_tensors, make_config, run,
                                    train_process)

pytestmark = pytest.mark.slow  # every test runs prepare or training, most in `cogvx` subprocesses


def train_cli(prepared, out: Path, *extra: str, file_size_limit: int | None = None) -> subprocess.CompletedProcess:
    """`cogvx train` in a child process; ``file_size_limit`` caps every file it writes (bytes),
    so the write that crosses it fails as it does on a full disk (EFBIG: Python ignores SIGXFSZ)."""

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    args = [sys.executable, "-m", "cogvx", "train", *base_overrides(prepared), f"train.output_dir={out}", *extra]
    return subprocess.run(args, cwd=out.parent, capture_output=True, text=True, timeout=300,
                          preexec_fn=limit if file_size_limit is not None else None)


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(prepared, tmp_path):
    out = tmp_path / "run"
    settings = ("train.max_steps=4", "train.checkpointing_steps=2", "validate.every_n_steps=0")
    assert run(prepared, out, *settings).steps == 4  # in this process: only the faulted run needs a child
    shutil.rmtree(out / "checkpoints" / "checkpoint-000004")  # as if the run had stopped after step 2
    kept = list_checkpoints(out / "checkpoints")
    assert [p.name for p in kept] == ["checkpoint-000002"]
    before = {p.name: p.read_bytes() for p in kept[0].iterdir()}
    # The run continued with files capped below a checkpoint's size: the step-4 write fails.
    full = train_cli(prepared, out, *settings, "--resume", "latest", file_size_limit=6000)
    assert "resumed from" in full.stdout and "step 2" in full.stdout, full.stdout[-1000:]
    assert full.returncode == 1, full.stderr[-2000:]
    message = full.stderr.replace("\n", " ")
    assert "could not write checkpoint" in message and "checkpoint-000002 is intact" in message, message
    assert "Traceback" not in full.stderr
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["checkpoint-000002"]
    assert {p.name: p.read_bytes() for p in kept[0].iterdir()} == before
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")], "staging left behind"
    # Space freed: the run resumes from step 2 and finishes.
    resumed = train_cli(prepared, out, *settings, "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [p.name for p in list_checkpoints(out / "checkpoints")][-1] == "checkpoint-000004"


# ----------------------------------------------------------------------------- prepare


def prepare_cli(data_root: Path, model: Path, out: Path, file_size_limit: int | None = None, **popen):
    args = [sys.executable, "-m", "cogvx", "prepare", f"model.path={model}", f"data.data_root={data_root}",
            f"prepare.output_dir={out}", "prepare.num_workers=0"]

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    return subprocess.Popen(args, cwd=out.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=limit if file_size_limit is not None else None, **popen)


@pytest.fixture(scope="module")
def reference_latents(synthetic, tiny_models, tmp_path_factory):
    from cogvx.prepare import run_prepare

    out = tmp_path_factory.mktemp("reference") / "latents"
    run_prepare(make_config(synthetic, tiny_models["tiny-t2v"], out), log=lambda *_: None)
    return out


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_prepare_killed_at_a_random_moment_resumes_to_the_same_files(seed, synthetic, tiny_models,
                                                                     reference_latents, tmp_path):
    """SIGKILL after a random 0.5-8 s (model load, encoding or writing); the re-run encodes only
    what is missing and ends with the uninterrupted run's files, byte for byte."""
    from cogvx.prepare import run_prepare

    out = tmp_path / "latents"
    process = prepare_cli(synthetic, tiny_models["tiny-t2v"], out)
    time.sleep(random.Random(seed).uniform(0.5, 8.0))
    process.send_signal(signal.SIGKILL)
    process.communicate()
    done_before = len(finished_files(out)) if out.exists() else 0
    resumed = run_prepare(make_config(synthetic, tiny_models["tiny-t2v"], out), log=lambda *_: None)
    assert resumed.videos_encoded == N_CLIPS - done_before
    assert digests(out) == digests(reference_latents)


def test_disk_full_while_writing_latents_keeps_what_was_written(synthetic, tiny_models, reference_latents,
                                                                tmp_path):
    """Half the clips already encoded; the next clip latent's write crosses the file-size cap:
    exit 4 with what to do, the files already there untouched, no partial file; with space
    again the re-run encodes only the missing clips and ends with the reference files."""
    from cogvx.prepare import run_prepare

    out = tmp_path / "latents"
    shutil.copytree(reference_latents, out)
    (out / "manifest.json").unlink()
    missing = sorted((out / "videos").glob("*.safetensors"))[:2]
    for path in missing:
        path.unlink()
    kept = digests(out)
    cap = min(p.stat().st_size for p in (reference_latents / "videos").glob("*.safetensors")) - 1
    process = prepare_cli(synthetic, tiny_models["tiny-t2v"], out, file_size_limit=cap)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 4, stderr[-2000:]
    message = stderr.replace("\n", " ")
    assert "could not write" in message and "encodes only what is missing" in message and "Traceback" not in stderr
    assert digests(out) == kept and not list(out.rglob(".*.safetensors"))
    resumed = run_prepare(make_config(synthetic, tiny_models["tiny-t2v"], out), log=lambda *_: None)
    assert resumed.videos_encoded == len(missing)
    assert digests(out) == digests(reference_latents)


def test_truncated_latent_file_is_named_when_training(synthetic, tiny_models, reference_latents, tmp_path):
    """A latent file damaged after prepare: `cogvx train` stops with exit 4 naming it and what to
    do, and `cogvx prepare` re-encodes exactly that file."""
    from cogvx.prepare import run_prepare

    out = tmp_path / "latents"
    shutil.copytree(reference_latents, out)
    damaged = sorted((out / "videos").glob("*.safetensors"))[0]
    damaged.write_bytes(damaged.read_bytes()[:100])
    args = [sys.executable, "-m", "cogvx", "train", f"model.path={tiny_models['tiny-t2v']}",
            f"data.data_root={synthetic}", f"prepare.output_dir={out}", f"train.output_dir={tmp_path / 'run'}",
            "train.max_steps=8", "tracking.enabled=false", "validate.every_n_steps=0"]
    done = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 4, done.stderr[-2000:]
    message = done.stderr.replace("\n", " ")
    assert f"cannot read {damaged}" in message and "cogvx prepare" in message and "Traceback" not in done.stderr
    again = run_prepare(make_config(synthetic, tiny_models["tiny-t2v"], out), log=lambda *_: None)
    assert again.videos_encoded == 1 and digests(out) == digests(reference_latents)


# ----------------------------------------------------------------------------- training kills


@pytest.fixture(scope="module")
def straight_run(prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    run(prepared, out, *KILL_SETTINGS)
    return lora_tensors(out)


KILL_SETTINGS = ("train.max_steps=30", "train.checkpointing_steps=1", "train.checkpoints_total_limit=2",
                 "validate.every_n_steps=0")


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_training_killed_at_a_random_moment_resumes_bit_identically(seed, prepared, straight_run, tmp_path):
    """SIGKILL at a random moment of a run that checkpoints every step (so kills land in
    checkpoint writes too); `--resume latest` finishes with the uninterrupted run's LoRA."""
    out = tmp_path / "killed"
    out.mkdir()
    process = train_process(prepared, out, *KILL_SETTINGS)
    time.sleep(random.Random(seed).uniform(3.0, 9.0))
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = run(prepared, out, *KILL_SETTINGS, resume="latest")
    assert finished.steps == 30
    resumed = lora_tensors(out)
    assert all(torch.equal(straight_run[k], resumed[k]) for k in straight_run)
    assert not hidden_leftovers(out)


def hidden_leftovers(out: Path) -> list[Path]:
    """Hidden files or folders anywhere in a run folder: staging a write never renamed, or a lock."""
    return [p for p in out.rglob(".*")]


# Runs `cogvx ARGS` and SIGKILLs it in the middle of checkpoint COGVX_TEST_KILL_IN's write: the
# trainable weights are in the staging folder, the optimizer state and state.json not yet.
KILL_IN_CHECKPOINT_WRITE = """
import os, signal, sys
import cogvx.training.checkpoint as checkpoint
from cogvx.cli import main

write = checkpoint.save_file

def write_then_die(tensors, path):
    write(tensors, path)
    if os.environ["COGVX_TEST_KILL_IN"] in path:
        os.kill(os.getpid(), signal.SIGKILL)

checkpoint.save_file = write_then_die
sys.argv = ["cogvx", *sys.argv[1:]]
main()
"""


def test_sigkill_inside_a_checkpoint_write_leaves_nothing_behind(prepared, tmp_path):
    """Killed inside the write of checkpoint 2, without a checkpoint limit: the staging folder
    and the lock are left; the resumed run takes the lock over, removes the staging folder,
    resumes from checkpoint 1 and finishes, and no hidden leftover remains."""
    import os

    out = tmp_path / "run"
    settings = ("train.max_steps=4", "train.checkpointing_steps=1", "train.checkpoints_total_limit=null",
                "validate.every_n_steps=0")
    args = [*base_overrides(prepared), f"train.output_dir={out}", *settings]
    killed = subprocess.run([sys.executable, "-c", KILL_IN_CHECKPOINT_WRITE, "train", *args], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "COGVX_TEST_KILL_IN": "checkpoint-000002"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    [staging] = [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".checkpoint-000002.")]
    assert (staging / "trainable.safetensors").is_file() and (out / ".cogvx.lock").is_file()
    resumed = subprocess.run([sys.executable, "-m", "cogvx", "train", *args, "--resume", "latest"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "1000"})
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    said = " ".join(resumed.stdout.split())
    assert f"taking over {out / '.cogvx.lock'}" in said and "removed 1 unfinished writes" in said, said[-2000:]
    assert "resumed from" in said and "checkpoint-000001" in said
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == [f"checkpoint-{n:06d}" for n in (1, 2, 3, 4)]
    assert not hidden_leftovers(out)
