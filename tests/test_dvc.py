"""The DVC pipeline on a copy of the project: repro, no-op re-run, param scoping, experiments,
push/pull through a local remote, offline plots."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO

pytestmark = pytest.mark.slow  # every test runs `dvc repro` or DVC copies of trained outputs


def sh(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               DVC_NO_ANALYTICS="1", HF_HUB_OFFLINE="1")
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{args}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def dvc(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return sh([sys.executable, "-m", "dvc", *args], cwd=cwd, timeout=timeout)


def git(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return sh(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """The tracked files of this repository in a fresh git repo, with the pipeline run once."""
    root = tmp_path_factory.mktemp("dvc") / "project"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["validate"]["num_inference_steps"] = 4
    params["train"]["max_steps"] = 6
    params["data"]["synthetic_clips"] = 3
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git("init", "-q", cwd=root)
    git("add", "-A", cwd=root)
    git("commit", "-qm", "copy", cwd=root)
    dvc("repro", cwd=root)
    return root


def test_repro_builds_everything_and_a_second_repro_does_nothing(project):
    for path in ("models/tiny-t2v/model_index.json", "data/raw/prompts.txt", "data/latents/manifest.json",
                 "outputs/train/lora/pytorch_lora_weights.safetensors", "outputs/samples/sample.mp4"):
        assert (project / path).is_file(), path
    metrics = json.loads((project / "metrics/train/metrics.json").read_text())
    assert metrics["steps"] == 6 and metrics["final_loss"] > 0
    again = dvc("repro", cwd=project)
    assert "Data and pipelines are up to date" in again.stdout


def test_a_training_param_reruns_only_training_and_generation(project):
    params_file = project / "params.yaml"
    original = params_file.read_text()
    params = yaml.safe_load(original)
    params["train"]["learning_rate"] = 0.002
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        assert set(json.loads(dvc("status", "--json", cwd=project).stdout)) == {"train"}
        ran = dvc("repro", cwd=project).stdout
        assert {line.split("'")[1] for line in ran.splitlines() if line.startswith("Running stage")} == {
            "train", "generate"}
    finally:
        params_file.write_text(original)
        dvc("repro", cwd=project)


def metric_sets(shown) -> list[dict]:
    """Every revision's metrics in `dvc exp show --json` output, flattened to {file: {name: value}}."""
    found = []
    if isinstance(shown, dict):
        if isinstance(shown.get("metrics"), dict):
            found.append({name: entry.get("data", {}) for name, entry in shown["metrics"].items()})
        for value in shown.values():
            found += metric_sets(value)
    elif isinstance(shown, list):
        for value in shown:
            found += metric_sets(value)
    return found


def test_experiment_with_a_changed_rank_shows_metrics_and_curves_of_both(project, tmp_path):
    git("add", "-A", cwd=project)
    git("commit", "-qm", "lock", cwd=project)
    dvc("exp", "run", "-n", "rank8", "-S", "train.lora.rank=8", "-S", "train.lora.alpha=8", cwd=project)
    shown = json.loads(dvc("exp", "show", "--json", cwd=project).stdout)
    assert '"rank": 8' in json.dumps(shown)
    revisions = [m for m in metric_sets(shown) if m]
    assert len(revisions) >= 2, shown  # the commit and the experiment
    for metrics in revisions:
        assert metrics["metrics/train/metrics.json"]["final_loss"] > 0
        assert metrics["metrics/train/resources.json"]["s_per_step"] > 0
        assert "train_peak_allocated_gib" in metrics["metrics/train/resources.json"]
        assert metrics["metrics/prepare/metrics.json"]["samples"] == 3
        assert metrics["metrics/prepare/resources.json"]["clips_per_second"] > 0
    losses = {m["metrics/train/metrics.json"]["final_loss"] for m in revisions}
    assert len(losses) == 2  # rank 8 trains differently
    diff = json.loads(dvc("exp", "diff", "HEAD", "rank8", "--json", cwd=project).stdout)
    assert "metrics/train/metrics.json" in diff["metrics"] and "train.lora.rank" in json.dumps(diff["params"])
    dvc("plots", "diff", "HEAD", "rank8", "-o", str(tmp_path / "plots"), cwd=project)
    page = (tmp_path / "plots" / "index.html").read_text()
    for title in ("training loss", "learning rate", "gradient norm", "seconds per step"):
        assert title in page


