"""Synthetic training clips: a coloured shape moving over a plain or gradient background.

They let the whole pipeline (data checks, latent preparation, training, validation) run with no
download: each clip is drawn with numpy, written as an H.264 mp4, and captioned with exactly
what it shows ("A red circle moving left to right on a blue background."), using the words the
tiny models' tokenizer was trained on. With ``control=True`` each clip also gets a control video
(the outline of its moving shape, see :meth:`ClipSpec.render_control`) for control training.
Everything is a pure function of the seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from cogvx.data.control import canny_frames
from cogvx.io import atomic_directory
from cogvx.models.tokenizer import COLOURS, MOTIONS, SHAPES

SIZES: tuple[tuple[int, int], ...] = ((64, 96), (96, 64), (64, 64), (80, 128))  # (height, width)
LENGTHS: tuple[int, ...] = (20, 24, 33, 40)  # frames; >= 17, the longest tiny-model default
SYNTHETIC_SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "ring")
SYNTHETIC_MOTIONS: tuple[str, ...] = ("moving left to right", "moving right to left", "falling down",
                                      "rising up", "growing", "shrinking", "bouncing")
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220),
    "yellow": (240, 220, 40), "purple": (140, 60, 200), "orange": (245, 140, 30),
    "white": (245, 245, 245), "black": (15, 15, 15), "pink": (245, 130, 190),
    "cyan": (40, 210, 220),
}
MIN_CONTRAST = 150.0  # RGB distance between the shape and every background colour
VIDEOS_DIR = "videos"
PROMPTS_FILE = "prompts.txt"
VIDEOS_FILE = "videos.txt"
CONTROLS_DIR = "controls"
CONTROL_VIDEOS_FILE = "control_videos.txt"  # DataConfig.control_videos_file's default
CONTROL_CANNY = (100, 200)  # Canny thresholds of the control outlines (data.canny_low / canny_high defaults)

assert set(COLOUR_RGB) == set(COLOURS), "every tokenizer colour needs an RGB value"
assert set(SYNTHETIC_SHAPES) <= set(SHAPES) and set(SYNTHETIC_MOTIONS) <= set(MOTIONS)


@dataclass(frozen=True)
class ClipSpec:
    """Everything that determines one synthetic clip; ``render()`` draws its frames."""

    index: int
    shape: str
    colour: str
    motion: str
    background: tuple[str, ...]  # one colour (plain) or two (vertical gradient, top to bottom)
    height: int
    width: int
    frames: int
    seed: int

    @property
    def path(self) -> str:
        """Where the clip goes, relative to the data set folder (as listed in videos.txt)."""
        return f"{VIDEOS_DIR}/clip_{self.index:03d}.mp4"

    @property
    def caption(self) -> str:
        """One sentence naming the colour, shape, motion and background the clip shows."""
        if len(self.background) == 1:
            scene = f"on {_article(self.background[0])} {self.background[0]} background"
        else:
            first, second = self.background
            scene = f"on {_article(first)} {first} to {second} gradient background"
        return f"{_article(self.colour).capitalize()} {self.colour} {self.shape} {self.motion} {scene}."

    @property
    def control_path(self) -> str:
        """Where the clip's control video goes, relative to the data set folder (control_videos.txt)."""
        return f"{CONTROLS_DIR}/clip_{self.index:03d}.mp4"

    def render(self) -> np.ndarray:
        """The clip's frames, ``[F, H, W, 3]`` uint8 (same spec, same arrays)."""
        rng = np.random.default_rng([self.seed, self.index, 1])
        return render_clip(self.shape, self.colour, self.motion, self.height, self.width,
                           self.frames, rng, background=self.background)

    def render_control(self) -> np.ndarray:
        """The clip's control video, ``[F, H, W, 3]`` uint8: Canny edges (white on black) of the
        shape's silhouette, frame for frame with :meth:`render`.

        The silhouette is the same shape drawn white on black with the clip's own generator (so
        the same size and path); edges of the clip itself could be empty, as some shape and
        background colours differ in hue but hardly in brightness, which Canny does not see.
        """
        rng = np.random.default_rng([self.seed, self.index, 1])
        silhouette = render_clip(self.shape, "white", self.motion, self.height, self.width,
                                 self.frames, rng, background="black")  # [F, H, W, 3]
        return canny_frames(silhouette, *CONTROL_CANNY)  # [F, H, W, 3]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def plan_clips(n: int, seed: int = 0, shapes: Sequence[str] = SYNTHETIC_SHAPES) -> list[ClipSpec]:
    """The specs of a data set of ``n`` clips.

    Sizes and lengths cycle so that every 16 clips cover each (size, length) pair once; shapes
    cycle too; colour, motion and background are drawn from a generator seeded by (seed, index),
    so clip i is the same whatever ``n`` is.
    """
    if not shapes:
        raise ValueError("shapes must name at least one shape")
    specs = []
    for index in range(n):
        rng = np.random.default_rng([seed, index])
        height, width = SIZES[index % len(SIZES)]
        frames = LENGTHS[(index + index // len(SIZES)) % len(LENGTHS)]
        colour = str(rng.choice(COLOURS))
        specs.append(ClipSpec(index=index, shape=shapes[index % len(shapes)], colour=colour,
                              motion=str(rng.choice(SYNTHETIC_MOTIONS)),
                              background=_pick_background(colour, rng), height=height,
                              width=width, frames=frames, seed=seed))
    return specs


def _pick_background(colour: str, rng: np.random.Generator) -> tuple[str, ...]:
    """A plain or two-colour background that contrasts with ``colour`` everywhere."""
    shape_rgb = np.array(COLOUR_RGB[colour], dtype=float)
    far = [c for c in COLOURS if np.linalg.norm(np.array(COLOUR_RGB[c]) - shape_rgb) > MIN_CONTRAST]
    if rng.random() < 0.5:
        return (str(rng.choice(far)),)
    # A gradient passes through every colour between its ends: keep the whole segment far away.
    pairs = [(a, b) for a in far for b in far
             if a != b and _segment_distance(shape_rgb, COLOUR_RGB[a], COLOUR_RGB[b]) > MIN_CONTRAST]
    a, b = pairs[int(rng.integers(len(pairs)))]
    return (a, b)


def _segment_distance(point: np.ndarray, start: Sequence[int], end: Sequence[int]) -> float:
    """Distance in RGB space from ``point`` to the segment ``start``-``end``."""
    a, b = np.array(start, dtype=float), np.array(end, dtype=float)
    t = np.clip(np.dot(point - a, b - a) / np.dot(b - a, b - a), 0.0, 1.0)
    return float(np.linalg.norm(a + t * (b - a) - point))


def render_clip(shape: str, colour: str, motion: str, height: int, width: int, frames: int,
                rng: np.random.Generator, *, background: str | Sequence[str] = "black") -> np.ndarray:
    """Draw ``frames`` frames of a ``colour`` ``shape`` doing ``motion``: ``[F, H, W, 3]`` uint8.

    ``background`` is one colour name, or two for a vertical gradient (top to bottom). ``rng``
    only jitters the size and the off-axis position, so the caption stays true.
    """
    for name, value, known in (("shape", shape, SYNTHETIC_SHAPES), ("motion", motion, SYNTHETIC_MOTIONS),
                               ("colour", colour, COLOURS)):
        if value not in known:
            raise ValueError(f"unknown {name} {value!r}; known: {', '.join(known)}")
    background = (background,) if isinstance(background, str) else tuple(background)
    if height < 16 or width < 16 or frames < 1 or len(background) not in (1, 2):
        raise ValueError(f"cannot render {frames} frames of {height}x{width} on {background}")
    canvas = _background(background, height, width)  # [H, W, 3] float
    radius = 0.18 * min(height, width) * rng.uniform(0.9, 1.1)
    jitter = rng.uniform(-0.5, 0.5)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5  # pixel centres, [H, W] each
    rgb = np.array(COLOUR_RGB[colour], dtype=np.float64)
    out = np.empty((frames, height, width, 3), dtype=np.uint8)  # [F, H, W, 3]
    for f in range(frames):
        t = f / (frames - 1) if frames > 1 else 0.0
        cx, cy, scale = _trajectory(motion, t, height, width, radius, jitter)
        alpha = _coverage(shape, xs - cx, ys - cy, radius * scale)[..., None]  # [H, W, 1]
        out[f] = np.rint(canvas * (1.0 - alpha) + rgb * alpha).astype(np.uint8)
    return out


def _background(colours: tuple[str, ...], height: int, width: int) -> np.ndarray:
    """A plain ``[H, W, 3]`` canvas, or a vertical gradient between two colours."""
    for name in colours:
        if name not in COLOUR_RGB:
            raise ValueError(f"unknown background colour {name!r}; known: {', '.join(COLOURS)}")
    top = np.array(COLOUR_RGB[colours[0]], dtype=np.float64)
    bottom = np.array(COLOUR_RGB[colours[-1]], dtype=np.float64)
    weight = np.linspace(0.0, 1.0, height)[:, None, None]  # [H, 1, 1]
    return np.broadcast_to(top * (1 - weight) + bottom * weight, (height, width, 3))


def _trajectory(motion: str, t: float, height: int, width: int, radius: float,
                jitter: float) -> tuple[float, float, float]:
    """Centre (x, y) and scale of the shape at time ``t`` in [0, 1]; it stays inside the frame."""
    bound = 1.35 * radius  # the largest extent of any shape at scale 1
    span_x, span_y = width - 2 * bound, height - 2 * bound
    cx, cy = width / 2 + jitter * span_x / 2, height / 2 + jitter * span_y / 2
    if motion == "moving left to right":
        return bound + t * span_x, cy, 1.0
    if motion == "moving right to left":
        return width - bound - t * span_x, cy, 1.0
    if motion == "falling down":
        return cx, bound + t * span_y, 1.0
    if motion == "rising up":
        return cx, height - bound - t * span_y, 1.0
    if motion == "growing":
        return cx, cy, 0.45 + 0.55 * t
    if motion == "shrinking":
        return cx, cy, 1.0 - 0.55 * t
    if motion == "bouncing":  # two bounces off the bottom edge
        return cx, height - bound - span_y * abs(math.sin(2 * math.pi * t)), 1.0
    raise ValueError(f"unknown motion {motion!r}")


def _coverage(shape: str, dx: np.ndarray, dy: np.ndarray, radius: float) -> np.ndarray:
    """How much of each pixel the shape covers, in [0, 1] (a one-pixel soft edge).

    ``dx``/``dy`` are offsets from the shape's centre; each shape is a boundary radius as a
    function of the angle, so the edge is where the distance from the centre crosses it.
    """
    dist = np.hypot(dx, dy)
    theta = np.arctan2(dy, dx)  # image coordinates: y down, so -pi/2 points up
    if shape == "circle":
        edge = dist - radius
    elif shape == "ring":
        edge = np.abs(dist - 0.72 * radius) - 0.28 * radius
    elif shape == "square":
        phi = np.mod(theta + math.pi / 4, math.pi / 2) - math.pi / 4  # angle from nearest side's normal
        edge = dist - 0.85 * radius / np.cos(phi)
    elif shape == "triangle":  # pointing up: side normals at 90, 210 and 330 degrees
        phi = np.mod(theta - math.pi / 2 + math.pi / 3, 2 * math.pi / 3) - math.pi / 3
        edge = dist - 0.65 * radius / np.cos(phi)
    elif shape == "star":
        edge = dist - _star_radius(theta, 1.3 * radius, 0.55 * radius)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SYNTHETIC_SHAPES)}")
    return np.clip(0.5 - edge, 0.0, 1.0)


