"""Model specs: what cogvx knows about each CogVideoX checkpoint.

A spec holds the facts a user picks a model by and that are checked before any weights are
loaded (task, default clip geometry, frame rule, LoRA targets). Architecture facts used at run
time (rotary embeddings, patch_size_t, ofs, learned positional embeddings) are read from the
loaded model's config, never from the spec's name; the spec's ``transformer`` kwargs only serve
to build a model with random weights where no checkpoint can be downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

from cogvx.errors import ConfigError
from cogvx.models import architectures as arch
from cogvx.models.constants import latent_frame_count

Task = Literal["t2v", "i2v"]

ATTENTION_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
PIPELINE_CLASS = {"t2v": "CogVideoXPipeline", "i2v": "CogVideoXImageToVideoPipeline"}
TINY_MODELS_DIR = "models"


@dataclass(frozen=True)
class FrameRule:
    """Valid clip lengths: ``multiple * k + 1`` frames for k >= 1 (4k+1 for 1.0, 16N+1 for 1.5)."""

    multiple: int

    def __str__(self) -> str:
        return f"{self.multiple}{'k' if self.multiple == 4 else 'N'}+1"

    def accepts(self, frames: int) -> bool:
        return frames > 1 and (frames - 1) % self.multiple == 0

    def nearest(self, frames: int) -> tuple[int, ...]:
        """The valid frame counts closest to ``frames`` (one or two), for error messages."""
        below = max(1, (frames - 1) // self.multiple) * self.multiple + 1
        above = below + self.multiple
        return tuple(sorted({value for value in (below, above) if value > 1}))


RULE_4K1 = FrameRule(4)
RULE_16N1 = FrameRule(16)


@dataclass(frozen=True)
class ModelSpec:
    """Facts about one CogVideoX checkpoint (or one tiny stand-in built locally)."""

    key: str
    hub_id: str | None
    task: Task
    generation: Literal["1.0", "1.5"]
    frames: int
    height: int
    width: int
    fps: int
    weights_dtype: Literal["fp16", "bf16", "fp32"]
    frame_rule: FrameRule
    vae_scaling_factor: float
    invert_scale_latents: bool
    snr_shift_scale: float
    transformer: Mapping[str, Any]
    lora_target_modules: tuple[str, ...] = ATTENTION_LORA_TARGETS
    tiny: bool = False
    notes: str = ""
    vae: Mapping[str, Any] = field(default_factory=lambda: arch.VAE)
    text_encoder: Mapping[str, Any] = field(default_factory=lambda: arch.T5_XXL)

    @property
    def default_source(self) -> str:
        """Where the loader looks when the config names no path: hub id, or the tiny model's folder."""
        return self.hub_id if self.hub_id is not None else f"{TINY_MODELS_DIR}/{self.key}"

    @property
    def pipeline_class(self) -> str:
        return PIPELINE_CLASS[self.task]

    @property
    def latent_frames(self) -> int:
        """Latent frames of the default clip (13 for 49 frames, 21 for 81)."""
        return latent_frame_count(self.frames)


def _real(key: str, hub_id: str, **kwargs: Any) -> ModelSpec:
    return ModelSpec(key=key, hub_id=hub_id, **kwargs)


def _tiny(key: str, **kwargs: Any) -> ModelSpec:
    return ModelSpec(key=key, hub_id=None, tiny=True, fps=8, weights_dtype="fp32",
                     vae=arch.TINY_VAE, text_encoder=arch.TINY_T5, **kwargs)


