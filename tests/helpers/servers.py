"""MLflow and Prefect as real local servers: `mlflow server` processes, the environment the
Prefect processes share, and deployments triggered and awaited through the Prefect API."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.helpers.processes import free_port

DEPLOYMENT = "cogvx-finetune/cogvx-finetune"  # prefect.yaml's flow and deployment


# ----------------------------------------------------------------------------- MLflow


def spawn_server(root: Path, backend_uri: str | None = None, port: int | None = None) -> tuple[subprocess.Popen, str]:
    """Start `mlflow server` on ``port`` (default: a free one) with a SQLite (or the given) store and
    served artifacts (no wait)."""
    root.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    args = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--backend-store-uri", backend_uri or f"sqlite:///{root / 'mlflow.db'}", "--serve-artifacts",
            "--artifacts-destination", str(root / "artifacts")]
    log = open(root / "server.log", "ab")
    process = subprocess.Popen(args, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    return process, f"http://127.0.0.1:{port}"


def wait_healthy(process: subprocess.Popen, url: str, root: Path, timeout: float = 60) -> str:
    """``url`` once the server answers /health; fails if it exits first or takes over ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"mlflow server exited {process.returncode}:\n"
                                 + (root / "server.log").read_text(errors="replace")[-3000:])
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return url
        except OSError:
            time.sleep(0.25)
    raise AssertionError(f"mlflow server at {url} not healthy after {timeout} s")


def stop_server(process: subprocess.Popen) -> None:
    """Terminate the server we started (and its uvicorn worker, in the same new session), by id."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)
    try:
        os.killpg(process.pid, signal.SIGKILL)  # a worker left behind in the server's own group
    except ProcessLookupError:
        pass  # the whole group is gone already


# ----------------------------------------------------------------------------- Prefect


def base_env(root: Path) -> dict[str, str]:
    """What every local process shares: this virtualenv first on PATH, Prefect's home and
    settings in ``root``, quiet logs, no telemetry, no Hugging Face hub."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("PREFECT_", "MLFLOW_", "PG", "HF_"))}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               PREFECT_HOME=str(root / "prefect-home"), PREFECT_LOGGING_LEVEL="WARNING",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1", PREFECT_CLI_PROMPT="false",
               HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", PYTHONUNBUFFERED="1")
    return env


def run_deployment_and_wait(api_url: str, overrides: list[str], timeout: float) -> tuple[Any, Any, list[Any]]:
    """Trigger the deployment with its overrides plus ``overrides``, wait for a final state;
    return the deployment, the flow run and the pool's workers, read from the Prefect API."""
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(DEPLOYMENT)
        flow_run = client.create_flow_run_from_deployment(
            deployment.id, parameters={"overrides": [*deployment.parameters["overrides"], *overrides]})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            flow_run = client.read_flow_run(flow_run.id)
            if flow_run.state is not None and flow_run.state.is_final():
                break
            time.sleep(1)
        workers = client.read_workers_for_work_pool(deployment.work_pool_name)
    return deployment, flow_run, workers


def stop_flow_run(flow_run: Any) -> None:
    """A flow run the worker started here and that is still going: stop its process, by id."""
    pid = (flow_run.infrastructure_pid or "").rpartition(":")[2] if flow_run is not None else ""
    if pid.isdigit() and not flow_run.state.is_final():
        try:
            os.kill(int(pid), signal.SIGTERM)
        except ProcessLookupError:
            pass