def _star_radius(theta: np.ndarray, outer: float, inner: float) -> np.ndarray:
    """Boundary radius of a five-pointed star (one tip up) along each angle ``theta``."""
    half = math.pi / 5  # 36 degrees between a tip and the next inner corner
    phi = np.abs(np.mod(theta + math.pi / 2 + half, 2 * half) - half)  # angle from nearest tip
    tip = np.array([outer, 0.0])
    corner = inner * np.array([math.cos(half), math.sin(half)])
    edge = corner - tip
    # The ray at angle phi meets the straight edge tip-corner at rho: rho * u = tip + s * edge.
    cross_tip_edge = tip[0] * edge[1] - tip[1] * edge[0]
    return cross_tip_edge / (np.cos(phi) * edge[1] - np.sin(phi) * edge[0])


def write_mp4(path: str | Path, frames: np.ndarray, fps: int) -> Path:
    """Encode ``[F, H, W, 3]`` uint8 frames as H.264 (yuv420p) at ``fps``."""
    import imageio.v2 as imageio

    imageio.mimwrite(str(path), list(frames), format="FFMPEG", fps=fps, codec="libx264",
                     pixelformat="yuv420p", quality=8, macro_block_size=1,
                     ffmpeg_log_level="error", output_params=["-fflags", "+bitexact"])
    return Path(path)


