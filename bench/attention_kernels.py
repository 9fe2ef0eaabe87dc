"""Attention kernels at CogVideoX's real shapes: forward and forward+backward time, TFLOP/s
and the difference from an fp32 reference, for torch's cuDNN and FlashAttention-2 SDPA
backends and FlashAttention-4 (train.attention_backend = fa4) where flash-attn-4 is
installed. Prints a table and writes JSON.

    python bench/attention_kernels.py --out bench/results/attention-h200.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# name: (batch, heads, tokens, head_dim); tokens = 226 text + the video's patches
SHAPES = {
    "5b 49x480x720": (1, 48, 17776, 64),
    "5b 49x480x720 CFG": (2, 48, 17776, 64),
    "2b 49x480x720": (1, 30, 17776, 64),
    "1.5-5b 81x768x1360": (1, 48, 45106, 64),
}
BACKENDS = ("cudnn", "flash", "fa4")


def timed_ms(work, warmup: int = 3, repeat: int = 10) -> float:
    """Median milliseconds of ``work`` between CUDA events, after warm-up."""
    for _ in range(warmup):
        work()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        work()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def use_backend(name: str, device) -> SDPBackend:
    """Select the kernel: fa4 routes SDPA's flash backend to FlashAttention-4."""
    from cogvx.models.flash4 import activate_fa4, deactivate_fa4
    from cogvx.models.performance import sdpa_backend

    activate_fa4(device) if name == "fa4" else deactivate_fa4()
    return sdpa_backend(name)


def accuracy(backend: SDPBackend, device) -> dict[str, float]:
    """Relative error of output and input gradients against float32 math, on a smaller shape."""
    generator = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, 8, 2048, 64, device=device, generator=generator) for _ in range(3))
    grad = torch.randn(1, 8, 2048, 64, device=device, generator=generator)
    errors = {}
    results = []
    for dtype, kernel in ((torch.float32, SDPBackend.MATH), (torch.bfloat16, backend)):
        inputs = [t.detach().clone().to(dtype).requires_grad_(True) for t in (q, k, v)]
        with sdpa_kernel([kernel]):
            out = F.scaled_dot_product_attention(*inputs)
        out.backward(grad.to(dtype))
        results.append([out.float()] + [t.grad.float() for t in inputs])
    for key, ref, got in zip(("out", "dq", "dk", "dv"), *results):
        errors[key] = float((got - ref).norm() / ref.norm())
    return errors


def measure(name: str, shape: tuple[int, int, int, int], device) -> dict:
    """Forward and forward+backward of one backend at one shape."""
    backend = use_backend(name, device)
    batch, heads, tokens, dim = shape
    q, k, v = (torch.randn(batch, heads, tokens, dim, device=device, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    grad = torch.randn_like(q)
    flop_fwd = 4 * batch * heads * tokens * tokens * dim

    def forward():
        with sdpa_kernel([backend]), torch.no_grad():
            F.scaled_dot_product_attention(q, k, v)

    def forward_backward():
        with sdpa_kernel([backend]):
            out = F.scaled_dot_product_attention(q, k, v)
        torch.autograd.grad(out, (q, k, v), grad)

    fwd = timed_ms(forward)
    both = timed_ms(forward_backward)
    bwd = both - fwd
    return {"backend": name, "shape": list(shape), "fwd_ms": round(fwd, 3), "bwd_ms": round(bwd, 3),
            "fwd_tflops": round(flop_fwd / fwd / 1e9, 1), "bwd_tflops": round(2.5 * flop_fwd / bwd / 1e9, 1)}


def kernel_names(name: str, device) -> list[str]:
    """The CUDA kernels one forward+backward of ``name`` runs (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    backend = use_backend(name, device)
    q, k, v = (torch.randn(1, 8, 2048, 64, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        with sdpa_kernel([backend]):
            out = F.scaled_dot_product_attention(q, k, v)
        out.sum().backward()
        torch.cuda.synchronize()
    return sorted({event.key[:200] for event in prof.key_averages() if event.device_time_total > 0
                   and not event.key.startswith(("aten::", "cuda", "Memcpy", "Memset"))})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("attention-kernels.json"))
    parser.add_argument("--shape", action="append", choices=sorted(SHAPES), help="default: all")
    args = parser.parse_args()
    device = torch.device("cuda")
    report = {"gpu": torch.cuda.get_device_name(device), "torch": torch.__version__, "results": [],
              "accuracy": {}, "kernels": {}, "errors": {}}
    for name in BACKENDS:
        try:
            report["accuracy"][name] = accuracy(use_backend(name, device), device)
            report["kernels"][name] = kernel_names(name, device)
            for label in args.shape or SHAPES:
                report["results"].append({"case": label, **measure(name, SHAPES[label], device)})
                print(json.dumps(report["results"][-1]), flush=True)
        except Exception as exc:  # a backend that cannot run here is a result, not the end of the others
            report["errors"][name] = f"{type(exc).__name__}: {exc}"[:2000]
            print(f"{name}: {report['errors'][name]}", flush=True)
        args.out.write_text(json.dumps(report, indent=2))
    print(f"\n{'case':24} {'backend':7} {'fwd ms':>8} {'bwd ms':>8} {'fwd TF/s':>9} {'bwd TF/s':>9}")
    for row in report["results"]:
        print(f"{row['case']:24} {row['backend']:7} {row['fwd_ms']:8.2f} {row['bwd_ms']:8.2f} "
              f"{row['fwd_tflops']:9.1f} {row['bwd_tflops']:9.1f}")
    print(json.dumps({"accuracy": report["accuracy"], "errors": report["errors"]}, indent=1))
    for name, kernels in report["kernels"].items():
        print(name, kernels[:6])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
