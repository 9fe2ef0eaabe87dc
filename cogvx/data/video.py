"""Video decoding with decord: probing clips, choosing which frames to read, reading them as
tensors and fitting them to a training size."""

from __future__ import annotations

import errno
import logging
import math
import os
import random
import re
import stat
import sys
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

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

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- odd files

_SPECIAL_FILES = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
                  (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                  (stat.S_ISSOCK, "a socket"))
NAME_MAX = 255  # bytes in one file name on ext4, XFS, btrfs, NTFS, APFS


def file_problem(path: Path, root: Path | None = None, what: str = "video file") -> str | None:
    """Why ``path`` is not a readable, non-empty regular file (a phrase), or None when it is.

    Every filesystem error is a reason, not an exception: a missing file or folder on the way, a
    file used as a folder, a symlink loop, a name too long, no permission. Only a regular file
    passes: a folder, a FIFO (opening one waits for a writer forever), a device or a socket is
    named as such and never opened. ``root``, a folder above ``path``, shortens the folder named
    when one is missing; ``what`` is the noun for what the file should be.
    """
    try:
        info = os.stat(path)
    except OSError as err:
        return _os_error_reason(Path(path), err, root)
    except ValueError:  # os.stat refuses a NUL in the path
        return "the path contains a NUL character"
    kind = next((name for test, name in _SPECIAL_FILES if test(info.st_mode)), None)
    if kind:
        return f"{kind}, not a {what}"
    if not stat.S_ISREG(info.st_mode):
        return f"not a regular file (not a {what})"
    if info.st_size == 0:
        return "empty file (0 bytes)"
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))
    except OSError as err:
        return _os_error_reason(Path(path), err, root)
    return None


def _os_error_reason(path: Path, err: OSError, root: Path | None) -> str:
    """A phrase for an OSError met while looking at ``path`` (see :func:`file_problem`)."""
    if err.errno == errno.ENOENT:
        if os.path.islink(path):
            return f"broken symlink (it points to {os.readlink(path)}, which does not exist)"
        missing = next((p for p in _ancestors(path, root) if not os.path.lexists(p)), None)
        return f"file not found (folder {_shown(missing, root)} does not exist)" if missing else "file not found"
    if err.errno == errno.ENOTDIR:
        blocker = next((p for p in _ancestors(path, root) if os.path.lexists(p) and not os.path.isdir(p)), None)
        where = _shown(blocker, root) if blocker else "part of the path"
        return f"not found: {where} is a file, not a folder"
    if err.errno == errno.ELOOP:
        return "symlink loop (a link on the path points back to itself)"
    if err.errno == errno.ENAMETOOLONG:
        longest = max(len(os.fsencode(part)) for part in path.parts)
        if longest > NAME_MAX:
            return (f"file name too long for the filesystem ({longest} bytes in one name; "
                    f"the limit is {NAME_MAX}): rename it")
        return f"path too long for the filesystem ({len(os.fsencode(path))} bytes)"
    if err.errno in (errno.EACCES, errno.EPERM):
        return "permission denied (the file, or a folder on its way, cannot be read)"
    return f"cannot be read ({err.strerror or errno.errorcode.get(err.errno, err.errno)})"


def _ancestors(path: Path, root: Path | None) -> list[Path]:
    """The folders above ``path``, outermost first, below ``root`` when it is one of them."""
    folders = list(reversed(path.parents))
    if root is not None and root in folders:
        folders = folders[folders.index(root) + 1:]
    return folders


def _shown(path: Path, root: Path | None) -> str:
    """``path`` relative to ``root`` where it lies inside it, for messages."""
    return str(path.relative_to(root)) if root is not None and path.is_relative_to(root) else str(path)


# --------------------------------------------------------------------------- decoder messages

_STDERR_LOCK = threading.RLock()
MAX_CAPTURED_BYTES = 64 * 1024


