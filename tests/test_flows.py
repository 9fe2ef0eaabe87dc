"""End-to-end tests of the Prefect flow on the tiny model, against a real, throwaway Prefect server.

A module-scoped fixture starts ``prefect server start`` on a free local port with PREFECT_HOME in
the test's temporary folder (nothing is read from or written to the user's ~/.prefect) and stops
it, by PID, at the end. Every run writes into the same temporary folder (params.yaml copied there,
data, latents, model and outputs pointed into it by overrides), so the base model, the data set
and the latents are made once and reused by the later runs, as they would be in a project.

The runs, each checked through the Prefect API (``get_client()``):

* the whole flow, in process: COMPLETED, with one COMPLETED task run per stage;
* the flow with an injected fault in ``train`` (COGVX_FAIL_ONCE): train fails once, is retried
  and the flow completes with the final LoRA written;
* a deployment served by ``cogvx flow serve --cron ...`` in a background process, triggered
  with ``run_deployment``: it completes, and its train resumes from the first run's checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from tests.helpers import REPO
from tests.helpers.processes import free_port, stop, wait_until
from tests.helpers.servers import spawn_server, stop_server, wait_healthy

pytestmark = pytest.mark.slow  # a real Prefect server and the whole flow on the tiny model

TINY = "tiny-t2v"
STAGES = ("build-base-model", "download", "validate", "prepare", "train", "render", "register")
SERVED = "cogvx-finetune-test"
CRON = "0 3 * * *"
LORA_FILE = "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project folder: params.yaml copied from the repository."""
    root = tmp_path_factory.mktemp("flow")
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    return root


def overrides_for(root: Path, train_dir: str) -> list[str]:
    """Point every path into ``root`` and shrink the job to seconds on the tiny model."""
    return [f"model.path={root}/models/{TINY}", f"data.data_root={root}/data/raw",
            f"prepare.output_dir={root}/data/latents", f"train.output_dir={root}/{train_dir}",
            "data.synthetic_clips=2", "train.max_steps=3",
            "validate.num_inference_steps=2", "tracking.enabled=false"]


@pytest.fixture(scope="module")
def prefect_env(workspace: Path) -> Iterator[dict[str, str]]:
    """A real Prefect server on a free port, and this process pointed at it; yields its settings."""
    port = free_port()
    env = {"PREFECT_HOME": str(workspace / "prefect-home"),
           "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # no telemetry where there is no network
           "PREFECT_LOGGING_LEVEL": "WARNING"}
    log = workspace / "prefect-server.log"
    with open(log, "wb") as out:
        server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                   "--port", str(port)], env={**os.environ, **env}, cwd=workspace,
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"{env['PREFECT_API_URL']}/health", timeout=2) as reply:
                return reply.status == 200
        except OSError:
            return False

    try:
        wait_until(healthy, 60, "prefect server start", server, log)
        with pytest.MonkeyPatch.context() as patch:
            for key, value in env.items():  # before prefect is imported, for this process ...
                patch.setenv(key, value)
            from prefect.settings import (PREFECT_API_URL, PREFECT_HOME, PREFECT_LOGGING_LEVEL,
                                          PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings)

            # ... and as settings, which hold even if prefect was imported earlier in the session.
            with temporary_settings(updates={PREFECT_HOME: env["PREFECT_HOME"],
                                             PREFECT_API_URL: env["PREFECT_API_URL"],
                                             PREFECT_SERVER_ANALYTICS_ENABLED: False,
                                             PREFECT_LOGGING_LEVEL: "WARNING"}):
                yield env
                _drain_prefect_workers()
    finally:
        stop(server)


def _drain_prefect_workers() -> None:
    """Send this process's pending logs and events before the server goes away."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)
    EventsWorker.drain_all(timeout=10)


def _run_flow(workspace: Path, train_dir: str, samples: str) -> tuple[Any, dict[str, Any]]:
    """Run ``finetune`` in this process; return (its final state, its summary)."""
    from flows.finetune import finetune

    state = finetune(params=str(workspace / "params.yaml"), overrides=overrides_for(workspace, train_dir),
                     out_dir=str(workspace / samples), return_state=True)
    assert state.is_completed(), state.message
    return state, state.result()


def _runs(flow_run_id) -> tuple[Any, dict[str, Any]]:
    """The flow run and its task runs (by task name), read back from the Prefect API."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        only_this = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        [flow_run] = client.read_flow_runs(flow_run_filter=only_this)
        task_runs = client.read_task_runs(flow_run_filter=only_this)
    by_name = {}
    for task_run in task_runs:
        by_name.setdefault(task_run.name.rsplit("-", 1)[0], []).append(task_run)
    return flow_run, by_name


