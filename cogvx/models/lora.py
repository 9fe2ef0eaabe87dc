"""Adapters with peft (train.lora.kind: lora, dora, lokr, loha), saved as one safetensors file.

LoRA and DoRA are saved in the file format diffusers' ``load_lora_weights`` reads: the file
carries peft's adapter config (rank, alpha, target modules, use_dora) in diffusers' own
``lora_adapter_metadata`` key, so diffusers restores alpha when loading and the adapter acts at
the strength it was trained with. diffusers cannot load LoKr and LoHa, so those files hold peft's
state dict with peft's config (its peft_type included) under ``peft_adapter_config``, loaded back
by :func:`load_lycoris` through peft. Every file has cogvx's own key with the base model, the
training config and the adapter kind.
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
PEFT_METADATA_KEY = "peft_adapter_config"
INIT_SCHEMES = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}
ADAPTER_KINDS = ("lora", "dora", "lokr", "loha")
LYCORIS_KINDS = ("lokr", "loha")  # peft's LyCORIS tuners: no diffusers loader, loaded through peft
KIND_NAMES = {"lora": "LoRA", "dora": "DoRA", "lokr": "LoKr", "loha": "LoHa"}


def adapter_config(kind: str, rank: int, alpha: float, target_modules: list[str], dropout: float = 0.0,
                   init: str = "gaussian"):
    """The peft config of one adapter kind: LoraConfig (use_dora for dora), LoKrConfig or
    LoHaConfig. LyCORIS layers have no input dropout: ``dropout`` is their rank_dropout (drops
    rows of the weight update), the nearest equivalent; ``init`` applies to lora and dora only."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    targets = sorted(target_modules)
    if kind in ("lora", "dora"):
        return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                          init_lora_weights=INIT_SCHEMES[init], use_dora=kind == "dora")
    if kind in LYCORIS_KINDS:
        lycoris = LoKrConfig if kind == "lokr" else LoHaConfig
        return lycoris(r=rank, alpha=alpha, rank_dropout=dropout, target_modules=targets)
    raise CogvxError(f"train.lora.kind = {kind!r}: expected one of {', '.join(ADAPTER_KINDS)}")


def add_lora(transformer, rank: int, alpha: float, target_modules: list[str], dropout: float = 0.0,
             init: str = "gaussian", kind: str = "lora") -> None:
    """Freeze the transformer and add a trainable adapter of ``kind`` (fp32 weights) to ``target_modules``."""
    transformer.requires_grad_(False)
    transformer.add_adapter(adapter_config(kind, rank, alpha, target_modules, dropout, init))
    for param in transformer.parameters():
        if param.requires_grad:
            param.data = param.data.float()


def adapter_kind(transformer, adapter: str = "default") -> str:
    """The kind (lora, dora, lokr, loha) of the transformer's peft adapter ``adapter``."""
    config = transformer.peft_config[adapter]
    kind = str(getattr(config.peft_type, "value", config.peft_type)).lower()
    if kind == "lora":
        return "dora" if config.use_dora else "lora"
    if kind not in LYCORIS_KINDS:
        raise CogvxError(f"unsupported peft adapter type {kind!r}; cogvx saves {', '.join(ADAPTER_KINDS)}")
    return kind


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
    ``state_dict`` is the model's full state where the module itself holds only a shard. LoRA and
    DoRA go through diffusers' writer (its loader reads them back), LoKr and LoHa as peft's state
    dict with peft's config; ``info`` gains the adapter kind.

    Equal weights and info give the same bytes in any process (sorted header, sorted target modules),
    so DVC and MLflow see an identical re-run as unchanged."""
    from peft.utils import get_peft_model_state_dict

    from cogvx.models.control import has_control_input, widened_projection

    kind = adapter_kind(transformer)
    info = {**info, "adapter_kind": kind}
    layers = {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(transformer, state_dict=state_dict).items()}
    # A control model's widened input projection travels in the same file (diffusers' layout).
    extra = widened_projection(transformer, state_dict) if has_control_input(transformer) else {}
    with atomic_directory(out_dir) as staging:
        if kind in LYCORIS_KINDS:
            _write_peft_file(staging / LORA_WEIGHT_NAME, {**layers, **extra}, adapter_metadata(transformer), info)
        else:
            _write_diffusers_file(staging, layers, adapter_metadata(transformer), info, extra)
    return out_dir / LORA_WEIGHT_NAME


def _write_diffusers_file(folder: Path, layers: dict[str, torch.Tensor], adapter: dict[str, Any],
                          info: dict[str, Any], extra: dict[str, torch.Tensor]) -> None:
    """diffusers' LoRA file (its key names and adapter metadata), rewritten reproducibly with
    cogvx's key and the ``extra`` tensors (a control model's input projection)."""
    from diffusers import CogVideoXPipeline
    from safetensors import safe_open
    from safetensors.torch import load_file

    from cogvx.tensorfile import save_tensors_reproducibly

    CogVideoXPipeline.save_lora_weights(folder, transformer_lora_layers=layers, transformer_lora_adapter_metadata=adapter,
                                        weight_name=LORA_WEIGHT_NAME, safe_serialization=True)
    path = folder / LORA_WEIGHT_NAME
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
    metadata[COGVX_METADATA_KEY] = json.dumps(info, sort_keys=True, default=str)
    save_tensors_reproducibly({**load_file(str(path)), **extra}, path, metadata=metadata)


def _write_peft_file(path: Path, layers: dict[str, torch.Tensor], adapter: dict[str, Any], info: dict[str, Any]) -> None:
    """peft's state dict (names as get_peft_model_state_dict gives them) with peft's config and cogvx's key."""
    from cogvx.tensorfile import save_tensors_reproducibly

    metadata = {"format": "pt", PEFT_METADATA_KEY: json.dumps(adapter, sort_keys=True, default=str),
                COGVX_METADATA_KEY: json.dumps(info, sort_keys=True, default=str)}
    save_tensors_reproducibly(layers, path, metadata=metadata)


