"""Where the VAE encode of `cogvx prepare` spends its time, and which lever moves it (issue 17, item 7).

Times the CogVideoX VAE encode of 49x480x720 clips (random weights, random pixels) in several
variants side by side in one process: eager as diffusers runs it, channels-last 3D memory format,
the encoder compiled (inductor), both, and batches of clips. Each variant's latents are compared
with the eager ones (relative error of the posterior mean). The eager variant is profiled once and
its kernels grouped, to say what the time is made of.

Floors (METHOD.md): ~149 TFLOP per clip (the convolutions), ~0.19 s at the H200's measured bf16
GEMM rate; the eager encode measured 0.97 s (../shared/reference/performance.md).

Run on the GPU machine:  python3 bench/vae_encode_variants.py --out $OUT/vae_variants.json
Prints a table last; writes every figure to --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

GIB = 2**30


def build_vae(device: torch.device):
    """The CogVideoX VAE at its real size (the 2b/5b config), bf16, frozen."""
    from diffusers import AutoencoderKLCogVideoX

    torch.manual_seed(0)
    with torch.device(device):
        vae = AutoencoderKLCogVideoX(block_out_channels=(128, 256, 256, 512), latent_channels=16, layers_per_block=3,
                                     norm_num_groups=32, temporal_compression_ratio=4, scaling_factor=0.7)
    return vae.to(torch.bfloat16 if device.type == "cuda" else torch.float32).requires_grad_(False).eval()


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeat: int) -> float:
    """Median seconds of ``repeat`` synchronized calls after one warm-up."""
    fn()
    synchronize()
    times = []
    for _ in range(repeat):
        synchronize()
        started = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def encode_mean(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Posterior mean [B, C', F', h, w] of pixels [B, C, F, H, W]."""
    return vae.encode(pixels).latent_dist.mean


def set_conv_layout(vae, memory_format: torch.memory_format) -> None:
    """Store every 3D convolution's weight in ``memory_format`` (the other parameters are not 5D)."""
    for module in vae.modules():
        if isinstance(module, torch.nn.Conv3d):
            module.weight.data = module.weight.data.contiguous(memory_format=memory_format)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def kernel_table(vae, pixels: torch.Tensor, top: int = 12) -> list[dict]:
    """The eager encode's CUDA kernels by total time (one profiled call)."""
    from torch.profiler import ProfilerActivity, profile

    activity = ProfilerActivity.CUDA if pixels.is_cuda else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof, torch.no_grad():
        encode_mean(vae, pixels)
        synchronize()
    rows = []
    for event in prof.key_averages():
        cuda_us = (getattr(event, "device_time_total", 0) if pixels.is_cuda else event.self_cpu_time_total)
        if cuda_us:
            rows.append({"kernel": event.key[:110], "ms": round(cuda_us / 1e3, 2), "calls": event.count})
    return sorted(rows, key=lambda row: -row["ms"])[:top]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="vae_variants.json")
    parser.add_argument("--frames", type=int, default=49)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=720)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--device", default="cuda", help="cpu: a quick check of the script itself")
    parser.add_argument("--quick", action="store_true", help="only eager and the compiled encoder")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    vae = build_vae(device)
    shape = (1, 3, args.frames, args.height, args.width)
    pixels = torch.rand(shape, device=device, dtype=next(vae.parameters()).dtype) * 2 - 1  # [B, C, F, H, W]
    results: list[dict] = []
    with torch.no_grad():
        reference = encode_mean(vae, pixels)
        # The fp32 encode: how far bf16 rounding alone moves the latents of this random-weight VAE.
        vae.float()
        full_precision = encode_mean(vae, pixels.float())
        vae.to(pixels.dtype)
        torch.cuda.empty_cache() if pixels.is_cuda else None

        def record(name: str, model, inputs: torch.Tensor, clips: int) -> None:
            if inputs.is_cuda:
                torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            with torch.no_grad():
                out = encode_mean(model, inputs)  # first call: compile time included
            synchronize()
            first = time.perf_counter() - started
            with torch.no_grad():
                seconds = timed(lambda: encode_mean(model, inputs), args.repeat)
            error = relative_error(out[:1], reference)
            results.append({"variant": name, "clips": clips, "s_per_clip": round(seconds / clips, 3),
                            "first_call_s": round(first, 1), "rel_err_vs_eager": round(error, 5),
                            "rel_err_vs_fp32": round(relative_error(out[:1], full_precision), 5),
                            "peak_gib": round(torch.cuda.max_memory_allocated() / GIB, 2) if inputs.is_cuda else 0.0})
            print("RESULT " + json.dumps(results[-1]), flush=True)

        record("eager", vae, pixels, 1)
        eager_kernels = kernel_table(vae, pixels)
        channels_last = pixels.contiguous(memory_format=torch.channels_last_3d)
        if not args.quick:
            set_conv_layout(vae, torch.channels_last_3d)
            record("eager channels_last_3d", vae, channels_last, 1)
            set_conv_layout(vae, torch.contiguous_format)
        vae.encoder = torch.compile(vae.encoder, dynamic=False)
        record("compiled encoder", vae, pixels, 1)
        compiled_kernels = kernel_table(vae, pixels)
        if not args.quick:
            record("compiled encoder, batch 2", vae, torch.cat([pixels, pixels]), 2)  # [2, C, F, H, W]
            set_conv_layout(vae, torch.channels_last_3d)
            torch._dynamo.reset()
            record("compiled encoder channels_last_3d", vae, channels_last, 1)
    print(json.dumps({"eager_kernels": eager_kernels, "compiled_kernels": compiled_kernels}, indent=1))
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump({"gpu": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__, "shape": shape,
                   "results": results, "eager_kernels": eager_kernels, "compiled_kernels": compiled_kernels},
                  handle, indent=1)
    print(f"\n{'variant':38} {'s/clip':>7} {'first s':>8} {'vs eager':>8} {'vs fp32':>8} {'peak GiB':>8}")
    for row in results:
        print(f"{row['variant']:38} {row['s_per_clip']:7.3f} {row['first_call_s']:8.1f} "
              f"{row['rel_err_vs_eager']:8.5f} {row['rel_err_vs_fp32']:8.5f} {row['peak_gib']:8.2f}")


if __name__ == "__main__":
    main()
