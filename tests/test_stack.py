"""The compose stack without Docker: the services of docker/compose.yaml as local processes.

No Docker engine runs here, so this test reads the configuration Compose itself resolves
(`docker compose config --format json`, with docker/.env.example and unique database names) and
starts the same services from it, on 127.0.0.1:

* PostgreSQL: the local server on 127.0.0.1:5432; the compose file's init script
  (docker/postgres/init-databases.sh) creates the MLflow and Prefect roles and databases;
* `mlflow` and `prefect-server`: the services' commands and environment, with service addresses
  (``mlflow:5000``, ``postgres:5432``, ...) mapped to 127.0.0.1 and free ports, ``--host`` to
  127.0.0.1 and volume paths to folders under tmp_path; each is awaited with its own compose
  healthcheck command;
* `flow-deploy`: its shell script, run in a copy of the image's project folder (the files the
  CUDA Dockerfile copies to /opt/cogvx), creates the work pool and deploys prefect.yaml's flow;
* `worker`: its command, a separate process polling the pool, awaited with the CUDA image's
  HEALTHCHECK command.

Then the deployment is triggered with a few overrides that shrink the job (tiny model, 3 steps)
and the test waits for it: the flow run completes through the worker, and the MLflow server (REST
client) has the training run with its loss curve, a registered LoRA version whose files were
stored by the server's artifact store in its artifacts folder. Everything started is stopped and
the databases and roles are dropped in ``finally`` blocks. Skipped only when no PostgreSQL
answers on 127.0.0.1:5432.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.helpers import REPO
from tests.helpers.compose import DOCKER, ENV_EXAMPLE, compose_config, instructions
from tests.helpers.processes import free_port, start, stop, tail, wait_until
from tests.helpers.servers import base_env, run_deployment_and_wait, stop_flow_run

PG_HOST, PG_PORT = "127.0.0.1", 5432  # the postgres image's port (not published by the stack)
PROJECT_ROOT = "/opt/cogvx"  # WORKDIR of the images' project, where flow-deploy runs
NAME_KEYS = ("MLFLOW_DB", "MLFLOW_DB_USER", "PREFECT_DB", "PREFECT_DB_USER")
FAST = ["data.synthetic_clips=2", "train.max_steps=3", "validate.num_inference_steps=2"]
LORA_FILE = "pytorch_lora_weights.safetensors"


# ----------------------------------------------------------------------------- plumbing


def postgres_answers() -> bool:
    """Whether something accepts connections on 127.0.0.1:5432."""
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex((PG_HOST, PG_PORT)) == 0


# ----------------------------------------------------------------------------- the configuration


def env_file_with_unique_names(tmp_path: Path, suffix: str) -> Path:
    """docker/.env.example with the database and role names made unique (``name_<suffix>``)."""
    lines = []
    for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        key, sep, value = line.partition("=")
        lines.append(f"{key}={value}_{suffix}" if sep and key in NAME_KEYS else line)
    path = tmp_path / "stack.env"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


class LocalStack:
    """Maps the resolved compose configuration onto this machine: service addresses to
    127.0.0.1 and free ports, volume and project paths to folders under ``root``."""

    def __init__(self, config: dict[str, Any], root: Path) -> None:
        self.services = config["services"]
        # Container port and local port of every service other services address.
        self.targets = {"postgres": PG_PORT}
        self.ports = {"postgres": PG_PORT}
        for name, service in self.services.items():
            for port in service.get("ports", []):
                self.targets[name], self.ports[name] = port["target"], free_port()
        self.paths = {PROJECT_ROOT: root / "project"}
        for service in self.services.values():
            for volume in service.get("volumes", []):
                if volume["type"] == "volume" and not volume["target"].startswith(PROJECT_ROOT + "/"):
                    self.paths[volume["target"]] = root / "volumes" / volume["source"]

    def url(self, name: str) -> str:
        """http://127.0.0.1:<port> of a published service."""
        return f"http://127.0.0.1:{self.ports[name]}"

    def localize(self, value: str, service: str) -> str:
        """One configuration string as it applies here: ``other:port`` addresses, the service's
        own ``127.0.0.1:port`` (health checks) and container paths rewritten."""
        for name, target in self.targets.items():
            value = value.replace(f"{name}:{target}", f"127.0.0.1:{self.ports[name]}")
        if service in self.targets:
            value = value.replace(f"127.0.0.1:{self.targets[service]}", f"127.0.0.1:{self.ports[service]}")
        for container_path in sorted(self.paths, key=len, reverse=True):
            value = value.replace(container_path, str(self.paths[container_path]))
        return value.replace("$$", "$")  # Compose's output escapes $ for the container's shell

    def argv(self, service: str) -> list[str]:
        """The service's command, localized, with --host 127.0.0.1 and --port its local port."""
        args = [self.localize(arg, service) for arg in self.services[service]["command"]]
        for index, arg in enumerate(args[:-1]):
            if arg == "--host":
                args[index + 1] = "127.0.0.1"
            elif arg == "--port":
                args[index + 1] = str(self.ports[service])
        return args

    def env(self, service: str, base: dict[str, str]) -> dict[str, str]:
        """``base`` plus the service's environment, localized (unset optional ones left out)."""
        own = {key: self.localize(value, service)
               for key, value in (self.services[service].get("environment") or {}).items() if value is not None}
        return {**base, **own}

    def healthcheck(self, service: str) -> list[str]:
        """The service's compose healthcheck command (CMD form), localized."""
        test = self.services[service]["healthcheck"]["test"]
        assert test[0] == "CMD", test
        return [self.localize(arg, service) for arg in test[1:]]