@contextmanager
def decoder_stderr() -> Iterator[list[str]]:
    """Capture what is written to file descriptor 2 inside the block (ffmpeg's and decord's logs).

    ffmpeg and decord print from C, straight to fd 2 and below Python's ``sys.stderr``, so their
    lines would reach the console ahead of cogvx's own report. The yielded list receives the
    captured lines when the block ends: callers turn them into a reason (:func:`decoder_reason`);
    what a successful decode printed goes to the debug log only. fd 2 belongs to the whole
    process, so the lock keeps two threads from swapping it under each other (DataLoader workers
    are processes, each with its own).
    """
    lines: list[str] = []
    with _STDERR_LOCK, tempfile.TemporaryFile() as sink:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield lines
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            lines += sink.read(MAX_CAPTURED_BYTES).decode("utf-8", "replace").splitlines()
    if lines:
        log.debug("decoder output: %s", " | ".join(lines))


# What decord or ffmpeg says (in the exception or on stderr) -> what it means, first match wins.
_DECODER_REASONS = (
    ("moov atom not found", "the mp4 has no index ('moov' atom): the file is truncated, or not an mp4"),
    ("partial file", "the file is truncated (it ends before its video data does)"),
    ("Invalid NAL unit size", "the video stream is damaged (its frames cannot be decoded)"),
    ("Error splitting the input into NAL units", "the video stream is damaged (its frames cannot be decoded)"),
    ("cannot find video stream", None),  # audio only, or a broken file: see _no_video_stream
    ("Failed to measure duration/frame-count", "its frame count cannot be measured (broken metadata); "
     "re-encode it, e.g. ffmpeg -i IN -c:v libx264 -pix_fmt yuv420p OUT.mp4"),
    ("Invalid data found when processing input", "ffmpeg recognizes no video format in it"),
    ("av_read_frame failed", "its video data cannot be read (a truncated or damaged file)"),
    ("Cannot create buffer source", "the video stream is damaged (its first frame cannot be decoded)"),
)
_DECORD_LOCATION = re.compile(r"^\[[\d:]+\] \S+:\d+: ")  # "[06:08:02] /src/video/video_reader.cc:151: "
_DECORD_CHECK = re.compile(r"Check failed: .*?\(-?\d+ vs\. -?\d+\)\s*")
_FFMPEG_PREFIX = re.compile(r"^\[[^\]]+ @ 0x[0-9a-fA-F]+\] ")  # "[mov,mp4,m4a @ 0x55bf9c402440] "
MAX_REASON_CHARS = 300


def decoder_reason(path: Path, error: BaseException, printed: list[str]) -> str:
    """A whole, readable phrase for why decord failed on ``path``.

    Raw decoder messages are cryptic and long ("Check failed: st_nb >= 0 (-1381258232 vs. 0)
    ERROR cannot find video stream with wanted index: -1"); this looks at the file's first bytes
    (an image, a GIF, a text file named .mp4), then at known decord/ffmpeg messages in the
    exception and in ``printed`` (captured by :func:`decoder_stderr`), then cleans up the raw one.
    """
    sniffed = _not_a_video(path)
    if sniffed:
        return sniffed
    text = " ".join([str(error), *printed])
    for pattern, reason in _DECODER_REASONS:
        if pattern in text:
            return reason or _no_video_stream(path)
    return _plain_decoder_message(error, printed)


_MAGIC = ((b"GIF87a", "GIF is not a supported video; convert it to mp4, e.g. ffmpeg -i IN.gif -pix_fmt yuv420p OUT.mp4"),
          (b"GIF89a", "GIF is not a supported video; convert it to mp4, e.g. ffmpeg -i IN.gif -pix_fmt yuv420p OUT.mp4"),
          (b"\x89PNG\r\n\x1a\n", "it is a PNG image, not a video"),
          (b"\xff\xd8\xff", "it is a JPEG image, not a video"),
          (b"version https://git-lfs", "it is a Git LFS pointer, not the video itself; fetch the files (git lfs pull)"))


def _not_a_video(path: Path) -> str | None:
    """What the file's first bytes show it to be instead of a video (an image, a text file), or None."""
    import codecs

    try:
        with open(path, "rb") as handle:
            head = handle.read(512)
    except OSError:  # gone since it was probed: the decoder's own reason stands
        return None
    for magic, reason in _MAGIC:
        if head.startswith(magic):
            return reason
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "it is a WebP image, not a video"
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return None
    if not text or not all(ch.isprintable() or ch in "\t\r\n" for ch in text):
        return None
    if "<html" in text.lower() or "<!doctype html" in text.lower():
        return "it is an HTML page, not a video (a failed download?)"
    return "it is a text file, not a video"


