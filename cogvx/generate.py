"""`cogvx generate`: render a video with the base model, optionally with a trained LoRA."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cogvx.config import Config
from cogvx.errors import CogvxError
from cogvx.models.specs import get_spec, resolve_key

if TYPE_CHECKING:
    from cogvx.inference import RenderSettings

ADAPTER = "cogvx"


@dataclass
class GenerateRequest:
    """What to render; None fields fall back to the validate section, then the training size
    (size and fps: :func:`cogvx.inference.render_settings`)."""

    prompt: str
    out: Path
    lora: Path | str | None = None  # a file, a folder, or models:/NAME@ALIAS
    lora_scale: float = 1.0
    transformer: Path | None = None
    weights: Path | None = None  # what `cogvx train` wrote: its lora/ or full/ folder
    frames: int | None = None
    height: int | None = None
    width: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    fps: int | None = None
    image: Path | None = None
    control: Path | None = None  # a control model's control video (or, with control_kind canny, a clip)
    control_kind: str | None = None  # file / canny; None: the kind the model was trained with


def lora_file(path: Path) -> Path:
    """A LoRA weights file, given the file (any name) or the folder `cogvx train` wrote it to.

    Filesystem oddities (a FIFO, a device, a symlink loop, a name too long) are refused with a
    reason, without opening anything; whether the file is safetensors is its content's business
    (:func:`cogvx.models.lora.read_lora_metadata`), not its name's.
    """
    from cogvx.data.video import file_problem
    from cogvx.models.lora import LORA_WEIGHT_NAME

    path = Path(path)
    if os.path.isdir(path):
        path = path / LORA_WEIGHT_NAME
    problem = file_problem(path, what="LoRA file")
    if problem and problem.startswith("file not found"):
        raise CogvxError(f"--lora {path}: no such LoRA file")
    if problem:
        raise CogvxError(f"{path} is not a readable safetensors LoRA file ({problem})")
    return path


def resolve_weights(config: Config, request: GenerateRequest) -> tuple[Path | None, Path | None]:
    """(LoRA path, transformer folder) from the request: registry URIs downloaded, and a
    ``weights`` folder sorted into LoRA (holds the LoRA file) or full transformer."""
    from cogvx.models.lora import LORA_WEIGHT_NAME

    lora, transformer = request.lora, request.transformer
    if request.weights is not None:
        weights = Path(request.weights)
        if os.path.isfile(weights / LORA_WEIGHT_NAME) or (os.path.lexists(weights) and not os.path.isdir(weights)):
            lora = weights  # a file (any name) is a LoRA, checked by content later; a full model is a folder
        else:
            transformer = weights
    if lora is not None:
        from cogvx.tracking import resolve_lora

        lora = resolve_lora(str(lora), config.tracking.tracking_uri, Path("outputs/registry"))
    return (Path(lora) if lora is not None else None), transformer


def check_lora_base(meta: dict, spec, path: Path, log=print) -> None:
    """Refuse a LoRA trained on another kind of model (text vs image to video, 1.0 vs 1.5):
    its layers may have the same shapes and load silently into the wrong model."""
    trained = resolve_key(str(meta["cogvx"].get("variant") or ""))
    if spec is None or trained is None or trained == spec.key:
        return
    other = get_spec(trained)
    if (other.task, other.generation, other.tiny) != (spec.task, spec.generation, spec.tiny):
        raise CogvxError(f"{path} was trained on {other.key} (CogVideoX {other.generation} {other.task}); "
                         f"this model is {spec.key} (CogVideoX {spec.generation} {spec.task}): "
                         "use the base model it was trained on")
    log(f"note: {path.name} was trained on {other.key}; applying it to {spec.key}")


def attach_lora(pipe, path: Path, scale: float, log=print, spec=None) -> dict:
    """Load an adapter file into the pipeline at ``scale`` x (alpha / rank), alpha read from the
    file; with ``spec``, an adapter recorded as trained on another kind of model is refused first.
    LoRA and DoRA load through diffusers' ``load_lora_weights``, LoKr and LoHa (which diffusers
    cannot read) through peft (:func:`cogvx.models.lora.load_lycoris`), under the same adapter
    name, so ``pipe.set_adapters`` changes the strength of either.

    A control model's file also holds the widened input projection: it replaces the
    transformer's before the adapter loads (:mod:`cogvx.models.control`).

    The file is read as safetensors whatever its name (``use_safetensors=True`` hands diffusers
    the file itself and turns off its pickle fallback, which otherwise picks ``torch.load`` for
    a name not ending in .safetensors); its header was checked before by read_lora_metadata.
    """
    from cogvx.models.lora import LYCORIS_KINDS, load_lycoris, read_lora_metadata

    from cogvx.models.control import load_widened_projection, read_projection

    path = lora_file(path)
    meta = read_lora_metadata(path)
    check_lora_base(meta, spec, path, log)
    if meta["control"]:
        load_widened_projection(pipe.transformer, read_projection(path), str(path))
    if meta["kind"] in LYCORIS_KINDS:
        load_lycoris(pipe.transformer, path, meta, ADAPTER, scale)
    else:
        _load_with_diffusers(pipe, path, scale, control=bool(meta["control"]))
    trained = meta["cogvx"].get("config", {}).get("train", {})
    if trained.get("ignore_learned_positional_embeddings"):
        from cogvx.models.positions import ignore_learned_positions

        ignore_learned_positions(pipe.transformer)
    _log_strength(meta, path, scale, log)
    return meta


def _load_with_diffusers(pipe, path: Path, scale: float, control: bool = False) -> None:
    """A LoRA / DoRA file through diffusers' loader, as adapter ADAPTER at ``scale``. A control
    model's file holds its input projection too, which load_lora_weights refuses (every key
    must be a LoRA one): its LoRA part goes through the same two steps without it."""
    from safetensors import SafetensorError

    from cogvx.models.control import PROJECTION_PREFIX

    try:
        if not control:
            pipe.load_lora_weights(str(path), use_safetensors=True, adapter_name=ADAPTER)
        else:
            state, metadata = pipe.lora_state_dict(str(path), use_safetensors=True, return_lora_metadata=True)
            state = {k: v for k, v in state.items() if not k.startswith(PROJECTION_PREFIX)}
            pipe.load_lora_into_transformer(state, transformer=pipe.transformer, adapter_name=ADAPTER,
                                            metadata=metadata, _pipeline=pipe)
    except (ValueError, KeyError, RuntimeError, SafetensorError) as err:
        raise CogvxError(f"{path} does not fit this model's transformer: {str(err).splitlines()[0][:200]}") from None
    pipe.set_adapters([ADAPTER], [scale])


def _log_strength(meta: dict, path: Path, scale: float, log=print) -> None:
    """One line saying the adapter's kind, rank, alpha and the strength it acts at."""
    from cogvx.models.lora import KIND_NAMES

    name = KIND_NAMES[meta["kind"]]
    if meta["rank"] and meta["alpha"]:
        log(f"{name} rank {meta['rank']}, alpha {meta['alpha']:g}: strength {scale:g} x alpha/rank "
            f"= {scale * meta['alpha'] / meta['rank']:g}")
    else:
        log(f"warning: {path.name} records no rank/alpha; diffusers assumes alpha = rank (strength {scale:g})")


