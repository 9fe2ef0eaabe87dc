"""Quality guards of the fp8-GEMM path (train.fp8_compute), run on the GPU where the real
kernel (torch._scaled_mm) runs:

- LoRA gradients of one step on the case's real architecture at a small clip size, bf16 vs
  fp8 storage vs fp8 storage + fp8 GEMMs (relative error of each LoRA tensor's gradient);
- loss curves of the training code on the tiny model, case.steps steps with the same data,
  noise and seed, bf16 vs fp8 storage vs fp8 GEMMs (windowed means, relative difference).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import torch

from cogvx.benchmark.cases import Case

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
CURVE_WINDOW = 20


def _lora_transformer(case: Case, device: torch.device):
    from cogvx.models.build import build_transformer
    from cogvx.models.lora import add_lora

    from cogvx.models.specs import get_spec

    torch.manual_seed(0)
    model = build_transformer(get_spec(case.variant), torch.bfloat16, device)
    add_lora(model, rank=64, alpha=64, target_modules=list(TARGETS))
    with torch.no_grad():  # non-zero B matrices, so every LoRA weight gets a gradient
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    return model.train()


def _lora_gradients(model, case: Case, device: torch.device) -> dict[str, torch.Tensor]:
    """LoRA gradients of loss = mean(output^2) for fixed random inputs (seeded)."""
    from cogvx.models.constants import VAE_LATENT_CHANNELS, VAE_SPATIAL_SCALE, latent_frame_count
    from cogvx.training.objective import rotary_embeddings

    frames, height, width = case.size
    generator = torch.Generator(device).manual_seed(1)
    latent_frames = latent_frame_count(frames)
    latents = torch.randn(1, latent_frames, VAE_LATENT_CHANNELS, height // VAE_SPATIAL_SCALE,  # [B, F, C, h, w]
                          width // VAE_SPATIAL_SCALE, generator=generator, device=device, dtype=torch.bfloat16)
    text = torch.randn(1, 226, model.config.text_embed_dim, generator=generator, device=device,
                       dtype=torch.bfloat16)  # [B, L, D]
    rotary = rotary_embeddings(model, height, width, latent_frames, device)
    model.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = model(hidden_states=latents, encoder_hidden_states=text, timestep=torch.tensor([500], device=device),
                    image_rotary_emb=rotary, return_dict=False)[0]
    out.float().pow(2).mean().backward()
    return {n: p.grad.detach().float().cpu() for n, p in model.named_parameters() if p.requires_grad}


def _errors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> dict[str, float]:
    errors = [float((actual[n] - expected[n]).norm() / expected[n].norm().clamp(min=1e-30)) for n in expected]
    return {"median": round(statistics.median(errors), 4), "max": round(max(errors), 4), "tensors": len(errors)}


def gradient_check(case: Case, device: torch.device) -> dict[str, Any]:
    """LoRA gradients at bf16, fp8 storage and fp8 GEMMs, on one model converted in place."""
    from cogvx.models.performance import Fp8ComputeLinear, Fp8StorageLinear, store_base_weights_in_fp8

    model = _lora_transformer(case, device)
    bf16 = _lora_gradients(model, case, device)
    store_base_weights_in_fp8(model, torch.bfloat16)
    storage = _lora_gradients(model, case, device)
    for name, module in model.named_modules():
        if type(module) is Fp8StorageLinear and name.startswith("transformer_blocks."):
            module.__class__ = Fp8ComputeLinear
    compute = _lora_gradients(model, case, device)
    return {"fp8_storage_vs_bf16": _errors(storage, bf16), "fp8_gemm_vs_bf16": _errors(compute, bf16),
            "fp8_gemm_vs_fp8_storage": _errors(compute, storage)}


def _curve(workdir: Path, device: torch.device, name: str, overrides: tuple[str, ...], steps: int) -> list[float]:
    from cogvx.benchmark.worker import _training_run, case_config, timed_steps
    from cogvx.training.loop import batches_from

    case = Case(name, "train", "tiny-t2v", (9, 64, 96), ("model.dtype=bf16", "train.learning_rate=1e-3",
                                                          "train.lora.rank=8", "train.lora.alpha=8", *overrides),
                steps=steps, warmup=0)
    config = case_config(case, workdir)
    run = _training_run(case, config, workdir, device)
    batches = batches_from(run.dataset, run.sampler, 0, 0, 1)
    return timed_steps(run, batches, steps)[1]


def _windowed(losses: list[float]) -> list[float]:
    return [statistics.fmean(losses[i:i + CURVE_WINDOW]) for i in range(0, len(losses), CURVE_WINDOW)]


def curve_check(workdir: Path, device: torch.device, steps: int) -> dict[str, Any]:
    """Tiny-model loss curves (windowed means) of bf16, fp8 storage and fp8 GEMMs."""
    curves = {"bf16": _curve(workdir, device, "curve-bf16", (), steps),
              "fp8_storage": _curve(workdir, device, "curve-fp8", ("train.fp8_base_weights=true",), steps),
              "fp8_gemm": _curve(workdir, device, "curve-fp8-gemm",
                                 ("train.fp8_base_weights=true", "train.fp8_compute=true"), steps)}
    windows = {key: _windowed(values) for key, values in curves.items()}

    def difference(key: str) -> float:
        return round(max(abs(a - b) / abs(b) for a, b in zip(windows[key], windows["bf16"])), 4)

    return {"steps": steps, "window": CURVE_WINDOW, "windowed_loss": {k: [round(v, 5) for v in w] for k, w in windows.items()},
            "max_window_rel_diff": {"fp8_storage": difference("fp8_storage"), "fp8_gemm": difference("fp8_gemm")},
            "loss_fell": {key: windows[key][-1] < windows[key][0] for key in windows}}


def run_quality(case: Case, workdir: Path, device: torch.device) -> dict[str, Any]:
    """Both checks; ``grad_rel_err_median`` and ``loss_curve_rel_diff`` are what targets bound."""
    gradients = gradient_check(case, device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    curves = curve_check(Path(workdir) / "quality", device, case.steps)
    return {"gradients": gradients, "curves": curves,
            "grad_rel_err_median": gradients["fp8_gemm_vs_bf16"]["median"],
            "loss_curve_rel_diff": curves["max_window_rel_diff"]["fp8_gemm"]}
