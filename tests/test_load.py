"""Load: prepare over 200 clips with decoding workers, then 500 training steps checkpointing
every 50 with a limit of 3. The processes' memory and open files are sampled while they run:
both stay flat, and the disk holds exactly the 3 newest checkpoints.

    make test PYTEST_ARGS="tests/test_load.py -s"   # prints the sampled figures
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from cogvx.training.checkpoint import list_checkpoints

CLIPS, STEPS = 200, 500
MIB = 2**20


def sampled_run(args: list[str], cwd: Path, in_loop, timeout: float = 900) -> list[tuple[float, int, int, bool]]:
    """Run a command, sampling (seconds, RSS of it and its workers, its open fds, whether its
    main loop is running, by ``in_loop()``) every 0.25 s."""
    process = subprocess.Popen(args, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    watched, samples, started = psutil.Process(process.pid), [], time.monotonic()
    while process.poll() is None and time.monotonic() - started < timeout:
        try:
            family = [watched, *watched.children(recursive=True)]
            rss = sum(p.memory_info().rss for p in family if p.is_running())
            samples.append((time.monotonic() - started, rss, watched.num_fds(), in_loop()))
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.25)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr[-3000:]
    return samples


def steady_growth(samples: list[tuple[float, int, int, bool]]) -> tuple[float, int, float]:
    """Over the main loop (model loading before it and the final save and render after it left
    out): (RSS growth in MiB from its first third to its last third, open-file growth, peak
    RSS in MiB of the whole run)."""
    loop = [s for s in samples if s[3]]
    assert len(loop) >= 6, f"only {len(loop)} samples inside the loop"
    third = max(1, len(loop) // 3)
    early, late = max(s[1] for s in loop[:third]), max(s[1] for s in loop[-third:])
    fds = max(s[2] for s in loop[-third:]) - min(s[2] for s in loop[:third])
    return (late - early) / MIB, fds, max(s[1] for s in samples) / MIB


@pytest.mark.slow
def test_prepare_200_clips_and_train_500_steps_stay_flat(tiny_models, tmp_path):
    from cogvx.data.synthetic import make_synthetic_dataset

    make_synthetic_dataset(tmp_path / "raw", CLIPS, seed=11)
    common = [f"model.path={tiny_models['tiny-t2v']}", f"data.data_root={tmp_path / 'raw'}",
              f"prepare.output_dir={tmp_path / 'latents'}", "tracking.enabled=false"]
    cogvx = [sys.executable, "-m", "cogvx"]
    videos = tmp_path / "latents" / "videos"

    def encoding() -> bool:  # from the first clip latent written to the last
        return videos.is_dir() and 0 < len(list(videos.glob("[!.]*.safetensors"))) < CLIPS

    prepare = sampled_run([*cogvx, "prepare", *common, "prepare.num_workers=2"], tmp_path, encoding)
    assert len(list((tmp_path / "latents" / "videos").glob("*.safetensors"))) == CLIPS
    checkpoints = tmp_path / "run" / "checkpoints"

    def training() -> bool:  # from the step-50 checkpoint to the last one
        names = {p.name for p in list_checkpoints(checkpoints)} if checkpoints.is_dir() else set()
        return bool(names) and "checkpoint-000500" not in names

    train = sampled_run([*cogvx, "train", *common, f"train.output_dir={tmp_path / 'run'}", f"train.max_steps={STEPS}",
                         "train.checkpointing_steps=50", "train.checkpoints_total_limit=3", "train.lora.rank=4",
                         "validate.every_n_steps=0", "validate.num_inference_steps=1"], tmp_path, training)
    names = [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")]
    assert names == ["checkpoint-000400", "checkpoint-000450", "checkpoint-000500"]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == names  # no leftovers
    for label, samples in (("prepare", prepare), ("train", train)):
        growth, fds, peak = steady_growth(samples)
        print(f"{label}: {len(samples)} samples, peak RSS {peak:.0f} MiB, RSS growth after warm-up "
              f"{growth:+.1f} MiB, open files growth {fds:+d}")
        assert growth < 128, f"{label}: RSS grew {growth:.0f} MiB inside its loop"
        assert fds <= 4, f"{label}: {fds} more open files at the end"
