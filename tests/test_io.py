"""Atomic writes: a failure mid-write leaves the previous file or folder as it was."""

from __future__ import annotations

import os

import pytest

from cogvx.io import STAGING_MARK, atomic_directory, atomic_file, atomic_write_text, remove_staging_leftovers


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "a.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert os.listdir(target.parent) == ["a.txt"]
    assert target.stat().st_mode & 0o777 == 0o666 & ~_umask()


def test_failed_file_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_file(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["a.txt"]


def test_failed_directory_write_keeps_the_old_folder(tmp_path):
    target = tmp_path / "model"
    with atomic_directory(target) as staging:
        (staging / "weights").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as staging:
            (staging / "weights").write_text("v2-partial")
            raise RuntimeError("killed")
    assert (target / "weights").read_text() == "v1"
    assert os.listdir(tmp_path) == ["model"]
    with atomic_directory(target) as staging:
        (staging / "weights").write_text("v2")
    assert (target / "weights").read_text() == "v2"


def test_leftovers_of_dead_writes_are_told_apart_and_removed(tmp_path):
    """A write that never finished (its process killed) leaves a marked temporary name; the
    cleanup removes those (and the unmarked names of older versions for the targets it is
    given) and nothing else."""
    with atomic_file(tmp_path / "report.json") as tmp:
        file_left = tmp.with_name(tmp.name + "-copy")
        tmp.write_text("half")
        os.link(tmp, file_left)  # what a SIGKILL would have left: the temporary file
    with atomic_directory(tmp_path / "lora") as staging:
        folder_left = staging.with_name(staging.name + "-copy")
        folder_left.mkdir()
        (folder_left / "weights").write_text("half")
    old_style = tmp_path / ".checkpoint-000002.k3j4l5"
    old_style.mkdir()
    kept = [tmp_path / "report.json", tmp_path / "lora", tmp_path / ".hidden-config", tmp_path / "plain.staging"]
    kept[2].write_text("user file")
    kept[3].write_text("user file")
    assert STAGING_MARK in file_left.name and STAGING_MARK in folder_left.name
    removed = remove_staging_leftovers(tmp_path, targets=("checkpoint-000002",))
    assert sorted(removed) == sorted([file_left, folder_left, old_style])
    assert sorted(tmp_path.iterdir()) == sorted(kept)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
