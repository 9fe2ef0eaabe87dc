"""Checkpoints of a training run: where the run is (:class:`TrainState`), which checkpoints belong
to it (:func:`fingerprint`), and the one checkpoint backend chosen at set-up.

Under DDP and on one process every process holds the whole model and optimizer, so the main
process writes cogvx's own format (:mod:`cogvx.training.checkpoint`: safetensors + JSON). Under
FSDP and DeepSpeed each process holds a shard, and the engines' own save/load write and read it
(:mod:`cogvx.training.sharded`). :func:`checkpoints_for` picks one of the two once; the loop
only calls ``save``, ``load`` and ``full_state``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cogvx.config import Config
from cogvx.training.collective import main_process_then_meet

# Settings that change neither the weights a step produces nor the data order.
# preset is among them: what it changes is in the resolved fields it sets, fingerprinted themselves.
NEUTRAL_TRAIN_KEYS = ("output_dir", "checkpointing_steps", "checkpoints_total_limit", "accelerate_config",
                      "process_group_timeout_minutes", "preset")


@dataclass
class TrainState:
    """Where the run is: optimizer steps done and micro-batches consumed."""

    step: int = 0
    micro_batches: int = 0
    losses: list[tuple[int, float]] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)  # per optimizer step, across resumes
    rates: list[tuple[int, float, float]] = field(default_factory=list)  # (step, lr used, grad norm)

    def progress(self, fingerprint: str) -> dict[str, Any]:
        """What a checkpoint records besides the tensors (the ``progress`` of its state.json)."""
        return {"micro_batches": self.micro_batches, "losses": self.losses, "seconds": self.seconds,
                "rates": self.rates, "fingerprint": fingerprint}

    @classmethod
    def from_saved(cls, saved: dict[str, Any]) -> TrainState:
        """The state a checkpoint's state.json describes (older checkpoints lack seconds and rates)."""
        progress = saved["progress"]
        return cls(step=saved["step"], micro_batches=progress["micro_batches"],
                   losses=[tuple(x) for x in progress["losses"]], seconds=progress.get("seconds", []),
                   rates=[tuple(x) for x in progress.get("rates", [])])


def fingerprint(config: Config, manifest: dict[str, Any]) -> str:
    """A hash of everything that shapes the trained weights: model, training settings, data, and
    the number of processes (it sets the global batch; left out for one, as before it counted)."""
    from cogvx.distributed import world_size
    from cogvx.hashing import content_key

    train = config.train.model_dump(mode="json", exclude=set(NEUTRAL_TRAIN_KEYS))
    processes = {"processes": world_size()} if world_size() > 1 else {}
    return content_key(model=config.model.model_dump(mode="json"), train=train,
                       entries=manifest["entries"], model_record=manifest["model"], **processes)


class PlainCheckpoints:
    """One process or DDP: the main process writes the trainable tensors, optimizer and schedule."""

    sharded = False

    def save(self, run, progress: dict[str, Any]) -> Path:
        from cogvx.models.lora import trainable_state
        from cogvx.training.checkpoint import checkpoint_dir, save_checkpoint

        limit = run.config.train.checkpoints_total_limit
        main_process_then_meet(run.accelerator, lambda: save_checkpoint(
            run.checkpoints, run.state.step, trainable_state(run.model), run.optimizer, run.lr_scheduler,
            progress, limit=limit))
        return checkpoint_dir(run.checkpoints, run.state.step)

    def load(self, run, path: Path) -> dict[str, Any]:
        from cogvx.models.lora import load_trainable_state
        from cogvx.training.checkpoint import load_checkpoint

        tensors, saved = load_checkpoint(path, run.optimizer, run.lr_scheduler)
        load_trainable_state(run.model, tensors)
        return saved

    def full_state(self, run) -> dict[str, torch.Tensor] | None:
        """None: the main process's module holds all the weights already."""
        return None


class ShardedCheckpoints:
    """FSDP / DeepSpeed: every process writes and reads its shard through the engine."""

    sharded = True

    def save(self, run, progress: dict[str, Any]) -> Path:
        from cogvx.training.sharded import save_sharded_checkpoint

        return save_sharded_checkpoint(run.accelerator, run.checkpoints, run.state.step, run.lr_scheduler,
                                       progress, run.config.train.checkpoints_total_limit)

    def load(self, run, path: Path) -> dict[str, Any]:
        from cogvx.training.sharded import load_sharded_checkpoint

        return load_sharded_checkpoint(run.accelerator, path, run.lr_scheduler)

    def full_state(self, run) -> dict[str, torch.Tensor]:
        """The weights gathered from every process (a collective: every process calls it)."""
        return run.accelerator.get_state_dict(run.transformer)


def checkpoints_for(accelerator) -> PlainCheckpoints | ShardedCheckpoints:
    """The checkpoint backend of the engine accelerate runs."""
    from cogvx.training.sharded import SHARDED_TYPES

    return ShardedCheckpoints() if accelerator.distributed_type in SHARDED_TYPES else PlainCheckpoints()


def save_run_checkpoint(run) -> Path:
    """Save a checkpoint of ``run``; every process returns once it is complete on disk."""
    return run.checkpointer.save(run, run.state.progress(fingerprint(run.config, run.dataset.manifest)))


def restore(run, checkpoint: Path) -> None:
    """Continue ``run`` from a checkpoint: weights, optimizer, LR schedule, data position
    (every process reads it)."""
    run.state = TrainState.from_saved(run.checkpointer.load(run, checkpoint))