def _no_video_stream(path: Path) -> str:
    """"no video stream", saying "audio only" when decord finds an audio stream in the file."""
    import decord

    with decoder_stderr():
        try:
            decord.AudioReader(str(path), ctx=decord.cpu(0), sample_rate=100, mono=True)
            has_audio = True
        except (decord.DECORDError, RuntimeError):
            has_audio = False
    return "no video stream (audio only)" if has_audio else "no video stream (a truncated or damaged file?)"


def _plain_decoder_message(error: BaseException, printed: list[str]) -> str:
    """decord's message (or ffmpeg's last line) without source locations and check expressions."""
    lines = [_DECORD_CHECK.sub("", _DECORD_LOCATION.sub("", line)).strip() for line in str(error).splitlines()]
    lines += [_FFMPEG_PREFIX.sub("", _DECORD_LOCATION.sub("", line)).strip() for line in reversed(printed)]
    message = next((line for line in lines if line), type(error).__name__)
    if len(message) > MAX_REASON_CHARS:
        message = message[:MAX_REASON_CHARS].rsplit(" ", 1)[0] + " ..."
    return message


def require_regular_file(path: Path) -> None:
    """VideoError with :func:`file_problem`'s reason unless ``path`` is a readable regular file
    (so that no decoder ever opens a FIFO, a device or a folder)."""
    problem = file_problem(path)
    if problem:
        raise VideoError(f"{path}: {problem}")


def probe_video(path: str | Path) -> VideoInfo:
    """Frame count, frame rate and size of a clip; VideoError when it cannot be decoded.

    Only a regular file is opened (a FIFO or a device would block or never end); what ffmpeg and
    decord print is captured (:func:`decoder_stderr`) and turned into the error's reason.
    """
    import decord

    path = Path(path)
    require_regular_file(path)
    with decoder_stderr() as printed:
        reader = None
        try:
            reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
            frames = len(reader)
            height, width = reader[0].shape[:2] if frames else (0, 0)
            fps = float(reader.get_avg_fps())
            error = None
        except (decord.DECORDError, RuntimeError, IndexError) as err:
            error = err
        finally:
            del reader  # decord decodes ahead on a thread: stop it while its messages are still captured
    if error is not None:
        raise VideoError(f"{path}: not a readable video: {decoder_reason(path, error, printed)}") from None
    if frames == 0 or height == 0 or width == 0:
        raise VideoError(f"{path}: no frames ({frames} frames, {width}x{height})")
    if height * width > MAX_CLIP_PIXELS:
        raise VideoError(f"{path}: {width}x{height} frames are larger than 8K (7680x4320); downscale the clip "
                         "first, e.g. ffmpeg -i IN -vf scale=-2:1080 OUT")
    return VideoInfo(frames=frames, fps=fps if math.isfinite(fps) and fps > 0 else 0.0,
                     height=int(height), width=int(width))


FRAME_SAMPLING_MODES = ("start", "evenly", "random")
# A clip within 1% of the target rate (29.97 fps for 30) already plays at it: no frame is dropped.
RATE_TOLERANCE = 0.01


def frame_step(native_fps: float, target_fps: int | None) -> float:
    """Source frames per sampled frame, so that a clip plays at ``target_fps``.

    ``native_fps / target_fps`` for a clip faster than the target; frames are then taken at their
    time stamps (30 fps at 8: frames 0, 4, 8, 11, 15, ...), so every rate gives the same motion
    speed, where a whole stride (every 4th frame) would play at 7.5 fps. 1.0 keeps every frame:
    no target, an unknown rate (0), or a clip no faster than the target (within RATE_TOLERANCE);
    frames are never repeated to slow a clip down.
    """
    if not target_fps or native_fps <= target_fps * (1 + RATE_TOLERANCE):
        return 1.0
    return native_fps / target_fps


def _source_offset(position: int, step: float) -> int:
    """The source frame (counted from the window's start) nearest the time of sampled frame ``position``."""
    return math.floor(position * step + 0.5)


