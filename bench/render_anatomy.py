"""Where a 5b render's time goes, piece by piece, at the real size with random weights: one
classifier-free-guidance denoising step (batch 2, 49x480x720) eager and with compiled blocks,
per attention kernel, bf16 and fp8 compute, with the compiled step's kernels by category; and
the VAE decode of the 13 latent frames, tiled and untiled, eager and compiled
(validate.compile_vae), with its peak memory. Prints each row as it finishes and writes JSON
after each. Run under a memory cap (--memory-cap-gib) to see what a 24 GB card does.

    python bench/render_anatomy.py --memory-cap-gib 23 --out bench/results/render-anatomy-h200.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cogvx.benchmark.profiling import profile_kernels  # noqa: E402
from cogvx.benchmark.suite import git_commit  # noqa: E402
from cogvx.inference import compile_vae_decoder, vae_tile_settings  # noqa: E402
from cogvx.models.build import build_transformer, build_vae  # noqa: E402
from cogvx.models.performance import compile_blocks, quantize_fp8_compute, set_attention_backend  # noqa: E402
from cogvx.models.specs import get_spec  # noqa: E402
from cogvx.training.objective import rotary_embeddings  # noqa: E402

LATENT = (13, 16, 60, 90)  # [F, C, h, w] of 49x480x720


def seconds_per_call(work, warmup: int = 2, repeat: int = 4) -> float:
    for _ in range(warmup):
        work()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        work()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def transformer_rows(device, backends: list[str]):
    """One CFG step (batch 2) in each setting, eager then compiled, then fp8 compute; yields a row each."""
    spec = get_spec("cogvideox-5b")
    model = build_transformer(spec, torch.bfloat16, device).eval().requires_grad_(False)
    latents = torch.randn(2, *LATENT, device=device, dtype=torch.bfloat16)  # [B, F, C, h, w]
    text = torch.randn(2, model.config.max_text_seq_length, model.config.text_embed_dim, device=device,
                       dtype=torch.bfloat16)  # [B, L, D]
    rotary = rotary_embeddings(model, LATENT[2] * 8, LATENT[3] * 8, LATENT[0], device)  # pixels: 8x the latent grid
    timestep = torch.tensor([500, 500], device=device)

    def step():
        with torch.no_grad():
            model(hidden_states=latents, encoder_hidden_states=text, timestep=timestep,
                  image_rotary_emb=rotary, return_dict=False)

    for backend in backends:
        set_attention_backend(model, backend, device)
        yield {"setting": f"eager {backend}", "s_per_step": seconds_per_call(step)}
    compile_blocks(model)
    for backend in backends:
        set_attention_backend(model, backend, device)
        yield {"setting": f"compiled {backend}", "s_per_step": seconds_per_call(step),
               "profile": profile_kernels(step)}
    quantize_fp8_compute(model, device)
    compile_blocks(model)
    yield {"setting": f"compiled {backends[-1]} fp8", "s_per_step": seconds_per_call(step),
           "profile": profile_kernels(step)}
    del model
    torch.cuda.empty_cache()


VAE_SETTINGS = (  # (name, tiles: None = untiled, () = diffusers' tiles, (rows, cols); compiled decoder)
    ("vae decode tiled", (), False),  # as cogvx generate decodes by default (3 x 3 tiles)
    ("vae decode tiles 2x2", (2, 2), False),
    ("vae decode tiles 1x2", (1, 2), False),
    ("vae decode untiled", None, False),
    ("vae decode tiles 2x2, compiled", (2, 2), True),
    ("vae decode tiled, compiled", (), True),
    ("vae decode tiles 1x2, compiled", (1, 2), True),
    ("vae decode untiled, compiled", None, True),
)


def vae_rows(device, only: list[str] | None = None):
    """The decode of one 49x480x720 clip's latents in each VAE_SETTINGS (time, peak memory,
    the first call's seconds: compiling) with its kernels; yields a row per setting."""
    vae = build_vae(get_spec("cogvideox-5b"), torch.bfloat16, device).eval().requires_grad_(False)
    vae.enable_slicing()
    defaults = {key: getattr(vae, key) for key in ("tile_sample_min_height", "tile_sample_min_width",
                                                   "tile_overlap_factor_height", "tile_overlap_factor_width")}
    latents = torch.randn(1, LATENT[1], LATENT[0], *LATENT[2:], device=device, dtype=torch.bfloat16)  # [B, C, F, h, w]
    for name, tiles, compiled in VAE_SETTINGS:
        if only and not any(word in name for word in only):
            continue
        if tiles is None:
            vae.disable_tiling()
        else:
            vae.enable_tiling(**(vae_tile_settings(vae, *LATENT[2:], *tiles) if tiles else defaults))
        vae.decoder._compiled_call_impl = None  # eager again
        torch._dynamo.reset()
        if compiled:
            compile_vae_decoder(vae, dynamic=tiles is not None)
        yield vae_row(vae, latents, name, device=device)
    del vae
    torch.cuda.empty_cache()


