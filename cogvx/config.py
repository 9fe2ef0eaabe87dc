"""The one typed configuration of cogvx.

Every setting is declared once here, with a default and a one-line description. params.yaml
holds one section per stage (data, model, prepare, train, validate, tracking); the CLI, the DVC
stages and the Prefect tasks all load it through :func:`load_config`, which merges dotted
command-line overrides (``train.lora.rank=8``) before validation, so an impossible value is
rejected before any work starts, with one message naming the key, the value and what is allowed.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cogvx.errors import ConfigError
from cogvx.io import atomic_write_text
from cogvx.models.specs import SPECS, get_spec, resolve_key

RESOLVED_CONFIG_NAME = "cogvx-config.yaml"
MAX_PARAMS_BYTES = 1 << 20


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _multiple_of_16(value: int | None) -> int | None:
    if value is not None and value % 16 != 0:
        raise ValueError(f"must be a multiple of 16 (e.g. {max(16, value // 16 * 16)} "
                         f"or {(value // 16 + 1) * 16})")
    return value


def _inside_data_root(value: str | None) -> str | None:
    """Listing files are read from inside data.data_root: a path that leaves it is refused, so a
    shared params file cannot make cogvx read (and echo in its errors) files elsewhere."""
    if value is not None:
        from pathlib import PurePath

        path = PurePath(value)
        if path.is_absolute() or ".." in path.parts:
            raise ValueError("must be a path inside data.data_root (relative, no '..')")
    return value


class DataConfig(Section):
    """Where the training clips come from, how they are listed, and how they are decoded."""

    source: str = Field("synthetic", description="What `cogvx data download` fetches into data_root: 'synthetic' clips, a hub dataset id, a local folder or a .zip/.tar archive.")
    revision: str | None = Field(None, description="Hub dataset revision (branch, tag or commit) when source is a hub id.")
    data_root: Path = Field(Path("data/raw"), description="Folder holding the clips and caption files; dataset paths are relative to it.")
    format: Literal["auto", "txt", "csv", "json"] = Field("auto", description="Dataset layout: prompts.txt+videos.txt, CSV, JSON/JSONL, or auto-detect (auto refuses a data_root holding several listings, e.g. metadata.csv beside prompts.txt+videos.txt: pick one here or with metadata_file).")
    prompts_file: str = Field("prompts.txt", description="txt layout: file with one caption per line, relative to data_root.")
    videos_file: str = Field("videos.txt", description="txt layout: file with one clip path per line, relative to data_root.")
    images_file: str = Field("images.txt", description="txt layout: optional file with one first-frame image per line (image-to-video).")
    metadata_file: str | None = Field(None, description="CSV/JSON/JSONL file listing the samples; null finds metadata.csv/.json/.jsonl in data_root.")
    caption_column: str = Field("caption", description="Caption column (CSV) or key (JSON) holding each clip's prompt.")
    video_column: str = Field("video", description="Column or key holding each clip's path, relative to data_root.")
    image_column: str = Field("image", description="Column or key of the optional first-frame image (image-to-video).")
    frames: int | None = Field(None, ge=2, description="Frames per training clip; null takes the model's default (must follow its frame rule).")
    height: int | None = Field(None, ge=16, description="Training height in pixels (multiple of 16); null takes the model's default.")
    width: int | None = Field(None, ge=16, description="Training width in pixels (multiple of 16); null takes the model's default.")
    buckets: list[tuple[int, int, int]] | None = Field(None, description="Resolution buckets as [frames, height, width] lists; null is the single bucket frames x height x width.")
    fps: int | Literal["native"] | None = Field(None, description="Frame rate clips are sampled at, so every clip moves at the speed the model was trained at: null = the model's own rate (8 fps for CogVideoX 1.0, 16 for 1.5); a number overrides it; 'native' keeps each clip's own rate. Faster clips are resampled, slower ones keep all their frames.")
    frame_sampling: Literal["start", "evenly", "random"] = Field("start", description="Which frames of a clip are taken: 'start' = a window at data.fps from the start (the rest of a longer clip is cut); 'random' = that window at a random offset, seeded by data.seed and the clip's path (a re-run takes the same frames); 'evenly' = frames spread evenly over the whole clip, ignoring data.fps (motion speed then varies with clip length).")
    skip_frames_start: int = Field(0, ge=0, description="Frames dropped from the start of every clip (intros, fades).")
    skip_frames_end: int = Field(0, ge=0, description="Frames dropped from the end of every clip.")
    resize_mode: Literal["center_crop", "random_crop", "resize"] = Field("center_crop", description="Fit clips to the bucket: scale to cover then crop centred or at random, or stretch.")
    random_flip: float = Field(0.0, ge=0.0, le=1.0, description="Probability of flipping a clip horizontally, in [0, 1].")
    skip_invalid: bool = Field(False, description="Drop invalid samples (with a report) instead of stopping on them.")
    id_token: str | None = Field(None, description="Word prepended to every caption (e.g. a rare token naming your subject or style).")
    control: Literal["none", "file", "canny"] = Field("none", description="Control video per clip (control training: the video steers layout and motion): 'file' = videos the user made (any depth / pose / edge estimator), listed in control_videos_file (txt layout) or control_column (CSV/JSON); 'canny' = computed by prepare from each clip (OpenCV Canny on every sampled frame); 'none' = no control.")
    control_videos_file: str = Field("control_videos.txt", description="txt layout, data.control = file: one control video per line, aligned with videos_file.")
    control_column: str = Field("control", description="CSV/JSON, data.control = file: column or key holding each clip's control video.")
    canny_low: int = Field(100, ge=0, le=255, description="data.control = canny: lower hysteresis threshold of OpenCV's Canny (0-255 gradients).")
    canny_high: int = Field(200, ge=1, le=255, description="data.control = canny: upper hysteresis threshold; must be above canny_low.")
    image_noise: bool = Field(True, description="Image-to-video: add pixel noise (sigma = exp(N(-3, 0.5))) to the first frame before encoding, as the reference trainers do.")
    synthetic_clips: int = Field(12, ge=1, description="Clips made when source is 'synthetic'.")
    seed: int = Field(0, ge=0, description="Seed of synthetic clips and of random crops, flips and frame windows.")

    _check_size = field_validator("height", "width")(_multiple_of_16)
    _check_listing = field_validator("prompts_file", "videos_file", "images_file", "control_videos_file",
                                     "metadata_file")(_inside_data_root)

    def sample_fps(self, model_fps: int | None) -> int | None:
        """The rate frames are taken at: fps, or ``model_fps`` when fps is null; None when no rate
        applies (fps = native keeps each clip's own, frame_sampling = evenly ignores rates)."""
        if self.frame_sampling == "evenly" or self.fps == "native":
            return None
        return self.fps or model_fps

    @field_validator("fps", mode="before")
    @classmethod
    def _check_fps(cls, value: Any) -> Any:
        """One message for every wrong value (not one per member of the union)."""
        if value is None or value == "native" or (type(value) is int and value >= 1):
            return value
        raise ValueError("must be a whole number of frames per second (>= 1), 'native' "
                         "(each clip's own rate) or null (the model's rate)")

    @field_validator("buckets")
    @classmethod
    def _check_buckets(cls, value: list[tuple[int, int, int]] | None) -> list[tuple[int, int, int]] | None:
        if value is not None:
            if not value:
                raise ValueError("must list at least one [frames, height, width] bucket, or be null")
            for frames, height, width in value:
                if frames < 2 or height < 16 or width < 16 or height % 16 or width % 16:
                    raise ValueError(f"bucket [{frames}, {height}, {width}]: frames must be >= 2, "
                                     "height and width multiples of 16")
        return value


class ModelConfig(Section):
    """Which base model to fine-tune and how to load it."""

    variant: str = Field("tiny-t2v", description="Registry key or hub id of the base model (see `cogvx models`).")
    path: str | None = Field(None, description="Local folder or hub id to load instead of the variant's default source.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to load.")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field("auto", description="Weights dtype; auto = the model's own dtype on GPU, fp32 on CPU.")
    cache_dir: Path | None = Field(None, description="Hugging Face cache folder; null uses HF_HOME / the default cache.")

    @field_validator("variant")
    @classmethod
    def _known_variant(cls, value: str) -> str:
        key = resolve_key(value)
        if key is None:
            raise ValueError(f"unknown model; known variants: {', '.join(SPECS)}")
        return key


class PrepareConfig(Section):
    """Precomputing latents and text embeddings once, before training."""

    output_dir: Path = Field(Path("data/latents"), description="Folder the precomputed latents, embeddings and manifest are written to.")
    batch_size: int = Field(1, ge=1, description="Clips encoded at once by the VAE (within one bucket).")
    num_workers: int = Field(2, ge=0, description="DataLoader workers decoding clips while the VAE encodes; 0 decodes in the main process.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where to encode; auto = cuda when available.")
    vae_tiling: bool = Field(False, description="Encode in spatial tiles to save memory (slower).")
    vae_slicing: bool = Field(False, description="Encode a batch one clip at a time to save memory.")
    compile: bool = Field(False, description=(
        "Compile the VAE encoder (torch.compile, inductor) on a GPU: faster per clip once compiled, at a "
        "one-off compile per bucket shape: on an H200 at 49x480x720, 1.88 instead of 0.94 clips/s after a "
        "45 s compile, so it pays off from about 90 clips of one size on. "
        "Ignored on a CPU. The latents match eager ones to bf16 rounding (like latents from another GPU), "
        "so files encoded either way are reused by the other."))
    accelerate_config: Path | None = Field(None, description="Encode on several processes (GPUs): an accelerate config file (e.g. configs/accelerate/ddp-2gpu.yaml) to run `cogvx prepare` under accelerate launch with; null runs it in this one process.")


class LoraConfig(Section):
    """LoRA adapter shape (peft)."""

    rank: int = Field(64, ge=1, description="LoRA rank r (>= 1).")
    alpha: float = Field(64.0, gt=0, description="LoRA alpha; the adapter is scaled by alpha / rank.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA branch, in [0, 1).")
    target_modules: list[str] | None = Field(None, description="Module names to adapt; null takes the model's default (attention q/k/v/out).")
    init: Literal["default", "gaussian", "pissa", "olora"] = Field("gaussian", description="peft init_lora_weights scheme (kind lora and dora; pissa and olora only there).")
    kind: Literal["lora", "dora", "lokr", "loha"] = Field("lora", description=(
        "Adapter kind (peft). lora: low-rank A/B pair, the usual choice, loaded by diffusers. "
        "dora: weight-decomposed LoRA (a trained magnitude per output row + a LoRA direction), closer to full "
        "fine-tuning at the same rank, a little slower; loaded by diffusers; not with fp8_base_weights. "
        "lokr: Kronecker product of two small factors, very few parameters for a given rank. "
        "loha: Hadamard product of two low-rank pairs, a higher effective rank for the same parameter count. "
        "lokr and loha use dropout as peft's rank_dropout and are loaded by cogvx through peft."))


class TrainConfig(Section):
    """The fine-tuning run."""

    method: Literal["lora", "full"] = Field("lora", description="LoRA adapters or full fine-tuning of the transformer.")
    output_dir: Path = Field(Path("outputs/train"), description="Folder for checkpoints, the final weights and validation samples.")
    seed: int = Field(42, ge=0, description="Seed of every random draw (data order, noise, timesteps).")
    max_steps: int = Field(100, ge=1, description="Optimizer steps to train for (unless epochs is set).")
    epochs: int | None = Field(None, ge=1, description="Train for this many passes over the data instead of max_steps; null uses max_steps.")
    batch_size: int = Field(1, ge=1, description="Clips per step on each process (GPU); the global batch is batch_size x gradient_accumulation_steps x processes.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches summed into one optimizer step.")
    learning_rate: float = Field(1e-4, gt=0, description="Peak learning rate.")
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"] = Field("constant_with_warmup", description="Learning-rate schedule (diffusers get_scheduler names).")
    lr_warmup_steps: int = Field(0, ge=0, description="Steps of linear warm-up at the start.")
    optimizer: Literal["adamw", "adam", "adamw8bit", "prodigy", "cpu_offload_adamw"] = Field("adamw", description="Optimizer; adamw8bit uses bitsandbytes, prodigy prodigyopt (set learning_rate 1.0), cpu_offload_adamw torchao (GPU only).")
    weight_decay: float = Field(1e-4, ge=0, description="Decoupled weight decay.")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="Adam beta1, in [0, 1).")
    adam_beta2: float = Field(0.95, ge=0, lt=1, description="Adam beta2, in [0, 1).")
    adam_epsilon: float = Field(1e-8, gt=0, description="Adam epsilon.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradients are clipped to this global norm.")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field("auto", description="auto = bf16 on GPU, fp32 on CPU; fp16 is safe only for 2b.")
    gradient_checkpointing: bool = Field(True, description="Recompute block activations in the backward pass to save memory.")
    checkpointing_steps: int = Field(50, ge=1, description="Save a resumable checkpoint every N steps.")
    checkpoints_total_limit: int | None = Field(3, ge=1, description="Keep at most this many checkpoints; null keeps all.")
    caption_dropout: float = Field(0.0, ge=0.0, le=1.0, description="Probability of training a sample with the empty caption (helps classifier-free guidance).")
    image_dropout: float = Field(0.05, ge=0.0, le=1.0, description="Image-to-video: probability of zeroing a sample's first-frame latents.")
    control_dropout: float = Field(0.0, ge=0.0, le=1.0, description="Control training (data.control): probability of zeroing a sample's control latents, so the model also learns without one.")
    control_weights: Literal["new", "all"] = Field("new", description="Control training: which input weights train besides the adapter: 'new' = only the zero-initialized weights of the control channels (the base model's input projection stays as it is); 'all' = the whole widened patch-embedding projection.")
    ignore_learned_positional_embeddings: bool = Field(False, description="Image-to-video 5b: ignore the learned positional embeddings fixed to 480x720, to train (and generate) at other sizes.")
    preset: Literal["none", "speed", "balanced", "lean"] = Field("none", description="Named memory/speed settings (GPU). LoRA: balanced = fp8_base_weights, compile blocks, cudnn attention; speed = balanced + fp8_compute + keep_attention_outputs (fastest, ~4.6 GiB more at 5b); lean = balanced + fp8_compute + activation_offload (least memory). Full fine-tuning: speed/balanced = optimizer cpu_offload_adamw, compile blocks, cudnn attention; lean adds activation_offload. The preset sets each of its fields still at the field's default; a field set to a non-default value keeps it (preset speed + attention_backend flash trains with flash). Training refuses a preset that cannot run on the GPU (CPU, fp8 below compute capability 8.9, estimated memory above the GPU's); `cogvx doctor` suggests one.")
    fp8_base_weights: bool = Field(False, description="LoRA: store the frozen base weights in fp8 (e4m3, one scale per output row) and upcast each layer to bf16 as it runs; halves their memory. LoRA layers, norms and embeddings stay in bf16.")
    compile: Literal["none", "blocks"] = Field("none", description="torch.compile each transformer block (regional: one block graph, compiled once, reused 30-42 times); the first step compiles (about a minute at real size), every later one is faster. Works with fp8_base_weights and gradient_checkpointing.")
    attention_backend: Literal["auto", "cudnn", "flash", "fa4", "efficient", "math"] = Field("auto", description="Scaled-dot-product attention kernel: auto lets torch pick; cudnn is torch's fastest built-in kernel on H100/H200; fa4 is FlashAttention-4 (pip install flash-attn-4; Hopper/Blackwell GPUs, compiles its kernels on first use); flash and efficient are torch's FlashAttention-2 and memory-efficient kernels; math is the slow reference.")
    activation_offload: bool = Field(False, description="Keep the checkpointed block inputs in pinned CPU memory instead of on the GPU (needs gradient_checkpointing); saves about 4 GiB at 5b 49x480x720 and 12 GiB at 1.5 81x768x1360; the copies run on a side stream, overlapped with compute.")
    fp8_compute: bool = Field(False, description="LoRA on a GPU of compute capability >= 8.9 (Ada, Hopper): the frozen base linears (stored in fp8, so it needs fp8_base_weights) multiply in fp8 with per-row scales (torch._scaled_mm) in the forward pass and its recompute; the backward stays in bf16. Faster GEMMs, a slight change in gradients (see the README's quality check).")
    keep_attention_outputs: bool = Field(False, description="Selective checkpointing (needs gradient_checkpointing): keep each block's attention output and logsumexp instead of recomputing attention in the backward pass; at 5b 49x480x720 about 4.6 GiB more for ~0.4 s less per step.")
    accelerate_config: Path | None = Field(None, description="Train on several processes (GPUs): an accelerate config file (e.g. configs/accelerate/ddp-2gpu.yaml) to run `cogvx train` under accelerate launch with; null runs it in this one process. train.batch_size is then per process.")
    process_group_timeout_minutes: int = Field(60, ge=1, description="Several processes: how long one waits for the others (e.g. while the main process renders validation clips) before the run fails.")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA adapter settings (train.method = lora).")