_SPECS = (
    _real("cogvideox-2b", "THUDM/CogVideoX-2b", task="t2v", generation="1.0", frames=49,
          height=480, width=720, fps=8, weights_dtype="fp16", frame_rule=RULE_4K1,
          vae_scaling_factor=1.15258426, invert_scale_latents=False, snr_shift_scale=3.0,
          transformer=arch.TRANSFORMER_2B, notes="sincos positions; fp16 is safe only for 2b"),
    _real("cogvideox-5b", "THUDM/CogVideoX-5b", task="t2v", generation="1.0", frames=49,
          height=480, width=720, fps=8, weights_dtype="bf16", frame_rule=RULE_4K1,
          vae_scaling_factor=0.7, invert_scale_latents=False, snr_shift_scale=1.0,
          transformer=arch.TRANSFORMER_5B, notes="rotary positions"),
    _real("cogvideox-5b-i2v", "THUDM/CogVideoX-5b-I2V", task="i2v", generation="1.0", frames=49,
          height=480, width=720, fps=8, weights_dtype="bf16", frame_rule=RULE_4K1,
          vae_scaling_factor=0.7, invert_scale_latents=False, snr_shift_scale=1.0,
          transformer=arch.TRANSFORMER_5B_I2V,
          notes="learned pos-emb fixed to 480x720 unless ignored"),
    _real("cogvideox1.5-5b", "THUDM/CogVideoX1.5-5B", task="t2v", generation="1.5", frames=81,
          height=768, width=1360, fps=16, weights_dtype="bf16", frame_rule=RULE_16N1,
          vae_scaling_factor=0.7, invert_scale_latents=True, snr_shift_scale=1.0,
          transformer=arch.TRANSFORMER_15_5B, notes="patch_size_t=2; 81 or 161 frames"),
    _real("cogvideox1.5-5b-i2v", "THUDM/CogVideoX1.5-5B-I2V", task="i2v", generation="1.5",
          frames=81, height=768, width=1360, fps=16, weights_dtype="bf16", frame_rule=RULE_16N1,
          vae_scaling_factor=0.7, invert_scale_latents=True, snr_shift_scale=1.0,
          transformer=arch.TRANSFORMER_15_5B_I2V,
          notes="short side 768, long side <= 1360; ofs=2.0"),
    _tiny("tiny-t2v", task="t2v", generation="1.0", frames=9, height=64, width=96,
          frame_rule=RULE_4K1, vae_scaling_factor=0.7, invert_scale_latents=False,
          snr_shift_scale=1.0, transformer=arch.TINY_TRANSFORMER_T2V,
          notes="random weights, built locally; like 5b"),
    _tiny("tiny-i2v", task="i2v", generation="1.0", frames=9, height=64, width=96,
          frame_rule=RULE_4K1, vae_scaling_factor=0.7, invert_scale_latents=False,
          snr_shift_scale=1.0, transformer=arch.TINY_TRANSFORMER_I2V,
          notes="random weights, built locally; like 5b-I2V"),
    _tiny("tiny-1.5-t2v", task="t2v", generation="1.5", frames=17, height=64, width=96,
          frame_rule=RULE_16N1, vae_scaling_factor=0.7, invert_scale_latents=True,
          snr_shift_scale=1.0, transformer=arch.TINY_TRANSFORMER_15_T2V,
          notes="random weights, built locally; like 1.5-5B"),
    _tiny("tiny-1.5-i2v", task="i2v", generation="1.5", frames=17, height=64, width=96,
          frame_rule=RULE_16N1, vae_scaling_factor=0.7, invert_scale_latents=True,
          snr_shift_scale=1.0, transformer=arch.TINY_TRANSFORMER_15_I2V,
          notes="random weights, built locally; like 1.5-5B-I2V"),
)

SPECS: Mapping[str, ModelSpec] = {spec.key: spec for spec in _SPECS}
TINY_VARIANTS = tuple(spec.key for spec in _SPECS if spec.tiny)
REAL_VARIANTS = tuple(spec.key for spec in _SPECS if not spec.tiny)


def resolve_key(name: str) -> str | None:
    """Map a registry key or hub id (any case) to its registry key, or None if unknown."""
    wanted = name.strip().lower()
    for spec in _SPECS:
        if wanted == spec.key or (spec.hub_id is not None and wanted == spec.hub_id.lower()):
            return spec.key
    return None


def get_spec(name: str) -> ModelSpec:
    """The spec for a registry key or hub id; a ConfigError listing the known ones otherwise."""
    key = resolve_key(name)
    if key is None:
        known = ", ".join(SPECS)
        raise ConfigError(f"unknown model variant {name!r}; known variants: {known}")
    return SPECS[key]