def vae_row(vae, latents, name: str, device) -> dict:
    """One decode setting: the first call (compiling), the median of two more, and its kernels."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    decode = lambda: vae.decode(latents)  # noqa: E731
    try:
        with torch.no_grad():
            started = time.perf_counter()
            decode()
            torch.cuda.synchronize()
            first = time.perf_counter() - started
            row = {"setting": name, "s_per_step": seconds_per_call(decode, warmup=0, repeat=2),
                   "first_call_s": round(first, 1), "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30,
                   "peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30}
            row["profile"] = profile_kernels(decode)
            return row
    except torch.OutOfMemoryError as err:
        return {"setting": name, "oom": True, "detail": str(err)[:300]}


def print_row(row: dict) -> None:
    """One line of the table: seconds, then peak memory or GPU time by kernel category."""
    categories = (row.get("profile") or {}).get("by_category_s", {})
    shown = ", ".join(f"{key} {value:.3f}" for key, value in categories.items() if value > 0.005)
    if "peak_reserved_gib" in row:
        shown = f"peak reserved {row['peak_reserved_gib']:.2f} GiB, first call {row['first_call_s']} s; {shown}"
    print(f"{row['setting']:36} {row.get('s_per_step', float('nan')):7.3f} s  {'OOM' if row.get('oom') else shown}",
          flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("render-anatomy.json"))
    parser.add_argument("--memory-cap-gib", type=float, default=None)
    parser.add_argument("--backend", action="append", help="attention backends (default cudnn, fa4)")
    parser.add_argument("--no-vae", action="store_true", help="leave out the VAE decode rows")
    parser.add_argument("--no-transformer", action="store_true", help="leave out the transformer rows")
    parser.add_argument("--vae", action="append", help="only the VAE rows whose name contains this (repeatable)")
    parser.add_argument("--commit", help="the commit to record (default: git's HEAD, stale in a copied tree)")
    args = parser.parse_args()
    device = torch.device("cuda", torch.cuda.current_device())
    if args.memory_cap_gib:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(args.memory_cap_gib * 2**30 / total, device)
    rows: list[dict] = []
    sections = ([] if args.no_vae else [lambda d: vae_rows(d, args.vae)]) + ([] if args.no_transformer else [
        lambda d: transformer_rows(d, args.backend or ["cudnn", "fa4"])])
    for section in sections:
        for row in section(device):
            print_row(row)
            rows.append(row)
            # Written after each row: a run cut short by a time limit keeps what it measured.
            args.out.write_text(json.dumps({"gpu": torch.cuda.get_device_name(device), "torch": torch.__version__,
                                            "commit": args.commit or git_commit(), "memory_cap_gib": args.memory_cap_gib,
                                            "allocator": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""), "rows": rows},
                                           indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