class ValidateConfig(Section):
    """Sample videos rendered during and after training."""

    prompts: list[str] = Field(default_factory=lambda: ["a red circle moving left to right on a blue background"], description="Prompts rendered as validation videos.")
    every_n_steps: int = Field(0, ge=0, description="Render every N training steps; 0 renders only at the end.")
    num_inference_steps: int = Field(50, ge=1, description="Denoising steps per sample.")
    guidance_scale: float = Field(6.0, ge=0, description="Classifier-free guidance scale.")
    frames: int | None = Field(None, ge=2, description="Frames per sample; null uses the training frames.")
    height: int | None = Field(None, ge=16, description="Sample height (multiple of 16); null uses the training height.")
    width: int | None = Field(None, ge=16, description="Sample width (multiple of 16); null uses the training width.")
    fps: int | None = Field(None, ge=1, description="Frame rate of the written mp4; null uses the model's.")
    seed: int = Field(0, ge=0, description="Seed of the sampling noise.")
    offload: Literal["model", "text_encoder", "sequential", "none"] = Field("model", description="GPU only: model = each component (T5, transformer, VAE) on the GPU only while it runs (whole-model copies at every render); text_encoder = the transformer and VAE stay on the GPU, T5 stays in pinned CPU memory and streams in block by block while it encodes (needs room for the transformer: ~11 GB bf16 at 5b, half with fp8_compute; works with fp8_compute); sequential = layer by layer (least memory, slow); none = everything on the GPU (most memory).")
    vae_tiling: bool = Field(True, description="Decode in spatial tiles (GPU): a few GiB instead of tens at 480x720 and up, same output up to tile blending; untiled, 5b generation at 49x480x720 ran out of memory on a simulated 24 GB card.")
    vae_tiles: tuple[int, int] | None = Field(None, description="GPU, with vae_tiling: decode in this grid of [rows, columns] tiles (e.g. [1, 2]: two full-height halves), overlapping as diffusers' tiles do; fewer, bigger tiles decode faster and take more memory. null = diffusers' tiles (half the model's sample height and width: 3 x 3 tiles at 480x720).")
    control_videos: list[Path] = Field(default_factory=list, description="Control training: a control video per validation prompt (with data.control = canny, clips whose edges are taken); empty uses the control of the first training samples, in listing order.")
    compile: bool = Field(False, description="torch.compile the transformer blocks for rendering (cogvx generate; in training, train.compile decides); pays off from about 20 denoising steps.")
    compile_vae: bool = Field(False, description="cogvx generate: torch.compile the VAE decoder (tiled: one graph with dynamic tile sizes). The first render compiles it and later renders of the same size reuse it, so it is meant for several renders in one process; at 5b 49x480x720 the compile did not finish within 7 minutes on an H200 (bench/README.md), so leave it off there. The frames equal the eager decoder's up to float rounding.")
    fp8_compute: bool = Field(False, description="cogvx generate on a GPU of compute capability >= 8.9 (Ada, Hopper): fp8 weights with per-row scales in the transformer's linear layers (the blocks' multiply in fp8, per-row quantized activations: training's fp8 path), a LoRA fused first; faster matmuls and half the transformer's memory, a slight change in output. Needs validate.offload = text_encoder or none.")
    cache: Literal["none", "first_block", "pyramid_broadcast", "faster"] = Field("none", description="Opt-in: diffusers' transformer caching for renders (in-training validation and cogvx generate), removed after each render so training is unchanged; faster renders at some change in output (bench/README.md: pyramid_broadcast beside the fp8 transformer rendered 5b 49x480x720 1.27x faster under a 23 GiB cap, frames 1.3% apart with random weights). first_block = first-block cache (the other blocks are skipped while the first block's output changes less than cache_threshold); pyramid_broadcast = pyramid attention broadcast (each block's attention reused every other step between timesteps 100 and 800, diffusers' CogVideoX settings; it keeps every block's attention output, ~9 GB at 5b 49x480x720 with guidance: with the bf16 transformer on the GPU it ran out of memory under a 23 GiB cap, beside validate.fp8_compute it fits); faster = FasterCache (attention reused every other step below timestep 681, the unconditional guidance branch approximated from the conditional one, diffusers' CogVideoX settings; not with compiled blocks: validate.compile / train.compile); none = off.")
    cache_threshold: float = Field(0.1, gt=0, description="Opt-in, with validate.cache = first_block: relative change of the first block's residual between steps below which the other blocks reuse their cached output (diffusers' FirstBlockCacheConfig.threshold); higher = faster renders at more change in output.")

    _check_size = field_validator("height", "width")(_multiple_of_16)

    @field_validator("vae_tiles")
    @classmethod
    def _positive_tiles(cls, tiles: tuple[int, int] | None) -> tuple[int, int] | None:
        if tiles is not None and min(tiles) < 1:
            raise ValueError(f"{list(tiles)} is not a grid: give [rows, columns], each at least 1 (e.g. [1, 2])")
        return tiles


