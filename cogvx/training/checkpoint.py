"""Resumable training checkpoints, in safetensors and JSON only (no pickle).

A checkpoint folder holds the trainable weights, the optimizer state (tensors in safetensors,
the rest in JSON), the LR scheduler state and the position in the data (random draws are a
function of that position, so there is no RNG state to keep). It is
written into a hidden staging folder and renamed into place, so ``latest`` never picks a
half-written one; a folder without its ``state.json`` is skipped as torn. The staging folders
(and other temporary files) a killed run left in its run folder are removed by
:func:`remove_dead_writes` when the next run takes the folder's lock.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cogvx.errors import CogvxError
from cogvx.io import atomic_directory, remove_staging_leftovers

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
# Staging folders of checkpoint writes: atomic_directory's (.checkpoint-N.cogvx-staging-X, or
# .checkpoint-N.X before the mark) and the sharded writer's (.checkpoint-N.staging).
CHECKPOINT_STAGING_PATTERN = re.compile(r"^\.checkpoint-\d+\..+$")
STATE_FILE = "state.json"
# What the run writes straight into its folder, for the unmarked temporary names of older versions.
RUN_FOLDER_TARGETS = ("lora", "full", "report.json", "metrics.json", "resources.json", "curves.csv", "step_time.csv",
                      "loss.csv", "cogvx-config.yaml")


def checkpoint_dir(root: Path, step: int) -> Path:
    return Path(root) / f"checkpoint-{step:06d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (torn or staging folders left out)."""
    if not Path(root).is_dir():
        return []
    found = [(int(m.group(1)), p) for p in Path(root).iterdir()
             if (m := CHECKPOINT_PATTERN.match(p.name)) and (p / STATE_FILE).is_file()]
    return [path for _, path in sorted(found)]


def remove_dead_writes(out: Path) -> list[Path]:
    """Delete what writes of dead runs left in run folder ``out``: checkpoint staging folders,
    half-written final weights, reports and validation clips; returns what was removed.

    Only the holder of the folder's run lock may call it (no other writer is alive then): a
    live writer's staging folder looks the same as a dead one's.
    """
    out = Path(out)
    root = out / "checkpoints"
    removed = remove_staging_leftovers(out, RUN_FOLDER_TARGETS)
    if root.is_dir():
        for entry in sorted(root.iterdir()):
            if CHECKPOINT_STAGING_PATTERN.match(entry.name) and entry.is_dir():
                shutil.rmtree(entry)
                removed.append(entry)
    for folder in sorted((out / "validation").glob("step-*")):
        removed += remove_staging_leftovers(folder)
    return removed


def read_fingerprint(path: Path) -> str | None:
    state = json.loads((Path(path) / STATE_FILE).read_text(encoding="utf-8"))
    return state.get("progress", {}).get("fingerprint")


def resolve_resume(root: Path, resume: str | None, fingerprint: str) -> Path | None:
    """The checkpoint to continue from.

    ``latest`` is the newest complete checkpoint written with the same training settings and data
    (same ``fingerprint``), or None to start afresh; a path must be such a checkpoint.
    """
    if resume is None:
        return None
    if resume == "latest":
        found = [p for p in list_checkpoints(root) if read_fingerprint(p) == fingerprint]
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise CogvxError(f"--resume {resume}: not a complete cogvx checkpoint (no {STATE_FILE})")
    if read_fingerprint(path) != fingerprint:
        raise CogvxError(f"--resume {resume}: written by a run with other training settings or data; "
                         "resuming would mix two runs (start afresh, or use the params it was made with)")
    return path


def _split_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors (at any depth: bitsandbytes nests its quantization state) to safetensors keys
    ``param/name[/sub...]``; everything else to JSON."""
    tensors: dict[str, torch.Tensor] = {}

    def split(node: dict[str, Any], prefix: str) -> dict[str, Any]:
        scalars = {}
        for name, value in node.items():
            key = f"{prefix}/{name}"
            if isinstance(value, torch.Tensor):
                tensors[key] = value.detach().cpu().contiguous()
            elif isinstance(value, dict):
                scalars[name] = {"__nested__": split(value, key)}
            else:
                scalars[name] = value
        return scalars

    scalars = {str(pid): split(values, str(pid)) for pid, values in state["state"].items()}
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _join_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    def join(scalars: dict[str, Any]) -> dict[str, Any]:
        return {name: join(value["__nested__"]) if isinstance(value, dict) and "__nested__" in value else value
                for name, value in scalars.items()}

    state: dict[int, dict[str, Any]] = {int(pid): join(values) for pid, values in meta["scalars"].items()}
    for key, value in tensors.items():
        pid, *path = key.split("/")
        node = state.setdefault(int(pid), {})
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(root: Path, step: int, trainable: dict[str, torch.Tensor], optimizer,
                    lr_scheduler, progress: dict[str, Any],
                    limit: int | None = None) -> Path:
    """Write checkpoint ``step`` atomically, then keep only the newest ``limit`` checkpoints."""
    target = checkpoint_dir(root, step)
    opt_tensors, opt_meta = _split_optimizer_state(optimizer.state_dict())
    try:
        with atomic_directory(target) as staging:
            save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()}, str(staging / "trainable.safetensors"))
            save_file(opt_tensors, str(staging / "optimizer.safetensors"))
            state = {"step": step, "progress": progress, "optimizer": opt_meta,
                     "lr_scheduler": lr_scheduler.state_dict()}
            (staging / STATE_FILE).write_text(json.dumps(state, indent=1, default=_jsonable), encoding="utf-8")
    except (OSError, SafetensorError) as err:
        kept = list_checkpoints(root)
        previous = f"the previous checkpoint {kept[-1]} is intact" if kept else "no earlier checkpoint exists"
        raise CogvxError(f"could not write checkpoint {target} ({err}); {previous}. Free disk space "
                         "(or raise the quota), then continue with --resume latest") from None
    prune_checkpoints(root, limit)
    return target


def prune_checkpoints(root: Path, limit: int | None) -> None:
    """Keep only the newest ``limit`` complete checkpoints (all of them when None)."""
    if limit is not None:
        for old in list_checkpoints(root)[:-limit]:
            shutil.rmtree(old)


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint's JSON")


def load_checkpoint(path: Path, optimizer, lr_scheduler) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Restore optimizer and scheduler in place; return (trainable tensors, state)."""
    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        trainable = load_file(str(path / "trainable.safetensors"))
        opt_tensors = load_file(str(path / "optimizer.safetensors"))
    except (OSError, ValueError, KeyError, json.JSONDecodeError, SafetensorError) as err:
        raise CogvxError(f"checkpoint {path} is damaged ({type(err).__name__}: {err}); "
                         "resume from an older one or delete it") from None
    optimizer.load_state_dict(_join_optimizer_state(opt_tensors, state["optimizer"]))
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    return trainable, state
