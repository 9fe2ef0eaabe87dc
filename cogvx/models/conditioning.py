"""What a task conditions the video on besides the caption, from `cogvx prepare` to training.

Text-to-video conditions on the caption alone. Image-to-video also conditions on a first-frame
image: prepare makes it (the sample's image, or the clip's own first frame, optionally noised),
encodes it with the VAE next to the clip and stores its posterior in the clip's latents file;
training hands its latents to the transformer channel-concatenated with the noisy video (plus
``ofs`` where the model has an ofs embedding), exactly as the diffusers pipeline does.

Control training (data.control) conditions a text-to-video model on a control video too (edges,
depth, pose): prepare encodes it (a file the user made, or the clip's own Canny edges) with the
same sampling, crop and flip as its clip, and training concatenates its latents with the noisy
video along channels, the layout of diffusers' CogVideoXFunControlPipeline.

One object per task (:func:`conditioning_for`) answers every such question, so prepare, the
latents dataset and training ask it rather than the task's name. A new conditioning is a new
:class:`Conditioning` subclass, not new branches in those modules. It takes its random numbers from the caller (``draws``), so training's
random stream, and with it exact resume, stays training's business.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Protocol

import torch

from cogvx.data.latents import (CONTROL_LATENT, CONTROL_TENSORS, IMAGE_LATENT, IMAGE_TENSORS, VIDEO_TENSORS,
                                posterior_tensors, sample_latents)
from cogvx.hashing import file_sha256

OFS = 2.0  # the 1.5 image-to-video pipeline's ofs value


class Sample(Protocol):
    """What a conditioning reads of one planned sample (prepare's Plan, the listing's Sample)."""

    image: Path | None
    control: Path | None


# Reads another video (a control video) exactly as the clip was read: same frames, crop and flip.
ReadLikeClip = Callable[[Path], torch.Tensor]


class Draws(Protocol):
    """Per-sample random numbers (training's SampleRandom): each call draws one value per sample."""

    def randn(self, shape: tuple[int, ...]) -> torch.Tensor: ...  # [B, *shape]

    def rand(self) -> torch.Tensor: ...  # [B]


def pad_to_temporal_patch(latents: torch.Tensor, patch_size_t: int | None) -> torch.Tensor:
    """Prepend copies of the first latent frame until the count divides patch_size_t (1.5 models),
    as the diffusers pipeline pads; latents are [B, F, C, h, w]."""
    if not patch_size_t:
        return latents
    missing = (-latents.shape[1]) % patch_size_t
    if missing == 0:
        return latents
    first = latents[:, :1].expand(-1, missing, -1, -1, -1)  # [B, missing, C, h, w]
    return torch.cat([first, latents], dim=1)  # [B, F + missing, C, h, w]


@dataclass(frozen=True)
class Conditioning:
    """The caption alone (the base every conditioning extends): prepare encodes only the clip,
    the transformer gets no extra input."""

    task: ClassVar[str] = ""
    # (pixel input, latent name) pairs prepare makes and encodes next to the clip, in file order.
    extra_latents: ClassVar[tuple[tuple[str, str], ...]] = ()

    @classmethod
    def from_spec(cls, spec) -> Conditioning:
        """The conditioning for a model spec (what the class needs of it)."""
        return cls()

    @property
    def video_tensors(self) -> tuple[str, ...]:
        """The tensors each videos/<key>.safetensors holds: the clip's posterior, then each extra's."""
        return VIDEO_TENSORS + tuple(name for _, latent in self.extra_latents for name in posterior_tensors(latent))

    @property
    def makes_image(self) -> bool:
        """Whether prepare makes (and encodes) a first-frame image per clip."""
        return any(pixels == "image" for pixels, _ in self.extra_latents)

    def key_fields(self, sample: Sample, data) -> dict[str, Any]:
        """What besides the clip determines its latents file (parts of the file's content key).
        A conditioning without an image records image = image_noise = None, as latents always have."""
        return {"image": None, "image_noise": None}

    def make_pixels(self, video: torch.Tensor, plan, data, read_like_clip: ReadLikeClip) -> dict[str, torch.Tensor]:
        """The extra pixel inputs of one planned clip (``video`` [F, C, H, W] in [-1, 1], ``plan``
        with image, control, bucket and crop_seed), by pixel input name."""
        return {}

    def transformer_inputs(self, batch: Mapping[str, Any], latents: torch.Tensor, transformer, scaling: float,
                           draws: Draws, train, device: torch.device) -> dict[str, Any]:
        """The transformer's extra inputs for a batch whose clean latents are ``latents``
        [B, F, C, h, w] (before temporal padding), dropouts from ``train`` (the train config);
        draws nothing for text alone."""
        return {}


@dataclass(frozen=True)
class TextToVideo(Conditioning):
    """Text-to-video: the caption alone."""

    task: ClassVar[str] = "t2v"


@dataclass(frozen=True)
class ImageToVideo(Conditioning):
    """Image-to-video: the caption and a first-frame image. ``invert_scale_latents`` (CogVideoX
    1.5) scales the image latents by 1 / scaling_factor instead of scaling_factor."""

    invert_scale_latents: bool = False
    task: ClassVar[str] = "i2v"
    extra_latents: ClassVar[tuple[tuple[str, str], ...]] = (("image", IMAGE_LATENT),)

    @classmethod
    def from_spec(cls, spec) -> ImageToVideo:
        return cls(invert_scale_latents=spec.invert_scale_latents)

    def key_fields(self, sample: Sample, data) -> dict[str, Any]:
        """The image's bytes (or "first-frame") and whether it is noised."""
        return {"image": file_sha256(sample.image) if sample.image else "first-frame", "image_noise": data.image_noise}

    def make_pixels(self, video: torch.Tensor, plan, data, read_like_clip: ReadLikeClip) -> dict[str, torch.Tensor]:
        """The first frame [1, C, H, W] in [-1, 1]: the sample's image fitted to the bucket the way
        the clip was (same seeded crop), else the clip's own first frame; with data.image_noise,
        noised once per clip (seeded by the plan's crop seed)."""
        from cogvx.data.video import fit_to_size

        image, bucket, seed = plan.image, plan.bucket, plan.crop_seed
        if image is not None:
            pixels = torch.from_numpy(_read_rgb(image))[None]  # [1, H, W, 3]
            generator = torch.Generator().manual_seed(seed)
            first = fit_to_size(pixels, bucket.height, bucket.width, data.resize_mode, generator)  # [1, C, H, W]
        else:
            first = video[:1].clone()  # [1, C, H, W]: the clip's first frame
        if data.image_noise:
            first = add_pixel_noise(first, seed)
        return {"image": first}

    def transformer_inputs(self, batch: Mapping[str, Any], latents: torch.Tensor, transformer, scaling: float,
                           draws: Draws, train, device: torch.device) -> dict[str, Any]:
        """The pipeline's conditioning: first-frame latents, zero frames after them, then the same
        temporal padding as the video latents; ``ofs`` when the model embeds it. Draws per sample,
        in this order: the image latent's noise, then its dropout (even at p = 0, so the random
        stream does not depend on the setting)."""
        image_scale = 1.0 / scaling if self.invert_scale_latents else scaling
        mean_name, logvar_name = IMAGE_TENSORS
        image_mean = batch[mean_name]  # [B, 1, C, h, w]
        image = sample_latents(image_mean, batch[logvar_name], image_scale,
                               noise=draws.randn(tuple(image_mean.shape[1:]))).to(device)  # [B, 1, C, h, w]
        keep = ~(draws.rand() < train.image_dropout)  # [B]
        image = image * keep.to(device, image.dtype).view(-1, 1, 1, 1, 1)  # keep: [B, 1, 1, 1, 1]
        zeros = image.new_zeros(image.shape[0], latents.shape[1] - 1, *image.shape[2:])  # [B, F-1, C, h, w]
        patch_t = transformer.config.patch_size_t
        extra: dict[str, Any] = {"image_latents": pad_to_temporal_patch(torch.cat([image, zeros], dim=1), patch_t)}
        if transformer.config.ofs_embed_dim:
            extra["ofs"] = torch.full((latents.shape[0],), OFS, device=device)  # [B]
        return extra


@dataclass(frozen=True)
class VideoControl(TextToVideo):
    """Text-to-video steered by a control video (data.control): ``kind`` 'file' reads the
    sample's control video, 'canny' takes the edges of the clip's own sampled frames (OpenCV's
    Canny, thresholds ``canny``). Its latents are the VAE posterior's mode x scaling_factor
    (what diffusers' CogVideoXFunControlPipeline feeds), concatenated with the noisy video."""

    kind: str = "file"
    canny: tuple[int, int] = (100, 200)
    extra_latents: ClassVar[tuple[tuple[str, str], ...]] = (("control", CONTROL_LATENT),)

    def key_fields(self, sample: Sample, data) -> dict[str, Any]:
        """The control video's bytes, or the Canny thresholds (the clip itself is in the key already)."""
        control = file_sha256(sample.control) if self.kind == "file" else f"canny:{self.canny[0]}:{self.canny[1]}"
        return {**super().key_fields(sample, data), "control": control}

    def make_pixels(self, video: torch.Tensor, plan, data, read_like_clip: ReadLikeClip) -> dict[str, torch.Tensor]:
        """The control video [F, C, H, W] in [-1, 1], frame for frame the clip's."""
        if self.kind == "canny":
            from cogvx.data.control import canny_video

            return {"control": canny_video(video, *self.canny)}
        return {"control": read_like_clip(plan.control)}

    def transformer_inputs(self, batch: Mapping[str, Any], latents: torch.Tensor, transformer, scaling: float,
                           draws: Draws, train, device: torch.device) -> dict[str, Any]:
        """The control latents, zeroed for the samples train.control_dropout drops (one draw per
        sample even at p = 0), padded in time like the video latents."""
        control = batch[CONTROL_TENSORS[0]].to(device) * scaling  # [B, F, C, h, w]: the posterior's mode
        keep = ~(draws.rand() < train.control_dropout)  # [B]
        control = control * keep.to(device, control.dtype).view(-1, 1, 1, 1, 1)  # keep: [B, 1, 1, 1, 1]
        return {"control_latents": pad_to_temporal_patch(control, transformer.config.patch_size_t)}


CONDITIONINGS: Mapping[str, type[Conditioning]] = {cls.task: cls for cls in (TextToVideo, ImageToVideo)}
# What the transformer's input holds after the noisy video, in order: diffusers' layouts.
CHANNEL_INPUTS = ("image_latents", "control_latents")


def conditioning_for(spec, data=None) -> Conditioning:
    """The conditioning of a model spec's task, and of ``data`` (the data config) where it asks
    for a control video (the config refuses control with image-to-video)."""
    control = getattr(data, "control", "none")
    if control != "none":
        return VideoControl(kind=control, canny=(data.canny_low, data.canny_high))
    return CONDITIONINGS[spec.task].from_spec(spec)


def add_pixel_noise(image: torch.Tensor, seed: int) -> torch.Tensor:
    """Image-to-video conditioning noise: sigma = exp(N(-3, 0.5)), drawn once per clip (seeded)."""
    generator = torch.Generator().manual_seed(seed + 1)
    sigma = torch.exp(torch.normal(-3.0, 0.5, (1,), generator=generator))
    return image + sigma * torch.randn(image.shape, generator=generator)


def _read_rgb(path: Path):
    """An image file as uint8 [H, W, 3]."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))  # [H, W, 3]