class TrackingConfig(Section):
    """MLflow experiment tracking and model registry."""

    enabled: bool = Field(True, description="Log runs to MLflow.")
    tracking_uri: str = Field("sqlite:///mlflow.db", description="MLflow tracking URI (server URL or sqlite:///file).")
    experiment: str = Field("cogvx", min_length=1, description="MLflow experiment name.")
    registered_model: str = Field("cogvx-lora", min_length=1, description="Registry name the trained weights are registered under.")


class Config(Section):
    """The whole configuration: one section per params.yaml section."""

    data: DataConfig = Field(default_factory=DataConfig, description="Training data.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Base model.")
    prepare: PrepareConfig = Field(default_factory=PrepareConfig, description="Latent precomputation.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Fine-tuning.")
    validate_: ValidateConfig = Field(default_factory=ValidateConfig, alias="validate", description="Validation samples.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow tracking.")

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML-ready dict with params.yaml's section names."""
        return self.model_dump(mode="json", by_alias=True)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    @property
    def spec(self):
        return get_spec(self.model.variant)

    @property
    def frames(self) -> int:
        return self.data.frames or self.spec.frames

    @property
    def height(self) -> int:
        return self.data.height or self.spec.height

    @property
    def width(self) -> int:
        return self.data.width or self.spec.width

    @property
    def sample_fps(self) -> int | None:
        """The rate frames are taken at: data.fps, or the model's own when it is null; None when
        no rate applies (data.fps = native keeps each clip's, frame_sampling = evenly ignores it)."""
        return self.data.sample_fps(self.spec.fps)

    @property
    def names_buckets(self) -> bool:
        """Whether the config names its training shapes (data.buckets or data.frames/height/width);
        when it does not, training takes the buckets recorded in the latents' manifest."""
        data = self.data
        return any(value is not None for value in (data.buckets, data.frames, data.height, data.width))

    @property
    def buckets(self):
        """The resolution buckets to train at: data.buckets, or the single configured shape."""
        from cogvx.data.buckets import Bucket

        if self.data.buckets:
            return [Bucket(*bucket) for bucket in self.data.buckets]
        return [Bucket(self.frames, self.height, self.width)]

    @property
    def model_source(self) -> str:
        """The folder or hub id the base model is loaded from."""
        return self.model.path or self.spec.default_source