@pytest.fixture(scope="module")
def first_run(workspace: Path, prefect_env: dict[str, str]) -> tuple[Any, dict[str, Any]]:
    """The whole flow once, from nothing: (final state, summary)."""
    return _run_flow(workspace, "train", "samples")


def test_flow_completes_with_every_stage(workspace: Path, first_run: tuple[Any, dict[str, Any]]) -> None:
    """The flow run and one task run per stage are COMPLETED on the server; the summary adds up."""
    state, summary = first_run
    flow_run, task_runs = _runs(state.state_details.flow_run_id)
    assert flow_run.flow_id is not None and flow_run.state.is_completed()
    assert flow_run.parameters["params"] == str(workspace / "params.yaml")
    assert "train.max_steps=3" in flow_run.parameters["overrides"]
    assert sorted(task_runs) == sorted(STAGES)
    for name in STAGES:
        [task_run] = task_runs[name]
        assert task_run.state.is_completed(), (name, task_run.state)
        assert task_run.run_count == 1, name

    assert summary["model"] == f"{workspace}/models/{TINY}"
    assert summary["validate"] == {"samples": 2, "valid": 2, "dropped": 0, "problems": []}
    assert summary["prepare"]["samples"] == 2 and summary["prepare"]["videos_encoded"] == 2
    assert summary["train"]["steps"] == 3 and summary["train"]["recovered_steps"] == 0
    assert summary["train"]["final_loss"] is not None
    assert (Path(summary["train"]["weights"]) / LORA_FILE).is_file()
    assert summary["render"] == str(workspace / "samples" / "flow-sample.mp4")
    assert Path(summary["render"]).stat().st_size > 0
    assert summary["register"] == {"skipped": "tracking disabled"}


