"""Memory and speed options of the transformer: fp8 weight storage, regional compile, the
attention kernel and activation offloading (train.fp8_base_weights, train.compile,
train.attention_backend, train.activation_offload).

Why fp8 storage is not diffusers' ``enable_layerwise_casting``: that hook casts a layer's
weights in place before and after each call (``module.to``). Under torch.compile with
non-reentrant gradient checkpointing the recomputed block then saves fp8 tensors where the
forward saved bf16 ones, and checkpointing refuses the step (the reference trainer's fp8 and
compile "did not combine", pytorch#166926). Here the cast is part of the layer's forward, a
pure function of the stored weight, so forward and recompute agree, inductor fuses the upcast
into the matmul's input, and the stored weights never change.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F

from cogvx.errors import CogvxError

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
# Layers kept in their own dtype: the LoRA branches (trained), norms and their modulation
# (small, precision-sensitive), the embeddings in and the projection out (as diffusers skips them).
FP8_SKIP = ("lora", "norm", "patch_embed", "pos_embed", "proj_out", "ofs_embed")
SDPA_BACKENDS = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION",
                 "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}


class Fp8StorageLinear(torch.nn.Linear):
    """A frozen nn.Linear whose weight is stored in fp8 with one scale per output row and
    upcast to ``compute_dtype`` inside forward (see the module docstring for why)."""

    weight_scale: torch.Tensor
    compute_dtype: torch.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to(self.compute_dtype) * self.weight_scale  # [out, in]
        return F.linear(x, weight, self.bias)


def _to_fp8(layer: torch.nn.Linear, compute_dtype: torch.dtype) -> None:
    """Turn a frozen nn.Linear into an Fp8StorageLinear in place (same parameters, fp8 weight)."""
    with torch.no_grad():
        weight = layer.weight.float()
        scale = (weight.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=1e-12)  # [out, 1]
        layer.weight = torch.nn.Parameter((weight / scale).to(FP8), requires_grad=False)
        layer.register_buffer("weight_scale", scale.to(compute_dtype))
    layer.compute_dtype = compute_dtype
    layer.__class__ = Fp8StorageLinear


def store_base_weights_in_fp8(transformer, compute_dtype: torch.dtype = torch.bfloat16) -> int:
    """Store every frozen nn.Linear of the transformer (outside FP8_SKIP) in fp8; returns how
    many layers changed. Call after the LoRA adapter is added (its base layers are converted,
    its own A/B matrices are not)."""
    changed = 0
    for name, module in transformer.named_modules():
        if type(module) is not torch.nn.Linear or any(re.search(p, name) for p in FP8_SKIP):
            continue
        if module.weight.requires_grad:
            raise CogvxError(f"fp8 storage is for frozen weights, but {name} is trainable")
        _to_fp8(module, compute_dtype)
        changed += 1
    return changed


def quantize_fp8_compute(transformer, device: torch.device) -> int:
    """Inference only: fp8 weights and dynamically quantized fp8 activations, per-row scales,
    in every nn.Linear outside FP8_SKIP (torchao); returns how many layers were quantized."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        raise CogvxError("validate.fp8_compute needs a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper); "
                         "set validate.fp8_compute=false here")
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    chosen = {name for name, module in transformer.named_modules()
              if type(module) is torch.nn.Linear and not any(re.search(p, name) for p in FP8_SKIP)}
    quantize_(transformer, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
              filter_fn=lambda module, name: name in chosen)
    return len(chosen)


def compile_blocks(transformer) -> int:
    """torch.compile each transformer block in place (regional compilation): the blocks share
    one graph, so the compile cost is one block's, and the model keeps its state dict names.
    Static shapes: each bucket compiles once instead of one dynamic graph for all."""
    for block in transformer.transformer_blocks:
        block.compile(dynamic=False)
    return len(transformer.transformer_blocks)


def offloaded_checkpoint(module, *args):
    """Gradient checkpointing of one block whose saved inputs live in pinned CPU memory.

    Reentrant checkpointing saves the block's inputs through autograd's saved-tensor hooks,
    which ``save_on_cpu`` moves to the CPU; they come back during the backward recompute. When
    no input needs a gradient (LoRA: the first block's input comes from frozen layers), the
    hidden states are made a leaf that does, or reentrant checkpointing would drop the block's
    LoRA gradients.
    """
    from torch.utils.checkpoint import checkpoint

    args = list(args)
    if torch.is_grad_enabled() and not any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        args[0] = args[0].detach().requires_grad_(True)
    with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
        return checkpoint(module.__call__, *args, use_reentrant=True)


def enable_checkpointing(transformer, offload: bool) -> None:
    """diffusers' per-block gradient checkpointing, its inputs offloaded to the CPU if asked."""
    if offload:
        transformer.enable_gradient_checkpointing(gradient_checkpointing_func=offloaded_checkpoint)
    else:
        transformer.enable_gradient_checkpointing()


@contextmanager
def attention_backend(name: str, device: torch.device) -> Iterator[None]:
    """Restrict scaled-dot-product attention to one kernel while the block runs ('auto': no
    restriction). cudnn needs a CUDA device; a kernel that cannot run the shapes raises."""
    if name == "auto":
        yield
        return
    if name == "cudnn" and device.type != "cuda":
        raise CogvxError("train.attention_backend = cudnn needs a CUDA device; use auto, flash or math on a CPU")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([getattr(SDPBackend, SDPA_BACKENDS[name])]):
        yield


class TransformerAttentionBackend:
    """Apply an attention_backend to one model's forward only (inside a pipeline, the text
    encoder keeps the default kernels: T5's attention bias rules out cuDNN and flash)."""

    def __init__(self, model, name: str, device: torch.device) -> None:
        self.model, self.name, self.device = model, name, device
        self._active: list = []
        self._handles: list = []

    def __enter__(self) -> "TransformerAttentionBackend":
        if self.name != "auto":
            self._handles = [self.model.register_forward_pre_hook(self._enter),
                             self.model.register_forward_hook(self._exit, always_call=True)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        while self._active:
            self._active.pop().__exit__(None, None, None)

    def _enter(self, _module, _args) -> None:
        context = attention_backend(self.name, self.device)
        context.__enter__()
        self._active.append(context)

    def _exit(self, _module, _args, _output) -> None:
        if self._active:
            self._active.pop().__exit__(None, None, None)