def generation_pipeline(config: Config, request: GenerateRequest, log=print, transformer_module=None):
    """The base pipeline with the request's weights, placed for rendering (validate.offload,
    vae_tiling, compile, compile_vae); ``transformer_module`` replaces the transformer (benchmarks).

    validate.cache goes on before the offload hooks (see apply_render_cache) and stays for the
    pipeline's life: the pipeline resets the cache's state at the end of every call."""
    from cogvx.inference import apply_render_cache, pick_device, prepare_for_device
    from cogvx.models.loader import load_pipeline, resolve_dtype
    from cogvx.models.performance import set_attention_backend

    spec, device = config.spec, pick_device()
    lora, transformer = resolve_weights(config, request)
    control = check_control_request(request, lora, config)
    dtype = resolve_dtype(config.model.dtype, spec, device)
    skip = ("transformer",) if transformer_module is not None else ()
    pipe = load_pipeline(config.model_source, spec, dtype=dtype, revision=config.model.revision,
                         cache_dir=config.model.cache_dir, transformer=transformer, skip=skip)
    if transformer_module is not None:
        pipe.transformer = transformer_module
    if lora is not None:
        attach_lora(pipe, lora, request.lora_scale, log, spec=spec)
    if control:
        from cogvx.inference import as_control_pipeline

        pipe = as_control_pipeline(pipe)
        pipe.control_record = control
    validate = config.validate_
    set_attention_backend(pipe.transformer, config.train.attention_backend, device)
    if validate.fp8_compute:
        _quantize_for_rendering(pipe, device, lora is not None, log)
    if apply_render_cache(pipe.transformer, config, lambda: pipe.current_timestep, request_guidance(config, request)):
        log(f"render cache: {validate.cache} (diffusers; faster, output changes a little)")
    prepare_for_device(pipe, device, validate.offload, validate.vae_tiling, validate.compile,
                       validate.compile_vae)
    return pipe, device


