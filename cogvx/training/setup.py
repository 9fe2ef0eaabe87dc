"""Setting up a training run: the accelerator, the latents, the transformer as the config wants
it (checkpointing, LoRA or full, fp8 storage, compile), the optimizer and the schedules."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cogvx.config import Config
from cogvx.training.checkpointing import PlainCheckpoints, ShardedCheckpoints, TrainState, checkpoints_for
from cogvx.training.optim import build_optimizer


def total_steps(config: Config, batches_per_epoch: int) -> int:
    """train.max_steps, or train.epochs worth of optimizer steps when epochs is set."""
    if config.train.epochs is None:
        return config.train.max_steps
    per_epoch = math.ceil(batches_per_epoch / config.train.gradient_accumulation_steps)
    return max(1, config.train.epochs * per_epoch)


def _device_and_dtype(config: Config, accelerator) -> tuple[torch.device, torch.dtype]:
    from cogvx.models.loader import resolve_dtype

    device = accelerator.device
    return device, resolve_dtype(config.model.dtype, config.spec, device)


@dataclass
class Run:
    """Everything a training run holds: accelerator, data, model, optimizer, schedulers, RNG."""

    config: Config
    accelerator: Any
    dataset: Any
    sampler: Any
    folder: Path
    transformer: Any
    optimizer: Any
    lr_scheduler: Any
    noise_scheduler: Any
    steps: int
    dtype: torch.dtype
    checkpointer: PlainCheckpoints | ShardedCheckpoints = field(default_factory=PlainCheckpoints)
    state: TrainState = field(default_factory=TrainState)
    rotary: dict[tuple, Any] = field(default_factory=dict)

    @property
    def model(self):
        """The transformer without accelerate's wrapper (what LoRA saving and pipelines use)."""
        return self.accelerator.unwrap_model(self.transformer)

    @property
    def checkpoints(self) -> Path:
        return Path(self.config.train.output_dir) / "checkpoints"

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def params_sharded(self) -> bool:
        """Whether each process holds only part of the weights (FSDP, DeepSpeed ZeRO-3): then
        every process must take part in each forward pass, validation's included."""
        from cogvx.training.sharded import params_sharded

        return params_sharded(self.accelerator)


def configure_transformer(transformer, config: Config, dtype: torch.dtype, buckets, device: torch.device) -> None:
    """Everything the config does to the transformer before training: attention kernel,
    checkpointing, learned positions, LoRA or full training, the control input (data.control),
    fp8 storage, regional compile (in this order: fp8 must see the LoRA base layers, compile
    must see the final modules)."""
    from cogvx.models.lora import add_lora
    from cogvx.models.performance import (
        compile_blocks,
        enable_checkpointing,
        set_attention_backend,
        store_base_weights_in_fp8,
    )
    from cogvx.models.positions import check_learned_positions, ignore_learned_positions

    train, lora = config.train, config.train.lora
    set_attention_backend(transformer, train.attention_backend, device)
    compiled = False
    if train.gradient_checkpointing:
        compiled = enable_checkpointing(transformer, offload=train.activation_offload,
                                        keep_attention=train.keep_attention_outputs, compiled=train.compile == "blocks", device=device)
    if train.ignore_learned_positional_embeddings:
        ignore_learned_positions(transformer)
    check_learned_positions(transformer, buckets)
    if train.method == "lora":
        add_lora(transformer, lora.rank, lora.alpha, lora.target_modules or list(config.spec.lora_target_modules),
                 lora.dropout, lora.init, lora.kind)
    else:
        transformer.requires_grad_(True)
    if config.data.control != "none":
        from cogvx.models.control import widen_for_control

        widen_for_control(transformer, train_base=train.control_weights == "all")
    if train.fp8_base_weights:
        store_base_weights_in_fp8(transformer, dtype, compute=train.fp8_compute)
    if train.compile == "blocks" and not compiled:
        compile_blocks(transformer)


def setup(config: Config, transformer=None, dataset=None) -> Run:
    """Build a run: data, transformer with LoRA, optimizer and schedulers, under accelerate.

    ``transformer`` and ``dataset`` replace the ones loaded from model.path and
    prepare.output_dir (the benchmarks pass real-size random-weight models and latents).
    """
    from diffusers import CogVideoXDDIMScheduler
    from diffusers.optimization import get_scheduler

    from cogvx.data.latents import LatentDataset
    from cogvx.models.loader import load_transformer, resolve_source
    from cogvx.training.sharded import accelerator_for, engine_dtype

    accelerator = accelerator_for(config)
    torch.manual_seed(config.train.seed)
    dataset = dataset if dataset is not None else LatentDataset(config.prepare.output_dir, config)
    device, dtype = _device_and_dtype(config, accelerator)
    dtype = engine_dtype(accelerator, dtype)
    spec = config.spec
    folder = resolve_source(config.model_source, config.model.revision, config.model.cache_dir, spec)
    if transformer is None:
        transformer = load_transformer(str(folder), spec, dtype=dtype)
    configure_transformer(transformer, config, dtype, dataset.buckets, device)
    optimizer = build_optimizer([p for p in transformer.parameters() if p.requires_grad], config, device)
    # Global batches: batch_size rows for each process (see the module docstring).
    sampler = dataset.batch_sampler(config.train.batch_size * accelerator.num_processes, seed=config.train.seed)
    steps = total_steps(config, len(sampler))
    lr_scheduler = get_scheduler(config.train.lr_scheduler, optimizer,
                                 num_warmup_steps=config.train.lr_warmup_steps, num_training_steps=steps)
    transformer, optimizer = accelerator.prepare(transformer, optimizer)
    return Run(config=config, accelerator=accelerator, dataset=dataset, sampler=sampler, folder=folder,
               transformer=transformer, optimizer=optimizer, lr_scheduler=lr_scheduler,
               noise_scheduler=CogVideoXDDIMScheduler.from_pretrained(folder, subfolder="scheduler"),
               steps=steps, dtype=dtype, checkpointer=checkpoints_for(accelerator))