# ----------------------------------------------------------------------------- loading


class _NoAliasLoader(yaml.SafeLoader):
    """Safe YAML loader that refuses anchors/aliases (no 'billion laughs' expansion)."""

    def compose_node(self, parent, index):  # noqa: ANN001 - PyYAML's signature
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise ConfigError(f"{mark.name}, line {mark.line + 1}: YAML aliases (*name) are not "
                              "allowed in params files; write the value out")
        return super().compose_node(parent, index)


def read_params_file(path: str | Path) -> dict[str, Any]:
    """Parse a params file into a dict, with a clear ConfigError for every way it can be bad."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file {str(path)!r} not found (pass --params PATH, or run from "
                          "the project folder that holds params.yaml)")
    raw = path.read_bytes()
    if len(raw) > MAX_PARAMS_BYTES:
        raise ConfigError(f"{path}: {len(raw)} bytes; a params file may be at most {MAX_PARAMS_BYTES}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {raw[err.start]:#04x} at offset {err.start})") from None
    loader = _NoAliasLoader(text)
    loader.name = str(path)
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    finally:
        loader.dispose()
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections "
                          f"({', '.join(_section_names())}), got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``key.sub=value`` into its key path and a YAML-typed value."""
    key, sep, value = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(part.strip() for part in parts):
        raise ConfigError(f"override {text!r} is not of the form section.key=value "
                          "(e.g. train.lora.rank=8)")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return [part.strip() for part in parts], parsed


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each dotted override set (sections created as needed)."""
    merged = _deep_copy(data)
    for text in overrides:
        keys, value = parse_override(text)
        node = merged
        for depth, key in enumerate(keys[:-1]):
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                prefix = ".".join(keys[: depth + 1])
                raise ConfigError(f"override {text!r}: {prefix} is a value ({child!r}), not a section")
            node = child
        node[keys[-1]] = value
    return merged


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {key: _deep_copy(value) for key, value in data.items()}
    if isinstance(data, list):
        return [_deep_copy(value) for value in data]
    return data


def build_config(data: dict[str, Any], source: str = "config") -> Config:
    """Validate a raw dict into a :class:`Config`; every problem reported in one ConfigError."""
    try:
        config = Config.model_validate(data)
    except ValidationError as err:
        problems = [_describe_error(e) for e in err.errors()]
        problems += _frame_problems(_raw_get(data, "model", "variant", default="tiny-t2v"), {
            key: _raw_get(data, *key.split("."), default=None) for key in FRAME_KEYS})
        raise ConfigError(_format_problems(source, problems)) from None
    changes = preset_changes(config.train)
    config = config.model_copy(update={"train": apply_preset(config.train)})
    problems = _note_preset_problems(check_consistency(config), changes, config.train.preset)
    if problems:
        raise ConfigError(_format_problems(source, problems))
    return config


def load_config(params: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Read ``params`` (or the built-in defaults when None), apply overrides, validate."""
    data = read_params_file(params) if params is not None else {}
    source = str(params) if params is not None else "defaults"
    if overrides:
        source += f" + {len(overrides)} override{'s' if len(overrides) > 1 else ''}"
    return build_config(apply_overrides(data, overrides), source)


