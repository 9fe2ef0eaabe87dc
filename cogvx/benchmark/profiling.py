"""Which GPU kernels a benchmarked step really ran: torch.profiler's kernel list, summed by
category (attention per backend, GEMM, fused elementwise), with the attention kernels' own
names, so that an option's claim ("flash attention", "fp8 GEMMs") is checked in the JSON."""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable

ATTENTION_BACKENDS = ("attn-cudnn", "attn-flash", "attn-fa4", "attn-efficient")
# FlashAttention-4 (CuTe DSL) kernels carry their Python module and class in the name.
FA4_KEYS = ("flash_attncute", "flash_attn_cute", "flashattentionforwardsm", "flashattentionbackward")


def kernel_category(name: str) -> str:
    """The category of one CUDA kernel by its name."""
    lowered = name.lower()
    if lowered.startswith("triton_"):
        # Inductor's own kernels, named after the ops they fuse: the rotary embedding fused into
        # the attention's input is "triton_poi_fused__scaled_dot_product_flash_attention_...".
        return "triton-fused"
    if "cudnn" in lowered and any(key in lowered for key in ("sdpa", "attn", "fmha")):
        return "attn-cudnn"
    if "implicit_gemm" in lowered or "nhwc" in lowered or "conv" in lowered:
        return "conv"  # cuDNN's convolutions (the patch embedding) are not attention
    if any(key in lowered for key in FA4_KEYS):
        return "attn-fa4"
    if "flash" in lowered:
        return "attn-flash"
    if "fmha" in lowered or "efficient" in lowered or "mem_eff" in lowered:
        return "attn-efficient"
    fp8 = any(key in lowered for key in ("f8", "fp8", "e4m3", "_qqtst", "ovscale"))  # cuBLAS nvjet "qq": fp8 inputs
    if fp8 and any(key in lowered for key in ("gemm", "xmma", "nvjet", "cutlass")):
        return "gemm-fp8"
    if any(key in lowered for key in ("gemm", "sm90_xmma", "cutlass", "nvjet", "gemv")):
        return "gemm"
    if "triton" in lowered:
        return "triton-fused"
    return "other"


def summarize_kernels(kernels: list[tuple[str, float]], top: int = 6) -> dict[str, Any]:
    """Seconds by category and the busiest kernel names of each attention and GEMM category,
    from (name, seconds) pairs."""
    by_category: dict[str, float] = defaultdict(float)
    by_name: dict[str, float] = defaultdict(float)
    for name, seconds in kernels:
        by_category[kernel_category(name)] += seconds
        by_name[name] += seconds
    names: dict[str, list[str]] = defaultdict(list)
    for name, _ in sorted(by_name.items(), key=lambda item: -item[1]):
        category = kernel_category(name)
        if category != "other" and category != "triton-fused" and len(names[category]) < top:
            names[category].append(name[:160])
    attention = {key: round(value, 4) for key, value in by_category.items() if key in ATTENTION_BACKENDS}
    return {"gpu_s": round(sum(by_category.values()), 4),
            "by_category_s": {key: round(value, 4) for key, value in sorted(by_category.items())},
            "attention_backend_seen": max(attention, key=attention.get) if attention else None,
            "kernel_names": dict(names)}


def profile_kernels(work: Callable[[], Any]) -> dict[str, Any]:
    """Run ``work`` once under torch.profiler (CUDA activity where there is a GPU) and
    summarize its kernels (none on a CPU-only machine)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        work()
        if cuda:
            torch.cuda.synchronize()
    kernels = [(event.key, event.device_time_total / 1e6) for event in prof.key_averages()
               if event.device_time_total > 0 and not event.key.startswith(("aten::", "cuda", "Memcpy", "Memset"))]
    return summarize_kernels(kernels)


class RenderPhases:
    """Wall seconds a render spends in each pipeline component (text encoder, transformer
    calls, VAE decode), each call bracketed by device synchronizations; what is left of the
    whole render is offload moves, scheduler steps and Python."""

    def __init__(self, pipe, device) -> None:
        self.pipe, self.device = pipe, device
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._saved: list[tuple[Any, str, Any]] = []  # (object, attribute, its own value or None)

    def _sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _timed(self, name: str, function: Callable) -> Callable:
        import time

        def wrapper(*args, **kwargs):
            self._sync()
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self._sync()
                self.seconds[name] += time.perf_counter() - started
                self.calls[name] += 1

        return wrapper

    def _wrap(self, target, attribute: str, name: str) -> None:
        # Offload hooks replace module.forward on the instance: wrap theirs, put it back after.
        self._saved.append((target, attribute, target.__dict__.get(attribute)))
        setattr(target, attribute, self._timed(name, getattr(target, attribute)))

    def __enter__(self) -> "RenderPhases":
        for name in ("text_encoder", "transformer"):
            if getattr(self.pipe, name, None) is not None:
                self._wrap(getattr(self.pipe, name), "forward", name)
        self._wrap(self.pipe.vae, "decode", "vae_decode")
        return self

    def __exit__(self, *exc) -> None:
        for target, attribute, own in reversed(self._saved):
            if own is None:
                delattr(target, attribute)
            else:
                setattr(target, attribute, own)
        self._saved.clear()

    def summary(self, total_s: float) -> dict[str, Any]:
        spent = sum(self.seconds.values())
        return {"seconds": {key: round(value, 2) for key, value in self.seconds.items()},
                "calls": dict(self.calls), "outside_components_s": round(total_s - spent, 2)}
