"""LoRA adapters with peft, saved in the file format diffusers' ``load_lora_weights`` reads.

The saved file carries peft's adapter config (rank, alpha, target modules) in diffusers' own
``lora_adapter_metadata`` key, so diffusers restores alpha when loading and the LoRA acts at the
strength it was trained with; cogvx adds its own key with the base model and training config.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from cogvx.errors import CogvxError
from cogvx.io import atomic_directory

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
COGVX_METADATA_KEY = "cogvx"
ADAPTER_METADATA_KEY = "lora_adapter_metadata"
INIT_SCHEMES = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}


def add_lora(transformer, rank: int, alpha: float, target_modules: list[str], dropout: float = 0.0,
             init: str = "gaussian") -> None:
    """Freeze the transformer and add a trainable LoRA adapter (fp32 weights) to ``target_modules``."""
    from peft import LoraConfig

    transformer.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                        init_lora_weights=INIT_SCHEMES[init])
    transformer.add_adapter(config)
    for param in transformer.parameters():
        if param.requires_grad:
            param.data = param.data.float()


def trainable_state(transformer) -> dict[str, torch.Tensor]:
    """The trainable tensors by name (what a checkpoint must hold to resume)."""
    return {name: param.detach() for name, param in transformer.named_parameters() if param.requires_grad}


def load_trainable_state(transformer, state: dict[str, torch.Tensor]) -> None:
    params = dict(transformer.named_parameters())
    missing = [name for name, p in params.items() if p.requires_grad and name not in state]
    if missing:
        raise CogvxError(f"checkpoint lacks {len(missing)} trainable tensors (e.g. {missing[0]}); "
                         "was it written by a run with another train.lora / train.method?")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def adapter_metadata(transformer) -> dict[str, Any]:
    """peft's adapter config as diffusers stores it, with set-valued fields (target_modules) sorted:
    peft keeps them in sets, whose order changes from process to process."""
    adapter = transformer.peft_config["default"].to_dict()
    return {key: sorted(value) if isinstance(value, (set, frozenset)) else value for key, value in adapter.items()}


def save_lora(transformer, out_dir: Path, info: dict[str, Any], state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the adapter as ``out_dir/pytorch_lora_weights.safetensors`` (atomically) and return it;
    ``state_dict`` is the model's full state where the module itself holds only a shard.

    Equal weights and info give the same bytes in any process (sorted header, sorted target modules),
    so DVC and MLflow see an identical re-run as unchanged."""
    from diffusers import CogVideoXPipeline
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open
    from safetensors.torch import load_file

    from cogvx.tensorfile import save_tensors_reproducibly

    layers = {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(transformer, state_dict=state_dict).items()}
    with atomic_directory(out_dir) as staging:
        CogVideoXPipeline.save_lora_weights(staging, transformer_lora_layers=layers,
                                            transformer_lora_adapter_metadata=adapter_metadata(transformer),
                                            weight_name=LORA_WEIGHT_NAME, safe_serialization=True)
        path = staging / LORA_WEIGHT_NAME
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
        metadata[COGVX_METADATA_KEY] = json.dumps(info, sort_keys=True, default=str)
        save_tensors_reproducibly(load_file(str(path)), path, metadata=metadata)
    return out_dir / LORA_WEIGHT_NAME


def read_lora_metadata(path: Path) -> dict[str, Any]:
    """rank, alpha, target modules and cogvx's record of a LoRA file (empty fields when absent).

    The file is recognized by its content (the safetensors header), whatever its name: anything
    else (a pickle, a torch.save zip, a truncated file, a FIFO) is a CogvxError naming it, raised
    before any loader sees the file, so nothing is ever unpickled.
    """
    from safetensors import SafetensorError, safe_open

    from cogvx.data.video import file_problem

    problem = file_problem(Path(path), what="LoRA file")
    if problem:
        raise CogvxError(f"{path} is not a readable safetensors LoRA file ({problem})")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
    except (SafetensorError, OSError) as err:
        raise CogvxError(f"{path} is not a readable safetensors LoRA file ({_not_safetensors(path, err)})") from None
    adapter = _json_metadata(path, metadata, ADAPTER_METADATA_KEY)
    prefix = "transformer."
    adapter = {k.removeprefix(prefix): v for k, v in adapter.items()}
    return {"rank": adapter.get("r"), "alpha": adapter.get("lora_alpha"),
            "target_modules": adapter.get("target_modules"),
            "cogvx": _json_metadata(path, metadata, COGVX_METADATA_KEY)}


def _not_safetensors(path: Path, err: Exception) -> str:
    """Why safetensors refused ``path``, naming pickles and torch.save archives for what they are."""
    with open(path, "rb") as handle:
        head = handle.read(4)
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "it is a pickle (.bin/.pt); cogvx never unpickles files: convert it to safetensors"
    if head == b"PK\x03\x04":
        return "it is a torch.save zip archive (.bin/.pt); cogvx never unpickles files: convert it to safetensors"
    return str(err).removeprefix("Error while deserializing header: ")


def _json_metadata(path: Path, metadata: dict[str, str], key: str) -> dict[str, Any]:
    """The JSON object stored under ``key`` in a safetensors header ({} when absent)."""
    try:
        value = json.loads(metadata.get(key, "{}"))
    except json.JSONDecodeError as err:
        value = err
    if not isinstance(value, dict):
        raise CogvxError(f"{path}: its '{key}' metadata is not a JSON object; the file is damaged, "
                         "or it was not written by diffusers / cogvx")
    return value