def test_an_identical_rerun_writes_the_same_bytes(project):
    """Training and prepare again from nothing give byte-identical tracked files: DVC sees no change."""
    tracked = ["outputs/train/lora/pytorch_lora_weights.safetensors", "metrics/train/metrics.json",
               "metrics/train/curves.csv", "data/latents/manifest.json", "metrics/prepare/metrics.json"]
    before = {name: (project / name).read_bytes() for name in tracked}
    shutil.rmtree(project / "data" / "latents")
    shutil.rmtree(project / "outputs" / "train")
    dvc("repro", "--force", "--single-item", "prepare", cwd=project)
    dvc("repro", "--force", "--single-item", "train", cwd=project)
    changed = [name for name in tracked if (project / name).read_bytes() != before[name]]
    assert not changed, changed
    assert "up to date" in dvc("status", cwd=project).stdout


def test_push_then_pull_restores_data_and_latents_on_a_fresh_clone(project, tmp_path):
    store = tmp_path / "store"
    dvc("remote", "add", "-d", "local", str(store), cwd=project)
    dvc("push", cwd=project)
    git("add", "-A", cwd=project)
    git("commit", "-qm", "remote", cwd=project)
    clone = tmp_path / "clone"
    git("clone", "-q", str(project), str(clone), cwd=tmp_path)
    dvc("pull", cwd=clone)
    assert (clone / "data/latents/manifest.json").read_bytes() == (project / "data/latents/manifest.json").read_bytes()
    assert sorted(p.name for p in (clone / "data/raw/videos").iterdir()) == sorted(
        p.name for p in (project / "data/raw/videos").iterdir())


def test_plots_render_without_a_cdn_and_leave_no_untracked_file(project, tmp_path):
    dvc("plots", "show", "-o", str(tmp_path / "plots"), cwd=project)
    page = (tmp_path / "plots" / "index.html").read_text()
    assert "<script src=" not in page and "vegaEmbed" in page and "training loss" in page
    dvc("plots", "show", cwd=project)  # into the project's own dvc_plots/
    untracked = [line for line in git("status", "--porcelain", "--untracked-files=all", cwd=project).stdout.splitlines()
                 if line.startswith("??")]
    assert not untracked, untracked


def test_a_canny_control_experiment_runs_every_stage_through_the_config(project):
    """data.control=canny as a DVC experiment: prepare encodes the edges, training writes a control
    model, the generate stage renders it (with the first validation control), metrics show."""
    from cogvx.models.lora import read_lora_metadata

    git("add", "-A", cwd=project)
    git("commit", "-qm", "before control", "--allow-empty", cwd=project)
    dvc("exp", "run", "-n", "canny", "-S", "data.control=canny", cwd=project)
    shown = json.loads(dvc("exp", "show", "--json", cwd=project).stdout)
    assert '"control": "canny"' in json.dumps(shown)
    assert all(m["metrics/train/metrics.json"]["final_loss"] > 0 for m in metric_sets(shown) if m)
    assert json.loads((project / "data/latents/manifest.json").read_text())["control"] == "canny"
    meta = read_lora_metadata(project / "outputs/train/lora/pytorch_lora_weights.safetensors")
    assert meta["control"]["kind"] == "canny" and meta["control"]["in_channels"] == 32
    assert (project / "outputs/samples/sample.mp4").stat().st_size > 0
    assert sorted(p.name for p in (project / "outputs/train/validation").rglob("*.mp4"))
