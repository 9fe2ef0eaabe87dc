"""Atomic writes: a reader sees the old file (or folder) or the new one, never half of one.

Every write goes through a hidden temporary name beside its target that carries
:data:`STAGING_MARK` (``.NAME.cogvx-staging-RANDOM``), so what a killed process left behind
can be told apart from anything else and removed (:func:`remove_staging_leftovers`) by the
next process that owns the folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

STAGING_MARK = ".cogvx-staging-"  # in the name of every temporary file and staging folder


def staging_prefix(target: Path) -> str:
    """The start of the temporary names of writes to ``target``: hidden, beside it, marked."""
    return f".{target.name}{STAGING_MARK}"


@contextmanager
def atomic_file(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed over ``path``.

    ``suffix`` lets writers that pick their format by extension (ffmpeg) see the right one.
    On any failure the temporary file is removed and ``path`` is left as it was.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=staging_prefix(target), suffix=suffix, dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging folder beside ``path``; on success it replaces ``path``."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=staging_prefix(target), dir=target.parent))
    try:
        yield staging
        os.chmod(staging, 0o777 & ~current_umask())
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def is_staging_name(name: str, targets: Iterable[str] = ()) -> bool:
    """Whether ``name`` is a temporary name of an atomic write: marked with :data:`STAGING_MARK`,
    or ``.TARGET.RANDOM`` for one of ``targets`` (the unmarked names of earlier cogvx versions)."""
    if not name.startswith("."):
        return False
    return STAGING_MARK in name or any(name.startswith(f".{target}.") for target in targets)


def remove_staging_leftovers(folder: str | os.PathLike, targets: Iterable[str] = ()) -> list[Path]:
    """Delete the temporary files and staging folders that atomic writes of dead processes left
    directly in ``folder`` (see :func:`is_staging_name`); returns what was removed.

    Only the folder's owner may call this (e.g. the holder of its run lock): a live writer's
    staging folder looks just the same.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    targets = tuple(targets)
    removed = []
    for entry in sorted(folder.iterdir()):
        if not is_staging_name(entry.name, targets):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
        removed.append(entry)
    return removed


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, fsync, rename)."""
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """UTF-8 text variant of :func:`atomic_write_bytes`."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def default_file_mode() -> int:
    """0o666 less the umask: what a plain open() would have created (mkstemp uses 0o600)."""
    return 0o666 & ~current_umask()