FRAME_KEYS = ("data.frames", "validate.frames")

# train.preset: what each named setting sets, by (train.method, preset). fp8 storage and compute
# are LoRA-only (full fine-tuning trains every weight), so the full presets save memory with the
# CPU-offload optimizer instead. Fastest first: speed > balanced > lean.
_LORA_BALANCED = {"fp8_base_weights": True, "compile": "blocks", "attention_backend": "cudnn"}
_FULL_BALANCED = {"optimizer": "cpu_offload_adamw", "compile": "blocks", "attention_backend": "cudnn"}
PRESETS: dict[tuple[str, str], dict[str, Any]] = {
    ("lora", "speed"): {**_LORA_BALANCED, "fp8_compute": True, "keep_attention_outputs": True},
    ("lora", "balanced"): _LORA_BALANCED,
    ("lora", "lean"): {**_LORA_BALANCED, "fp8_compute": True, "activation_offload": True},
    ("full", "speed"): _FULL_BALANCED,
    ("full", "balanced"): _FULL_BALANCED,
    ("full", "lean"): {**_FULL_BALANCED, "activation_offload": True},
}
PRESET_ORDER = ("speed", "balanced", "lean")


def preset_changes(train: TrainConfig) -> dict[str, Any]:
    """The fields train.preset changes: each of the preset's fields whose value is still the
    field's default. A field the user set to anything else keeps that value (explicit wins)."""
    wanted = PRESETS.get((train.method, train.preset), {})
    fields = TrainConfig.model_fields
    return {name: value for name, value in wanted.items()
            if getattr(train, name) == fields[name].default and value != fields[name].default}


