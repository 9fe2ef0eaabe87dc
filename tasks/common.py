"""What every cogvx task shares: fault injection for tests, the retry condition, the logger.

Fault injection
---------------
``COGVX_FAIL_ONCE=<task name>`` (``download``, ``validate``, ``prepare``, ``train``, ``render``,
``register``, ``build-base-model`` or ``check-model``) together with
``COGVX_FAIL_ONCE_MARKER=<path>`` makes that task raise ``RuntimeError("injected fault")`` the
first time it starts, when the marker file does not exist yet (it is created then), and run
normally on the retry, since the marker is there by then. ``train@N`` crashes training instead
at optimizer step N (after the step, before its checkpoint), so the retry must resume. Both variables must be set; without the
marker nothing is injected. Delete the marker to inject the fault again. Tests use it to check
that Prefect retries a task and that a retried ``train`` resumes instead of starting over.

Retries
-------
:func:`worth_retrying` is every task's ``retry_condition_fn``: a bad configuration or a bad
data set fails the same way on every attempt, so those errors are not retried; anything else
(a flaky download, a lost worker, an out-of-memory on a shared GPU, an injected fault) is.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

FAIL_ONCE_ENV = "COGVX_FAIL_ONCE"
FAIL_ONCE_MARKER_ENV = "COGVX_FAIL_ONCE_MARKER"


def fail_once(task_name: str, step: int | None = None) -> None:
    """Raise RuntimeError("injected fault") if COGVX_FAIL_ONCE names this task (at its start, or
    ``<task>@N`` at step N) and its marker file does not exist yet (creating it, so the retry
    runs normally)."""
    name, _, at = os.environ.get(FAIL_ONCE_ENV, "").strip().partition("@")
    due_step = int(at) if at else None  # None: the fault is due at the task's start
    if name != task_name or step != due_step:
        return
    marker = os.environ.get(FAIL_ONCE_MARKER_ENV, "").strip()
    if not marker:
        return
    path = Path(marker)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(path, "x", encoding="utf-8") as handle:  # atomic: one attempt wins
            handle.write(f"{task_name}\n")
    except FileExistsError:
        return
    raise RuntimeError("injected fault")


def worth_retrying(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry unless the error is a config or data-set error, or
    another run holds the output folder (a retry seconds later would meet it again)."""
    from cogvx.data.validation import DataValidationError
    from cogvx.errors import ConfigError
    from cogvx.runlock import FolderInUseError

    return not isinstance(getattr(state, "data", None), (ConfigError, DataValidationError, FolderInUseError))


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """The task run's Prefect logger; a plain ``cogvx.tasks`` logger outside a run (``task.fn()``)."""
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("cogvx.tasks")
