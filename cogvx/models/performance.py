"""Memory and speed options of the transformer: fp8 weight storage and fp8 GEMMs, regional
compile, the attention kernel, selective checkpointing and activation offloading
(train.fp8_base_weights, train.fp8_compute, train.compile, train.attention_backend,
train.keep_attention_outputs, train.activation_offload).

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

import torch
import torch.nn.functional as F

from cogvx.errors import CogvxError

FP8 = torch.float8_e4m3fn
FP8_CAPABILITY = (8, 9)  # fp8 GEMMs (torch._scaled_mm, torchao): Ada (sm_89) and Hopper (sm_90) onwards
FP8_MAX = 448.0  # largest finite e4m3fn value
# Layers kept in their own dtype: the LoRA branches (trained), norms and their modulation
# (small, precision-sensitive), the embeddings in and the projection out (as diffusers skips them).
FP8_SKIP = ("lora", "norm", "patch_embed", "pos_embed", "proj_out", "ofs_embed")
# fa4 is SDPA's flash backend with FlashAttention-4's kernels routed in (cogvx.models.flash4).
SDPA_BACKENDS = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "fa4": "FLASH_ATTENTION",
                 "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}


class Fp8StorageLinear(torch.nn.Linear):
    """A frozen nn.Linear whose weight is stored in fp8 with one scale per output row and
    upcast to ``compute_dtype`` inside forward (see the module docstring for why)."""

    weight_scale: torch.Tensor
    compute_dtype: torch.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to(self.compute_dtype) * self.weight_scale  # [out, in]
        return F.linear(x, weight, self.bias)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [rows, k] as fp8 e4m3 with one float32 scale per row: (x_fp8 [rows, k], scale [rows, 1])."""
    scale = (x.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp(min=1e-12)  # [rows, 1]
    return (x.float() / scale).to(FP8), scale


class _Fp8Matmul(torch.autograd.Function):
    """y = x W^T + b with x quantized per row and the stored fp8 W (per-row scales): one
    rowwise-scaled fp8 GEMM forward (torch._scaled_mm on CUDA; the same arithmetic in float32
    elsewhere, for tests). W is frozen, so the backward only needs dL/dx = dL/dy W, computed
    in the compute dtype from the upcast W: rowwise scales of W run along its output rows,
    the contracted dimension of that product, so it cannot use them."""

    @staticmethod
    def forward(ctx, x, weight, weight_scale, bias, compute_dtype):
        rows = x.reshape(-1, x.shape[-1])  # [tokens, in]
        x_fp8, x_scale = quantize_rows(rows)
        w_scale = weight_scale.float().reshape(1, -1)  # [1, out]
        if x.device.type == "cuda":
            out = torch._scaled_mm(x_fp8, weight.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=compute_dtype)
        else:
            out = ((x_fp8.float() * x_scale) @ (weight.float() * w_scale.t()).t()).to(compute_dtype)
        if bias is not None:
            out = out + bias
        ctx.save_for_backward(weight, weight_scale)
        ctx.compute_dtype = compute_dtype
        return out.reshape(*x.shape[:-1], out.shape[-1])  # [..., out]

    @staticmethod
    def backward(ctx, grad_out):
        weight, weight_scale = ctx.saved_tensors
        upcast = weight.to(ctx.compute_dtype) * weight_scale  # [out, in]
        return grad_out.to(ctx.compute_dtype) @ upcast, None, None, None, None


class Fp8ComputeLinear(Fp8StorageLinear):
    """An Fp8StorageLinear that also multiplies in fp8 (train.fp8_compute): see _Fp8Matmul."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Fp8Matmul.apply(x.to(self.compute_dtype), self.weight, self.weight_scale, self.bias,
                                self.compute_dtype)


def _to_fp8(layer: torch.nn.Linear, compute_dtype: torch.dtype, compute: bool = False) -> None:
    """Turn a frozen nn.Linear into an Fp8StorageLinear (Fp8ComputeLinear with ``compute``) in
    place (same parameters, fp8 weight)."""
    with torch.no_grad():
        weight = layer.weight.float()
        scale = (weight.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=1e-12)  # [out, 1]
        layer.weight = torch.nn.Parameter((weight / scale).to(FP8), requires_grad=False)
        layer.register_buffer("weight_scale", scale.to(compute_dtype))
    layer.compute_dtype = compute_dtype
    layer.__class__ = Fp8ComputeLinear if compute else Fp8StorageLinear


def store_base_weights_in_fp8(transformer, compute_dtype: torch.dtype = torch.bfloat16, compute: bool = False) -> int:
    """Store every frozen nn.Linear of the transformer (outside FP8_SKIP) in fp8; returns how
    many layers changed. With ``compute`` the linears of the transformer blocks also multiply
    in fp8 (the embeddings' few-row GEMMs gain nothing from it). Call after the LoRA adapter
    is added (its base layers are converted, its own A/B matrices are not)."""
    changed = 0
    for name, module in transformer.named_modules():
        if type(module) is not torch.nn.Linear or any(re.search(p, name) for p in FP8_SKIP):
            continue
        if module.weight.requires_grad:
            raise CogvxError(f"fp8 storage is for frozen weights, but {name} is trainable")
        _to_fp8(module, compute_dtype, compute=compute and name.startswith("transformer_blocks."))
        changed += 1
    return changed


def quantize_fp8_compute(transformer, device: torch.device) -> int:
    """Inference: the training fp8 path (:func:`store_base_weights_in_fp8` with ``compute``) on
    the frozen transformer: fp8 weights with per-row scales everywhere outside FP8_SKIP, and the
    blocks' linears multiplying in fp8 (rowwise-scaled torch._scaled_mm); returns how many layers
    changed. Plain tensors, unlike torchao's fp8 tensor subclass used before, whose 5b renders
    did not finish within 200-260 s in three H200 bench runs (its compile suspected), while
    the compiled blocks of training's fp8 path share one graph."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < FP8_CAPABILITY:
        raise CogvxError("validate.fp8_compute needs a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper); "
                         "set validate.fp8_compute=false here")
    transformer.requires_grad_(False)
    return store_base_weights_in_fp8(transformer, compute_dtype=transformer.dtype, compute=True)


def compile_blocks(transformer) -> int:
    """torch.compile each transformer block in place (regional compilation): the blocks share
    one graph, so the compile cost is one block's, and the model keeps its state dict names.
    Static shapes: each bucket compiles once instead of one dynamic graph for all."""
    for block in transformer.transformer_blocks:
        block.compile(dynamic=False)
    return len(transformer.transformer_blocks)


class ActivationOffloader:
    """Saved-tensor hooks that keep large saved tensors (the checkpointed block inputs) in
    pinned CPU memory, copied on a side stream so the copies overlap the blocks' compute: the
    copy out starts when the block's input is ready and the forward goes on; in the backward
    pass, unpacking block i's input starts the copy in of block i-1's, so it arrives while
    block i recomputes and back-propagates. Pinned buffers come from torch's caching host
    allocator (reused step after step). Small tensors (embeddings, rotary tables shared by
    every block) stay where they are."""

    MIN_BYTES = 1 << 24  # 16 MiB: a block input at 49x480x720 is ~110 MB, the text states ~1.4 MB

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._last: _Offloaded | None = None

    def pack(self, tensor: torch.Tensor):
        if self.stream is None or tensor.device.type != "cuda" or tensor.numel() * tensor.element_size() < self.MIN_BYTES:
            return tensor
        entry = _Offloaded(tensor, self.stream, previous=self._last)
        self._last = entry
        return entry

    def unpack(self, packed):
        if not isinstance(packed, _Offloaded):
            return packed
        previous, packed.previous = packed.previous, None
        tensor = packed.fetch(self.device)
        if previous is not None:
            previous.prefetch(self.device)  # the next block the backward pass reaches
        return tensor


class _Offloaded:
    """One tensor on its way to or from pinned CPU memory (see ActivationOffloader)."""

    def __init__(self, tensor: torch.Tensor, stream, previous: "_Offloaded | None") -> None:
        self.stream, self.previous = stream, previous
        self.cpu = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        stream.wait_stream(torch.cuda.current_stream(tensor.device))
        with torch.cuda.stream(stream):
            self.cpu.copy_(tensor, non_blocking=True)
        tensor.record_stream(stream)  # its memory is not reused before the copy is done
        self.copied_out = stream.record_event()
        self.gpu: torch.Tensor | None = None
        self.copied_in = None

    def prefetch(self, device: torch.device) -> None:
        if self.gpu is not None or self.cpu is None:
            return
        self.gpu = torch.empty(self.cpu.shape, dtype=self.cpu.dtype, device=device)
        self.stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(self.copied_out)
            self.gpu.copy_(self.cpu, non_blocking=True)
        self.copied_in = self.stream.record_event()

    def fetch(self, device: torch.device) -> torch.Tensor:
        self.prefetch(device)
        torch.cuda.current_stream(device).wait_event(self.copied_in)
        tensor, self.gpu, self.cpu = self.gpu, None, None
        return tensor


def offloaded_checkpoint_function(offloader: ActivationOffloader):
    """Gradient checkpointing of one block whose saved inputs go through ``offloader``.

    Reentrant checkpointing saves the block's inputs through autograd's saved-tensor hooks;
    when no input needs a gradient (LoRA: the first block's input comes from frozen layers),
    the hidden states are made a leaf that does, or reentrant checkpointing would drop the
    block's LoRA gradients."""
    from torch.utils.checkpoint import checkpoint

    def offloaded_checkpoint(module, *args):
        args = list(args)
        if torch.is_grad_enabled() and not any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            args[0] = args[0].detach().requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(offloader.pack, offloader.unpack):
            return checkpoint(module.__call__, *args, use_reentrant=True)

    return offloaded_checkpoint


# The fused attention kernels whose outputs (attention output, logsumexp, RNG state) the
# backward of attention needs: kept by train.keep_attention_outputs, everything else recomputed.
ATTENTION_OPS = tuple(getattr(torch.ops.aten, name).default for name in (
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention_for_cpu")
    if hasattr(torch.ops.aten, name))


def _keep_attention_policy(_ctx, op, *args, **kwargs):
    """MUST_SAVE the attention kernels' outputs, MUST_RECOMPUTE everything else: under
    compile "prefer" would let inductor's partitioner keep ~3x more (measured: 32 GiB at 5b)."""
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op in ATTENTION_OPS else CheckpointPolicy.MUST_RECOMPUTE


def _keep_attention_context():
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(_keep_attention_policy)


def keep_attention_checkpoint(module, *args):
    """Selective checkpointing of one block: its attention outputs are kept, the rest recomputed."""
    from torch.utils.checkpoint import checkpoint

    return checkpoint(module, *args, use_reentrant=False, context_fn=_keep_attention_context)


def enable_checkpointing(transformer, offload: bool = False, keep_attention: bool = False,
                         compiled: bool = False, device: torch.device | None = None) -> bool:
    """diffusers' per-block gradient checkpointing: its inputs offloaded to the CPU, or its
    attention outputs kept (selective). With ``compiled`` and ``keep_attention`` the
    checkpointed block is what gets compiled (one graph for all blocks), so that inductor's
    partitioner sees the policy; returns True then (the blocks must not be compiled again).
    ``device`` is where training runs (offload copies need its streams), the parameters' by default."""
    if offload and keep_attention:
        raise CogvxError("train.activation_offload and train.keep_attention_outputs cannot be combined: "
                         "one moves the checkpointed inputs off the GPU, the other keeps more on it")
    if offload:
        device = device or next(transformer.parameters()).device
        transformer.enable_gradient_checkpointing(
            gradient_checkpointing_func=offloaded_checkpoint_function(ActivationOffloader(device)))
        return False
    if keep_attention:
        function = torch.compile(keep_attention_checkpoint, dynamic=False) if compiled else keep_attention_checkpoint
        transformer.enable_gradient_checkpointing(gradient_checkpointing_func=function)
        return compiled
    transformer.enable_gradient_checkpointing()
    return False


def sdpa_backend(name: str):
    """The torch SDPBackend of an attention_backend name."""
    from torch.nn.attention import SDPBackend

    return getattr(SDPBackend, SDPA_BACKENDS[name])


class BackendAttnProcessor:
    """diffusers' CogVideoX attention processor with scaled-dot-product attention restricted to
    one kernel. The restriction lives inside the processor, so it is part of what compiled
    blocks trace, and the checkpoint recompute of the backward pass runs it too (a context
    around the model's call does neither: under compile cuDNN ran where flash was asked)."""

    def __init__(self, name: str) -> None:
        from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0

        self.name, self.backend = name, sdpa_backend(name)
        self.inner = CogVideoXAttnProcessor2_0()

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb=None) -> torch.Tensor:
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel([self.backend]):
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)


def set_attention_backend(transformer, name: str, device: torch.device) -> None:
    """Give every attention layer of the transformer the kernel ``name`` ('auto': diffusers'
    own processor, torch picks the kernel). cudnn needs a CUDA device; fa4 a Hopper or
    Blackwell GPU and the flash-attn-4 package (it takes over SDPA's flash backend in this
    process; any other choice gives it back to FlashAttention-2)."""
    from cogvx.models.flash4 import activate_fa4, deactivate_fa4

    if name == "cudnn" and device.type != "cuda":
        raise CogvxError("train.attention_backend = cudnn needs a CUDA device; use auto, flash or math on a CPU")
    if name == "fa4":
        activate_fa4(device)
    elif device.type == "cuda":
        deactivate_fa4()
    from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0

    transformer.set_attn_processor(CogVideoXAttnProcessor2_0() if name == "auto" else BackendAttnProcessor(name))
