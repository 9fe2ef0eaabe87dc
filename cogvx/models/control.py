"""Control training's model side: the transformer's input widened for control latents.

diffusers' CogVideoXFunControlPipeline feeds a control model ``cat([noisy video, control], dim=2)``
(16 + 16 channels for CogVideoX) through a patch embedding whose input projection takes twice the
video's channels. cogvx widens an official text-to-video checkpoint into that layout: the video's
input weights are the base model's, the control's start at zero, so at step 0 the widened model
predicts exactly what the base model does and training teaches it to use the control.

While training, the projection is a :class:`ControlInput` (the frozen base projection plus a
zero-initialized trainable projection of the control channels; a sum of two projections over
split channels is one projection over all of them). What is saved and rendered with is the
widened projection in diffusers' own layout (:func:`widened_projection`), so the pipeline's
transformer is a plain CogVideoXTransformer3DModel with ``in_channels`` doubled.
"""

from __future__ import annotations

import torch

from cogvx.errors import CogvxError

# Names of the widened projection's tensors in a control LoRA file (beside the LoRA's own).
PROJECTION_PREFIX = "transformer.patch_embed.proj."


class ControlInput(torch.nn.Module):
    """The patch embedding's input projection over [video | control] inputs: ``base`` (the
    model's own projection of the video channels) plus ``control``, zero-initialized, fp32 and
    trainable. Conv2d projections (CogVideoX 1.0) split channels; Linear ones (1.5: patches of
    C x p_t x p x p features, channel outermost) split features at C x p_t x p x p."""

    def __init__(self, base: torch.nn.Module, split: int, train_base: bool = False) -> None:
        super().__init__()
        self.base, self.split = base, split
        self.is_conv = isinstance(base, torch.nn.Conv2d)
        device = base.weight.device
        if self.is_conv:
            self.control = torch.nn.Conv2d(split, base.out_channels, base.kernel_size, base.stride, bias=False,
                                           device=device, dtype=torch.float32)
        else:
            self.control = torch.nn.Linear(split, base.out_features, bias=False, device=device, dtype=torch.float32)
        torch.nn.init.zeros_(self.control.weight)
        if train_base:
            base.float().requires_grad_(True)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.is_conv:
            video, control = inputs[:, :self.split], inputs[:, self.split:]  # [N, C, H, W] each
        else:
            video, control = inputs[..., :self.split], inputs[..., self.split:]  # [B, N, C x p_t x p x p] each
        out = self.base(video.to(self.base.weight.dtype))
        return (out + self.control(control.to(self.control.weight.dtype)).to(out.dtype)).to(inputs.dtype)


def widen_for_control(transformer, train_base: bool = False) -> ControlInput:
    """Give ``transformer`` (a text-to-video CogVideoXTransformer3DModel) a control input of as
    many channels as its video input, zero-initialized, and record the doubled ``in_channels``
    in its config (what CogVideoXFunControlPipeline reads). ``train_base`` also trains the
    model's own input weights (train.control_weights = all). Call after the adapter is added:
    adding one freezes every weight."""
    embed = transformer.patch_embed
    if isinstance(embed.proj, ControlInput):
        raise CogvxError("the transformer already has a control input")
    channels = transformer.config.in_channels
    base = embed.proj
    split = channels if isinstance(base, torch.nn.Conv2d) else base.in_features
    embed.proj = ControlInput(base, split, train_base)
    transformer.register_to_config(in_channels=2 * channels)
    return embed.proj


def widened_projection(transformer, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The widened input projection in diffusers' layout (fp32, on the CPU), keyed as in a LoRA
    file (PROJECTION_PREFIX): the base weight and the control weight side by side along the input
    dimension, the base bias. From ``state`` (the full state dict, where the module holds a shard)
    when given, else from the module."""
    named = state if state is not None else transformer.state_dict()
    base_weight = named["patch_embed.proj.base.weight"].float().cpu()
    control_weight = named["patch_embed.proj.control.weight"].float().cpu()
    tensors = {PROJECTION_PREFIX + "weight": torch.cat([base_weight, control_weight], dim=1)}  # [D, 2C, ...]
    bias = named.get("patch_embed.proj.base.bias")
    if bias is not None:
        tensors[PROJECTION_PREFIX + "bias"] = bias.float().cpu()
    return {name: value.contiguous() for name, value in tensors.items()}


def has_control_input(transformer) -> bool:
    return isinstance(transformer.patch_embed.proj, ControlInput)


def load_widened_projection(transformer, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Replace the transformer's input projection by the widened one of a control file (its
    tensors under PROJECTION_PREFIX), in the transformer's dtype; a projection that does not fit
    this transformer (other width, kernel or model family) is a CogvxError naming ``source``."""
    weight, bias = tensors[PROJECTION_PREFIX + "weight"], tensors.get(PROJECTION_PREFIX + "bias")
    base = transformer.patch_embed.proj
    channels = transformer.config.in_channels
    expected = list(base.weight.shape)
    expected[1] *= 2
    if list(weight.shape) != expected:
        raise CogvxError(f"{source}: its control input projection is {list(weight.shape)}, this model's "
                         f"widened one would be {expected}: the file was trained on another model")
    if isinstance(base, torch.nn.Conv2d):
        widened = torch.nn.Conv2d(2 * channels, base.out_channels, base.kernel_size, base.stride, bias=bias is not None)
    else:
        widened = torch.nn.Linear(2 * base.in_features, base.out_features, bias=bias is not None)
    widened.to(device=base.weight.device, dtype=base.weight.dtype)
    with torch.no_grad():
        widened.weight.copy_(weight)
        if bias is not None:
            widened.bias.copy_(bias)
    transformer.patch_embed.proj = widened
    transformer.register_to_config(in_channels=2 * channels)


def read_projection(path) -> dict[str, torch.Tensor]:
    """The widened input projection stored in a control LoRA file (only those tensors are read);
    a control file without one is damaged: CogvxError."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys() if name.startswith(PROJECTION_PREFIX)}
    if PROJECTION_PREFIX + "weight" not in tensors:
        raise CogvxError(f"{path}: its metadata says it is a control model, but it holds no "
                         f"'{PROJECTION_PREFIX}weight'; the file is damaged, or it was not written by cogvx")
    return tensors
