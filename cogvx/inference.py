"""Rendering videos with a loaded CogVideoX pipeline and writing them as mp4."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
from PIL import Image

from cogvx.errors import CogvxError
from cogvx.io import atomic_file

if TYPE_CHECKING:
    from cogvx.config import Config


@dataclass(frozen=True)
class RenderSettings:
    """The size of a rendered clip and the rate its mp4 plays at."""

    frames: int
    height: int
    width: int
    fps: int


def render_settings(config: Config, frames: int | None = None, height: int | None = None,
                    width: int | None = None, fps: int | None = None) -> RenderSettings:
    """What a render uses, by one rule for `cogvx generate`, in-training validation and `cogvx check`.

    Size: the value asked for (a generate request), else validate.frames/height/width, else the
    first training bucket: the shape the model is trained at, so a LoRA is seen at its own size.
    Rate: the one asked for, else validate.fps, else the rate training took the clips' frames at
    (data.fps, Config.sample_fps), else the model's own, so motion plays at the speed training saw.
    One rule, because the clip `cogvx check` proves runs before training, the clips validation
    writes during it and the one generate renders afterwards should have the same size and speed
    for the same config; they used three different fallbacks before. An unset (None or 0) value
    falls through to the next.
    """
    validate, bucket = config.validate_, config.buckets[0]
    return RenderSettings(frames=frames or validate.frames or bucket.frames,
                          height=height or validate.height or bucket.height,
                          width=width or validate.width or bucket.width,
                          fps=fps or validate.fps or config.sample_fps or config.spec.fps)


def pick_device() -> torch.device:
    """The first CUDA device when there is one, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def prepare_for_device(pipe, device: torch.device, offload: str = "model", vae_tiling: bool = True,
                       compile_blocks: bool = False, compile_vae: bool = False) -> None:
    """Place the pipeline for rendering (validate.offload / vae_tiling / compile / compile_vae).

    CPU: everything on the CPU. GPU: ``model`` offload keeps one component (T5, transformer,
    VAE) on the GPU at a time, ``sequential`` one layer, ``none`` all of them; tiling decodes
    the video in spatial tiles so the VAE needs a few GiB instead of tens.
    """
    if compile_blocks and not _blocks_compiled(pipe.transformer):
        from cogvx.models.performance import compile_blocks as compile_transformer_blocks

        compile_transformer_blocks(pipe.transformer)
    if device.type != "cuda":
        pipe.to(device)
    else:
        _place_on_gpu(pipe, device, offload, vae_tiling)
    if compile_vae:
        compile_vae_decoder(pipe.vae, dynamic=pipe.vae.use_tiling)


def _place_on_gpu(pipe, device: torch.device, offload: str, vae_tiling: bool) -> None:
    if offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif offload == "text_encoder":
        stream_text_encoder(pipe.text_encoder, device)
        for name in ("transformer", "vae"):
            getattr(pipe, name).to(device)
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe.to(device)
    if vae_tiling:
        pipe.vae.enable_tiling()
    pipe.vae.enable_slicing()


def stream_text_encoder(text_encoder, device: torch.device) -> None:
    """Keep the T5 encoder in pinned CPU memory and bring it to ``device`` one block at a time
    while it encodes, the next block's copy on a side stream (diffusers' group offloading), so
    that none of its ~9.5 GB (T5-XXL, bf16) stays on the GPU and nothing else has to move: the
    transformer and the VAE stay put (validate.offload = text_encoder)."""
    from diffusers.hooks import apply_group_offloading
    from diffusers.hooks.group_offloading import _is_group_offload_enabled

    stack = getattr(text_encoder, "encoder", text_encoder)  # T5's blocks are in encoder.block; its embedding is tied
    if _is_group_offload_enabled(stack):  # placed again (a second render setting on the same pipeline)
        return
    apply_group_offloading(stack, onload_device=device, offload_type="block_level", num_blocks_per_group=1,
                           use_stream=device.type == "cuda")