def make_synthetic_dataset(out_dir: str | Path, n: int, seed: int = 0, fps: int = 8, *,
                           shapes: Sequence[str] = SYNTHETIC_SHAPES, control: bool = False) -> Path:
    """Write ``n`` captioned clips to ``out_dir`` (videos/, prompts.txt, videos.txt); return it.

    ``control`` also writes a control video per clip (controls/, same frame count, size and fps;
    see :meth:`ClipSpec.render_control`) and control_videos.txt, aligned with videos.txt, for
    data.control=file. Everything is written into a staging folder that replaces ``out_dir``
    only once complete, so an interrupted or failed run leaves the previous data set (or none),
    never half of one.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if fps < 1:
        raise ValueError(f"fps must be >= 1, got {fps}")
    specs = plan_clips(n, seed, shapes)
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as staging:
        (staging / VIDEOS_DIR).mkdir()
        for spec in specs:
            write_mp4(staging / spec.path, spec.render(), fps)
        (staging / PROMPTS_FILE).write_text("".join(f"{s.caption}\n" for s in specs), encoding="utf-8")
        (staging / VIDEOS_FILE).write_text("".join(f"{s.path}\n" for s in specs), encoding="utf-8")
        if control:
            _write_controls(staging, specs, fps)
    return out_dir


def _write_controls(folder: Path, specs: Sequence[ClipSpec], fps: int) -> None:
    """The control videos of ``specs`` (controls/) and control_videos.txt, line by line with videos.txt."""
    (folder / CONTROLS_DIR).mkdir()
    for spec in specs:
        write_mp4(folder / spec.control_path, spec.render_control(), fps)
    (folder / CONTROL_VIDEOS_FILE).write_text("".join(f"{s.control_path}\n" for s in specs), encoding="utf-8")
