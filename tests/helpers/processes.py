"""Processes the tests start and stop themselves: free ports, polling, logs, process groups."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import pytest


def free_port() -> int:
    """A TCP port nobody listens on at the moment, on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(check: Callable[[], Any], timeout: float, what: str,
               proc: subprocess.Popen | None = None, log: Path | None = None) -> Any:
    """Poll ``check()`` every 0.5 s until it returns something truthy; fail after ``timeout``
    s, or at once if ``proc`` exits, with the tail of ``log``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{what}: the process exited with {proc.returncode}\n{tail(log)}")
        if result := check():
            return result
        time.sleep(0.5)
    pytest.fail(f"{what}: not within {timeout:.0f} s\n{tail(log)}")


def tail(log: Path | None, chars: int = 4000) -> str:
    """The end of a log file (empty if there is none)."""
    return log.read_text(errors="replace")[-chars:] if log is not None and log.is_file() else ""


def start(argv: list[str], env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen:
    """Start ``argv`` as the leader of a new process group, output to ``log``."""
    cwd.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        return subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    """Stop a process started here and what it started in its group, by its id."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # children left behind in the group (uvicorn workers)
    except ProcessLookupError:
        pass
