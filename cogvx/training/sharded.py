"""Training on several processes through accelerate: the Accelerator a config asks for, and
checkpoints where each process holds only a shard of the state (FSDP, DeepSpeed).

Under DDP (and on one process) every process holds the whole model and optimizer, so the main
process writes cogvx's own checkpoint format (safetensors + JSON). Under FSDP and DeepSpeed the
optimizer state (and with FSDP / ZeRO-3 the weights) is split across processes; there the
engines' own save/load (``accelerator.save_state`` / ``load_state``) writes and reads the shards,
every process its part, and cogvx adds its ``state.json`` (step, data position, LR schedule)
last, so a checkpoint without it is still recognised as torn. Those shard files are the
engines' formats (DeepSpeed and torch.distributed.checkpoint); they are read back only by the
run that wrote them.
"""

from __future__ import annotations

import json
import os
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DistributedType

from cogvx.config import Config
from cogvx.errors import CogvxError
from cogvx.training.checkpoint import STATE_FILE, checkpoint_dir, prune_checkpoints

SHARDED_TYPES = (DistributedType.FSDP, DistributedType.DEEPSPEED)


def mixed_precision(config: Config, device_is_cuda: bool) -> str:
    """train.mixed_precision with auto resolved: bf16 on a GPU, none on a CPU."""
    if config.train.mixed_precision != "auto":
        return config.train.mixed_precision
    return "bf16" if device_is_cuda else "no"


def accelerator_for(config: Config):
    """The Accelerator of a training run: precision, gradient accumulation, how long processes
    wait for each other; the launcher's config (DDP, FSDP, DeepSpeed) comes from accelerate."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    train = config.train
    cuda = torch.cuda.is_available()
    wait = InitProcessGroupKwargs(timeout=timedelta(minutes=train.process_group_timeout_minutes))
    accelerator = Accelerator(mixed_precision=mixed_precision(config, cuda), cpu=not cuda,
                              gradient_accumulation_steps=train.gradient_accumulation_steps,
                              kwargs_handlers=[wait])
    check_engine(accelerator)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        fill_deepspeed_config(accelerator.state.deepspeed_plugin.deepspeed_config, config)
    return accelerator


def check_engine(accelerator) -> None:
    """Refuse to run plain DDP where the launch asked for FSDP or DeepSpeed: accelerate runs
    those on GPUs only and would otherwise fall back to replicating everything without a word."""
    for engine, wanted in (("FSDP", DistributedType.FSDP), ("DEEPSPEED", DistributedType.DEEPSPEED)):
        asked = os.environ.get(f"ACCELERATE_USE_{engine}", "false").lower() == "true"
        if asked and accelerator.distributed_type != wanted:
            raise CogvxError(f"the accelerate config asks for {engine}, but accelerate set up "
                             f"{accelerator.distributed_type.value} (no CUDA GPU here?); {engine} runs on GPUs only. "
                             "On CPUs use configs/accelerate/ddp-2gpu.yaml")


def engine_dtype(accelerator, dtype: torch.dtype) -> torch.dtype:
    """The dtype the model computes in: DeepSpeed casts the whole model to its bf16/fp16 (there
    is no autocast around it), so inputs must come in that dtype; elsewhere ``dtype``."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision, dtype)
    return dtype


def fill_deepspeed_config(ds_config: dict[str, Any], config: Config) -> None:
    """Sizes DeepSpeed needs that accelerate cannot infer here (cogvx feeds batches itself, not a
    prepared DataLoader): micro batch, accumulation and clipping, from the cogvx config."""
    train = config.train
    ds_config["train_micro_batch_size_per_gpu"] = train.batch_size
    ds_config["gradient_accumulation_steps"] = train.gradient_accumulation_steps
    ds_config["gradient_clipping"] = train.max_grad_norm
    ds_config.pop("train_batch_size", None)  # DeepSpeed derives it from the two above


def params_sharded(accelerator) -> bool:
    """Whether each process holds only part of the weights (FSDP; DeepSpeed ZeRO stage 3)."""
    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return accelerator.state.deepspeed_plugin.zero_stage == 3
    return False


def save_sharded_checkpoint(accelerator, root: Path, step: int, lr_scheduler, progress: dict[str, Any],
                            limit: int | None) -> Path:
    """Every process writes its shard into a staging folder; the main process adds state.json,
    renames the folder into place and drops old checkpoints. All return once it is complete."""
    target = checkpoint_dir(root, step)
    staging = target.with_name(f".{target.name}.staging")
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(staging), safe_serialization=True)
    except OSError as err:
        raise CogvxError(f"could not write checkpoint {target} ({err}); earlier checkpoints are intact. "
                         "Free disk space, then continue with --resume latest") from None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {"step": step, "progress": progress, "lr_scheduler": lr_scheduler.state_dict(),
                 "format": "accelerate-save-state", "distributed_type": accelerator.distributed_type.value}
        (staging / STATE_FILE).write_text(json.dumps(state, indent=1), encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
        prune_checkpoints(root, limit)
    accelerator.wait_for_everyone()
    return target


def load_sharded_checkpoint(accelerator, path: Path, lr_scheduler) -> dict[str, Any]:
    """Every process loads its shard of a checkpoint written by :func:`save_sharded_checkpoint`."""
    state = json.loads((Path(path) / STATE_FILE).read_text(encoding="utf-8"))
    if state.get("format") != "accelerate-save-state":
        raise CogvxError(f"checkpoint {path} was written by a run on one process or under DDP; resume it "
                         "the same way (sharded FSDP / DeepSpeed runs write their own checkpoint layout)")
    accelerator.load_state(str(path))
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    return state