def copy_image_project(dockerfile: Path, dest: Path) -> Path:
    """Lay out ``dest`` as the image's project folder: what the Dockerfile COPYs from the build
    context to relative destinations while WORKDIR is the project root."""
    workdir = None
    for word, args in instructions(dockerfile):
        if word == "WORKDIR":
            workdir = args
        elif word == "COPY" and workdir == PROJECT_ROOT and not args.startswith("--"):
            *sources, target = args.split()
            if target.startswith("/"):
                continue
            for source in sources:
                into = dest / target / Path(source).name if target.endswith("/") else dest / target
                into.parent.mkdir(parents=True, exist_ok=True)
                if (REPO / source).is_dir():
                    shutil.copytree(REPO / source, into, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    shutil.copy2(REPO / source, into)
    assert (dest / "prefect.yaml").is_file() and (dest / "flows" / "finetune.py").is_file()
    return dest


def command_succeeds(argv: list[str], env: dict[str, str], cwd: Path) -> bool:
    """Whether ``argv`` (a health check) exits 0 within 15 s."""
    try:
        return subprocess.run(argv, env=env, cwd=cwd, capture_output=True, timeout=15).returncode == 0
    except subprocess.TimeoutExpired:
        return False


# ----------------------------------------------------------------------------- databases


@pytest.fixture
def databases(tmp_path: Path) -> Iterator[tuple[LocalStack, dict[str, str]]]:
    """The stack's configuration with unique database names, and those databases created on the
    local PostgreSQL by the compose file's own init script; dropped afterwards."""
    if not postgres_answers():
        pytest.skip(f"no PostgreSQL on {PG_HOST}:{PG_PORT}")
    import psycopg2

    suffix = uuid.uuid4().hex[:8]
    config = compose_config(env_file_with_unique_names(tmp_path, suffix), home=tmp_path)
    stack = LocalStack(config, tmp_path)
    postgres = stack.services["postgres"]
    names = {key: postgres["environment"][key] for key in NAME_KEYS}
    assert all(value.endswith(f"_{suffix}") for value in names.values())
    [script] = [v["source"] for v in postgres["volumes"] if v["target"].startswith("/docker-entrypoint-initdb.d/")]
    env = {**stack.env("postgres", base_env(tmp_path)), "PGHOST": PG_HOST, "PGPORT": str(PG_PORT)}
    admin = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=postgres["environment"]["POSTGRES_USER"],
                             dbname="postgres")
    admin.autocommit = True
    try:
        done = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        yield stack, names
    finally:
        with admin.cursor() as cursor:
            for db in ("MLFLOW_DB", "PREFECT_DB"):
                cursor.execute(f'DROP DATABASE IF EXISTS "{names[db]}" WITH (FORCE)')
            for role in ("MLFLOW_DB_USER", "PREFECT_DB_USER"):
                cursor.execute(f'DROP ROLE IF EXISTS "{names[role]}"')
        admin.close()


# ----------------------------------------------------------------------------- the test


def start_servers(stack: LocalStack, env: dict[str, str], root: Path) -> dict[str, subprocess.Popen]:
    """mlflow and prefect-server as the compose file runs them; both awaited with their own
    compose healthchecks."""
    procs = {}
    for name in ("mlflow", "prefect-server"):
        procs[name] = start(stack.argv(name), stack.env(name, env), root / name, root / f"{name}.log")
    for name, proc in procs.items():
        check = stack.healthcheck(name)
        wait_until(lambda: command_succeeds(check, env, root), 120, f"{name} healthcheck", proc, root / f"{name}.log")
    return procs


def deploy(stack: LocalStack, env: dict[str, str], root: Path) -> None:
    """flow-deploy's script, in the image's project folder: work pool and deployment."""
    service = stack.services["flow-deploy"]
    cwd = Path(stack.localize(service["working_dir"], "flow-deploy"))
    done = subprocess.run(stack.argv("flow-deploy"), env=stack.env("flow-deploy", env), cwd=cwd,
                          capture_output=True, text=True, timeout=180)
    (root / "flow-deploy.log").write_text(done.stdout + done.stderr)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]