def apply_preset(train: TrainConfig) -> TrainConfig:
    """``train`` with its preset resolved (see :func:`preset_changes`), validated again; a pure
    function, so every consumer of the built config sees the same resolved values."""
    changes = preset_changes(train)
    if not changes:
        return train
    return TrainConfig.model_validate({**train.model_dump(), **changes})


def _note_preset_problems(problems: list[str], changes: dict[str, Any], preset: str) -> list[str]:
    """Say so when a consistency problem is about a value the preset set, not one the user wrote."""
    noted = []
    for problem in problems:
        field = next((name for name in changes if problem.startswith(f"train.{name} = ")), None)
        if field is not None:
            problem += (f" [train.{field} was set by train.preset = {preset}; with this setting use "
                        "train.preset = none and choose the options yourself]")
        noted.append(problem)
    return noted


def check_consistency(config: Config) -> list[str]:
    """Checks that span several fields (frame rules depend on the chosen model; memory options
    that only make sense together)."""
    frames = {"data.frames": config.data.frames, "validate.frames": config.validate_.frames}
    for index, bucket in enumerate(config.data.buckets or []):
        frames[f"data.buckets[{index}] frames"] = bucket[0]
    return (_frame_problems(config.model.variant, frames) + _option_problems(config.train)
            + _render_cache_problems(config) + _render_placement_problems(config) + _control_problems(config))


