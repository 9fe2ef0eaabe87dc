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
    return streamed_offload_adamw(params, kwargs)


class StreamedGradientNorm:
    """The squared global gradient norm, summed on the GPU as each gradient is made.

    The CPU-offload optimizer copies every gradient to the CPU the moment the backward pass
    finishes it and frees the GPU copy, so clipping the GPU gradients afterwards sees none
    (and would not reach the CPU copies the step uses). These hooks run before the
    optimizer's own, one small reduction per parameter."""

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        self.squared: torch.Tensor | None = None
        for param in params:
            param.register_post_accumulate_grad_hook(self._add)

    def _add(self, param: torch.nn.Parameter) -> None:
        if param.grad is not None:
            term = param.grad.detach().float().pow(2).sum()
            self.squared = term if self.squared is None else self.squared + term

    def take(self) -> float:
        """The norm since the last take (0.0 when no gradient was made)."""
        squared, self.squared = self.squared, None
        return 0.0 if squared is None else float(squared.sqrt())


def streamed_offload_adamw(params: list[torch.nn.Parameter], kwargs: dict):
    """torchao's CPUOffloadOptimizer with fused CPU AdamW and gradients streamed to the CPU
    (none kept on the GPU), its gradient norm tracked by StreamedGradientNorm (attribute
    ``streamed_norm``) so that clip_streamed_gradients can clip what the CPU step uses."""
    from torchao.optim import CPUOffloadOptimizer

    norm = StreamedGradientNorm(params)  # registered first: its hooks see the GPU gradients
    optimizer = CPUOffloadOptimizer(params, torch.optim.AdamW, offload_gradients=True, fused=True, **kwargs)
    optimizer.streamed_norm = norm
    return optimizer


def clip_streamed_gradients(optimizer, max_norm: float) -> float | None:
    """Clip a streamed-gradient optimizer's CPU gradients (and its small on-GPU ones) to
    ``max_norm``; the global norm before clipping. None for any other optimizer."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    norm_source = getattr(inner, "streamed_norm", None)
    if norm_source is None:
        return None
    norm = norm_source.take()
    scale = min(1.0, max_norm / (norm + 1e-6))
    # The CPU steps are fused AdamW: they divide each gradient by grad_scale inside the step
    # kernel (the hook GradScaler uses), so clipping costs no extra pass over the CPU copies.
    for cpu_optimizer in inner.optim_dict.values():
        cpu_optimizer.grad_scale = torch.tensor(1.0 / scale) if scale < 1.0 else None
        cpu_optimizer.found_inf = torch.tensor(0.0) if scale < 1.0 else None
    if scale < 1.0 and inner.d_opt is not None:  # the small parameters kept on the GPU
        grads = [p.grad for group in inner.d_opt.param_groups for p in group["params"] if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, scale)
    return norm
