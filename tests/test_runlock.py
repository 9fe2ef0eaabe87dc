"""One writer per output folder: real processes holding, dying with and fighting over the lock,
and the Prefect deployments running one flow run at a time."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cogvx.runlock import LOCK_NAME, FolderInUseError, run_lock
from tests.helpers import REPO
from tests.helpers.training import base_overrides, train_process

HOLD = """
import os, sys, time
from cogvx.runlock import run_lock
with run_lock(sys.argv[1], "train.output_dir"):
    if len(sys.argv) > 2 and os.fork():  # the parent leaves; its child keeps the lock's descriptor
        os._exit(0)
    print("held", os.getpid(), flush=True)
    time.sleep(120)
"""


def holder_process(folder: Path, *extra: str) -> tuple[subprocess.Popen, int]:
    """A process that takes ``folder``'s lock and sleeps (with ``fork``: leaves a child that
    does); returns once the lock is held, with the PID of the process that sleeps."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), *extra], stdout=subprocess.PIPE, text=True)
    word, pid = process.stdout.readline().split()
    assert word == "held"
    return process, int(pid)


def wait_for_holder(folder: Path, pid: int, process: subprocess.Popen, timeout: float = 120) -> dict:
    """The lock file's JSON once process ``pid`` has written it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            holder = json.loads((folder / LOCK_NAME).read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            holder = {}
        if holder.get("pid") == pid:
            return holder
        time.sleep(0.05)
    raise AssertionError(f"process {pid} never took the lock of {folder} (exit {process.poll()})")


def test_second_writer_is_refused_naming_the_holder(tmp_path):
    with run_lock(tmp_path, "train.output_dir", command="cogvx train x=1") as path:
        holder = json.loads(path.read_text(encoding="utf-8"))
        assert holder["command"] == "cogvx train x=1" and holder["host"] == socket.gethostname()
        with pytest.raises(FolderInUseError) as refused:
            with run_lock(tmp_path, "train.output_dir"):
                pytest.fail("two holders")
        message = str(refused.value)
        assert f"PID {holder['pid']}" in message and holder["started"] in message and "cogvx train x=1" in message
        assert "pick another train.output_dir" in message and refused.value.exit_code == 6
    assert not (tmp_path / LOCK_NAME).exists()  # released: removed
    with run_lock(tmp_path, "train.output_dir"):
        pass


def test_lock_of_a_killed_process_is_taken_over_with_a_notice(tmp_path):
    process, _ = holder_process(tmp_path)
    with pytest.raises(FolderInUseError):
        with run_lock(tmp_path, "train.output_dir"):
            pass
    process.send_signal(signal.SIGKILL)
    process.wait()
    notices: list[str] = []
    with run_lock(tmp_path, "train.output_dir", log=notices.append) as path:
        assert json.loads(path.read_text(encoding="utf-8"))["pid"] != process.pid
    [notice] = notices
    assert "taking over" in notice and f"PID {process.pid} on host {socket.gethostname()}" in notice


def test_lock_kept_by_a_child_of_a_dead_holder_says_so(tmp_path):
    """The holder forked and died; its child still has the descriptor, so the kernel's lock is
    still held: refused, saying the named process is gone and how to find the one holding it."""
    process, child = holder_process(tmp_path, "fork")
    process.wait()  # reaped: its PID names no process now
    try:
        assert json.loads((tmp_path / LOCK_NAME).read_text(encoding="utf-8"))["pid"] == process.pid != child
        with pytest.raises(FolderInUseError, match=f"PID {process.pid} .*that process is gone.*fuser -v"):
            with run_lock(tmp_path, "train.output_dir"):
                pass
    finally:
        os.kill(child, signal.SIGKILL)
        process.stdout.close()


@pytest.mark.slow
def test_two_train_processes_into_one_folder(prepared, tmp_path):
    """The second `cogvx train` into a folder in use exits at once (exit 6) naming the first,
    before it creates an MLflow run; the first goes on undisturbed and stops cleanly."""
    out = tmp_path / "run"
    out.mkdir()
    first = train_process(prepared, out, "train.max_steps=2000", "train.checkpointing_steps=5000",
                          "validate.every_n_steps=0")
    try:
        holder = wait_for_holder(out, first.pid, first)
        store = tmp_path / "mlruns.db"
        second = subprocess.run([sys.executable, "-m", "cogvx", "train", *base_overrides(prepared),
                                 f"train.output_dir={out}", "tracking.enabled=true",
                                 f"tracking.tracking_uri=sqlite:///{store}"],
                                cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert second.returncode == 6, second.stderr[-2000:]
        message = " ".join(second.stderr.split())
        assert f"PID {first.pid} on host {socket.gethostname()}" in message and holder["started"] in message
        assert "cogvx train" in message and "Wait for it to finish" in message and "Traceback" not in message
        assert not store.exists(), "the refused run touched the tracking store"
        assert first.poll() is None
        deadline = time.monotonic() + 180  # training under way (its SIGTERM handler installed)
        while time.monotonic() < deadline and first.poll() is None and not (out / "cogvx-config.yaml").exists():
            time.sleep(0.05)
        time.sleep(1.0)
    finally:
        first.send_signal(signal.SIGTERM)
        _, stderr = first.communicate(timeout=120)
    assert first.returncode == 130, stderr[-2000:]
    assert not (out / LOCK_NAME).exists()


@pytest.mark.slow
def test_prepare_into_a_folder_in_use_is_refused(prepared, tmp_path):
    """`cogvx prepare` takes the same lock on prepare.output_dir: a second one there would
    delete the first one's files mid-write (its cleanup of partial files)."""
    with run_lock(prepared["latents"], "prepare.output_dir", command="cogvx prepare"):
        done = subprocess.run([sys.executable, "-m", "cogvx", "prepare", *base_overrides(prepared)],
                              cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 6, done.stderr[-2000:]
    message = " ".join(done.stderr.split())
    assert "is in use by another cogvx run" in message and "pick another prepare.output_dir" in message


# ----------------------------------------------------------------------------- Prefect


def test_prefect_yaml_runs_one_at_a_time():
    """prefect.yaml's deployment has a concurrency limit of 1 that queues (what `prefect deploy` reads)."""
    from prefect.cli.deploy._models import PrefectYamlModel

    spec = PrefectYamlModel.model_validate(yaml.safe_load((REPO / "prefect.yaml").read_text(encoding="utf-8")))
    [deployment] = spec.deployments
    assert deployment.concurrency_limit.limit == 1
    assert deployment.concurrency_limit.collision_strategy == "ENQUEUE"


def test_served_deployment_runs_one_at_a_time():
    from prefect.client.schemas.objects import ConcurrencyLimitStrategy

    from flows.finetune import served_deployment

    deployment = served_deployment("0 3 * * *", overrides=["train.max_steps=5"])
    assert deployment.concurrency_limit == 1
    assert deployment.concurrency_options.collision_strategy == ConcurrencyLimitStrategy.ENQUEUE
    assert deployment.parameters["overrides"] == ["train.max_steps=5"]


@pytest.mark.slow
def test_a_run_held_back_by_the_limit_is_reported_as_waiting():
    """Against a real (temporary) Prefect server: with one run of the served deployment running,
    the next is held back (AwaitingConcurrencySlot) when the runner proposes it, and the
    runner's log says it waits for the running one."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.runner._state_proposer import StateProposer
    from prefect.states import Running
    from prefect.testing.utilities import prefect_test_harness

    from flows.finetune import RUNNER_STATE_LOGGER, ConcurrencyWaitNotice, served_deployment

    deployment = served_deployment("0 3 * * *")  # outside the event loop (to_deployment is sync there)

    async def propose_two() -> tuple[str, str]:
        async with get_client() as client:
            deployment_id = await deployment.aapply()
            first = await client.create_flow_run_from_deployment(deployment_id)
            second = await client.create_flow_run_from_deployment(deployment_id)
            proposer = StateProposer(client=client)
            assert await proposer.propose_pending(first)
            await client.set_flow_run_state(first.id, Running())
            assert not await proposer.propose_pending(second)
            held = await client.read_flow_run(second.id)
            return str(second.id), held.state.name

    logger, notice, seen = logging.getLogger(RUNNER_STATE_LOGGER), ConcurrencyWaitNotice(), Collect()
    level = logger.level
    logger.addFilter(notice)
    logger.addHandler(seen)  # Prefect's loggers do not propagate to pytest's
    # A flow run earlier in this process (test_flows.py, PREFECT_LOGGING_LEVEL=WARNING) leaves
    # Prefect's loggers at WARNING; a served deployment's runner logs at INFO (Prefect's default).
    logger.setLevel(logging.INFO)
    try:
        with prefect_test_harness(server_startup_timeout=120):
            second_id, state_name = asyncio.run(propose_two())
    finally:
        logger.setLevel(level)
        logger.removeFilter(notice)
        logger.removeHandler(seen)
    assert state_name == "AwaitingConcurrencySlot"
    assert any(second_id in message and "waits (AwaitingConcurrencySlot)" in message for message in seen.messages), seen.messages


class Collect(logging.Handler):
    """The messages of the records it handles."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
