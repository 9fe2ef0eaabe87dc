"""Video decoding with decord: probing clips and choosing which frames to read."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from cogvx.errors import CogvxError


class VideoError(CogvxError):
    """A clip cannot be read (missing, empty, corrupt, or not a video)."""


@dataclass(frozen=True)
class VideoInfo:
    """What decoding needs to know about a clip before reading any frame."""

    frames: int
    fps: float
    height: int
    width: int


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
