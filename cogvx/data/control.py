"""Control videos computed from the clips themselves: Canny edge maps (data.control = canny).

Control training steers a generated video with a second video of the same length (edges,
depth, pose). Edges need no model: OpenCV's Canny detector, run on every frame, gives a video
of white outlines on black that carries the clip's layout and motion but not its colours, so
the model learns to follow the outlines. :func:`canny_frames` works on decoded uint8 frames
(synthetic control clips, `cogvx generate --control-kind canny`); :func:`canny_video` on the
[-1, 1] tensors the training pipeline decodes clips into.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from cogvx.errors import CogvxError

if TYPE_CHECKING:
    import torch

OPENCV_HINT = "pip install opencv-python-headless (a cogvx dependency; reinstall cogvx to get it)"


def _opencv():
    """The cv2 module; a CogvxError saying how to install it when it is missing."""
    try:
        import cv2
    except ImportError as err:
        raise CogvxError(f"data.control=canny needs OpenCV, which cannot be imported ({err}); "
                         f"{OPENCV_HINT}") from None
    return cv2


def _check_thresholds(low: int, high: int) -> None:
    """Refuse thresholds Canny would silently misread (high below low, outside 0-255 gradients)."""
    if not (0 <= low < high <= 255):
        raise CogvxError(f"Canny thresholds must satisfy 0 <= low < high <= 255, got low={low}, "
                         f"high={high}; set data.canny_low / data.canny_high")


def canny_frames(frames: np.ndarray, low: int, high: int) -> np.ndarray:
    """Canny edges of RGB frames: ``[F, H, W, 3]`` uint8 in, ``[F, H, W, 3]`` uint8 out (0 or 255).

    Each frame is converted to grayscale and run through ``cv2.Canny(gray, low, high)``; the
    one-channel edge map is repeated on the three channels so the result is a video like any
    other (the VAE encodes RGB).
    """
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames [F, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
    _check_thresholds(low, high)
    cv2 = _opencv()
    edges = np.empty(frames.shape[:3], dtype=np.uint8)  # [F, H, W]
    for index, frame in enumerate(frames):
        gray = cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY)  # [H, W]
        edges[index] = cv2.Canny(gray, low, high)
    return np.repeat(edges[..., None], 3, axis=-1)  # [F, H, W, 1] -> [F, H, W, 3]


def canny_video(video: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """Canny edges of a decoded clip: float ``[F, C=3, H, W]`` in [-1, 1] in, same shape, dtype
    and device out, edges at 1.0 and the rest at -1.0 (the range the VAE expects)."""
    import torch

    if video.ndim != 4 or video.shape[1] != 3:
        raise ValueError(f"expected a video [F, 3, H, W], got shape {tuple(video.shape)}")
    pixels = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # [F, 3, H, W]
    frames = pixels.permute(0, 2, 3, 1).cpu().numpy()  # [F, H, W, 3]
    edges = torch.from_numpy(canny_frames(frames, low, high))  # [F, H, W, 3] uint8, 0 or 255
    edges = edges.permute(0, 3, 1, 2)  # [F, 3, H, W]
    return (edges.float() / 127.5 - 1.0).to(device=video.device, dtype=video.dtype)