def load_lycoris(transformer, path: Path, meta: dict[str, Any], adapter: str, scale: float) -> None:
    """Add the LoKr / LoHa adapter of the file at ``path`` (read by read_lora_metadata into
    ``meta``) to ``transformer`` as ``adapter``, through peft, at ``scale`` x alpha / rank.
    The config comes from the file, so the layers have the shapes they were trained with; a
    file that does not fit (other target modules or shapes) is a CogvxError."""
    from peft import PeftConfig
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    from cogvx.models.control import PROJECTION_PREFIX

    fields = {k: v for k, v in meta["peft_config"].items() if k not in ("base_model_name_or_path", "revision")}
    layers = {k: v for k, v in load_file(str(path)).items() if not k.startswith(PROJECTION_PREFIX)}
    try:
        config = PeftConfig.from_peft_type(**fields)
        transformer.add_adapter(config, adapter_name=adapter)
        result = set_peft_model_state_dict(transformer, layers, adapter_name=adapter)
    except (ValueError, KeyError, TypeError, RuntimeError) as err:
        raise CogvxError(f"{path} does not fit this model's transformer: {str(err).splitlines()[0][:200]}") from None
    if result.unexpected_keys:
        raise CogvxError(f"{path} does not fit this model's transformer: {len(result.unexpected_keys)} of its "
                         f"tensors have no layer here (e.g. {result.unexpected_keys[0]})")
    set_lycoris_scale(transformer, adapter, scale)


def set_lycoris_scale(transformer, adapter: str, scale: float) -> None:
    """Every LoKr / LoHa layer of ``adapter`` at ``scale`` x alpha / rank (peft's LycorisLayer.set_scale)."""
    from peft.tuners.lycoris_utils import LycorisLayer

    for module in transformer.modules():
        if isinstance(module, LycorisLayer):
            module.set_scale(adapter, scale)


def read_lora_metadata(path: Path) -> dict[str, Any]:
    """Adapter kind, rank, alpha, target modules, peft config (LoKr / LoHa) and cogvx's record
    of an adapter file (empty fields when absent).

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
    return _describe_adapter(path, metadata)


def _describe_adapter(path: Path, metadata: dict[str, str]) -> dict[str, Any]:
    """read_lora_metadata's answer from a safetensors header: the kind from cogvx's record
    (files written before kinds existed are lora, or dora where diffusers' metadata says so)."""
    adapter = _json_metadata(path, metadata, ADAPTER_METADATA_KEY)
    adapter = {k.removeprefix("transformer."): v for k, v in adapter.items()}
    peft_config, record = _json_metadata(path, metadata, PEFT_METADATA_KEY), _json_metadata(path, metadata, COGVX_METADATA_KEY)
    kind = record.get("adapter_kind") or ("dora" if adapter.get("use_dora") else "lora")
    control = record.get("control") or None  # control training: kind, channels, ...
    if kind not in ADAPTER_KINDS:
        raise CogvxError(f"{path}: adapter kind {kind!r} is none of {', '.join(ADAPTER_KINDS)}; "
                         "the file was written by a newer cogvx, or it is damaged")
    if kind in LYCORIS_KINDS:
        if str(peft_config.get("peft_type", "")).lower() != kind:
            raise CogvxError(f"{path}: a {KIND_NAMES[kind]} file without a matching '{PEFT_METADATA_KEY}' "
                             "metadata; the file is damaged, or it was not written by cogvx")
        return {"kind": kind, "rank": peft_config.get("r"), "alpha": peft_config.get("alpha"),
                "target_modules": peft_config.get("target_modules"), "peft_config": peft_config, "cogvx": record,
                "control": control}
    return {"kind": kind, "rank": adapter.get("r"), "alpha": adapter.get("lora_alpha"),
            "target_modules": adapter.get("target_modules"), "peft_config": None, "cogvx": record,
            "control": control}


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
