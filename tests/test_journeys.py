"""A new user's paths through the real commands, on a fresh copy of the repository.

A Prefect server and a `process` work-pool worker run the deployment of prefect.yaml exactly as
its comments tell a user to (`prefect work-pool create`, `prefect deploy`, `prefect worker
start`), with MLflow tracking to a SQLite file outside the project; then the LoRA the worker
trained is promoted and rendered by alias with `cogvx registry promote` and `cogvx generate
--lora models:/NAME@ALIAS`, the way the README says. (The DVC journey, `dvc repro` then `dvc exp
run/show/diff` and byte-identical re-runs, is tests/test_dvc.py.)
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO
from tests.helpers.processes import free_port, start, stop, tail, wait_until
from tests.helpers.servers import base_env, run_deployment_and_wait, stop_flow_run

FAST = ["data.synthetic_clips=2", "train.max_steps=3", "validate.num_inference_steps=2", "train.checkpointing_steps=3"]
LORA_FILE = "pytorch_lora_weights.safetensors"


def fresh_copy(dest: Path) -> Path:
    """The repository's tracked files (as they are in the working tree) in a new git repo."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target)
    return dest


def prefect(*args: str, env: dict[str, str], cwd: Path, timeout: float = 180) -> str:
    done = subprocess.run([sys.executable, "-m", "prefect", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, f"prefect {' '.join(args)}:\n{(done.stdout + done.stderr)[-4000:]}"
    return done.stdout


def cogvx(*args: str, env: dict[str, str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "cogvx", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, f"cogvx {' '.join(args)}:\n{(done.stdout + done.stderr)[-4000:]}"
    assert "Traceback" not in done.stdout + done.stderr
    return done


def api_healthy(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2):
            return True
    except OSError:
        return False


@pytest.mark.slow
def test_work_pool_worker_trains_registers_on_sqlite_outside_the_repo_and_generate_renders_by_alias(tmp_path):
    project = fresh_copy(tmp_path / "project")
    store = tmp_path / "elsewhere" / "tracking.db"
    tracking = f"tracking.tracking_uri=sqlite:///{store}"
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {**base_env(tmp_path), "PREFECT_API_URL": api_url, "PREFECT_WORKER_QUERY_SECONDS": "1",
           "PREFECT_WORKER_WEBSERVER_PORT": str(free_port())}
    server_env = {key: value for key, value in env.items() if key != "PREFECT_API_URL"}
    procs, flow_run = [], None
    try:
        procs.append(start([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                            "--port", str(port)], server_env, tmp_path / "server", tmp_path / "server.log"))
        wait_until(lambda: api_healthy(api_url), 120, "prefect server", procs[0], tmp_path / "server.log")
        prefect("work-pool", "create", "cogvx-process", "--type", "process", env=env, cwd=project)
        prefect("deploy", "--name", "cogvx-finetune", env=env, cwd=project)
        procs.append(start([sys.executable, "-m", "prefect", "worker", "start", "--pool", "cogvx-process"],
                           env, tmp_path / "worker", tmp_path / "worker.log"))
        _, flow_run, _ = run_deployment_and_wait(api_url, [*FAST, tracking], timeout=420)
        assert flow_run.state.is_completed(), (flow_run.state, tail(tmp_path / "worker.log"))
    finally:
        stop_flow_run(flow_run)
        for proc in reversed(procs):
            stop(proc)

    # MLflow wrote to the configured file only: nothing in the project's working folder.
    assert store.is_file() and list((store.parent / "mlruns").rglob(LORA_FILE))
    assert not (project / "mlflow.db").exists() and not (project / "mlruns").exists()
    trained = project / "outputs" / "train" / "lora" / LORA_FILE
    listed = cogvx("registry", "list", "--json", tracking, env=env, cwd=project).stdout
    assert '"version": "1"' in listed
    cogvx("registry", "promote", "1", tracking, env=env, cwd=project)
    out = tmp_path / "by-alias.mp4"
    rendered = cogvx("generate", "--lora", "models:/cogvx-lora@champion", "--steps", "2", "--out", str(out),
                     tracking, *FAST, env=env, cwd=project)
    assert out.stat().st_size > 0 and "wrote" in rendered.stdout
    fetched = list((project / "outputs").rglob(f"cogvx-lora-v1/**/{LORA_FILE}"))
    digest = lambda path: hashlib.sha256(path.read_bytes()).hexdigest()  # noqa: E731
    assert fetched and digest(fetched[0]) == digest(trained), fetched
