"""The optimizer train.optimizer names; a new optimizer is one more branch here and one more
value of that config field."""

from __future__ import annotations

import torch

from cogvx.config import Config
from cogvx.errors import CogvxError


def build_optimizer(params: list[torch.nn.Parameter], config: Config, device: torch.device):
    """The optimizer named by train.optimizer, with clear errors where it cannot run here."""
    train = config.train
    kwargs = dict(lr=train.learning_rate, betas=(train.adam_beta1, train.adam_beta2),
                  eps=train.adam_epsilon, weight_decay=train.weight_decay)
    if train.optimizer == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    if train.optimizer == "adam":
        return torch.optim.Adam(params, **kwargs)
    if train.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **kwargs)
    if train.optimizer == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(params, **kwargs)
    if device.type != "cuda":
        raise CogvxError("train.optimizer = cpu_offload_adamw (torchao CPUOffloadOptimizer) needs a CUDA "
                         "device; on a CPU use adamw")
    from torchao.optim import CPUOffloadOptimizer

    return CPUOffloadOptimizer(params, torch.optim.AdamW, **kwargs)
