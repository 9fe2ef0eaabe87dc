"""Build every real CogVideoX variant at full size with random weights on a GPU; report sizes.

Checks the real-size builders that the benchmarks use (no download): parameter counts against
the published ones and the GPU memory the bf16 weights take. Prints a table, writes JSON.

    python bench/real_size_build.py --out bench/results/real_size_build.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from cogvx.io import atomic_write_text
from cogvx.models.build import build_text_encoder, build_transformer, build_vae
from cogvx.models.specs import REAL_VARIANTS, get_spec

GIB = 2**30


def measure(name: str, build) -> dict:
    """Build one module on the GPU, then free it; parameters, allocated GiB and seconds."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    started = time.perf_counter()
    module = build()
    torch.cuda.synchronize()
    row = {"module": name, "parameters": sum(p.numel() for p in module.parameters()),
           "allocated_gib": round((torch.cuda.memory_allocated() - before) / GIB, 3),
           "peak_gib": round(torch.cuda.max_memory_allocated() / GIB, 3),
           "build_s": round(time.perf_counter() - started, 2),
           "dtype": str(next(module.parameters()).dtype).removeprefix("torch.")}
    del module
    torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/real_size_build.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    bf16 = torch.bfloat16
    rows = [measure(key, lambda key=key: build_transformer(get_spec(key), bf16, "cuda"))
            for key in REAL_VARIANTS]
    spec = get_spec("cogvideox-5b")
    rows.append(measure("vae", lambda: build_vae(spec, bf16, "cuda")))
    rows.append(measure("t5-v1_1-xxl encoder", lambda: build_text_encoder(spec, 32128, bf16, "cuda")))
    print(f"{'module':<22}{'parameters':>16}{'alloc GiB':>11}{'build s':>9}")
    for row in rows:
        print(f"{row['module']:<22}{row['parameters']:>16,}{row['allocated_gib']:>11.2f}{row['build_s']:>9.1f}")
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "python": platform.python_version(), "rows": rows}
    atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
