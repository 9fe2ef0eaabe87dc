"""Put a training data set into ``data_root``: synthetic clips, a local folder or archive, or a hub dataset.

``cogvx data download`` (and the DVC stage built on it) calls :func:`fetch_dataset` with
``data.source``. Accepted sources:

* ``synthetic``: short generated clips (no download), made by :mod:`cogvx.data.synthetic`;
* a local folder: copied, refusing symlinks that point outside it;
* a local ``.zip`` / ``.tar`` / ``.tar.gz`` / ``.tgz`` archive: extracted, refusing members that
  would land outside ``data_root`` (absolute paths, ``..``, escaping links);
* a hub dataset id ``org/name``: downloaded with ``huggingface_hub.snapshot_download`` (resumable,
  with a progress bar), failing at once with an actionable message when the hub is unreachable.

Local sources and synthetic clips are built in a staging folder that replaces ``data_root`` only
when complete, so a crash never leaves half a data set. Every fetch ends by writing
``data_root/.cogvx-source.json``, which records what is there; a later fetch of the same source
(same path, size and mtime; same repo id and revision; same clip count and seed) does nothing.
The marker is also what allows cogvx to replace ``data_root``: a non-empty folder without one holds
someone's own files and is never deleted.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tarfile
import zipfile
from pathlib import Path
from typing import Any, Callable, TypeVar

from cogvx.errors import CogvxError, ConfigError
from cogvx.io import atomic_directory, atomic_write_text

MARKER_NAME = ".cogvx-source.json"
T = TypeVar("T")
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
EXAMPLE_HUB_DATASET = "Wild-Heart/Disney-VideoGeneration-Dataset"
ACCEPTED_FORMS = (
    "'synthetic' (generated clips, no download); a local folder; a local .zip, .tar, .tar.gz or "
    f".tgz archive; or a hub dataset id 'org/name' (e.g. {EXAMPLE_HUB_DATASET})"
)


class DatasetNotAvailableError(CogvxError):
    """The data set named by data.source cannot be found locally, extracted safely, nor downloaded."""

    exit_code = 3


def fetch_dataset(source: str, data_root: Path, *, revision: str | None = None,
                  synthetic_clips: int = 12, seed: int = 0, synthetic_controls: bool = False) -> Path:
    """Put the data set named by ``source`` into ``data_root`` and return ``data_root``.

    Does nothing when ``data_root`` already holds a complete copy of the same source. ``revision``
    only applies to hub ids; ``synthetic_clips``, ``seed`` and ``synthetic_controls`` (a control
    video per clip, for data.control = file) only to ``source == "synthetic"``.
    An existing local path wins over the hub-id reading of ``source``.
    """
    data_root = Path(data_root).expanduser()
    root = data_root.resolve()  # a symlinked data_root is filled where it points
    if source == "synthetic":
        _fetch_synthetic(root, synthetic_clips, seed, synthetic_controls)
        return data_root
    path = Path(source).expanduser()
    if path.is_dir():
        _fetch_folder(path.resolve(), root)
    elif path.is_file():
        _fetch_archive(path.resolve(), root)
    else:
        from cogvx.hub import is_hub_id

        if not is_hub_id(source):
            raise DatasetNotAvailableError(_unknown_source_message(source, "no such file or folder"))
        _fetch_hub(source, root, revision)
    return data_root


# ----------------------------------------------------------------------------- the marker


def _read_marker(data_root: Path) -> dict[str, Any] | None:
    """The marker's content; None when there is none, {} when it is unreadable (so: redo the work)."""
    marker = data_root / MARKER_NAME
    if not marker.is_file():
        return None
    try:
        content = json.loads(marker.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return content if isinstance(content, dict) else {}


def _is_current(data_root: Path, identity: dict[str, Any]) -> bool:
    """Whether data_root holds a complete fetch of exactly ``identity``."""
    marker = _read_marker(data_root)
    return marker is not None and marker.get("identity") == identity and marker.get("complete") is True


def _write_marker(folder: Path, identity: dict[str, Any], complete: bool = True, **details: Any) -> None:
    """Record what folder holds; ``details`` (e.g. the hub commit) are informative, not compared."""
    text = json.dumps({"identity": identity, "complete": complete, **details}, indent=2) + "\n"
    atomic_write_text(folder / MARKER_NAME, text)


def _check_replaceable(data_root: Path) -> None:
    """Refuse to replace a data_root that holds files cogvx did not put there (someone's own clips)."""
    if data_root.exists() and not data_root.is_dir():
        raise ConfigError(f"data.data_root = {str(data_root)!r} is a file; it must be a folder "
                          "(or not exist yet)")
    if data_root.is_dir() and _read_marker(data_root) is None and any(data_root.iterdir()):
        raise ConfigError(
            f"data.data_root = {str(data_root)!r} already holds files that cogvx did not put there, "
            f"and fetching would replace them. To train on those files, set data.source to that "
            f"folder (data.source={data_root}); otherwise move them away or pick another data.data_root.")


def _check_no_overlap(source: Path, data_root: Path) -> None:
    """Refuse a source inside data_root (replacing data_root would delete it) or containing it."""
    if source.is_relative_to(data_root) or data_root.is_relative_to(source):
        raise ConfigError(
            f"data.source = {str(source)!r} and data.data_root = {str(data_root)!r} overlap; "
            "fetching would copy a folder into itself or delete the source. Keep the source outside "
            "data_root, or set data.source to data_root itself to use it in place.")


# ----------------------------------------------------------------------------- synthetic clips


def _fetch_synthetic(data_root: Path, clips: int, seed: int, controls: bool = False) -> None:
    """Generate ``clips`` clips with ``seed`` (and control videos) unless data_root already holds exactly those."""
    if clips < 1:
        raise ConfigError(f"data.synthetic_clips = {clips}; it must be at least 1")
    identity = {"kind": "synthetic", "clips": clips, "seed": seed}
    if controls:
        identity["controls"] = True  # absent otherwise: folders made before controls existed stay current
    if _is_current(data_root, identity) and _listed_files_exist(data_root):
        return
    _check_replaceable(data_root)
    from cogvx.data.synthetic import make_synthetic_dataset

    with atomic_directory(data_root) as staging:
        make_synthetic_dataset(staging, clips, seed=seed, control=controls)
        _write_marker(staging, identity)


def _listed_files_exist(data_root: Path) -> bool:
    """Whether prompts.txt and videos.txt exist and every clip videos.txt lists is there."""
    prompts, videos = data_root / "prompts.txt", data_root / "videos.txt"
    if not (prompts.is_file() and videos.is_file()):
        return False
    listed = [line.strip() for line in videos.read_text(encoding="utf-8").splitlines() if line.strip()]
    return bool(listed) and all((data_root / name).is_file() for name in listed)


# ----------------------------------------------------------------------------- local folder


def _fetch_folder(source: Path, data_root: Path) -> None:
    """Copy the folder ``source`` into data_root (or use it in place when it is data_root)."""
    if source == data_root:
        return
    _check_no_overlap(source, data_root)
    identity = {"kind": "folder", "path": str(source), **_tree_stats(source)}
    if _is_current(data_root, identity):
        return
    _check_replaceable(data_root)
    links = _symlink_targets(source)
    escaping = sorted(str(link.relative_to(source)) for link, target in links.items()
                      if not target.is_relative_to(source))
    if escaping:
        raise DatasetNotAvailableError(
            f"data.source = {str(source)!r} has symlinks pointing outside it, which a copy would "
            f"not carry: {', '.join(escaping)}. Replace them with the files they point to "
            "(e.g. cp -rL SOURCE NEW_FOLDER) and set data.source to the result.")
    with atomic_directory(data_root) as staging:
        shutil.copytree(source, staging, symlinks=True, dirs_exist_ok=True)
        _relink(links, source, staging)
        _write_marker(staging, identity)


def _tree_stats(root: Path) -> dict[str, int]:
    """Files, bytes and newest mtime under root: a change anywhere in the tree changes them."""
    files = size = 0
    newest = root.lstat().st_mtime_ns
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            stat = os.lstat(os.path.join(dirpath, name))
            newest = max(newest, stat.st_mtime_ns)
            if name in filenames:
                files, size = files + 1, size + stat.st_size
    return {"files": files, "size": size, "mtime": newest}


def _symlink_targets(root: Path) -> dict[Path, Path]:
    """Every symlink under root (not followed) with the real path it finally points to."""
    links: dict[Path, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            if path.is_symlink():
                links[path] = Path(os.path.realpath(path))
    return links


def _relink(links: dict[Path, Path], source: Path, staging: Path) -> None:
    """Point the copied links at the copy: each becomes a relative link to its real target."""
    for link, target in links.items():
        copied = staging / link.relative_to(source)
        copied.unlink()
        os.symlink(os.path.relpath(target, link.parent), copied, target_is_directory=target.is_dir())


# ----------------------------------------------------------------------------- local archive


def _fetch_archive(archive: Path, data_root: Path) -> None:
    """Extract a .zip or .tar archive into data_root, refusing any member that would escape it."""
    if not archive.name.lower().endswith(ARCHIVE_SUFFIXES):
        raise DatasetNotAvailableError(_unknown_source_message(
            str(archive), f"a file, but not an archive ({', '.join(ARCHIVE_SUFFIXES)})"))
    _check_no_overlap(archive, data_root)
    stat = archive.stat()
    identity = {"kind": "archive", "path": str(archive), "size": stat.st_size, "mtime": stat.st_mtime_ns}
    if _is_current(data_root, identity):
        return
    _check_replaceable(data_root)
    with atomic_directory(data_root) as staging:
        if archive.name.lower().endswith(".zip"):
            _extract_zip(archive, staging)
        else:
            _extract_tar(archive, staging)
        _hoist_single_folder(staging)
        _write_marker(staging, identity)


def _unsafe_name(name: str) -> str | None:
    """Why an archive member name would land outside the extraction folder, or None if it is safe."""
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:([\\/]|$)", name):
        return "absolute path"
    if ".." in name.replace("\\", "/").split("/"):
        return "'..' in its path"
    return None


def _refuse_members(archive: Path, problems: list[tuple[str, str]]) -> None:
    """One error naming every unsafe member (and why), before anything is extracted."""
    if problems:
        listed = "; ".join(f"{name!r} ({reason})" for name, reason in problems[:10])
        more = f"; and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise DatasetNotAvailableError(
            f"refusing to extract {archive}, unsafe members: {listed}{more}. Nothing was extracted; "
            "rebuild the archive from plain files and links that stay inside it, with relative paths.")


def _extract_zip(archive: Path, staging: Path) -> None:
    try:
        with zipfile.ZipFile(archive) as zf:
            names = zf.namelist()
            _refuse_members(archive, [(name, why) for name in names if (why := _unsafe_name(name))])
            zf.extractall(staging)
    except zipfile.BadZipFile as err:
        raise DatasetNotAvailableError(f"{archive} is not a readable zip archive: {err}") from err


def _extract_tar(archive: Path, staging: Path) -> None:
    if not hasattr(tarfile, "data_filter"):
        raise DatasetNotAvailableError(
            f"Python {sys.version.split()[0]} lacks tarfile's safe extraction filter (added in 3.10.12 "
            f"and 3.11.4); upgrade Python, or extract {archive} yourself and set data.source to the folder.")
    try:
        with tarfile.open(archive) as tf:
            members = tf.getmembers()
            _refuse_members(archive, _tar_problems(members, staging))
            tf.extractall(staging, members=members, filter="data")
    except (tarfile.ReadError, tarfile.CompressionError, EOFError) as err:
        raise DatasetNotAvailableError(f"{archive} is not a readable tar archive: {err}") from err


def _tar_problems(members: list[tarfile.TarInfo], staging: Path) -> list[tuple[str, str]]:
    """Unsafe tar members: our name rules plus tarfile's 'data' filter (links out, devices)."""
    problems = []
    for member in members:
        reason = _unsafe_name(member.name)
        if reason is None:
            try:
                tarfile.data_filter(member, str(staging))
            except tarfile.FilterError as err:
                reason = str(err)
        if reason is not None:
            problems.append((member.name, reason))
    return problems


def _hoist_single_folder(staging: Path) -> None:
    """An archive of one top folder (zip -r x.zip mydata/) gives that folder's content, not the folder."""
    entries = list(staging.iterdir())
    if len(entries) != 1 or not entries[0].is_dir() or entries[0].is_symlink():
        return
    inner = staging / f".cogvx-hoist-{os.getpid()}"
    entries[0].rename(inner)
    for child in inner.iterdir():
        child.rename(staging / child.name)
    inner.rmdir()


# ----------------------------------------------------------------------------- hub dataset


def _fetch_hub(repo_id: str, data_root: Path, revision: str | None) -> None:
    """Download the hub dataset into data_root (resuming a partial download), failing fast offline.

    The revision is resolved to a commit first: that one call tells whether the hub answers
    before data_root is touched, and gives the file list the finished download is checked
    against (snapshot_download returns an existing local_dir as it is when the hub fails).
    """
    identity = {"kind": "hub", "repo_id": repo_id, "revision": revision}
    if _is_current(data_root, identity):
        return
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.utils import validate_repo_id

    from cogvx.hub import hub_reachable

    try:
        validate_repo_id(repo_id)
    except ValueError as err:
        raise DatasetNotAvailableError(_unknown_source_message(repo_id, str(err))) from err
    if constants.HF_HUB_OFFLINE:
        raise DatasetNotAvailableError(_hub_message(repo_id, "HF_HUB_OFFLINE is set"))
    if not hub_reachable():
        raise DatasetNotAvailableError(_hub_message(
            repo_id, f"the hub ({constants.ENDPOINT}) cannot be reached"))
    info = _hub_call(repo_id, lambda: HfApi().dataset_info(repo_id, revision=revision))
    _claim_for_download(data_root, identity)
    _hub_call(repo_id, lambda: snapshot_download(
        repo_id, repo_type="dataset", revision=info.sha, local_dir=data_root))
    missing = [s.rfilename for s in info.siblings or [] if not (data_root / s.rfilename).is_file()]
    if missing:
        raise DatasetNotAvailableError(_hub_message(
            repo_id, f"download incomplete, {len(missing)} file(s) missing "
            f"(e.g. {', '.join(missing[:3])}); run it again to resume"))
    _write_marker(data_root, identity, commit=info.sha)


def _hub_call(repo_id: str, call: Callable[[], T]) -> T:
    """Run one hub call, turning network and hub failures into one DatasetNotAvailableError."""
    try:
        return call()
    except _download_errors() as err:
        reason = f"{type(err).__name__}: " + next((ln for ln in str(err).splitlines() if ln.strip()), "")
        status = getattr(getattr(err, "response", None), "status_code", None)
        if status in (401, 403, 404):  # the hub answered: wrong id or revision, or no access
            raise DatasetNotAvailableError(
                f"cannot download dataset {repo_id!r}: the hub refused ({reason}).\n"
                "  Check data.source (the dataset id) and data.revision; a private or gated dataset "
                "needs `hf auth login` (or HF_TOKEN) with access granted on its page.") from err
        raise DatasetNotAvailableError(_hub_message(repo_id, f"download failed ({reason})")) from err


def _claim_for_download(data_root: Path, identity: dict[str, Any]) -> None:
    """Make data_root ready for an in-place download and mark it as cogvx's, not yet complete.

    A previous cogvx data set of another source is removed; a partial download of the same one is
    kept so snapshot_download resumes it; anyone else's files make this refuse.
    """
    _check_replaceable(data_root)
    marker = _read_marker(data_root)
    if marker is not None and marker.get("identity") != identity:
        shutil.rmtree(data_root)
    data_root.mkdir(parents=True, exist_ok=True)
    _write_marker(data_root, identity, complete=False)


def _download_errors() -> tuple[type[BaseException], ...]:
    """What snapshot_download raises for network and hub failures (the HTTP client's errors included)."""
    from huggingface_hub import errors

    names = ("HTTPError", "XetDownloadError")  # not in every huggingface_hub version
    extra = tuple(getattr(errors, name) for name in names if hasattr(errors, name))
    return (errors.HfHubHTTPError, OSError, *extra)


# ----------------------------------------------------------------------------- messages


def _hub_message(repo_id: str, reason: str) -> str:
    local = Path(repo_id).expanduser().absolute()
    return (
        f"cannot download dataset {repo_id!r}: {reason}.\n"
        f"  On a machine with network access run\n"
        f"    hf download {repo_id} --repo-type dataset --local-dir {repo_id.split('/')[1]}\n"
        f"  then copy that folder (or a .zip/.tar archive of it) here and set data.source to its path;\n"
        f"  or use data.source=synthetic to try cogvx with generated clips.\n"
        f"  (If {repo_id!r} was meant as a local folder or archive: {local} does not exist.)"
    )


def _unknown_source_message(source: str, reason: str) -> str:
    return f"data.source = {source!r} is not usable ({reason}). Accepted forms: {ACCEPTED_FORMS}."
