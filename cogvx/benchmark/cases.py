"""What `cogvx bench` measures: named cases grouped into suites, each a config plus targets.

A case is a set of dotted config overrides (the same keys `cogvx train` reads) applied to a
model at a clip size; its kind says which of the project's own code paths runs: ``train``
(optimizer steps of the training loop), ``validate`` (training steps, one in-training
validation render, one more step), ``generate`` (one 50-step render as `cogvx generate`
does) or ``prepare`` (`cogvx prepare` over real clips). ``reference`` names the anchor step
(shared/bench/anchor_lora_step.py) run in the same invocation to compare with.

A case with ``launch`` runs under ``accelerate launch`` with that file of configs/accelerate/
on ``processes`` GPUs (DDP, FSDP2, DeepSpeed), through the same training and prepare code;
``baseline`` names the one-process case its scaling efficiency is measured against.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Kind = Literal["train", "validate", "generate", "prepare", "quality"]

LORA_64 = ("train.method=lora", "train.lora.rank=64", "train.lora.alpha=64")
FAST = ("train.compile=blocks", "train.attention_backend=cudnn")
FP8_FAST = ("train.fp8_base_weights=true", *FAST)
VALIDATION_50 = ("validate.num_inference_steps=50", "validate.guidance_scale=6.0")


@dataclass(frozen=True)
class Case:
    """One measured configuration."""

    name: str
    kind: Kind
    variant: str
    size: tuple[int, int, int]  # frames, height, width
    overrides: tuple[str, ...] = ()
    reference: str | None = None  # anchor model ("2b" / "5b") to run side by side
    targets: dict[str, float] = field(default_factory=dict)  # e.g. {"time_ratio": 0.6, "peak_gib": 12}
    steps: int = 5
    warmup: int = 2
    note: str = ""
    launch: str | None = None  # accelerate config file in configs/accelerate/
    processes: int = 1
    baseline: str | None = None  # case to compute scaling efficiency against
    profile: bool = False  # train: one more step under torch.profiler (kernel names); generate: time by component
    env: tuple[tuple[str, str], ...] = ()  # environment of the case's process, e.g. the CUDA allocator's settings

    @property
    def size_text(self) -> str:
        return "x".join(map(str, self.size))


S49 = (49, 480, 720)


def generate_5b(name: str, options: tuple[str, ...], target_seconds: float | None = None, profile: bool = True,
                env: tuple[tuple[str, str], ...] = (), note: str = "") -> Case:
    """A 5b generate case at 49x480x720: 50 steps, CFG 6, compiled blocks, then ``options``; with
    ``target_seconds`` the issue's time target and the 23 GiB card's memory target. The 5b
    reference step runs in the same invocation, so the render's figures come from a GPU whose
    speed that step shows."""
    targets = {"seconds": target_seconds, "peak_reserved_gib": 23.0} if target_seconds else {}
    return Case(name, "generate", "cogvideox-5b", S49, VALIDATION_50 + ("validate.compile=true",) + options, "5b",
                targets=targets, steps=1, warmup=1, profile=profile, env=env, note=note)


ISSUE7: tuple[Case, ...] = (
    Case("5b-lora-bf16", "train", "cogvideox-5b", S49, LORA_64, "5b",
         note="our step at the reference's settings (bf16, eager, AdamW)"),
    Case("5b-lora-compile", "train", "cogvideox-5b", S49, LORA_64 + FAST, "5b"),
    Case("5b-lora-fp8-compile", "train", "cogvideox-5b", S49, LORA_64 + FP8_FAST, "5b",
         targets={"time_ratio": 0.6, "mem_ratio": 0.66}),
    Case("5b-lora-fp8-compile-8bit", "train", "cogvideox-5b", S49, LORA_64 + FP8_FAST + ("train.optimizer=adamw8bit",),
         "5b", targets={"time_ratio": 0.6, "mem_ratio": 0.66}),
    Case("5b-lora-fp8-compile-flash", "train", "cogvideox-5b", S49,
         LORA_64 + ("train.fp8_base_weights=true", "train.compile=blocks", "train.attention_backend=flash"), "5b",
         targets={"time_ratio": 0.6, "mem_ratio": 0.66}, note="FlashAttention-2 kernel instead of cuDNN"),
    Case("5b-lora-fp8-compile-offload", "train", "cogvideox-5b", S49,
         LORA_64 + FP8_FAST + ("train.activation_offload=true",), "5b",
         targets={"time_ratio": 0.6, "mem_ratio": 0.66}),
    Case("5b-lora-lowest", "train", "cogvideox-5b", S49,
         LORA_64 + FP8_FAST + ("train.optimizer=adamw8bit", "train.activation_offload=true"), "5b",
         targets={"mem_ratio": 0.66}),
    Case("2b-lora-bf16", "train", "cogvideox-2b", S49, LORA_64, "2b"),
    Case("2b-lora-fp8-compile", "train", "cogvideox-2b", S49, LORA_64 + FP8_FAST, "2b",
         targets={"time_ratio": 0.65, "peak_gib": 5.0}),
    Case("2b-lora-lowest", "train", "cogvideox-2b", S49,
         LORA_64 + FP8_FAST + ("train.optimizer=adamw8bit", "train.activation_offload=true"), "2b",
         targets={"time_ratio": 0.65, "peak_gib": 5.0}),
    Case("5b-lora-with-validation", "validate", "cogvideox-5b", S49,
         LORA_64 + FP8_FAST + VALIDATION_50 + ("validate.offload=model",), None,
         targets={"peak_gib": 24.0}, steps=2, warmup=1,
         note="2 steps, one 49-frame 50-step CFG validation render (T5 + VAE + transformer), 1 more step"),
    Case("5b-full-cpu-offload", "train", "cogvideox-5b", S49,
         ("train.method=full", "train.optimizer=cpu_offload_adamw", "train.activation_offload=true", *FAST),
         None, targets={"peak_gib": 24.0}, steps=3, warmup=1),
    Case("1.5-5b-lora-81x768x1360", "train", "cogvideox1.5-5b", (81, 768, 1360),
         LORA_64 + FP8_FAST + ("train.activation_offload=true",), None,
         targets={"peak_gib": 24.0}, steps=3, warmup=1, note="floor 7.5 s/step"),
    Case("5b-generate", "generate", "cogvideox-5b", S49,
         VALIDATION_50 + ("validate.compile=true", "validate.offload=model", "train.attention_backend=cudnn"),
         targets={"seconds": 80.0, "peak_gib": 24.0}, steps=1, warmup=1,
         note="49 frames, 50 steps, CFG 6; compile warm-up with a 2-step render not counted"),
    Case("5b-generate-fp8", "generate", "cogvideox-5b", S49,
         VALIDATION_50 + ("validate.compile=true", "validate.fp8_compute=true", "validate.offload=none",
                          "train.attention_backend=cudnn"),
         targets={"seconds": 80.0, "peak_gib": 24.0}, steps=1, warmup=1,
         note="as 5b-generate with torchao fp8 (per-row) linear layers, everything resident on the GPU"),
    Case("prepare-49x480x720", "prepare", "cogvideox-5b", S49, (), None,
         targets={"clips_per_s": 1.0}, steps=16, warmup=0,
         note="16 clips: decode + VAE + T5 + write"),
)

# The same code paths on the tiny model, for CPU tests of the benchmark itself.
SMOKE: tuple[Case, ...] = (
    Case("tiny-lora", "train", "tiny-t2v", (9, 64, 96), ("train.lora.rank=4", "train.lora.alpha=4"), steps=2, warmup=1),
    Case("tiny-lora-fp8-offload", "train", "tiny-t2v", (9, 64, 96),
         ("train.lora.rank=4", "train.fp8_base_weights=true", "train.activation_offload=true"), steps=2, warmup=1),
    Case("tiny-lora-ddp", "train", "tiny-t2v", (9, 64, 96), ("train.lora.rank=4", "train.lora.alpha=4"), steps=2,
         warmup=1, launch="ddp-2gpu.yaml", processes=2, baseline="tiny-lora"),
    Case("tiny-validate", "validate", "tiny-t2v", (9, 64, 96),
         ("validate.num_inference_steps=2", "train.attention_backend=flash"), steps=1, warmup=1),
    Case("tiny-generate", "generate", "tiny-t2v", (9, 64, 96),
         ("validate.num_inference_steps=2", "train.attention_backend=flash"), steps=1, warmup=1, profile=True),
    Case("tiny-generate-cache", "generate", "tiny-t2v", (9, 64, 96),
         ("validate.num_inference_steps=8", "validate.cache=first_block", "validate.cache_threshold=0.35"), steps=1,
         warmup=1, note="validate.cache's speedup and output difference against the same render uncached"),
    Case("tiny-control-lokr-validate", "validate", "tiny-t2v", (9, 64, 96),
         ("validate.num_inference_steps=2", "data.control=canny", "train.lora.kind=lokr", "train.lora.rank=4"),
         steps=1, warmup=1, note="the issue18 cases' code paths: widened input, control latents, control render"),
)

# Several GPUs (issue 10): DDP scaling of the fast LoRA step, sharded full fine-tuning, prepare.
FULL = ("train.method=full", "train.optimizer=adamw", "train.attention_backend=cudnn")
ISSUE10: tuple[Case, ...] = (
    Case("5b-lora-1gpu", "train", "cogvideox-5b", S49, LORA_64 + FP8_FAST, "5b",
         note="one process: the baseline of the DDP cases"),
    Case("5b-lora-ddp", "train", "cogvideox-5b", S49, LORA_64 + FP8_FAST, "5b", launch="ddp-2gpu.yaml",
         processes=2, baseline="5b-lora-1gpu", targets={"scaling_efficiency": 0.9},
         note="batch 1 per GPU; samples/s over all GPUs"),
    Case("5b-full-fsdp2", "train", "cogvideox-5b", S49, FULL, None, launch="fsdp2.yaml", processes=2,
         steps=3, warmup=1, note="weights, gradients and AdamW state sharded; peak per GPU"),
    Case("5b-full-zero2", "train", "cogvideox-5b", S49, FULL, None, launch="zero2.yaml", processes=2,
         steps=3, warmup=1, note="DeepSpeed ZeRO-2 (published: 42 GB per GPU on 8 GPUs)"),
    Case("5b-full-zero3", "train", "cogvideox-5b", S49, FULL, None, launch="zero3.yaml", processes=2,
         steps=3, warmup=1, note="DeepSpeed ZeRO-3"),
    Case("prepare-1gpu", "prepare", "cogvideox-5b", S49, (), None, steps=16, warmup=0,
         note="16 clips on one GPU: the baseline of prepare-ddp"),
    Case("prepare-ddp", "prepare", "cogvideox-5b", S49, (), None, launch="ddp-2gpu.yaml", processes=2,
         baseline="prepare-1gpu", steps=16, warmup=0, note="16 clips shared across GPUs"),
)

# Issue 17: every headline setting on a simulated 24 GB card (`bench run --memory-cap-gib 23`),
# the named presets against the eager and the compiled reference step, kernels checked by name.
SPEED = ("train.preset=speed",)
BALANCED = ("train.preset=balanced",)
LEAN = ("train.preset=lean",)
VALIDATE_QUICK = ("validate.num_inference_steps=2", "validate.guidance_scale=6.0", "validate.offload=model")
S81 = (81, 768, 1360)
FA4 = ("train.attention_backend=fa4",)
EXPANDABLE = (("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True"),)
ISSUE17: tuple[Case, ...] = (
    Case("5b-speed", "train", "cogvideox-5b", S49, LORA_64 + SPEED, "5b", targets={"time_ratio": 0.6},
         steps=4, warmup=2, profile=True, note="preset speed: fp8 storage + fp8 GEMMs, compiled, cuDNN, attention kept"),
    Case("5b-balanced", "train", "cogvideox-5b", S49, LORA_64 + BALANCED, "5b", steps=4, warmup=2, profile=True),
    Case("5b-lean", "train", "cogvideox-5b", S49, LORA_64 + LEAN, "5b", targets={"time_ratio": 0.75, "mem_ratio": 0.55},
         steps=4, warmup=2),
    Case("5b-flash", "train", "cogvideox-5b", (9, 240, 368), LORA_64 + BALANCED + ("train.attention_backend=flash",),
         steps=1, warmup=1, profile=True, note="kernel check: FlashAttention-2 asked, under compile, small clip"),
    Case("5b-flash-eager", "train", "cogvideox-5b", (9, 240, 368), LORA_64 + ("train.attention_backend=flash",),
         steps=1, warmup=1, profile=True, note="kernel check: FlashAttention-2 asked, eager, small clip"),
    Case("2b-speed", "train", "cogvideox-2b", S49, LORA_64 + SPEED, "2b", targets={"time_ratio": 0.6},
         steps=4, warmup=2),
    Case("5b-full", "train", "cogvideox-5b", S49, ("train.method=full", "train.preset=balanced"), "5b",
         targets={"peak_reserved_gib": 20.0, "s_per_step_median": 3.8}, steps=3, warmup=2,
         note="full fine-tune: CPU-offload AdamW (fused), gradients streamed to the CPU, compiled blocks"),
    Case("fp8-quality", "quality", "cogvideox-5b", (9, 240, 368), (), None, steps=240,
         targets={"grad_rel_err_median": 0.1, "loss_curve_rel_diff": 0.05},
         note="LoRA gradients fp8 GEMMs vs bf16 on the 5b architecture; 240-step tiny loss curves"),
    Case("2b-lora-validation", "validate", "cogvideox-2b", S49, LORA_64 + SPEED + VALIDATE_QUICK, None,
         targets={"peak_reserved_gib": 23.0}, steps=2, warmup=1),
    Case("5b-lora-validation", "validate", "cogvideox-5b", S49, LORA_64 + SPEED + VALIDATE_QUICK, None,
         targets={"peak_reserved_gib": 23.0}, steps=2, warmup=1),
    Case("5b-i2v-lora-validation", "validate", "cogvideox-5b-i2v", S49, LORA_64 + SPEED + VALIDATE_QUICK, None,
         targets={"peak_reserved_gib": 23.0}, steps=2, warmup=1),
    Case("1.5-5b-lora-validation", "validate", "cogvideox1.5-5b", S81, LORA_64 + LEAN + VALIDATE_QUICK, None,
         targets={"peak_reserved_gib": 23.0}, steps=2, warmup=1, note="81x768x1360, preset lean"),
    Case("1.5-5b-i2v-lora-validation", "validate", "cogvideox1.5-5b-i2v", S81, LORA_64 + LEAN + VALIDATE_QUICK, None,
         targets={"peak_reserved_gib": 23.0}, steps=2, warmup=1, note="81x768x1360, preset lean"),
    generate_5b("5b-generate", ("validate.offload=model", "train.attention_backend=cudnn"), 65.0,
                note="49 frames, 50 steps, CFG 6, compiled bf16; time by component"),
    generate_5b("5b-generate-fp8",
                ("validate.fp8_compute=true", "validate.offload=none", "train.attention_backend=cudnn"), 60.0),
    generate_5b("5b-generate-first-block-cache",
                ("validate.offload=model", "train.attention_backend=cudnn", "validate.cache=first_block"),
                profile=False,
                note="as 5b-generate with diffusers' FirstBlockCache (validate.cache)"),
    generate_5b("5b-generate-pyramid",
                ("validate.offload=model", "train.attention_backend=cudnn", "validate.cache=pyramid_broadcast"),
                note="as 5b-generate with diffusers' pyramid attention broadcast (a fixed skip schedule: its "
                "speedup does not depend on the weights)"),
    # FlashAttention-4 (train.attention_backend=fa4, flash-attn-4 installed on the GPU machine)
    Case("5b-speed-fa4", "train", "cogvideox-5b", S49, LORA_64 + SPEED + FA4, "5b", targets={"time_ratio": 0.6},
         steps=4, warmup=2, profile=True, note="preset speed with FlashAttention-4 kernels"),
    Case("2b-speed-fa4", "train", "cogvideox-2b", S49, LORA_64 + SPEED + FA4, "2b", targets={"time_ratio": 0.6},
         steps=4, warmup=2, profile=True, note="preset speed with FlashAttention-4 kernels"),
    Case("5b-fa4-eager", "train", "cogvideox-5b", (9, 240, 368), LORA_64 + FA4, steps=1, warmup=1, profile=True,
         note="kernel check: FlashAttention-4 asked, eager, small clip"),
    generate_5b("5b-generate-fa4", ("validate.offload=model",) + FA4, 65.0,
                note="as 5b-generate with FlashAttention-4 kernels"),
    generate_5b("5b-generate-fp8-fa4", ("validate.fp8_compute=true", "validate.offload=none") + FA4, 60.0,
                note="as 5b-generate-fp8 with FlashAttention-4 kernels"),
    # Generation with the untiled VAE decode (the tiled one took 10.7 of 81.6 s): out of memory under
    # the cap at 23902ef (13.2 GiB allocated, 9.2 GiB held in partly used blocks, 1.3 GiB asked for),
    # so the same with expandable allocator segments, which let freed pages go back; caching hooks.
    generate_5b("5b-generate-untiled",
                ("validate.offload=model", "train.attention_backend=cudnn", "validate.vae_tiling=false"), 65.0,
                note="as 5b-generate, VAE decode untiled"),
    generate_5b("5b-generate-fa4-untiled-expandable", ("validate.offload=model", "validate.vae_tiling=false") + FA4,
                65.0, env=EXPANDABLE, note="as 5b-generate-fa4, VAE decode untiled, expandable allocator segments"),
    generate_5b("5b-generate-fa4-expandable", ("validate.offload=model",) + FA4, 65.0, env=EXPANDABLE,
                note="as 5b-generate-fa4 (tiled decode) with expandable allocator segments: what they cost alone"),
    generate_5b("5b-generate-first-block-cache-fa4", ("validate.offload=model", "validate.cache=first_block") + FA4,
                note="as 5b-generate-fa4 with diffusers' FirstBlockCache"),
    generate_5b("5b-generate-pyramid-fa4", ("validate.offload=model", "validate.cache=pyramid_broadcast") + FA4,
                note="as 5b-generate-fa4 with diffusers' pyramid attention broadcast (a fixed skip schedule: its "
                "speedup does not depend on the weights)"),
    # The VAE decode compiled (validate.compile_vae), tiled (dynamic tile sizes) and untiled.
    generate_5b("5b-generate-fa4-compiled-vae", ("validate.compile_vae=true", "validate.offload=model") + FA4, 65.0,
                note="as 5b-generate-fa4, the VAE decoder compiled"),
    generate_5b("5b-generate-fp8-fa4-compiled-vae",
                ("validate.compile_vae=true", "validate.fp8_compute=true", "validate.offload=none") + FA4, 60.0,
                note="as 5b-generate-fp8-fa4, the VAE decoder compiled"),
    generate_5b("5b-generate-fp8-compiled-vae",
                ("validate.compile_vae=true", "validate.fp8_compute=true", "validate.offload=none",
                 "train.attention_backend=cudnn"), 60.0, note="as 5b-generate-fp8, the VAE decoder compiled"),
    generate_5b("5b-generate-fa4-untiled-compiled-vae",
                ("validate.compile_vae=true", "validate.vae_tiling=false", "validate.offload=model") + FA4, 65.0,
                env=EXPANDABLE,
                note="as 5b-generate-fa4, the VAE decoder compiled and untiled, expandable allocator segments"),
    # The T5 encoder streamed in from pinned CPU memory while the transformer and VAE stay on the GPU
    # (validate.offload=text_encoder: no whole-model copies per render, and fp8 compute can offload);
    # the decode in fewer, bigger tiles (validate.vae_tiles). cuDNN cases first (one cold call).
    generate_5b("5b-generate-t5-stream",
                ("validate.offload=text_encoder", "train.attention_backend=cudnn"), 65.0,
                note="as 5b-generate, T5 streamed, the transformer and VAE resident"),
    generate_5b("5b-generate-fp8-t5-stream",
                ("validate.fp8_compute=true", "validate.offload=text_encoder", "validate.vae_tiles=[2,2]",
                 "train.attention_backend=cudnn"), 60.0,
                note="as 5b-generate-fp8, T5 streamed, decode in 2 x 2 tiles"),
    generate_5b("5b-generate-pyramid-t5-stream",
                ("validate.offload=text_encoder", "validate.vae_tiles=[2,2]", "validate.cache=pyramid_broadcast",
                 "train.attention_backend=cudnn"),
                note="as 5b-generate-t5-stream with pyramid attention broadcast, then the same render uncached "
                "(speedup and output difference; random weights). Out of memory under the cap at dcad2c2: the "
                "broadcast keeps every block's attention output, 42 x 218 MB at this size, beside the resident "
                "transformer"),
    generate_5b("5b-generate-pyramid-fp8-t5-stream",
                ("validate.fp8_compute=true", "validate.offload=text_encoder", "validate.cache=pyramid_broadcast",
                 "train.attention_backend=cudnn"),
                note="pyramid attention broadcast beside the fp8 transformer (~6 GB instead of 11), diffusers' "
                "decode tiles, then the same render uncached: a fixed skip schedule, so its speedup does not "
                "depend on the weights"),
    generate_5b("5b-generate-pyramid-fp8-fa4-t5-stream",
                ("validate.fp8_compute=true", "validate.offload=text_encoder", "validate.cache=pyramid_broadcast") + FA4,
                60.0, note="as 5b-generate-pyramid-fp8-t5-stream with FlashAttention-4: the fastest render setting, "
                "then the same render uncached"),
    generate_5b("5b-generate-fa4-tiles-1x2", ("validate.offload=model", "validate.vae_tiles=[1,2]") + FA4, 65.0,
                note="as 5b-generate-fa4, decode in 1 x 2 tiles"),
    generate_5b("5b-generate-fa4-t5-stream", ("validate.offload=text_encoder", "validate.vae_tiles=[2,2]") + FA4, 65.0,
                note="as 5b-generate-fa4, T5 streamed, the transformer and VAE resident, decode in 2 x 2 tiles"),
    generate_5b("5b-generate-fp8-fa4-t5-stream",
                ("validate.fp8_compute=true", "validate.offload=text_encoder", "validate.vae_tiles=[2,2]") + FA4, 60.0,
                note="as 5b-generate-fp8-fa4, T5 streamed, decode in 2 x 2 tiles"),
    generate_5b("5b-generate-first-block-cache-fa4-t5-stream",
                ("validate.offload=text_encoder", "validate.vae_tiles=[2,2]", "validate.cache=first_block") + FA4,
                note="as 5b-generate-fa4-t5-stream with first-block cache, then the same render uncached "
                "(speedup and output difference; random weights: its skips depend on the weights)"),
    Case("5b-full-fa4", "train", "cogvideox-5b", S49, ("train.method=full", "train.preset=balanced") + FA4, "5b",
         targets={"peak_reserved_gib": 20.0, "s_per_step_median": 3.8}, steps=3, warmup=2, profile=True,
         note="5b-full with FlashAttention-4 kernels"),
    Case("prepare-eager", "prepare", "cogvideox-5b", S49, (), None, targets={"clips_per_s": 1.5}, steps=16, warmup=0,
         note="16 clips: decode + VAE + T5 + write; clips/s after the first batch"),
    Case("prepare-compile", "prepare", "cogvideox-5b", S49, ("prepare.compile=true",), None,
         targets={"clips_per_s": 1.5}, steps=16, warmup=0, note="VAE encoder compiled"),
)

# Issue 18: control training (a canny-control LoRA: the widened input and control latents) and the
# adapter kinds, beside the reference step, on the simulated 24 GB card (--memory-cap-gib 23).
CONTROL = ("data.control=canny",)
ISSUE18: tuple[Case, ...] = (
    Case("5b-control-canny", "train", "cogvideox-5b", S49, LORA_64 + SPEED + CONTROL, "5b",
         targets={"time_ratio": 0.6, "peak_reserved_gib": 23.0}, steps=4, warmup=2,
         note="canny-control LoRA r64, preset speed: 32-channel input, control latents"),
    Case("5b-control-canny-validation", "validate", "cogvideox-5b", S49, LORA_64 + SPEED + CONTROL + VALIDATE_QUICK,
         None, targets={"peak_reserved_gib": 23.0}, steps=2, warmup=1,
         note="as 5b-control-canny with an in-training validation render (control pipeline)"),
    Case("5b-dora", "train", "cogvideox-5b", S49, LORA_64 + FAST + ("train.lora.kind=dora",), "5b",
         targets={"peak_reserved_gib": 23.0}, steps=4, warmup=2,
         note="DoRA r64, compiled, cuDNN (bf16 base: DoRA refuses fp8 storage)"),
    Case("5b-lokr", "train", "cogvideox-5b", S49, LORA_64 + SPEED + ("train.lora.kind=lokr",), "5b",
         targets={"peak_reserved_gib": 23.0}, steps=4, warmup=2, note="LoKr r64, preset speed"),
)
SUITES: dict[str, tuple[Case, ...]] = {"issue7": ISSUE7, "issue10": ISSUE10, "issue17": ISSUE17, "issue18": ISSUE18,
                                       "smoke": SMOKE}
# Reference variants run besides the eager anchor step (anchor_lora_step.py --variant ...), by model.
REFERENCE_VARIANTS: dict[str, dict[str, tuple[str, ...]]] = {"issue17": {"5b": ("compile",)}}


def check_runnable(cases: list[Case], cuda_available: bool) -> None:
    """Real-size cases need a CUDA GPU (a 5b model in fp32 on a CPU would take 20+ GiB of RAM)."""
    from cogvx.errors import CogvxError
    from cogvx.models.specs import get_spec

    real = [case.name for case in cases if not get_spec(case.variant).tiny]
    if real and not cuda_available:
        raise CogvxError(f"cases {', '.join(real[:3])}{' ...' if len(real) > 3 else ''} build real-size models "
                         "and need a CUDA GPU; on this machine run `cogvx bench run --suite smoke`")


def select(suite: str, names: list[str] | None = None) -> list[Case]:
    """The cases of a suite, or the named ones among them (in suite order)."""
    from cogvx.errors import CogvxError

    if suite not in SUITES:
        raise CogvxError(f"no benchmark suite {suite!r}; suites: {', '.join(SUITES)}")
    cases = list(SUITES[suite])
    if names:
        known = {case.name for case in cases}
        unknown = [name for name in names if name not in known]
        if unknown:
            raise CogvxError(f"suite {suite} has no case {', '.join(unknown)}; cases: {', '.join(sorted(known))}")
        cases = [case for case in cases if case.name in names]
    return cases
