"""`cogvx doctor`: what this machine offers cogvx (versions, device, optional parts)."""

from __future__ import annotations

import os
import platform
from importlib import metadata, util

from cogvx import __version__

CORE_PACKAGES = ("torch", "diffusers", "transformers", "accelerate", "peft", "huggingface_hub",
                 "safetensors", "pydantic")
OPTIONAL_PARTS = {
    "decord": "video decoding (data)",
    "imageio-ffmpeg": "mp4 writing",
    "bitsandbytes": "8-bit optimizers",
    "torchao": "CPU-offload optimizer, fp8",
    "prodigyopt": "Prodigy optimizer",
    "prefect": "workflow orchestration",
    "mlflow": "experiment tracking",
    "dvc": "data and pipeline versioning",
    "flash-attn-4": "FlashAttention-4 kernels for train.attention_backend=fa4, Hopper / Blackwell GPUs",
}
MODULE_OF = {"flash-attn-4": "flash_attn"}  # distributions whose import name is not their own


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def device_report() -> dict[str, str]:
    """CPU or CUDA, with each GPU's name and memory."""
    import torch

    report = {"torch build": f"{torch.__version__} (CUDA {torch.version.cuda or 'none'})"}
    if not torch.cuda.is_available():
        report["device"] = f"CPU only ({os.cpu_count()} cores); training runs in fp32, slowly"
        return report
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        report[f"cuda:{index}"] = f"{props.name}, {props.total_memory / 2**30:.1f} GiB"
    report["bf16"] = str(torch.cuda.is_bf16_supported())
    return report


def preset_report() -> str:
    """The train.preset to pick here: none on a CPU; on a GPU (the first) the fastest preset whose
    estimated 5b LoRA 49x480x720 peak fits its memory and whose kernels it has (fp8: 8.9+)."""
    import torch

    from cogvx.training.presets import DOCTOR_CASE_NAME, device_facts, suggest_preset

    if not torch.cuda.is_available():
        return "none (presets are GPU settings)"
    capability, total = device_facts(torch.device("cuda", 0))
    name, need = suggest_preset(capability, total)
    if name == "none":
        return f"none ({DOCTOR_CASE_NAME} needs ~{need:.0f} GiB even with lean, the GPU has {total:.0f}; try cogvideox-2b)"
    return f"{name} ({DOCTOR_CASE_NAME} needs ~{need:.0f} GiB of {total:.0f})"


def hub_report() -> str:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "offline (HF_HUB_OFFLINE set): only local folders and the cache"
    from cogvx.hub import hub_reachable

    reachable = hub_reachable()
    return f"{constants.ENDPOINT} {'reachable' if reachable else 'NOT reachable: use local folders or cogvx make-tiny-model'}"


def collect_report() -> dict[str, str]:
    """Everything doctor prints, as ordered key/value pairs."""
    report = {"cogvx": __version__, "python": platform.python_version(),
              "platform": platform.platform(terse=True)}
    for name in CORE_PACKAGES:
        report[name] = package_version(name) or "MISSING (required)"
    report.update(device_report())
    report["suggested preset"] = preset_report()
    for name, purpose in OPTIONAL_PARTS.items():
        version = package_version(name)
        installed = version if version and util.find_spec(MODULE_OF.get(name, name.replace("-", "_"))) else None
        report[name] = f"{installed}  ({purpose})" if installed else f"not installed ({purpose})"
    report["hub"] = hub_report()
    return report
