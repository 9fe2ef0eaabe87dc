"""One writer per output folder: a lock file that names its holder.

`cogvx train` (and `cogvx prepare`) hold ``FOLDER/.cogvx.lock`` for as long as they write into
their folder. The lock itself is the kernel's (``flock`` on an open file descriptor): it belongs
to the running process and disappears with it, however it dies, so a folder is never left
locked by a dead run. The file's content, JSON ``{pid, host, started, command}``, only says who
holds it: a second writer is refused at once with those details, and a run that finds the
details of a holder that died without releasing (SIGKILL, out of memory, power loss) takes the
folder over with a short notice. The file is removed when the holder releases it.

With several processes (accelerate launch) only the main one takes the lock, once per launch;
the others write into the folder under its protection.
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import socket
import sys
from contextlib import contextmanager, suppress
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator

from cogvx.errors import CogvxError

LOCK_NAME = ".cogvx.lock"


class FolderInUseError(CogvxError):
    """Another live process is writing into the same output folder."""

    exit_code = 6


def lock_path(folder: str | os.PathLike) -> Path:
    return Path(folder) / LOCK_NAME


@contextmanager
def run_lock(folder: str | os.PathLike, setting: str, log: Callable[[str], Any] = print,
             command: str | None = None) -> Iterator[Path]:
    """Hold ``folder``'s lock for the ``with`` block; yields the lock file's path.

    ``setting`` is the config key that names the folder (``train.output_dir``): the refusal
    tells the user to pick another one. Raises :class:`FolderInUseError` at once (no waiting)
    when a live process holds the lock; ``log`` gets the notice when a dead holder's lock is
    taken over.
    """
    path = lock_path(folder)
    created = not path.parent.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire(path, setting)
    try:
        previous = _read_holder(fd)
        if previous:
            log(f"taking over {path}: {describe(previous)} ended without releasing it "
                "(killed?); its unfinished writes are cleaned up")
        _write_holder(fd, holder_record(command))
        yield path
    finally:
        if _same_file(fd, path):
            path.unlink()  # still holding the lock, so no one else can have it yet
        os.close(fd)
        if created:  # a run that stopped before writing anything leaves no empty folder behind
            with suppress(OSError):  # not empty (it wrote, or another run just started there): keep it
                path.parent.rmdir()


def holder_record(command: str | None = None) -> dict[str, Any]:
    """What the lock file says about this process."""
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": command if command is not None else this_command()}


def this_command() -> str:
    """This process's command line, as the user would type it (``cogvx train ...``)."""
    program = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    if program == "__main__.py":  # python -m cogvx
        program = "cogvx"
    return shlex.join([program, *sys.argv[1:]])


def describe(holder: dict[str, Any]) -> str:
    """``PID 123 on host gpu-1, started 2025-01-02T03:04:05+00:00 (cogvx train ...)``."""
    command = f" ({holder['command']})" if holder.get("command") else ""
    return (f"PID {holder.get('pid', '?')} on host {holder.get('host', '?')}, "
            f"started {holder.get('started', '?')}{command}")


def _acquire(path: Path, setting: str) -> int:
    """An open descriptor of ``path`` holding its exclusive lock, or FolderInUseError.

    The holder removes the file when it releases it; a process that opened the old file just
    before that would lock a file no longer in the folder, so the lock is taken again on the
    file now at ``path`` until the two are the same.
    """
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise FolderInUseError(busy_message(path, holder, setting)) from None
        except OSError as err:
            os.close(fd)
            raise CogvxError(f"cannot lock {path} ({err}): this file system offers no file locks; "
                             f"put {setting} on a local disk") from None
        if _same_file(fd, path):
            return fd
        os.close(fd)


def busy_message(path: Path, holder: dict[str, Any] | None, setting: str) -> str:
    """Why the folder is refused, who holds it, and what to do."""
    folder = path.parent
    if not holder:
        who = "another process that has only just started (its details are not written yet)"
    else:
        who = describe(holder)
        if holder.get("host") == socket.gethostname() and not _pid_alive(holder.get("pid")):
            who += (f"; that process is gone, but one it started still holds the lock "
                    f"(`fuser -v {path}` shows it): stop it")
    return (f"{folder} is in use by another cogvx run: {who}. Two runs writing there would "
            f"overwrite each other's files. Wait for it to finish, or pick another {setting} "
            f"(e.g. {setting}={folder}-2)")


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return True  # unknown: assume the holder is alive
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``fd`` is the file now at ``path`` (not one removed since it was opened)."""
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (opened.st_dev, opened.st_ino)


def _read_holder(fd: int) -> dict[str, Any] | None:
    """The holder the lock file names; None when empty or unreadable (being written)."""
    size = os.fstat(fd).st_size
    data = os.pread(fd, size, 0) if size else b""
    try:
        holder = json.loads(data.decode("utf-8")) if data.strip() else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return holder if isinstance(holder, dict) else None


def _write_holder(fd: int, holder: dict[str, Any]) -> None:
    data = (json.dumps(holder) + "\n").encode("utf-8")
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)