def _control_problems(config: Config) -> list[str]:
    """data.control with what control training cannot do: image-to-video models (their input
    already holds the image latents, and diffusers' CogVideoXFunControlPipeline, which renders
    control models, splits the input in two halves), full fine-tuning, inverted Canny thresholds,
    validation controls that do not pair with the prompts."""
    data, validate, problems = config.data, config.validate_, []
    if data.canny_high <= data.canny_low:
        problems.append(f"data.canny_high = {data.canny_high} must be above data.canny_low = {data.canny_low}")
    if validate.control_videos and len(validate.control_videos) != len(validate.prompts):
        problems.append(f"validate.control_videos lists {len(validate.control_videos)} videos for "
                        f"{len(validate.prompts)} validate.prompts: give one per prompt, or none")
    if data.control == "none":
        if validate.control_videos:
            problems.append("validate.control_videos is set but data.control = none: set data.control "
                            "(file or canny) to train a control model")
        return problems
    spec = config.spec
    if spec.task != "t2v":
        problems.append(f"data.control = {data.control} needs a text-to-video model: {spec.key} is image-to-video, "
                        "its input already holds the image latents (diffusers' CogVideoXFunControlPipeline, "
                        "which renders control models, has no image input); use the text-to-video model "
                        "of the same family")
    if config.train.method != "lora":
        problems.append(f"data.control = {data.control} trains an adapter and the control input weights: "
                        "set train.method = lora")
    return problems


def _render_placement_problems(config: Config) -> list[str]:
    """validate.fp8_compute with model or sequential offload: fp8 halves the transformer so it
    can stay on the GPU (offload = text_encoder or none); the offload hooks would copy it to the
    CPU and back at every render for nothing (and with torchao's fp8 tensors, used before, they
    failed at the first move on an H200), so the pair is refused up front."""
    if config.validate_.fp8_compute and config.validate_.offload not in ("none", "text_encoder"):
        return [f"validate.fp8_compute = true does not go with validate.offload = {config.validate_.offload}: "
                "fp8 renders keep the transformer on the GPU; set validate.offload = text_encoder "
                "(the transformer stays on the GPU, T5 streams in from the CPU), none (everything stays on the GPU) "
                "or validate.fp8_compute = false"]
    return []


def _render_cache_problems(config: Config) -> list[str]:
    """validate.cache = faster on compiled blocks: its hooks' step counters and timestep tests
    recompile each block graph until torch.compile gives up (recompile_limit) and runs those
    parts eagerly, so the combination costs compile time and gains nothing; refused up front
    rather than at the first validation render. (first_block and pyramid_broadcast compile.)"""
    if config.validate_.cache != "faster":
        return []
    tail = ("FasterCache's hooks recompile the compiled blocks at every step until torch.compile "
            "gives up; use validate.cache = first_block or pyramid_broadcast, or no compile")
    problems = []
    if config.validate_.compile:
        problems.append(f"validate.compile = true does not go with validate.cache = faster: {tail}")
    if config.train.compile == "blocks":
        problems.append(f"train.compile = blocks does not go with validate.cache = faster (validation "
                        f"renders the training transformer): {tail}")
    return problems


def _option_problems(train: TrainConfig) -> list[str]:
    problems = []
    if train.fp8_base_weights and train.method != "lora":
        problems.append("train.fp8_base_weights = true: fp8 storage is for frozen base weights; "
                        "with train.method = full every weight trains (use optimizer cpu_offload_adamw to save memory)")
    if train.activation_offload and not train.gradient_checkpointing:
        problems.append("train.activation_offload = true needs train.gradient_checkpointing = true "
                        "(it offloads the checkpointed block inputs)")
    if train.keep_attention_outputs and not train.gradient_checkpointing:
        problems.append("train.keep_attention_outputs = true needs train.gradient_checkpointing = true "
                        "(it chooses what checkpointing keeps)")
    problems += _adapter_kind_problems(train)
    if train.fp8_compute and not (train.fp8_base_weights and train.method == "lora"):
        problems.append("train.fp8_compute = true multiplies the fp8-stored frozen base weights: it needs "
                        "train.method = lora and train.fp8_base_weights = true")
    if train.optimizer == "cpu_offload_adamw" and train.gradient_accumulation_steps > 1:
        problems.append(f"train.optimizer = cpu_offload_adamw streams each gradient to the CPU as soon as the "
                        f"backward pass makes it, so micro-batches cannot be summed on the GPU: set "
                        f"train.gradient_accumulation_steps = 1 (not {train.gradient_accumulation_steps}) and raise "
                        f"train.batch_size, or use another optimizer")
    return problems


