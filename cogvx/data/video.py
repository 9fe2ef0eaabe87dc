"""Video decoding with decord: probing clips, choosing which frames to read, reading them as
tensors and fitting them to a training size."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cogvx.errors import CogvxError

if TYPE_CHECKING:
    import torch


class VideoError(CogvxError):
    """A clip cannot be read (missing, empty, corrupt, or not a video)."""


@dataclass(frozen=True)
class VideoInfo:
    """What decoding needs to know about a clip before reading any frame."""

    frames: int
    fps: float
    height: int
    width: int


# Larger frames are refused before decoding a clip: 49 frames of 8K already take 4.9 GB as uint8.
MAX_CLIP_PIXELS = 7680 * 4320


def probe_video(path: str | Path) -> VideoInfo:
    """Frame count, frame rate and size of a clip; VideoError when it cannot be decoded."""
    import decord

    path = Path(path)
    if not path.is_file():
        raise VideoError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise VideoError(f"{path}: empty file (0 bytes)")
    try:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
        frames = len(reader)
        height, width = reader[0].shape[:2] if frames else (0, 0)
        fps = float(reader.get_avg_fps())
    except (decord.DECORDError, RuntimeError, IndexError) as err:
        raise VideoError(f"{path}: not a readable video ({str(err).splitlines()[0][:120]})") from None
    if frames == 0 or height == 0 or width == 0:
        raise VideoError(f"{path}: no frames ({frames} frames, {width}x{height})")
    if height * width > MAX_CLIP_PIXELS:
        raise VideoError(f"{path}: {width}x{height} frames are larger than 8K (7680x4320); downscale the clip "
                         "first, e.g. ffmpeg -i IN -vf scale=-2:1080 OUT")
    return VideoInfo(frames=frames, fps=fps if math.isfinite(fps) and fps > 0 else 0.0,
                     height=int(height), width=int(width))


def frame_stride(native_fps: float, target_fps: int | None) -> int:
    """Read every n-th frame so that the clip plays at about ``target_fps`` (1 keeps all)."""
    if not target_fps or native_fps <= 0:
        return 1
    return max(1, round(native_fps / target_fps))


def usable_frame_count(info: VideoInfo, target_fps: int | None = None, skip_start: int = 0,
                       skip_end: int = 0) -> int:
    """How many frames sampling can give after skipping the ends and striding to ``target_fps``."""
    remaining = info.frames - skip_start - skip_end
    if remaining <= 0:
        return 0
    return math.ceil(remaining / frame_stride(info.fps, target_fps))


def sample_frame_indices(info: VideoInfo, wanted: int, target_fps: int | None = None,
                         skip_start: int = 0, skip_end: int = 0) -> list[int]:
    """The indices of the ``wanted`` frames to read, from the start of the usable range."""
    available = usable_frame_count(info, target_fps, skip_start, skip_end)
    if wanted > available:
        raise VideoError(f"needs {wanted} frames, the clip gives {available} "
                         f"({info.frames} frames at {info.fps:g} fps)")
    stride = frame_stride(info.fps, target_fps)
    return [skip_start + stride * i for i in range(wanted)]


RESIZE_MODES = ("center_crop", "random_crop", "resize")


def read_frames(path: str | Path, indices: list[int]) -> torch.Tensor:
    """Decode the frames at ``indices`` as uint8 ``[F, H, W, 3]``; VideoError naming the clip.

    Only the requested frames are decoded (decord seeks), so sampling a short clip out of a
    long video costs the frames read, not the whole file.
    """
    import decord
    import torch

    path = Path(path)
    if not indices:
        raise ValueError(f"{path}: no frame indices to read")
    if not path.is_file():
        raise VideoError(f"{path}: no such file")
    try:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
        if min(indices) < 0 or max(indices) >= len(reader):
            raise VideoError(f"{path}: frame indices {min(indices)}..{max(indices)} outside the "
                             f"clip's {len(reader)} frames")
        frames = reader.get_batch(list(indices)).asnumpy()  # [F, H, W, 3] uint8
    except (decord.DECORDError, RuntimeError, IndexError) as err:
        message = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
        raise VideoError(f"{path}: cannot decode frames ({message})") from None
    return torch.from_numpy(frames)


def fit_to_size(frames: torch.Tensor, height: int, width: int, mode: str,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Fit uint8 ``[F, H, W, 3]`` frames to float32 ``[F, 3, height, width]`` in [-1, 1].

    "center_crop" and "random_crop" scale the clip (keeping its aspect ratio) just enough to
    cover the target, then cut the target out of the middle or at an offset drawn from
    ``generator``; "resize" stretches to the target, distorting the aspect ratio but keeping the
    whole picture. [-1, 1] is the range the CogVideoX VAE expects.
    """
    import torch
    import torch.nn.functional as F

    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {mode!r}; known: {', '.join(RESIZE_MODES)}")
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected frames of shape [F, H, W, 3], got {list(frames.shape)}")
    clip = frames.permute(0, 3, 1, 2).float()  # [F, 3, H, W]
    src_h, src_w = clip.shape[-2:]
    if mode == "resize":
        scaled_h, scaled_w = height, width
    else:
        scale = max(height / src_h, width / src_w)
        scaled_h = max(height, round(src_h * scale))
        scaled_w = max(width, round(src_w * scale))
    if (scaled_h, scaled_w) != (src_h, src_w):
        clip = F.interpolate(clip, size=(scaled_h, scaled_w), mode="bilinear",
                             align_corners=False, antialias=True)  # [F, 3, scaled_h, scaled_w]
    spare_h, spare_w = scaled_h - height, scaled_w - width
    if mode == "random_crop":
        top = int(torch.randint(0, spare_h + 1, (1,), generator=generator))
        left = int(torch.randint(0, spare_w + 1, (1,), generator=generator))
    else:
        top, left = spare_h // 2, spare_w // 2
    clip = clip[:, :, top:top + height, left:left + width]  # [F, 3, height, width]
    return (clip / 127.5 - 1.0).clamp_(-1.0, 1.0).contiguous()


def load_clip(path: str | Path, info: VideoInfo, frames: int, height: int, width: int, *,
              target_fps: int | None = None, skip_start: int = 0, skip_end: int = 0,
              mode: str = "center_crop", flip_probability: float = 0.0,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """One training clip: ``frames`` frames as float32 ``[F, 3, height, width]`` in [-1, 1].

    Frames are sampled from the start of the usable range (after the skips, strided to
    ``target_fps``), fitted with ``mode``, and mirrored left-right with ``flip_probability``.
    All randomness (crop offset, then flip) comes from ``generator``, in that order, so a
    seeded generator gives the same clip every time.
    """
    import torch

    if not 0.0 <= flip_probability <= 1.0:
        raise ValueError(f"flip_probability must be in [0, 1], got {flip_probability}")
    indices = sample_frame_indices(info, frames, target_fps, skip_start, skip_end)
    clip = fit_to_size(read_frames(path, indices), height, width, mode, generator)
    if flip_probability > 0 and float(torch.rand((), generator=generator)) < flip_probability:
        clip = clip.flip(-1)  # [F, 3, H, W], mirrored along W
    return clip