def vae_tile_settings(vae, latent_height: int, latent_width: int, rows: int, cols: int) -> dict[str, Any]:
    """``enable_tiling`` arguments that make diffusers' tiled decode of a latent frame of
    ``latent_height`` x ``latent_width`` cut it into ``rows`` x ``cols`` tiles (fewer where a
    side has fewer latent pixels than that), each overlapping the next by about diffusers' own
    share (1/6 of a tile's height, 1/5 of its width), with seams that line up."""
    scale = spatial_scale(vae)
    tile_height, overlap_height = tile_span(latent_height, rows, 1 / 6, scale)
    tile_width, overlap_width = tile_span(latent_width, cols, 1 / 5, scale)
    return {"tile_sample_min_height": tile_height * scale, "tile_sample_min_width": tile_width * scale,
            "tile_overlap_factor_height": overlap_height, "tile_overlap_factor_width": overlap_width}


def tile_span(latents: int, tiles: int, share: float, scale: int) -> tuple[int, float]:
    """One axis of :func:`vae_tile_settings`: a tile's length in latent pixels and its overlap
    factor. diffusers steps by ``int(tile * (1 - factor))`` latent pixels and blends the last
    ``int(tile * scale * factor)`` decoded pixels of a tile into the next; both must come out
    whole (step + overlap = tile) or the blend misses the overlap by a few pixels, a seam."""
    if tiles <= 1 or latents <= 1:
        return 2 * max(latents, 1), share  # one tile: the first step already passes the end
    step = -(-latents // min(tiles, latents))
    first = max(1, round(step * share / (1 - share)))
    for overlap in (*range(first, step + 1), *range(first - 1, 0, -1)):
        tile = step + overlap
        factor = overlap / tile
        if int(tile * (1 - factor)) == step and int(tile * scale * factor) == overlap * scale:
            return tile, factor
    raise ValueError(f"no whole tiling of {latents} latent pixels into {tiles}")  # not reached: overlap = step works


def fit_vae_tiles(vae, height: int, width: int, tiles: tuple[int, int] | None) -> None:
    """Before a render of ``height`` x ``width`` pixels: with tiling on and validate.vae_tiles
    set, size the decode's tiles for that grid (:func:`vae_tile_settings`)."""
    if tiles is None or not getattr(vae, "use_tiling", False):
        return
    scale = spatial_scale(vae)
    vae.enable_tiling(**vae_tile_settings(vae, height // scale, width // scale, *tiles))


def spatial_scale(vae) -> int:
    """Pixels per latent pixel along height and width: diffusers' rule for its tiles."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def compile_vae_decoder(vae, dynamic: bool) -> None:
    """torch.compile the VAE decoder in place (module names kept). A tiled decode sees several
    tile shapes (the last row and column are shorter): ``dynamic`` sizes give one graph for
    them instead of one per shape, each recompiled; untiled, the frame batches give two static
    graphs (the first, without the causal convolutions' cache, and the rest)."""
    if not _is_compiled(vae.decoder):
        vae.decoder.compile(dynamic=dynamic)


def _is_compiled(module: torch.nn.Module) -> bool:
    """Whether ``module.compile()`` was called on the module."""
    return getattr(module, "_compiled_call_impl", None) is not None


def _blocks_compiled(transformer) -> bool:
    return any(_is_compiled(block) for block in transformer.transformer_blocks)


def render_cache_config(kind: str, threshold: float, current_timestep: Callable[[], Any], guidance_scale: float):
    """diffusers' cache config for one validate.cache kind, with the settings diffusers gives
    for CogVideoX (the examples in its PyramidAttentionBroadcastConfig / apply_faster_cache docs).

    ``current_timestep`` is the pipeline's own (``lambda: pipe.current_timestep``): PAB and
    FasterCache decide by timestep. FasterCache expects the guidance batch [uncond, cond] the
    CogVideoX pipelines build; at guidance_scale <= 1 they build none, so it runs as for a
    guidance-distilled model (attention reuse only) instead of splitting a batch of one.
    """
    from diffusers import FasterCacheConfig, FirstBlockCacheConfig, PyramidAttentionBroadcastConfig

    if kind == "first_block":
        return FirstBlockCacheConfig(threshold=threshold)
    if kind == "pyramid_broadcast":
        return PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(100, 800),
            current_timestep_callback=current_timestep)
    if kind == "faster":
        return FasterCacheConfig(
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 681),
            low_frequency_weight_update_timestep_range=(99, 641), high_frequency_weight_update_timestep_range=(-1, 301),
            spatial_attention_block_identifiers=("transformer_blocks",), attention_weight_callback=lambda _: 0.3,
            tensor_format="BFCHW", is_guidance_distilled=guidance_scale <= 1.0, current_timestep_callback=current_timestep)
    raise ValueError(f"unknown render cache kind {kind!r}")


def apply_render_cache(transformer, config: Config, current_timestep: Callable[[], Any],
                       guidance_scale: float) -> bool:
    """Enable validate.cache on ``transformer`` through diffusers' ``enable_cache``; whether one was.

    Call it before the pipeline's offload hooks go on and :func:`remove_render_cache` after they
    come off: FasterCache wraps the transformer's own forward, which accelerate's hooks replace
    and restore around every pipeline call. FasterCache on compiled blocks is refused (its hooks
    recompile each block at every step until torch.compile gives up; config.py says so too).
    """
    validate = config.validate_
    if validate.cache == "none":
        return False
    if validate.cache == "faster" and _blocks_compiled(transformer):
        raise CogvxError("validate.cache = faster cannot render with torch.compile'd transformer blocks "
                         "(train.compile = blocks, validate.compile or a preset): use validate.cache = "
                         "first_block or pyramid_broadcast, or leave the blocks uncompiled")
    cache = render_cache_config(validate.cache, validate.cache_threshold, current_timestep, guidance_scale)
    try:
        transformer.enable_cache(cache)
    except ValueError as err:
        raise CogvxError(f"validate.cache = {validate.cache}: diffusers cannot apply it to this transformer "
                         f"({err}); set validate.cache = none or another kind") from err
    return True


def remove_render_cache(transformer) -> None:
    """Disable the transformer's diffusers cache, if one is on, and give every module back its
    class's forward: diffusers leaves the original bound method as an instance attribute."""
    if transformer.is_cache_enabled:
        transformer.disable_cache()
    for module in transformer.modules():
        own = vars(module).get("forward")
        if inspect.ismethod(own) and own.__self__ is module and own.__func__ is type(module).forward:
            del module.forward


def relative_difference(a, b) -> float:
    """||a - b|| / ||b|| over float64 (tensors or arrays of one shape): how far a render with
    a cache (``a``) is from the uncached one (``b``); 0.0 when both are zero."""
    a64, b64 = (x.detach().to("cpu", torch.float64).numpy() if torch.is_tensor(x) else np.asarray(x, np.float64)
                for x in (a, b))
    if a64.shape != b64.shape:
        raise ValueError(f"relative_difference of shapes {a64.shape} and {b64.shape}")
    norm = np.linalg.norm(b64)
    diff = np.linalg.norm(a64 - b64)
    return float(diff / norm) if norm else (0.0 if diff == 0 else float("inf"))


def placeholder_image(height: int, width: int) -> Image.Image:
    """A smooth colour gradient used as the first frame when an image-to-video check has no image."""
    ys = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    xs = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    rgb = np.stack([np.broadcast_to(xs, (height, width)), np.broadcast_to(ys, (height, width)),
                    np.full((height, width), 128, np.float32)], axis=-1)  # [H, W, 3]
    return Image.fromarray(rgb.astype(np.uint8))


def render(pipe, prompt: str, *, frames: int, height: int, width: int, steps: int,
           guidance_scale: float, seed: int, image: Image.Image | None = None,
           control: list[Image.Image] | None = None, vae_tiles: tuple[int, int] | None = None) -> np.ndarray:
    """Sample one video; returns uint8 frames shaped [F, H, W, 3]. A control pipeline takes its
    frame count from ``control`` (one frame per rendered frame: :func:`control_frames`);
    ``vae_tiles`` is validate.vae_tiles (:func:`fit_vae_tiles`)."""
    fit_vae_tiles(pipe.vae, height, width, vae_tiles)
    kwargs = dict(prompt=prompt, num_frames=frames, height=height, width=width,
                  num_inference_steps=steps, guidance_scale=guidance_scale,
                  generator=torch.Generator("cpu").manual_seed(seed), output_type="np")
    parameters = inspect.signature(pipe.__call__).parameters
    if "image" in parameters:
        kwargs["image"] = image if image is not None else placeholder_image(height, width)
    if "control_video" in parameters:
        if not control:
            raise CogvxError("this is a control model: it renders from a control video (cogvx generate --control VIDEO)")
        del kwargs["num_frames"]
        kwargs["control_video"] = control
    with torch.inference_mode():
        video = pipe(**kwargs).frames[0]  # [F, H, W, 3] floats in [0, 1]
    return (np.clip(video, 0.0, 1.0) * 255).round().astype(np.uint8)


def as_control_pipeline(pipe):
    """The same components (the transformer widened for control) in cogvx's ControlPipeline,
    diffusers' CogVideoXFunControlPipeline with 1.5's temporal padding."""
    from cogvx.models.control_pipeline import ControlPipeline

    control = ControlPipeline(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae,
                              transformer=pipe.transformer, scheduler=pipe.scheduler)
    control.set_progress_bar_config(disable=None)  # the denoising bar on a terminal only, as load_pipeline sets it
    return control


def validation_controls(config: Config) -> list[Path]:
    """The control video of each validation prompt (none without data.control): those of
    validate.control_videos, else the first training samples' (their control videos; their clips
    with data.control = canny, whose edges are taken), in listing order, repeated as needed."""
    from cogvx.data.listing import read_samples

    data, prompts = config.data, config.validate_.prompts
    if data.control == "none" or not prompts:
        return []
    if config.validate_.control_videos:
        return list(config.validate_.control_videos)
    samples, _ = read_samples(data)
    sources = [sample.control if data.control == "file" else sample.video for sample in samples]
    sources = [path for path in sources if path is not None]
    if not sources:
        raise CogvxError(f"validation renders a control model from a control video per prompt, and {data.data_root} "
                         "lists none: set validate.control_videos (one per validate.prompts entry)")
    return [sources[index % len(sources)] for index in range(len(prompts))]


def check_control_video(path: str | Path, size: RenderSettings, config: Config):
    """The VideoInfo of a render's control video, once it is known to give ``size.frames`` frames
    at the training rate; a CogvxError saying why otherwise (missing, not a video, too short)."""
    from cogvx.data.video import file_problem, probe_video, usable_frame_count

    path = Path(path)
    problem = file_problem(path, what="control video")
    if problem:
        raise CogvxError(f"control video {path}: {problem}")
    info = probe_video(path)
    fps = config.sample_fps
    usable = usable_frame_count(info, fps)
    if usable < size.frames:
        rate = f" at {fps} fps" if fps else ""
        raise CogvxError(f"control video {path}: {usable} frames{rate}, the render needs {size.frames}: "
                         "use a longer control video or render fewer frames (--frames)")
    return info


def control_frames(path: str | Path, kind: str, size: RenderSettings, config: Config,
                   canny: tuple[int, int] | None = None) -> list[Image.Image]:
    """The control video of a render: ``size.frames`` frames of ``path`` taken as training takes
    a clip's (from the start, at the training rate), centre-cropped to the render size; with
    ``kind`` canny, the Canny edges of those frames, as prepare makes them, with the thresholds
    ``canny`` (default: data.canny_low / canny_high). A video that cannot give them is a
    CogvxError saying why."""
    from cogvx.data.control import canny_video
    from cogvx.data.video import load_clip

    info = check_control_video(path, size, config)
    video = load_clip(path, info, size.frames, size.height, size.width,
                      target_fps=config.sample_fps)  # [F, C, H, W] in [-1, 1]
    if kind == "canny":
        video = canny_video(video, *(canny or (config.data.canny_low, config.data.canny_high)))
    pixels = ((video.permute(0, 2, 3, 1) + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)  # [F, H, W, C]
    return [Image.fromarray(frame) for frame in pixels.numpy()]


def write_video(frames: np.ndarray, path: str | Path, fps: int) -> Path:
    """Write [F, H, W, 3] uint8 frames as an H.264 mp4, atomically (temp file + rename)."""
    import imageio.v2 as imageio

    with atomic_file(path, suffix=".mp4") as tmp:
        with imageio.get_writer(tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264",
                                quality=8, macro_block_size=1, ffmpeg_log_level="error") as writer:
            for frame in frames:
                writer.append_data(frame)
    return Path(path)