def usable_frame_count(info: VideoInfo, target_fps: int | None = None, skip_start: int = 0,
                       skip_end: int = 0) -> int:
    """How many frames at ``target_fps`` the clip gives after skipping its ends (see frame_step)."""
    remaining = info.frames - skip_start - skip_end
    if remaining <= 0:
        return 0
    step = frame_step(info.fps, target_fps)
    count = max(1, math.ceil((remaining - 0.5) / step))  # positions whose source frame is inside
    while count > 1 and _source_offset(count - 1, step) >= remaining:  # float rounding at the edge
        count -= 1
    while _source_offset(count, step) < remaining:
        count += 1
    return count


def window_span(wanted: int, step: float) -> int:
    """Source frames covered by a window of ``wanted`` frames taken ``step`` source frames apart."""
    return _source_offset(wanted - 1, step) + 1


def sample_frame_indices(info: VideoInfo, wanted: int, target_fps: int | None = None,
                         skip_start: int = 0, skip_end: int = 0, *, mode: str = "start",
                         seed: int = 0) -> list[int]:
    """The indices of the ``wanted`` frames to read from the usable range (after the skips).

    ``mode`` "start": a window at ``target_fps`` from the start of the range (the rest of a long
    clip is cut); "random": the same window at an offset drawn from ``seed`` (the caller's per-clip
    seed, so a re-run reads the same frames); "evenly": ``wanted`` frames spread evenly from the
    first to the last frame of the range, whatever the clip's length and rate (``target_fps`` is
    ignored), as the reference trainers sample.
    """
    if mode not in FRAME_SAMPLING_MODES:
        raise ValueError(f"unknown frame sampling {mode!r}; known: {', '.join(FRAME_SAMPLING_MODES)}")
    remaining = info.frames - skip_start - skip_end
    if mode == "evenly":
        if wanted > remaining:
            raise VideoError(f"needs {wanted} frames, the clip gives {max(0, remaining)} "
                             f"({info.frames} frames at {info.fps:g} fps)")
        gap = (remaining - 1) / (wanted - 1) if wanted > 1 else 0.0
        return [skip_start + math.floor(i * gap + 0.5) for i in range(wanted)]
    available = usable_frame_count(info, target_fps, skip_start, skip_end)
    if wanted > available:
        raise VideoError(f"needs {wanted} frames, the clip gives {available} "
                         f"({info.frames} frames at {info.fps:g} fps)")
    step = frame_step(info.fps, target_fps)
    start = skip_start
    if mode == "random":
        start += random.Random(seed).randint(0, remaining - window_span(wanted, step))
    return [start + _source_offset(i, step) for i in range(wanted)]


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
    require_regular_file(path)
    with decoder_stderr() as printed:
        reader = None
        try:
            reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
            count = len(reader)
            frames = None
            if min(indices) >= 0 and max(indices) < count:
                frames = reader.get_batch(list(indices)).asnumpy()  # [F, H, W, 3] uint8
            error = None
        except (decord.DECORDError, RuntimeError, IndexError) as err:
            error = err
        finally:
            del reader  # decord decodes ahead on a thread: stop it while its messages are still captured
    if error is not None:
        raise VideoError(f"{path}: cannot decode frames: {decoder_reason(path, error, printed)}") from None
    if frames is None:
        raise VideoError(f"{path}: frame indices {min(indices)}..{max(indices)} outside the "
                         f"clip's {count} frames")
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
              generator: torch.Generator | None = None, frame_sampling: str = "start",
              sample_seed: int = 0) -> torch.Tensor:
    """One training clip: ``frames`` frames as float32 ``[F, 3, height, width]`` in [-1, 1].

    Frames are sampled from the usable range (after the skips) by ``frame_sampling`` at
    ``target_fps`` (see :func:`sample_frame_indices`; "random" draws its window from
    ``sample_seed``), fitted with ``mode``, and mirrored left-right with ``flip_probability``.
    All randomness of the picture (crop offset, then flip) comes from ``generator``, in that
    order, so a seeded generator gives the same clip every time.
    """
    import torch

    if not 0.0 <= flip_probability <= 1.0:
        raise ValueError(f"flip_probability must be in [0, 1], got {flip_probability}")
    indices = sample_frame_indices(info, frames, target_fps, skip_start, skip_end,
                                   mode=frame_sampling, seed=sample_seed)
    clip = fit_to_size(read_frames(path, indices), height, width, mode, generator)
    if flip_probability > 0 and float(torch.rand((), generator=generator)) < flip_probability:
        clip = clip.flip(-1)  # [F, 3, H, W], mirrored along W
    return clip