def test_flow_trains_and_renders_a_canny_control_model(workspace: Path, first_run: tuple[Any, dict[str, Any]]) -> None:
    """data.control through the flow's one config: prepare encodes the clips' edges, train writes a
    control model, render renders it with the first validation control."""
    from flows.finetune import finetune
    from cogvx.models.lora import read_lora_metadata

    overrides = [*overrides_for(workspace, "train-canny"), "data.control=canny",
                 f"prepare.output_dir={workspace}/data/latents-canny"]
    state = finetune(params=str(workspace / "params.yaml"), overrides=overrides,
                     out_dir=str(workspace / "samples-canny"), return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    meta = read_lora_metadata(Path(summary["train"]["weights"]) / LORA_FILE)
    assert meta["control"]["kind"] == "canny"
    assert Path(summary["render"]).stat().st_size > 0


def test_train_fails_once_and_is_retried(workspace: Path, first_run: tuple[Any, dict[str, Any]],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """An injected fault in train: the task fails, Prefect retries it, the flow completes."""
    marker = workspace / "fail-once-train"
    monkeypatch.setenv("COGVX_FAIL_ONCE", "train")
    monkeypatch.setenv("COGVX_FAIL_ONCE_MARKER", str(marker))
    state, summary = _run_flow(workspace, "train-retried", "samples-retried")

    assert marker.is_file()
    flow_run, task_runs = _runs(state.state_details.flow_run_id)
    assert flow_run.state.is_completed()
    [train] = task_runs["train"]
    assert train.state.is_completed() and train.run_count == 2
    from prefect import get_client

    with get_client(sync_client=True) as client:
        history = client.read_task_run_states(train.id)
    # Pending, Running, AwaitingRetry (the injected fault; the server keeps no message), Retrying, Completed
    assert [s.name for s in history].count("AwaitingRetry") == 1
    for name in set(STAGES) - {"train"}:  # the other stages ran once
        assert [run.run_count for run in task_runs[name]] == [1], name
    assert summary["train"]["steps"] == 3
    assert (workspace / "train-retried" / "lora" / LORA_FILE).is_file()


def test_training_crashed_mid_run_is_retried_from_its_checkpoint(workspace: Path, first_run: tuple[Any, dict[str, Any]],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash at step 4 of 5 (checkpoints every step): Prefect retries the task, which resumes
    from step 3 instead of starting over, and reports how long recovering took."""
    from flows.finetune import finetune

    marker = workspace / "fail-once-train-at-4"
    monkeypatch.setenv("COGVX_FAIL_ONCE", "train@4")
    monkeypatch.setenv("COGVX_FAIL_ONCE_MARKER", str(marker))
    overrides = [*overrides_for(workspace, "train-crashed"), "train.max_steps=5", "train.checkpointing_steps=1",
                 "validate.every_n_steps=0"]
    state = finetune(params=str(workspace / "params.yaml"), overrides=overrides,
                     out_dir=str(workspace / "samples-crashed"), return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    assert marker.is_file()
    [train] = _runs(state.state_details.flow_run_id)[1]["train"]
    assert train.run_count == 2
    assert summary["train"]["steps"] == 5 and summary["train"]["recovered_steps"] == 3
    assert 0 < summary["train"]["recovery_s"] < 60


def test_served_deployment_runs(workspace: Path, first_run: tuple[Any, dict[str, Any]],
                                prefect_env: dict[str, str]) -> None:
    """`cogvx flow serve --cron` serves a deployment; a triggered run completes, resuming
    train from the first run's last checkpoint instead of training again."""
    from prefect import get_client
    from prefect.deployments import run_deployment

    params = str(workspace / "params.yaml")
    overrides = overrides_for(workspace, "train")
    env = {**os.environ, **prefect_env, "PREFECT_RUNNER_POLL_FREQUENCY": "1",
           "PREFECT_LOGGING_LEVEL": "INFO"}  # INFO: the resumed-steps line reaches the API
    log = workspace / "serve.log"
    with open(log, "wb") as out:
        serving = subprocess.Popen([sys.executable, "-m", "cogvx", "flow", "serve", "--cron", CRON, "--name", SERVED,
                                    "--params", params, "--out", str(workspace / "samples-served"),
                                    *overrides], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        def deployment():
            with get_client(sync_client=True) as client:
                try:
                    return client.read_deployment_by_name(f"cogvx-finetune/{SERVED}")
                except Exception:  # ObjectNotFound until the runner has registered it
                    return None

        served = wait_until(deployment, 90, "cogvx flow serve", serving, log)
        assert [s.schedule.cron for s in served.schedules] == [CRON]
        assert served.parameters["overrides"] == overrides

        flow_run = run_deployment(name=f"cogvx-finetune/{SERVED}", timeout=300,
                                  parameters={"params": params, "overrides": overrides,
                                              "out_dir": str(workspace / "samples-served")})
        assert flow_run.state.is_completed(), (flow_run.state, log.read_text(errors="replace")[-3000:])
        assert (workspace / "samples-served" / "flow-sample.mp4").is_file()
        # The served run's train resumed from the first run's final checkpoint (report.json is
        # rewritten by that run; Prefect's log shipping is asynchronous, so files are the witness).
        report = json.loads((workspace / "train" / "report.json").read_text())
        assert (report["resumed_from_step"], report["steps"]) == (3, 3)
    finally:
        stop(serving)


def test_prefect_yaml_deploys_the_flow(monkeypatch: pytest.MonkeyPatch) -> None:
    """prefect.yaml parses, names the process work pool and a cron schedule, and its entrypoint imports."""
    from prefect.flows import load_flow_from_entrypoint

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text(encoding="utf-8"))
    [deployment] = spec["deployments"]
    assert deployment["name"] == "cogvx-finetune"
    assert deployment["work_pool"]["name"] == "cogvx-process"
    assert deployment["parameters"]["params"] == "params.yaml"
    assert [s["cron"] for s in deployment["schedules"]] == [CRON]
    monkeypatch.chdir(REPO)  # entrypoints are relative to the project root, where `prefect deploy` runs
    flow = load_flow_from_entrypoint(deployment["entrypoint"])
    assert flow.name == "cogvx-finetune"
    assert set(deployment["parameters"]) <= set(flow.parameters.properties)


def test_fail_once_injects_one_fault(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The named task fails while the marker is missing, then runs; other tasks never fail."""
    from tasks.common import fail_once

    marker = tmp_path / "marker"
    monkeypatch.setenv("COGVX_FAIL_ONCE", "render")
    fail_once("render")  # no marker path: nothing is injected
    monkeypatch.setenv("COGVX_FAIL_ONCE_MARKER", str(marker))
    fail_once("train")
    with pytest.raises(RuntimeError, match="injected fault"):
        fail_once("render")
    assert marker.is_file()
    fail_once("render")
    marker.unlink()
    monkeypatch.setenv("COGVX_FAIL_ONCE", "train@4")
    fail_once("train")  # at the start: not due
    fail_once("train", step=3)
    with pytest.raises(RuntimeError, match="injected fault"):
        fail_once("train", step=4)
    fail_once("train", step=4)  # once only


def test_config_errors_are_not_retried() -> None:
    """A bad configuration fails the same way every time: the retry condition says no."""
    from prefect.states import Failed

    from cogvx.errors import ConfigError
    from tasks.common import worth_retrying

    assert not worth_retrying(None, None, Failed(data=ConfigError("bad")))
    assert worth_retrying(None, None, Failed(data=RuntimeError("injected fault")))


def test_register_skips_when_tracking_is_disabled() -> None:
    """With tracking off, register returns at once (MLflow is never touched), even outside a run."""
    from tasks.training import register

    assert register.fn(None, ["tracking.enabled=false"], "no/such/lora") == {"skipped": "tracking disabled"}


def test_build_base_model_reuses_existing_model(workspace: Path, first_run: tuple[Any, dict[str, Any]]) -> None:
    """A second build finds model_index.json and returns the folder without rebuilding."""
    from tasks.models import build_base_model

    folder = workspace / "models" / TINY
    index = folder / "model_index.json"
    before = index.stat().st_mtime_ns
    assert build_base_model.fn(None, [f"model.path={folder}"]) == str(folder)
    assert index.stat().st_mtime_ns == before


@pytest.fixture
def postgres_backend() -> Iterator[str | None]:
    """A fresh PostgreSQL database on 127.0.0.1:5432 for the MLflow server, when one answers."""
    import socket
    import uuid

    try:
        import psycopg2
    except ImportError:
        yield None
        return
    with socket.socket() as sock:
        sock.settimeout(1)
        if sock.connect_ex(("127.0.0.1", 5432)) != 0:
            yield None
            return
    name = f"cogvx_test_{uuid.uuid4().hex[:10]}"
    admin = psycopg2.connect(host="127.0.0.1", user="postgres", dbname="postgres")
    admin.autocommit = True
    admin.cursor().execute(f"CREATE DATABASE {name}")
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        admin.cursor().execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()


def test_flow_against_real_prefect_and_mlflow_servers(workspace: Path, first_run, prefect_env, postgres_backend,
                                                      tmp_path: Path) -> None:
    """The flow tracked in a real MLflow server (PostgreSQL backend when available); both APIs
    agree afterwards; the registered LoRA, promoted to champion, is what `cogvx generate` uses."""
    from mlflow.tracking import MlflowClient

    process, url = spawn_server(tmp_path / "mlflow", postgres_backend)
    try:
        wait_healthy(process, url, tmp_path / "mlflow", timeout=90)
        from flows.finetune import finetune

        overrides = [*overrides_for(workspace, "tracked")[:-1], f"tracking.tracking_uri={url}",
                     "tracking.registered_model=flow-lora"]
        state = finetune(params=str(workspace / "params.yaml"), overrides=overrides,
                         out_dir=str(workspace / "tracked-samples"), return_state=True)
        assert state.is_completed(), state.message
        flow_run, tasks = _runs(state.state_details.flow_run_id)
        assert flow_run.state.is_completed() and {"train", "register"} <= set(tasks)
        summary = state.result()
        client = MlflowClient(tracking_uri=url, registry_uri=url)
        run_id = summary["train"]["run_id"]
        assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [1, 2, 3]
        videos = client.list_artifacts(run_id, "validation")
        assert videos and any(a.path.endswith(".mp4") for a in client.list_artifacts(run_id, videos[-1].path))
        version = summary["register"]["version"]
        client.set_registered_model_alias("flow-lora", "champion", version)
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        generated = subprocess.run(
            [sys.executable, "-m", "cogvx", "generate", "--lora", "models:/flow-lora@champion", "--steps", "2",
             "--out", str(tmp_path / "champion.mp4"), f"tracking.tracking_uri={url}",
             f"model.path={workspace}/models/{TINY}"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert generated.returncode == 0, generated.stderr[-2000:]
        assert (tmp_path / "champion.mp4").stat().st_size > 0
    finally:
        stop_server(process)