def start_worker(stack: LocalStack, env: dict[str, str], root: Path) -> subprocess.Popen:
    """The worker service's command, polling every second; awaited with the CUDA image's
    HEALTHCHECK (its webserver on a free local port)."""
    worker_env = {**stack.env("worker", env), "PREFECT_WORKER_WEBSERVER_PORT": str(free_port()),
                  "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_HEARTBEAT_SECONDS": "5"}
    assert worker_env["PREFECT_WORKER_WEBSERVER_HOST"] == "127.0.0.1"
    worker = start(stack.argv("worker"), worker_env, root / "worker", root / "worker.log")
    [health] = [args for word, args in instructions(DOCKER / "Dockerfile.cuda") if word == "HEALTHCHECK"]
    check = json.loads(health.split(" CMD ", 1)[1])
    wait_until(lambda: command_succeeds(check, worker_env, root), 90, "worker healthcheck", worker, root / "worker.log")
    return worker


@pytest.mark.slow
def test_compose_services_run_the_flow_through_the_work_pool(databases, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The flow, deployed and run as the compose stack does it, completes through the worker and
    is tracked, registered and stored by the MLflow server."""
    from mlflow import MlflowClient

    from cogvx.config import load_config
    from cogvx.tracking import resolve_lora

    monkeypatch.chdir(tmp_path)  # MLflow client defaults (./mlflow.db, ./mlruns) stay out of the repo
    stack, _ = databases
    env = base_env(tmp_path)
    copy_image_project(DOCKER / "Dockerfile.cuda", stack.paths[PROJECT_ROOT])
    procs: dict[str, subprocess.Popen] = {}
    flow_run = None
    try:
        procs.update(start_servers(stack, env, tmp_path))
        deploy(stack, env, tmp_path)
        procs["worker"] = start_worker(stack, env, tmp_path)
        api_url = stack.env("worker", env)["PREFECT_API_URL"]
        deployment, flow_run, workers = run_deployment_and_wait(api_url, FAST, timeout=300)
        log = tail(tmp_path / "worker.log")

        # The deployment is what flow-deploy made of prefect.yaml and the compose values.
        mlflow_url = stack.url("mlflow")
        assert deployment.work_pool_name == stack.services["flow-deploy"]["environment"]["COGVX_WORK_POOL"]
        assert deployment.pull_steps == [{"prefect.deployments.steps.set_working_directory":
                                          {"directory": str(stack.paths[PROJECT_ROOT])}}]
        assert deployment.parameters["overrides"] == [f"tracking.tracking_uri={mlflow_url}"]
        assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * *"]
        # The run completed in a process the worker started.
        assert flow_run.state.is_completed(), (flow_run.state, log)
        assert flow_run.work_pool_name == deployment.work_pool_name
        assert flow_run.infrastructure_pid and not flow_run.infrastructure_pid.endswith(f":{os.getpid()}")
        assert any(worker.status.value == "ONLINE" for worker in workers), workers
        project = stack.paths[PROJECT_ROOT]
        assert (project / "outputs" / "samples" / "flow-sample.mp4").stat().st_size > 0

        # MLflow, through its REST API: the training run, its loss curve, the registered LoRA.
        config = load_config(project / "params.yaml", FAST)
        client = MlflowClient(tracking_uri=mlflow_url, registry_uri=mlflow_url)
        experiment = client.get_experiment_by_name(config.tracking.experiment)
        [run] = client.search_runs([experiment.experiment_id])
        assert run.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2, 3]
        assert run.info.artifact_uri.startswith("mlflow-artifacts:/")  # stored through the server
        [version] = client.search_model_versions(f"name='{config.tracking.registered_model}'")
        assert version.run_id == run.info.run_id and version.status == "READY"

        # The artifact store: the LoRA's bytes, fetched back by its registry URI (as `cogvx
        # generate --lora models:/...` does), are those the worker trained, and the server keeps
        # them in its artifacts destination (the volume).
        fetched = resolve_lora(f"models:/{version.name}/{version.version}", mlflow_url, tmp_path / "fetched")
        trained = next((project / "outputs").rglob(f"lora/{LORA_FILE}"))
        assert (fetched / LORA_FILE).read_bytes() == trained.read_bytes()
        stored = list(stack.paths["/var/lib/mlflow/artifacts"].rglob(LORA_FILE))
        assert stored and stored[0].read_bytes() == trained.read_bytes()
        assert client.list_artifacts(run.info.run_id)
    finally:
        stop_flow_run(flow_run)
        for proc in reversed(list(procs.values())):
            stop(proc)
