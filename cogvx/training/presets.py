"""Whether a training run's settings can run on this device: train.preset's GPU settings, fp8
compute's compute capability, and the run's estimated peak GPU memory.

The presets themselves (what each one sets) are config data (:data:`cogvx.config.PRESETS`),
resolved when the config is built; this module holds what needs the device: the refusals made at
the start of `cogvx train`, before any model is loaded, and the estimate of the peak memory a run
needs, from the model's architecture and the training size, calibrated against peaks measured on
an H200 (see :func:`estimate_training_allocated_gib` and tests/test_presets.py).
"""

from __future__ import annotations

import math
import os

import torch

from cogvx.config import PRESET_ORDER, PRESETS, Config, TrainConfig, apply_preset, load_config
from cogvx.errors import CogvxError
from cogvx.models.constants import VAE_SPATIAL_SCALE, latent_frame_count
from cogvx.models.specs import ModelSpec
from cogvx.models.performance import FP8_CAPABILITY

GIB = 2**30
# Calibration of the estimate (tests/test_presets.py checks it against the measured peaks):
LIVE_BLOCK_ACTIVATIONS = 28  # one block's live forward + backward tensors, in [tokens, inner_dim] units
OFFLOAD_IN_FLIGHT = 2  # activation_offload: block inputs on the GPU at once (the one used, the next fetched)
ALLOCATOR_RESERVE = 1.1  # reserved / allocated of the caching allocator (17.27 -> 18.98 GiB measured)
CUDA_CONTEXT_GIB = 1.0  # CUDA context and kernels, outside the allocator
WEIGHT_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}
# Optimizer state per trainable parameter, in parameter-sized copies (cpu_offload_adamw: on the CPU).
STATE_COPIES = {"adamw": 2, "adam": 2, "prodigy": 4, "cpu_offload_adamw": 0}
DOCTOR_CASE = ("model.variant=cogvideox-5b", "train.method=lora")  # its default clip: 49x480x720
DOCTOR_CASE_NAME = "5b LoRA 49x480x720"


# ----------------------------------------------------------------------------- estimate


