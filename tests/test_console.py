"""The console is for people: progress lines where no terminal is, short summaries, and no
third-party noise, seen through the real `cogvx` commands with their output captured (a pipe, as
under DVC, a Prefect worker or a log file)."""

from __future__ import annotations

import json

import pytest

from cogvx.training.progress import StepProgress

NOISE = ("Traceback", "Unable to import `torchao`", "Loading pipeline components", "Loading weights",
         "INFO mlflow", "it/s]", "Writing model shards", "database is locked")


def test_progress_lines_without_a_terminal_come_at_the_start_every_twentieth_and_the_end():
    lines: list[str] = []
    with StepProgress(total=40, log=lines.append, terminal=False, every_s=3600) as progress:
        for step in range(1, 41):
            progress.update(step, loss=1.0 / step, lr=1e-4, grad_norm=0.5, step_s=0.01)
    steps = [int(line.split()[1].split("/")[0]) for line in lines]
    assert steps == [1, *range(2, 41, 2)]
    assert lines[0].startswith("step 1/40 (2%)  loss 1.0000  lr 1.00e-04  grad 0.500") and "ETA" in lines[0]


def test_progress_after_a_resume_counts_from_the_resumed_step():
    lines: list[str] = []
    progress = StepProgress(total=10, initial=6, log=lines.append, terminal=False, every_s=3600)
    for step in range(7, 11):
        progress.update(step, 0.5, 1e-4, 0.5, 0.01)
    assert [line.split()[1] for line in lines] == ["7/10", "8/10", "9/10", "10/10"]


def test_no_progress_lines_from_other_processes():
    lines: list[str] = []
    progress = StepProgress(total=3, log=lines.append, enabled=False, terminal=False)
    progress.update(1, 0.5, 1e-4, 0.5, 0.01)
    assert lines == []


@pytest.fixture(scope="module")
def console_project(tiny_models, tmp_path_factory):
    """A folder with two synthetic clips and the overrides of a 3-step run on them (named so as
    not to shadow conftest's ``prepared``)."""
    from cogvx.data.synthetic import make_synthetic_dataset

    root = tmp_path_factory.mktemp("console")
    make_synthetic_dataset(root / "raw", 2, seed=3)
    return root, [f"model.path={tiny_models['tiny-t2v']}", f"data.data_root={root / 'raw'}",
                  f"prepare.output_dir={root / 'latents'}", "prepare.num_workers=0",
                  f"tracking.tracking_uri=sqlite:///{root / 'mlflow.db'}", "validate.num_inference_steps=1",
                  "train.max_steps=3", "train.lora.rank=4", "train.lora.alpha=4"]


@pytest.mark.slow
def test_prepare_and_train_print_progress_and_summaries_and_no_noise(console_project, run_cli):
    root, settings = console_project
    done = run_cli("prepare", *settings, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "samples" in done.stdout and "clips/s" in done.stdout and "sampling" in done.stdout
    trained = run_cli("train", *settings, f"train.output_dir={root / 'run'}", cwd=root)
    assert trained.returncode == 0, trained.stderr[-3000:]
    for step in (1, 2, 3):
        assert f"step {step}/3 " in trained.stdout, trained.stdout
    for row in ("final loss", "weights", "s/step", "peak memory", "MLflow run", "registered"):
        assert row in trained.stdout, trained.stdout
    for text in (done.stdout + done.stderr, trained.stdout + trained.stderr):
        assert not [noise for noise in NOISE if noise in text], text[-3000:]


@pytest.mark.slow
def test_json_summaries_on_request(console_project, run_cli):
    root, settings = console_project
    done = run_cli("prepare", "--json", *settings, cwd=root)
    assert done.returncode == 0 and json.loads(done.stdout)["samples"] == 2
    trained = run_cli("train", "--json", *settings, "tracking.enabled=false", "validate.every_n_steps=0",
                      "train.max_steps=1", f"train.output_dir={root / 'json-run'}", cwd=root)
    assert trained.returncode == 0, trained.stderr[-3000:]
    summary = json.loads(trained.stdout)
    assert summary["steps"] == 1 and summary["weights"].endswith("lora")
