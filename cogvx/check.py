"""`cogvx check`: load the configured base model and render a short clip, end to end.

It proves, before a long run, that the config is valid, the weights load through the same loader
every stage uses, the architecture matches the chosen variant, and a clip of the size validation
and `cogvx generate` render (cogvx.inference.render_settings) runs through text encoder,
transformer and VAE. It writes the clip, a JSON report and the resolved
config into its output folder.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from cogvx.config import Config, write_resolved_config
from cogvx.io import atomic_write_text


def run_check(config: Config, out_dir: str | Path, steps: int = 2) -> dict[str, Any]:
    """Render the first validation prompt with ``steps`` denoising steps; return the report."""
    import numpy as np

    from cogvx.inference import pick_device, prepare_for_device, render, render_settings, write_video
    from cogvx.models.loader import load_pipeline, resolve_dtype

    out_dir = Path(out_dir)
    spec = config.spec
    device = pick_device()
    dtype = resolve_dtype(config.model.dtype, spec, device)
    started = time.perf_counter()
    pipe = load_pipeline(config.model_source, spec, dtype=dtype, revision=config.model.revision,
                         cache_dir=config.model.cache_dir)
    prepare_for_device(pipe, device)
    loaded = time.perf_counter()
    size = render_settings(config)
    video = render(pipe, config.validate_.prompts[0], frames=size.frames, height=size.height,
                   width=size.width, steps=steps, guidance_scale=config.validate_.guidance_scale,
                   seed=config.validate_.seed)
    rendered = time.perf_counter()
    write_video(video, out_dir / "sample.mp4", fps=size.fps)
    report = {
        "model": spec.key, "source": config.model_source, "device": str(device),
        "dtype": str(dtype).removeprefix("torch."), "frames": int(video.shape[0]),
        "height": int(video.shape[1]), "width": int(video.shape[2]), "steps": steps,
        "transformer_parameters": sum(p.numel() for p in pipe.transformer.parameters()),
        "load_seconds": round(loaded - started, 3), "render_seconds": round(rendered - loaded, 3),
        "pixel_std": round(float(np.std(video)), 3),
    }
    atomic_write_text(out_dir / "report.json", json.dumps(report, indent=2) + "\n")
    write_resolved_config(config, out_dir)
    return report
