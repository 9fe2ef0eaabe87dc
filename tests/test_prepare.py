"""`cogvx prepare` and the latents it leaves: content-addressed, resumable, checked on read."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from cogvx.data.buckets import Bucket
from cogvx.data.validation import DataValidationError
from cogvx.data.latents import LatentDataset, LatentsError, read_manifest, sample_latents
from cogvx.prepare import run_prepare, summarize
from tests.helpers.training import N_CLIPS, digests, finished_files, make_config


@pytest.mark.slow
def test_prepare_encodes_every_clip_and_caption(synthetic, tiny_models, tmp_path):
    config = make_config(synthetic, tiny_models["tiny-t2v"], tmp_path / "latents")
    summary = run_prepare(config)
    assert (summary.samples, summary.videos_encoded, summary.texts_encoded) == (N_CLIPS, N_CLIPS, N_CLIPS + 1)
    assert summary.peak_memory_gib > 0 and summary.seconds > 0
    # One bucket, batch 1: the first clip is the warm-up, the rest give the steady rate.
    assert 0 < summary.phase_seconds["warmup"] <= summary.phase_seconds["vae"]
    assert summary.steady_clips_per_second > 0
    manifest = read_manifest(tmp_path / "latents")
    assert manifest["model"]["variant"] == "tiny-t2v" and manifest["buckets"] == ["9x64x96"]
    assert len(manifest["entries"]) == N_CLIPS
    dataset = LatentDataset(tmp_path / "latents", config)
    item = dataset[0]
    assert item["latent_mean"].shape == (3, 16, 8, 12)  # [F, C, h, w] for 9 x 64 x 96
    assert item["latent_logvar"].shape == (3, 16, 8, 12)
    assert item["prompt_embeds"].shape == (226, 32)  # [L, D]
    latents = sample_latents(item["latent_mean"], item["latent_logvar"], 0.7, torch.Generator().manual_seed(0))
    assert latents.shape == (3, 16, 8, 12) and torch.isfinite(latents).all()
    assert (tmp_path / "latents" / "cogvx-config.yaml").is_file()


def test_steady_rate_leaves_out_each_process_first_batches():
    shares = [{"videos": 10, "warmup_clips": 2, "texts": 11, "encode_seconds": 30.0, "phases": {"warmup": 22.0},
               "peak": 1.0, "memory_kind": "cuda peak allocated"},
              {"videos": 10, "warmup_clips": 2, "texts": 0, "encode_seconds": 28.0, "phases": {"warmup": 24.0},
               "peak": 2.0, "memory_kind": "cuda peak allocated"}]
    summary = summarize(shares, samples=20, todo=20, dropped=0, seconds=40.0)
    assert summary.encode_clips_per_second == round(20 / 30.0, 3)
    assert summary.steady_clips_per_second == round(16 / 8.0, 3)  # the slowest process's 8 s after warm-up
    assert summary.phase_seconds["warmup"] == 24.0
    nothing_steady = summarize([{**shares[0], "videos": 2}], samples=2, todo=2, dropped=0, seconds=40.0)
    assert nothing_steady.steady_clips_per_second == 0.0


@pytest.mark.slow
def test_second_run_encodes_nothing_and_a_changed_caption_only_its_text(synthetic, tiny_models, tmp_path):
    data_root = shutil.copytree(synthetic, tmp_path / "raw")
    config = make_config(data_root, tiny_models["tiny-t2v"], tmp_path / "latents")
    run_prepare(config)
    before = digests(tmp_path / "latents")
    again = run_prepare(config)
    assert (again.videos_encoded, again.texts_encoded, again.skipped) == (0, 0, N_CLIPS)
    assert digests(tmp_path / "latents") == before

    prompts = (data_root / "prompts.txt").read_text().splitlines()
    prompts[1] = "A completely different caption about a green star."
    (data_root / "prompts.txt").write_text("\n".join(prompts) + "\n")
    changed = run_prepare(config)
    assert (changed.videos_encoded, changed.texts_encoded) == (0, 1)
    entries = read_manifest(tmp_path / "latents")["entries"]
    assert entries[1]["caption"] == prompts[1]
    assert LatentDataset(tmp_path / "latents", config)[1]["prompt_embeds"].shape == (226, 32)
    assert len(digests(tmp_path / "latents")) == len(before) + 1  # old text kept until --prune
    run_prepare(config, prune=True)
    assert len(digests(tmp_path / "latents")) == len(before)


@pytest.mark.slow
def test_killed_prepare_resumes_to_the_same_files(synthetic, tiny_models, tmp_path):
    """SIGKILL a real `cogvx prepare` after its first clip; the re-run finishes the rest."""
    reference = tmp_path / "reference"
    run_prepare(make_config(synthetic, tiny_models["tiny-t2v"], reference))

    out = tmp_path / "latents"
    args = [sys.executable, "-m", "cogvx", "prepare", f"model.path={tiny_models['tiny-t2v']}",
            f"data.data_root={synthetic}", f"prepare.output_dir={out}", "prepare.num_workers=0"]
    process = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not finished_files(out) and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    partial = finished_files(out)
    assert 1 <= len(partial) < N_CLIPS and not (out / "manifest.json").exists()

    resumed = run_prepare(make_config(synthetic, tiny_models["tiny-t2v"], out))
    assert resumed.videos_encoded == N_CLIPS - len(partial)
    assert digests(out) == digests(reference)
    assert read_manifest(out)["entries"] == read_manifest(reference)["entries"]


@pytest.mark.slow
def test_latents_for_another_model_or_bucket_are_refused(synthetic, tiny_models, tmp_path):
    run_prepare(make_config(synthetic, tiny_models["tiny-t2v"], tmp_path / "latents"))
    other_model = make_config(synthetic, tiny_models["tiny-i2v"], tmp_path / "latents", "tiny-i2v")
    with pytest.raises(LatentsError, match=r"model variant: latents have 'tiny-t2v', this run needs 'tiny-i2v'"):
        LatentDataset(tmp_path / "latents", other_model)
    other_size = make_config(synthetic, tiny_models["tiny-t2v"], tmp_path / "latents", "tiny-t2v", "data.frames=13")
    with pytest.raises(LatentsError, match=r"buckets 9x64x96 are not among this run's buckets \(13x64x96\)"):
        LatentDataset(tmp_path / "latents", other_size)
    with pytest.raises(LatentsError, match="run `cogvx prepare` first"):
        LatentDataset(tmp_path / "nothing", other_size)


@pytest.mark.slow
def test_multi_bucket_batches_come_from_one_bucket(synthetic, tiny_models, tmp_path):
    buckets = "data.buckets=[[9, 64, 96], [9, 96, 64], [9, 64, 64]]"
    config = make_config(synthetic, tiny_models["tiny-t2v"], tmp_path / "latents", "tiny-t2v", buckets)
    run_prepare(config)
    dataset = LatentDataset(tmp_path / "latents", config)
    assert set(dataset.buckets) == {Bucket(9, 64, 96), Bucket(9, 96, 64), Bucket(9, 64, 64)}
    for batch in dataset.batch_sampler(batch_size=2, seed=0):
        assert len({dataset.buckets[i] for i in batch}) == 1
        shapes = {tuple(dataset[i]["latent_mean"].shape) for i in batch}
        assert len(shapes) == 1


@pytest.mark.slow
@pytest.mark.parametrize("variant, latent_frames", [("tiny-i2v", 3), ("tiny-1.5-i2v", 5)])
def test_image_to_video_latents_include_the_first_frame(synthetic, tiny_models, tmp_path, variant, latent_frames):
    config = make_config(synthetic, tiny_models[variant], tmp_path / "latents", variant)
    run_prepare(config)
    item = LatentDataset(tmp_path / "latents", config)[0]
    assert item["latent_mean"].shape == (latent_frames, 16, 8, 12)
    assert item["image_latent_mean"].shape == (1, 16, 8, 12)  # [1, C, h, w]
    assert read_manifest(tmp_path / "latents")["model"]["invert_scale_latents"] == (variant == "tiny-1.5-i2v")


def test_broken_data_stops_prepare_before_any_model_loads(synthetic, tmp_path):
    data_root = shutil.copytree(synthetic, tmp_path / "raw")
    (data_root / "videos" / "clip_001.mp4").unlink()
    config = make_config(data_root, tmp_path / "no-model-here", tmp_path / "latents")
    with pytest.raises(DataValidationError, match="clip_001.mp4"):
        run_prepare(config)
    assert not (tmp_path / "latents").exists()


@pytest.mark.slow
def test_cli_synthetic_validate_prepare(run_cli, tiny_models, tmp_path):
    made = run_cli("data", "synthetic", "--out", "raw", "--n", "2")
    assert made.returncode == 0, made.stderr
    validated = run_cli("data", "validate", "data.data_root=raw")
    assert validated.returncode == 0 and "2 valid samples" in validated.stdout
    (tmp_path / "raw" / "videos" / "clip_000.mp4").write_bytes(b"")
    broken = run_cli("data", "validate", "data.data_root=raw")
    assert broken.returncode == 4 and "clip_000.mp4" in broken.stderr and "Traceback" not in broken.stderr
    prepared = run_cli("prepare", "data.data_root=raw", f"model.path={tiny_models['tiny-t2v']}",
                       "--skip-invalid", "--summary", "summary.json")
    assert prepared.returncode == 0, prepared.stderr
    assert json.loads((tmp_path / "summary.json").read_text())["videos_encoded"] == 1
    dropped = json.loads((tmp_path / "data" / "latents" / "dropped.json").read_text())
    assert [d["video"] for d in dropped["dropped"]] == ["videos/clip_000.mp4"]