def tokens_per_sample(spec: ModelSpec, frames: int, height: int, width: int) -> int:
    """Transformer sequence length of one clip: latent patches plus the text tokens. 1.5 models
    (patch_size_t = 2) pad the latent frames to a multiple of it and patch them in pairs."""
    arch = spec.transformer
    patch, patch_t = arch["patch_size"], arch.get("patch_size_t") or 1
    latent_frames = math.ceil(latent_frame_count(frames) / patch_t)
    side = VAE_SPATIAL_SCALE * patch
    return latent_frames * (height // side) * (width // side) + arch["max_text_seq_length"]


def transformer_parameters(spec: ModelSpec) -> tuple[int, int]:
    """(parameters of the blocks' linear layers, all other parameters) of the spec's transformer,
    from its architecture: per block, attention q/k/v/out (4 D^2), the 4x feed-forward (8 D^2) and
    the two adaptive norms (2 x time_embed_dim x 6 D); outside them the patch and text embeddings,
    the time embedding and the output projection."""
    arch = spec.transformer
    inner = arch["num_attention_heads"] * arch["attention_head_dim"]
    time_dim, patch = arch["time_embed_dim"], arch["patch_size"] ** 2 * (arch.get("patch_size_t") or 1)
    block = 12 * inner * inner + 12 * time_dim * inner + 23 * inner  # weights + biases
    other = (arch["text_embed_dim"] + arch["in_channels"] * patch + patch * arch["out_channels"]) * inner
    other += inner * time_dim + time_dim * time_dim + time_dim * 2 * inner + 8 * inner
    return arch["num_layers"] * block, other


def _weight_bytes(config: Config) -> int:
    """Bytes per base weight on a GPU: model.dtype, or the checkpoint's own dtype (auto)."""
    requested = config.model.dtype
    return WEIGHT_BYTES[config.spec.weights_dtype if requested == "auto" else requested]


def _state_bytes(optimizer: str, param_bytes: int) -> int:
    """Optimizer state per trainable parameter on the GPU (8-bit AdamW: two 1-byte moments)."""
    return 2 if optimizer == "adamw8bit" else STATE_COPIES[optimizer] * param_bytes


def _training_extra_bytes(config: Config, all_params: int, weight_bytes: int) -> int:
    """What training adds to the base weights: LoRA's fp32 adapters (on the attention projections,
    D x D each) with their gradients and state; for full fine-tuning every weight's gradient and
    state, in the weights' dtype (cpu_offload_adamw: gradients streamed to the CPU, state there)."""
    train, arch = config.train, config.spec.transformer
    if train.method == "full":
        grads = 0 if train.optimizer == "cpu_offload_adamw" else weight_bytes
        return all_params * (grads + _state_bytes(train.optimizer, weight_bytes))
    inner = arch["num_attention_heads"] * arch["attention_head_dim"]
    targets = len(train.lora.target_modules or config.spec.lora_target_modules)
    adapters = arch["num_layers"] * targets * train.lora.rank * 2 * inner
    return adapters * (4 + 4 + _state_bytes(train.optimizer, 4))


def _activation_bytes(train: TrainConfig, arch, rows: int, tokens: int, act_bytes: int) -> int:
    """Activations at the peak (the backward pass of the first block): the checkpointed block
    inputs (one [rows, D] tensor per block; a couple with activation_offload), the kept attention
    outputs and fp32 logsumexp (keep_attention_outputs), and one block's live tensors; without
    gradient checkpointing every block's live tensors. ``rows`` = batch x tokens."""
    layers, heads = arch["num_layers"], arch["num_attention_heads"]
    unit = rows * heads * arch["attention_head_dim"] * act_bytes
    live = LIVE_BLOCK_ACTIVATIONS * unit
    if train.attention_backend == "math":  # the reference kernel materialises scores and probabilities
        live += 2 * (rows // tokens) * heads * tokens * tokens * act_bytes
    if not train.gradient_checkpointing:
        return layers * live
    kept = (OFFLOAD_IN_FLIGHT if train.activation_offload else layers) * unit
    if train.keep_attention_outputs:
        kept += layers * (unit + rows * heads * 4)
    return kept + live


def estimate_training_allocated_gib(config: Config) -> float:
    """Peak GPU memory the allocator hands out in a training step of one process holding the whole
    model (what torch.cuda.max_memory_allocated reports), in GiB, at the config's largest bucket.

    base weights (2 bytes each in bf16/fp16; the blocks' linears 1 byte with fp8_base_weights)
    + LoRA adapters, gradients and optimizer state (full fine-tuning: every weight's)
    + activations (:func:`_activation_bytes`), with one block's live tensors calibrated at
    LIVE_BLOCK_ACTIVATIONS = 28 units of [batch x tokens, inner_dim]; within 15% of the H200
    peaks in tests/test_presets.py (5b, 2b and 1.5-5B; LoRA and full; bf16, fp8, offload).
    """
    spec, train = config.spec, config.train
    tokens = max(tokens_per_sample(spec, *bucket) for bucket in config.buckets)
    act_bytes = 4 if train.mixed_precision == "no" else 2
    block_params, other_params = transformer_parameters(spec)
    weight_bytes = _weight_bytes(config)
    fp8 = train.fp8_base_weights and train.method == "lora"
    weights = block_params * (1 if fp8 else weight_bytes) + other_params * weight_bytes
    extra = _training_extra_bytes(config, block_params + other_params, weight_bytes)
    activations = _activation_bytes(train, spec.transformer, train.batch_size * tokens, tokens, act_bytes)
    return (weights + extra + activations) / GIB


def estimate_training_peak_gib(config: Config) -> float:
    """GPU memory a training run needs, in GiB: the allocated peak with the caching allocator's
    reserve (x1.1) and the CUDA context (~1 GiB), to compare with a GPU's total memory."""
    return estimate_training_allocated_gib(config) * ALLOCATOR_RESERVE + CUDA_CONTEXT_GIB


# ----------------------------------------------------------------------------- refusals


def with_preset(config: Config, preset: str) -> Config:
    """``config`` as it would resolve under another preset: the fields its own preset set (those
    holding that preset's value) go back to their defaults, then ``preset`` is applied."""
    train = config.train
    fields = TrainConfig.model_fields
    undone = {name: fields[name].default for name, value in PRESETS.get((train.method, train.preset), {}).items()
              if getattr(train, name) == value}
    plain = TrainConfig.model_validate({**train.model_dump(), **undone, "preset": preset})
    return config.model_copy(update={"train": apply_preset(plain)})


def _fp8_problem(train: TrainConfig, device_type: str, capability: tuple[int, int] | None) -> str | None:
    """Why fp8 compute cannot run here (a CPU, or a GPU before compute capability 8.9), or None."""
    if not train.fp8_compute or (device_type == "cuda" and capability is not None and capability >= FP8_CAPABILITY):
        return None
    here = "this is a CPU" if device_type != "cuda" else f"this GPU is {capability[0]}.{capability[1]}"
    if PRESETS.get((train.method, train.preset), {}).get("fp8_compute"):
        return (f"train.preset = {train.preset} multiplies in fp8 (train.fp8_compute), which needs compute "
                f"capability 8.9+ (Ada, Hopper); {here}: use preset balanced")
    return (f"train.fp8_compute = true needs a CUDA GPU of compute capability 8.9+ (Ada, Hopper); {here}: "
            "set train.fp8_compute = false")


def _memory_problem(config: Config, total_memory_gib: float) -> str | None:
    """Why the preset's run does not fit the GPU (its estimate, the GPU's memory, what would fit)."""
    need = estimate_training_peak_gib(config)
    if need <= total_memory_gib:
        return None
    train = config.train
    lighter = PRESET_ORDER[PRESET_ORDER.index(train.preset) + 1:]
    fits = [(name, estimate_training_peak_gib(with_preset(config, name))) for name in lighter]
    fits = [(name, gib) for name, gib in fits if gib <= total_memory_gib]
    hint = (f"train.preset = {fits[0][0]} would fit (~{fits[0][1]:.1f} GiB)" if fits else
            "no preset fits: lower train.batch_size or data.frames/height/width, or set train.optimizer = adamw8bit")
    bucket = max(config.buckets, key=lambda b: tokens_per_sample(config.spec, *b))
    return (f"train.preset = {train.preset}: {config.spec.key} {train.method} at {bucket}, batch {train.batch_size}, "
            f"needs an estimated {need:.1f} GiB of GPU memory and the GPU has {total_memory_gib:.1f} GiB; {hint}")


def preset_problem(config: Config, device_type: str, capability: tuple[int, int] | None,
                   total_memory_gib: float | None) -> str | None:
    """Why the config's preset (or fp8 compute) cannot run on this device, or None when it can. The
    memory check is made for one process holding the whole model (not under train.accelerate_config,
    where FSDP / ZeRO shard it)."""
    train = config.train
    if train.preset != "none" and device_type != "cuda":
        fp8 = ", fp8" if train.method == "lora" else ", CPU-offload optimizer"
        return (f"train.preset = {train.preset} is a GPU setting (compiled blocks, cuDNN attention{fp8} ...); "
                "on a CPU set train.preset = none")
    problem = _fp8_problem(train, device_type, capability)
    if problem is None and train.preset != "none" and total_memory_gib is not None and train.accelerate_config is None:
        problem = _memory_problem(config, total_memory_gib)
    return problem


def check_preset_runs(config: Config, device_type: str, capability: tuple[int, int] | None,
                      total_memory_gib: float | None) -> None:
    """Refuse (CogvxError) a run whose preset or fp8 compute cannot run on this device, before any
    model is loaded: see :func:`preset_problem`."""
    problem = preset_problem(config, device_type, capability, total_memory_gib)
    if problem is not None:
        raise CogvxError(problem)


def device_facts(device: torch.device) -> tuple[tuple[int, int] | None, float | None]:
    """(compute capability, total memory in GiB) of a CUDA device; (None, None) for any other."""
    if device.type != "cuda":
        return None, None
    props = torch.cuda.get_device_properties(device)
    return (props.major, props.minor), props.total_memory / GIB


def check_preset_for_device(config: Config, device: torch.device) -> None:
    """:func:`check_preset_runs` with the facts of ``device`` read from torch."""
    capability, total = device_facts(device)
    check_preset_runs(config, device.type, capability, total)


def training_device() -> torch.device:
    """The device this process trains on: cuda:LOCAL_RANK (0 outside accelerate launch) when torch
    sees a GPU, else the CPU (what accelerate picks)."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


# ----------------------------------------------------------------------------- doctor


def suggest_preset(capability: tuple[int, int], total_memory_gib: float) -> tuple[str, float]:
    """The fastest preset (speed > balanced > lean) a 5b LoRA 49x480x720 run can use on a GPU of this
    capability and memory, with its estimated need in GiB; ("none", lean's need) when none fits."""
    needs = {}
    for name in PRESET_ORDER:
        config = load_config(None, [*DOCTOR_CASE, f"train.preset={name}"])
        needs[name] = estimate_training_peak_gib(config)
        if preset_problem(config, "cuda", capability, total_memory_gib) is None:
            return name, needs[name]
    return "none", needs[PRESET_ORDER[-1]]
