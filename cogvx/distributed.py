"""Several processes (GPUs) with accelerate: launching, who is who, and splitting work.

A stage whose config names an accelerate config (``--accelerate-config FILE`` on the command line,
or ``prepare.accelerate_config`` / ``train.accelerate_config``) runs itself under ``accelerate launch
--config_file FILE -m cogvx ...`` with exactly its resolved config (:func:`run_launched`; accelerate
then runs DDP, FSDP or DeepSpeed as the file says); ``accelerate launch -m cogvx train`` /
``torchrun -m cogvx`` work directly. Inside, the rank and the number of processes come from the
environment those launchers set, so they are known before any model or process group exists.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Sequence, TypeVar

from cogvx.errors import CogvxError, ConfigError

T = TypeVar("T")
OPTION = "--accelerate-config"
LAUNCHED_MARK = "COGVX_LAUNCHED"  # set for the processes relaunch() starts


def rank() -> int:
    """This process's global rank (0 without a launcher)."""
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """Number of processes of the run (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return rank() == 0


def launched() -> bool:
    """Whether a launcher started this process (cogvx's relaunch, accelerate launch, torchrun):
    then it does the work itself instead of launching again."""
    return os.environ.get(LAUNCHED_MARK) == "1" or "LOCAL_RANK" in os.environ or world_size() > 1


def should_launch(accelerate_config: Path | None) -> bool:
    """Whether a command asked to run on an accelerate config must launch the processes: it
    has a config and is not itself one of the launched processes."""
    return accelerate_config is not None and not launched()


def shard(items: Sequence[T], index: int, count: int) -> list[T]:
    """Process ``index``'s share of ``items`` out of ``count`` processes: every count-th item,
    so shares differ in size by at most one and each item goes to exactly one process."""
    return list(items[index::count])


def strip_option(argv: Sequence[str], option: str = OPTION) -> list[str]:
    """``argv`` without ``option VALUE`` / ``option=VALUE`` (what the launched processes run)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            kept.append(arg)
    return kept


def launch_command(config_file: Path, argv: Sequence[str]) -> list[str]:
    """The ``accelerate launch`` command that runs ``cogvx argv`` on the processes of ``config_file``."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
            "-m", "cogvx", *strip_option(argv)]


def relaunch(config_file: Path, argv: Sequence[str], stdout=None) -> int:
    """Run ``cogvx argv`` under accelerate launch with ``config_file``; return its exit code.

    SIGTERM sent to this process goes on to the launcher (which passes it to every process: they
    checkpoint at the same step and stop); SIGINT from a terminal reaches them all directly, so
    this process only waits. Either way the exit code is 130 when the run was stopped so.
    ``stdout`` is where the processes' standard output goes (default: this process's).
    """
    if not Path(config_file).is_file():
        raise ConfigError(f"{OPTION} {config_file}: no such file; the files shipped with cogvx are in "
                          "configs/accelerate/ (e.g. ddp-2gpu.yaml)")
    env = {**os.environ, LAUNCHED_MARK: "1"}
    process = subprocess.Popen(launch_command(config_file, argv), env=env, stdout=stdout)
    stopped: list[int] = []

    def forward(signum, _frame) -> None:
        stopped.append(signum)
        if signum == signal.SIGTERM:
            process.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = process.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 130 if stopped and code != 0 else code


def _stderr_descriptor() -> int | None:
    """This process's standard error as a file descriptor; None where it has none (a captured stream)."""
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return None


class LaunchInterrupted(CogvxError):
    """The launched processes were stopped by SIGINT/SIGTERM (a training run checkpointed first)."""

    exit_code = 130


def run_launched(config, command: str, extra: Sequence[str] = ()) -> None:
    """Run ``cogvx command`` on the processes of the command's accelerate_config, under exactly
    ``config`` (written to a temporary params file); a failure raises with what to look at.

    The processes' output is progress and notices, so it goes to standard error: standard output
    stays for the caller's own summary (``--json`` prints JSON alone there).
    """
    import tempfile

    config_file = getattr(config, command).accelerate_config
    with tempfile.TemporaryDirectory(prefix="cogvx-launch-") as folder:
        params = Path(folder) / "params.yaml"
        params.write_text(config.to_yaml(), encoding="utf-8")
        code = relaunch(config_file, [command, "--params", str(params), *extra], stdout=_stderr_descriptor())
    if code == 130:
        raise LaunchInterrupted("interrupted: every process stopped; a training run saved a checkpoint first "
                                "(continue with --resume latest)")
    if code != 0:
        raise CogvxError(f"`cogvx {command}` on the processes of {config_file} failed (exit status {code}); "
                         "their messages are above")


class Processes:
    """The processes of a launched command (just this one when not launched): waiting for each
    other and collecting results, through accelerate's process state (gloo on CPU, NCCL on GPU)."""

    def __init__(self, timeout_minutes: int = 60) -> None:
        self.index, self.count = rank(), world_size()
        self.state = None
        if self.count > 1:
            from datetime import timedelta

            import torch
            from accelerate import PartialState

            self.state = PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(minutes=timeout_minutes))

    @property
    def is_main(self) -> bool:
        return self.index == 0

    @property
    def device(self):
        """This process's device when launched (cuda:LOCAL_RANK on a GPU machine), else None."""
        return self.state.device if self.state is not None else None

    def wait(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()

    def gather(self, value) -> list:
        """``value`` of every process, in rank order (on every process)."""
        if self.state is None:
            return [value]
        from accelerate.utils import gather_object

        return gather_object([value])


def close_process_group() -> None:
    """End a launched command's process group: every process waits for the others, then leaves
    the group. Leaving it to interpreter shutdown let a process that finished first abort
    (SIGABRT in gloo's teardown) while the main process was still writing its summary."""
    torch = sys.modules.get("torch")  # a command that never imported torch has no group (and --help stays fast)
    if torch is None or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()