def check_control_request(request: GenerateRequest, lora: Path | None, config: Config) -> dict | None:
    """A control model's record (None for any other), after checking, before any weight loads,
    that the request and the weights agree: a control model needs a control video (--control,
    else, with data.control set, the config's first validation control) that gives the render's
    frames, --control needs a control model, and the LoRA was trained on this kind of model."""
    from cogvx.models.lora import read_lora_metadata

    meta = read_lora_metadata(lora_file(lora)) if lora is not None else None
    if meta is not None:
        check_lora_base(meta, config.spec, lora_file(lora), log=lambda *_: None)  # attach_lora notes it
    control = meta["control"] if meta is not None else None
    if control and request.control is not None:
        from cogvx.inference import check_control_video

        check_control_video(request.control, request_settings(config, request), config)
    if control and request.control is None and config.data.control == "none":
        raise CogvxError(f"{lora} is a control model (trained with data.control = {control.get('kind')}): "
                         "give its control video with --control VIDEO"
                         + (" (a clip, with --control-kind canny, for its edges)" if control.get("kind") == "canny" else ""))
    if request.control_kind is not None and request.control is None:
        raise CogvxError("--control-kind says what the --control video is: give --control VIDEO with it")
    if request.control is not None and not control:
        raise CogvxError("--control needs a control model: a LoRA trained with data.control "
                         f"({'this one was not' if lora is not None else 'give it with --lora or --weights'})")
    return control


def request_guidance(config: Config, request: GenerateRequest) -> float:
    """The request's guidance scale, else validate.guidance_scale."""
    return config.validate_.guidance_scale if request.guidance_scale is None else request.guidance_scale


def _quantize_for_rendering(pipe, device, has_lora: bool, log=print) -> None:
    """validate.fp8_compute: fuse the LoRA into the base weights, then quantize to fp8."""
    from cogvx.models.performance import quantize_fp8_compute

    if has_lora:
        pipe.fuse_lora(components=["transformer"])
        pipe.unload_lora_weights()
    pipe.transformer.to(device)  # made fp8 where it runs, and kept there (validate.offload = text_encoder or none)
    layers = quantize_fp8_compute(pipe.transformer, device)
    log(f"fp8 compute: {layers} linear layers of the transformer in fp8 (per-row scales)")


def request_settings(config: Config, request: GenerateRequest) -> RenderSettings:
    """The request's size and fps, unset values by the one rule every render follows."""
    from cogvx.inference import render_settings

    return render_settings(config, request.frames, request.height, request.width, request.fps)


def render_request(pipe, config: Config, request: GenerateRequest, device, log=print):
    """Render the request's clip: uint8 frames [F, H, W, 3]."""
    from PIL import Image

    from cogvx.inference import render

    validate, size = config.validate_, request_settings(config, request)
    image = Image.open(request.image).convert("RGB") if request.image else None
    control = None
    trained = getattr(pipe, "control_record", None)
    if trained:
        from cogvx.inference import control_frames, validation_controls

        path = request.control or validation_controls(config)[0]
        if request.control is None:
            log(f"control video: {path} (the first validation control; --control VIDEO picks another)")
        kind = request.control_kind or (trained.get("kind") if request.control else config.data.control) or "file"
        control = control_frames(path, kind, size, config, canny=trained.get("canny"))  # the thresholds it learnt
    video = render(pipe, request.prompt, frames=size.frames, height=size.height, width=size.width,
                   steps=request.steps or validate.num_inference_steps,
                   guidance_scale=request_guidance(config, request),
                   seed=validate.seed if request.seed is None else request.seed, image=image, control=control,
                   vae_tiles=validate.vae_tiles)
    if video.shape[0] != size.frames:
        log(f"note: the pipeline returned {video.shape[0]} frames for {size.frames} asked "
            "(CogVideoX 1.0 decodes exactly when (frames - 1) / 4 + 1 is odd, e.g. 9, 17, 25, 49)")
    return video


def generate(config: Config, request: GenerateRequest, log=print) -> Path:
    """Load the base pipeline (and LoRA), render one clip, write it as mp4."""
    from cogvx.inference import write_video

    pipe, device = generation_pipeline(config, request, log)
    video = render_request(pipe, config, request, device, log)
    return write_video(video, request.out, request_settings(config, request).fps)