def _adapter_kind_problems(train: TrainConfig) -> list[str]:
    """train.lora.kind combinations that cannot work: PiSSA/OLoRA initialize LoRA's A/B pair
    from the base weight (no such pair in LoKr/LoHa); DoRA's magnitude divides by the norm of
    the base weight, which peft reads from the layer as stored, and fp8 storage holds it scaled
    per row, so the adapter would be normalized by the wrong norm."""
    lora, problems = train.lora, []
    if train.method != "lora":
        return problems
    if lora.kind in ("lokr", "loha") and lora.init in ("pissa", "olora"):
        problems.append(f"train.lora.init = {lora.init} initializes a LoRA A/B pair from the base weights; "
                        f"train.lora.kind = {lora.kind} has none: use train.lora.init = gaussian (or kind lora / dora)")
    if lora.kind == "dora" and train.fp8_base_weights:
        problems.append("train.fp8_base_weights = true does not go with train.lora.kind = dora: DoRA normalizes "
                        "by the base weight's norm, which fp8 storage keeps scaled per row; use "
                        "train.fp8_base_weights = false, or kind lora / lokr / loha")
    return problems


def _frame_problems(variant: Any, frames_by_key: dict[str, Any]) -> list[str]:
    """Frame counts that break the variant's frame rule (4k+1 or 16N+1)."""
    key = resolve_key(variant) if isinstance(variant, str) else None
    if key is None:
        return []
    spec = SPECS[key]
    problems = []
    for name, frames in frames_by_key.items():
        if isinstance(frames, int) and frames >= 2 and not spec.frame_rule.accepts(frames):
            nearest = " or ".join(str(v) for v in spec.frame_rule.nearest(frames))
            problems.append(f"{name} = {frames}: {spec.key} needs {spec.frame_rule} frames "
                            f"(e.g. {nearest})")
    return problems


def _raw_get(data: Any, *keys: str, default: Any) -> Any:
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return default
        data = data[key]
    return data


def _format_problems(source: str, problems: list[str]) -> str:
    noun = "problem" if len(problems) == 1 else "problems"
    lines = "\n".join(f"  - {problem}" for problem in problems)
    return f"invalid configuration ({source}), {len(problems)} {noun}:\n{lines}"


def _describe_error(error: dict[str, Any]) -> str:
    """One line for one pydantic error: dotted key, the value given, and what is allowed."""
    loc = [str(part) for part in error["loc"] if not str(part).startswith("function-")]
    loc = ["validate" if part == "validate_" else part for part in loc]
    key = ".".join(loc) or "(top level)"
    value = _short_repr(error.get("input"))
    if error["type"] == "extra_forbidden":
        return f"{key} = {value}: unknown key; {_allowed_keys_hint(loc)}"
    message = error["msg"]
    for prefix in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(prefix)
    return f"{key} = {value}: {message}"


# Names users bring from other trainers' flags, mapped to ours for "did you mean" hints.
FLAG_ALIASES = {
    "lr": "learning_rate", "max_train_steps": "max_steps", "steps": "max_steps",
    "train_batch_size": "batch_size", "rank": "lora.rank", "lora_rank": "lora.rank",
    "lora_alpha": "lora.alpha", "alpha": "lora.alpha", "gradient_accumulation": "gradient_accumulation_steps",
    "num_frames": "frames", "max_num_frames": "frames", "validation_steps": "every_n_steps",
    "validation_prompt": "prompts", "pretrained_model_name_or_path": "path",
}


def _allowed_keys_hint(loc: list[str]) -> str:
    """'did you mean x?' plus the keys that section accepts."""
    model: type[BaseModel] = Config
    for part in loc[:-1]:
        field = _field_by_name(model, part)
        annotation = field.annotation if field is not None else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return "check the spelling"
        model = annotation
    names = [f.alias or name for name, f in model.model_fields.items()]
    alias = FLAG_ALIASES.get(loc[-1])
    close = [alias] if alias and alias.split(".")[0] in names else difflib.get_close_matches(loc[-1], names, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    section = ".".join(loc[:-1]) or "the top level"
    return f"{hint}{section} accepts: {', '.join(names)}"


def _field_by_name(model: type[BaseModel], name: str):
    for field_name, field in model.model_fields.items():
        if name in (field_name, field.alias):
            return field
    return None


def _short_repr(value: Any, limit: int = 200) -> str:
    """A value as a message shows it: whole up to ``limit`` characters (a deep path stays
    readable), cut beyond (a pasted blob does not flood the console)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _section_names() -> list[str]:
    return [field.alias or name for name, field in Config.model_fields.items()]


# ----------------------------------------------------------------------------- output


def write_resolved_config(config: Config, directory: str | Path) -> Path:
    """Write the resolved config next to the outputs it produced (atomically)."""
    header = "# Resolved cogvx configuration that produced the files in this folder.\n"
    return atomic_write_text(Path(directory) / RESOLVED_CONFIG_NAME, header + config.to_yaml())


def schema_rows(model: type[BaseModel] = Config, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, description) for every leaf field, in declaration order."""
    rows: list[tuple[str, str, str, str]] = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{field.alias or name}"
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows.extend(schema_rows(annotation, prefix=f"{key}."))
            continue
        default = field.get_default(call_default_factory=True)
        rows.append((key, _type_name(annotation), _short_repr(_plain(default), 50),
                     field.description or ""))
    return rows


def _type_name(annotation: Any) -> str:
    text = str(annotation).replace("typing.", "").replace("pathlib._local.", "").replace("pathlib.", "")
    return text.replace("<class '", "").replace("'>", "")


def _plain(value: Any) -> Any:
    return str(value) if isinstance(value, Path) else value
