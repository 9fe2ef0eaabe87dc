"""Let forked child processes (DataLoader workers) exit cleanly inside a Prefect run.

Prefect 3.8.8's log and event services register a thread-exit hook (``threading._register_atexit``)
when they start, and reset their state in a forked child (``os.register_at_fork``) without
removing that hook. A child made by ``multiprocessing`` with the fork start method, such as a
torch DataLoader worker (``prepare.num_workers > 0``), then fails in that hook as it exits
(``AssertionError`` in ``_QueueServiceBase._drain``) and exits with code 1 after doing all its
work; torch reports "DataLoader worker (pid N) exited unexpectedly with exit code 1", and the
task fails (or, with retries, silently redoes its work).

:func:`install` (called when :mod:`tasks.training` is imported) registers a fork handler that drops those
hooks in the child only: the services are stopped there anyway, with nothing to drain. The
parent process is untouched.
"""

from __future__ import annotations

import functools
import os
import threading

_installed = False


def _is_prefect_hook(hook: object) -> bool:
    target = hook.func if isinstance(hook, functools.partial) else hook
    owner = getattr(target, "__self__", None)
    return owner is not None and type(owner).__module__.startswith("prefect.")


def drop_prefect_exit_hooks() -> None:
    """In a forked child: forget the thread-exit hooks of Prefect's (reset) services."""
    hooks = getattr(threading, "_threading_atexits", None)  # CPython 3.9+: a plain list
    if isinstance(hooks, list):
        hooks[:] = [hook for hook in hooks if not _is_prefect_hook(hook)]


def install() -> None:
    """Register :func:`drop_prefect_exit_hooks` to run in every forked child (once per process)."""
    global _installed
    if not _installed and hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=drop_prefect_exit_hooks)
        _installed = True
