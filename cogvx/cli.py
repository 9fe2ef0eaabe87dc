"""The `cogvx` command line: a thin shell over the library.

Every command that does work takes ``--params FILE`` and dotted overrides (``train.lora.rank=8``)
and goes through :func:`cogvx.config.load_config`, so a bad value is rejected before any work.
User errors print one message (no traceback) and exit non-zero.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import click
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cogvx import __version__
from cogvx.config import Config, load_config, schema_rows
from cogvx.errors import CogvxError, CogvxWarning
from cogvx.models.specs import SPECS, TINY_VARIANTS

app = typer.Typer(
    name="cogvx",
    help="Fine-tune CogVideoX video diffusion models (LoRA or full) into custom video generators.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
config_app = typer.Typer(help="Show the resolved configuration or its documented fields.",
                         no_args_is_help=True)
app.add_typer(config_app, name="config")
data_app = typer.Typer(help="Get, make and validate training data sets.", no_args_is_help=True)
app.add_typer(data_app, name="data")
registry_app = typer.Typer(help="The MLflow Model Registry: list and promote registered LoRAs.", no_args_is_help=True)
app.add_typer(registry_app, name="registry")
bench_app = typer.Typer(help="Measure memory and speed of the project's own training, generation and prepare code at real size.",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")
tracking_app = typer.Typer(help="MLflow tracking: finish runs that could not reach the store.", no_args_is_help=True)
app.add_typer(tracking_app, name="tracking")
flow_app = typer.Typer(help="Run the whole pipeline as a Prefect flow, once or on a cron schedule.", no_args_is_help=True)
app.add_typer(flow_app, name="flow")

# Piped output gets a wide table instead of rich's 80-column default.
out = Console(width=None if sys.stdout.isatty() else 160, soft_wrap=not sys.stdout.isatty())
err = Console(stderr=True, soft_wrap=not sys.stderr.isatty())

DEFAULT_PARAMS = Path("params.yaml")
ParamsOption = Annotated[Optional[Path], typer.Option(
    "--params", "-p", help="params file; default: ./params.yaml when present, else built-in defaults.",
    show_default=False)]
OverridesArg = Annotated[Optional[list[str]], typer.Argument(
    help="Dotted overrides applied on top of the params file, e.g. train.lora.rank=8 data.frames=49.",
    show_default=False)]


def params_path(params: Optional[Path]) -> Optional[str]:
    """The params file a command reads: --params, else ./params.yaml when present, else None."""
    if params is None and DEFAULT_PARAMS.is_file():
        params = DEFAULT_PARAMS
    return str(params) if params is not None else None


def resolve_config(params: Optional[Path], overrides: Optional[list[str]]) -> Config:
    """The validated config of a command: --params (or ./params.yaml, or defaults) + overrides."""
    return load_config(params_path(params), overrides or ())


def _version_callback(value: bool) -> None:
    if value:
        out.print(f"cogvx {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version_callback,
                                                is_eager=True, help="Print the version and exit.")] = False) -> None:
    """Fine-tune CogVideoX video diffusion models (LoRA or full) into custom video generators."""


@config_app.command("show")
def config_show(overrides: OverridesArg = None, params: ParamsOption = None,
                as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of YAML.")] = False) -> None:
    """Print the resolved configuration (params file + overrides, validated)."""
    config = resolve_config(params, overrides)
    if as_json:
        print(json.dumps(config.to_dict(), indent=2))
    else:
        print(config.to_yaml(), end="")


@config_app.command("schema")
def config_schema(as_json: Annotated[bool, typer.Option("--json", help="Print the JSON Schema.")] = False) -> None:
    """Print every config field: dotted key, type, default and what it does."""
    if as_json:
        print(json.dumps(Config.model_json_schema(by_alias=True), indent=2))
        return
    section = None
    for key, type_name, default, description in schema_rows():
        if key.split(".")[0] != section:
            section = key.split(".")[0]
            print(f"{'' if section == 'data' else chr(10)}[{section}]")
        print(f"  {key}: {type_name} = {default}\n      {description}")


@app.command("models")
def models(as_json: Annotated[bool, typer.Option("--json", help="Print every field as JSON.")] = False) -> None:
    """List the model specs: the CogVideoX checkpoints and the tiny local stand-ins."""
    specs = list(SPECS.values())
    if as_json:
        rows = [dict(variant=s.key, hub_id=s.hub_id, source=s.default_source, task=s.task,
                     version=s.generation, frames=s.frames, height=s.height, width=s.width,
                     fps=s.fps, weights_dtype=s.weights_dtype, frame_rule=str(s.frame_rule),
                     vae_scaling_factor=s.vae_scaling_factor,
                     invert_scale_latents=s.invert_scale_latents,
                     lora_target_modules=list(s.lora_target_modules), notes=s.notes)
                for s in specs]
        print(json.dumps(rows, indent=2))
        return
    table = Table(title="cogvx models", caption="LoRA targets: "
                  + ", ".join(sorted({", ".join(s.lora_target_modules) for s in specs}))
                  + "; more fields: cogvx models --json")
    for column in ("variant", "source", "task", "ver", "clip FxHxW", "fps", "dtype", "frames", "VAE scale"):
        table.add_column(column, no_wrap=column in ("variant", "clip FxHxW"))
    for s in specs:
        scale = f"{s.vae_scaling_factor:g}" + (" (1/x)" if s.invert_scale_latents else "")
        table.add_row(s.key, s.default_source, s.task, s.generation, f"{s.frames}x{s.height}x{s.width}",
                      str(s.fps), s.weights_dtype, str(s.frame_rule), scale)
    out.print(table)


@app.command("make-tiny-model")
def make_tiny_model(
    overrides: OverridesArg = None, params: ParamsOption = None,
    variant: Annotated[Optional[str], typer.Option(help=f"Tiny variant: {', '.join(TINY_VARIANTS)}; default: model.variant.")] = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Folder to write; default: model.path or models/<variant>.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace the folder if it exists.")] = False,
) -> None:
    """Build a tiny random-weight CogVideoX pipeline in the diffusers layout (no download)."""
    if variant is not None:
        overrides = [*(overrides or []), f"model.variant={variant}"]
    config = resolve_config(params, overrides)
    spec = config.spec
    if not spec.tiny:
        raise CogvxError(f"model.variant = {spec.key!r} is a full-size model; make-tiny-model builds "
                         f"{', '.join(TINY_VARIANTS)}")
    from cogvx import stages

    with err.status(f"building {spec.key} ..."):
        model = stages.build_base_model(config, out_dir or Path(config.model_source), seed=seed,
                                        existing="replace" if overwrite else "fail")
    out.print(f"wrote {spec.key} ({spec.task}, CogVideoX {spec.generation}) to {model.source}")


@app.command("check")
def check(overrides: OverridesArg = None, params: ParamsOption = None,
          out_dir: Annotated[Path, typer.Option("--out", help="Folder for sample.mp4, report.json and the resolved config.")] = Path("outputs/check"),
          steps: Annotated[int, typer.Option(min=1, help="Denoising steps.")] = 2) -> None:
    """Load the configured base model and render a short clip, to prove the set-up end to end."""
    config = resolve_config(params, overrides)
    from cogvx import stages

    report = stages.check(config, out_dir, steps=steps)
    out.print_json(json.dumps(report))
    out.print(f"wrote {out_dir}/sample.mp4")


AccelerateConfigOption = Annotated[Optional[Path], typer.Option(
    "--accelerate-config", help="Run on several processes (GPUs) with this accelerate config file: DDP, FSDP2 or "
    "DeepSpeed; the files shipped are in configs/accelerate/. The same as the override prepare.accelerate_config=FILE "
    "(train.accelerate_config for train), or as `accelerate launch --config_file FILE -m cogvx ...`.",
    show_default=False)]


def with_accelerate_config(overrides: Optional[list[str]], section: str, accelerate_config: Optional[Path]) -> list[str]:
    """--accelerate-config FILE is the override ``<section>.accelerate_config=FILE``."""
    return [*(overrides or []), *([f"{section}.accelerate_config={accelerate_config}"] if accelerate_config else [])]


SkipInvalidOption = Annotated[bool, typer.Option(
    "--skip-invalid", help="Drop invalid samples (with a JSON report) instead of stopping; same as data.skip_invalid=true.")]


def _with_skip_invalid(overrides: Optional[list[str]], skip_invalid: bool) -> list[str]:
    return [*(overrides or []), *(["data.skip_invalid=true"] if skip_invalid else [])]


@data_app.command("validate")
def data_validate(
    overrides: OverridesArg = None, params: ParamsOption = None, skip_invalid: SkipInvalidOption = False,
    report: Annotated[Optional[Path], typer.Option(help="Where --skip-invalid lists the dropped samples (JSON); default: prepare.output_dir/dropped.json.")] = None,
) -> None:
    """Check every sample of the data set (files, captions, clips) and report all problems at once."""
    config = resolve_config(params, _with_skip_invalid(overrides, skip_invalid))
    from cogvx import stages

    with err.status(f"validating {config.data.data_root} ..."):
        checked = stages.validate_data(config, report)
    note = f", dropped {checked.dropped} (report: {checked.report})" if checked.dropped else ""
    out.print(f"{checked.valid} valid samples in {config.data.data_root}{note}")


@data_app.command("synthetic")
def data_synthetic(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder to write (prompts.txt, videos.txt, videos/).")],
    n: Annotated[int, typer.Option("--n", min=1, help="Number of clips.")] = 12,
    seed: Annotated[int, typer.Option(help="Seed of shapes, colours and motions.")] = 0,
    fps: Annotated[int, typer.Option(min=1, help="Frame rate of the clips.")] = 8,
    control: Annotated[bool, typer.Option("--control", help="Also write a control video per clip (the moving shape's outline) and control_videos.txt, for data.control = file.")] = False,
) -> None:
    """Make short synthetic clips (moving coloured shapes) with matching captions."""
    from cogvx.data.synthetic import make_synthetic_dataset

    with err.status(f"writing {n} clips ..."):
        make_synthetic_dataset(out_dir, n, seed=seed, fps=fps, control=control)
    out.print(f"wrote {n} clips with captions{' and control videos' if control else ''} to {out_dir}")


@data_app.command("download")
def data_download(overrides: OverridesArg = None, params: ParamsOption = None) -> None:
    """Fetch data.source into data.data_root: synthetic clips, a hub dataset, a folder or an archive."""
    config = resolve_config(params, overrides)
    from cogvx import stages

    root = stages.download(config)
    out.print(f"data set from {config.data.source} is in {root}")


MetricsOption = Annotated[Optional[Path], typer.Option(
    "--metrics", help="Folder for the metrics and curve files (DVC's metrics and plots); default: the run's own folder.",
    show_default=False)]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the summary as JSON instead of a table.")]


def sampling_text(summary: dict) -> str:
    """How prepare took frames from the clips, in words."""
    mode, fps = summary.get("frame_sampling", "start"), summary.get("sample_fps")
    how = ("evenly spaced over each whole clip" if mode == "evenly" else
           f"a {'random' if mode == 'random' else 'start'} window at {fps} fps" if fps else
           f"a {mode} window at each clip's own rate")
    return f"{how}; {summary.get('clips_resampled', 0)} clips resampled, {summary.get('clips_cut', 0)} cut"


def prepare_rows(summary: dict) -> list[tuple[str, str]]:
    """What a person wants to know after `cogvx prepare`."""
    return [("samples", f"{summary['samples']} ({summary['dropped']} dropped)"),
            ("encoded now", f"{summary['videos_encoded']} clips, {summary['texts_encoded']} captions "
                            f"({summary['skipped']} already encoded)"),
            ("sampling", sampling_text(summary)),
            ("speed", f"{summary['clips_per_second']:.3g} clips/s ({summary['seconds']:.1f} s)"
                      + (f"; {summary['steady_clips_per_second']:.3g} clips/s after the warm-up batch"
                         if summary.get("steady_clips_per_second") else "")),
            ("peak memory", f"{summary['peak_memory_gib']:.2f} GiB ({summary['memory_kind']})")]


@app.command("prepare")
def prepare(
    overrides: OverridesArg = None, params: ParamsOption = None, skip_invalid: SkipInvalidOption = False,
    prune: Annotated[bool, typer.Option(help="Delete latent files the new manifest no longer uses.")] = False,
    summary: Annotated[Optional[Path], typer.Option(help="Also write the run summary (JSON) here.")] = None,
    accelerate_config: AccelerateConfigOption = None, metrics: MetricsOption = None, as_json: JsonOption = False,
) -> None:
    """Validate the data, then encode clips (VAE) and captions (T5) into latents + a manifest.

    With several processes (--accelerate-config, or accelerate launch -m cogvx prepare) each
    encodes its share of the clips; the main process writes the manifest.
    """
    config = resolve_config(params, with_accelerate_config(_with_skip_invalid(overrides, skip_invalid), "prepare",
                                                          accelerate_config))
    from cogvx import stages
    from cogvx.distributed import is_main_process
    from cogvx.io import atomic_write_text

    result = stages.prepare(config, prune=prune, log=err.print if as_json else out.print,
                            metrics_dir=None if launched_by_cogvx() else metrics)
    if not is_main_process():
        return
    text = json.dumps(result.as_dict(), indent=2)
    if summary is not None:
        atomic_write_text(summary, text + "\n")
    if launched_by_cogvx():  # the launching process prints the summary
        return
    if as_json:
        print(text)
    else:
        print_summary(f"latents and manifest in {config.prepare.output_dir}", prepare_rows(result.as_dict()))


def print_summary(title: str, rows: list[tuple[str, str]]) -> None:
    """A short two-column table for people (``--json`` gives the machine-readable form)."""
    out.print(title, highlight=False, soft_wrap=True)
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column("what", style="bold", no_wrap=True)
    table.add_column("value", overflow="fold")
    for name, value in rows:
        table.add_row(name, value)
    out.print(table)


def training_rows(report) -> list[tuple[str, str]]:
    """What a person wants to know after `cogvx train` (a TrainingReport): where the weights are,
    loss, speed, memory, MLflow."""
    timing, resumed = report.timing, report.resumed_from_step
    rows = [("steps", f"{report.steps}" + (f" (resumed at {resumed})" if resumed else "")),
            ("final loss", f"{report.final_loss:.6g}" if report.final_loss is not None else "none"),
            ("weights", f"{report.weights} ({report.method})"),
            ("speed", f"{timing.s_per_step:.3f} s/step, {timing.samples_per_s:.3g} samples/s"),
            ("peak memory", f"{report.memory.peak_allocated_gib:.2f} GiB ({report.memory.measure})")]
    tracking = report.tracking
    if tracking is not None and tracking.run_id:
        state = "complete" if tracking.complete else "INCOMPLETE (see the warning above)"
        rows.append(("MLflow run", f"{tracking.run_id} ({state})"))
    if tracking is not None and tracking.registered:
        rows.append(("registered", f"{tracking.registered['name']} version {tracking.registered['version']}"))
    return rows


def launched_by_cogvx() -> bool:
    """Whether this process is one that a cogvx stage launched (--accelerate-config): then the
    launching process prints the summary, once."""
    import os

    from cogvx.distributed import LAUNCHED_MARK

    return os.environ.get(LAUNCHED_MARK) == "1"


@app.command("train")
def train(
    overrides: OverridesArg = None, params: ParamsOption = None,
    resume: Annotated[Optional[str], typer.Option(help="'latest' (the newest complete checkpoint, if any) or a checkpoint folder.")] = None,
    accelerate_config: AccelerateConfigOption = None, metrics: MetricsOption = None, as_json: JsonOption = False,
) -> None:
    """Fine-tune on the precomputed latents (LoRA or full); checkpoints, validation clips, a report.

    On several GPUs: --accelerate-config configs/accelerate/ddp-2gpu.yaml (or accelerate launch
    -m cogvx train); train.batch_size is per GPU.
    """
    config = resolve_config(params, with_accelerate_config(overrides, "train", accelerate_config))
    from cogvx import stages
    from cogvx.distributed import is_main_process

    # With --json, standard output holds the JSON alone; progress and notices go to standard error.
    report = stages.train(config, resume=resume, log=err.print if as_json else out.print, metrics_dir=metrics)
    if not is_main_process() or launched_by_cogvx():  # the launching process prints the summary
        return
    if as_json:
        keys = ("steps", "final_loss", "method", "weights", "processes", "timing", "memory", "tracking")
        figures = report.to_dict()
        print(json.dumps({key: figures.get(key) for key in keys}, indent=1))
    else:
        rows = [*training_rows(report), ("report", str(Path(config.train.output_dir) / "report.json"))]
        print_summary(f"trained {config.spec.key} ({config.train.method})", rows)


class ControlKind(str, Enum):
    """cogvx generate --control-kind: what the --control video is."""

    file = "file"
    canny = "canny"


@app.command("generate")
def generate(
    prompt: Annotated[Optional[str], typer.Option(help="What the video shows; default: the first validate.prompts entry.")] = None,
    out_file: Annotated[Path, typer.Option("--out", help="mp4 file to write.")] = Path("outputs/generated.mp4"),
    lora: Annotated[Optional[str], typer.Option(help="LoRA file, its folder, or a registry URI models:/NAME@ALIAS or models:/NAME/VERSION.")] = None,
    lora_scale: Annotated[float, typer.Option(help="Strength multiplier on top of the file's alpha/rank; 0 = base model.")] = 1.0,
    transformer: Annotated[Optional[Path], typer.Option(help="A fully fine-tuned transformer folder (train.method=full) to use instead of the base one.")] = None,
    weights: Annotated[Optional[Path], typer.Option(help="What `cogvx train` wrote (its lora/ or full/ folder): picks --lora or --transformer by itself.")] = None,
    frames: Annotated[Optional[int], typer.Option(help="Frames (model's frame rule); default: validate.frames or the training size.")] = None,
    height: Annotated[Optional[int], typer.Option(help="Height in pixels (multiple of 16).")] = None,
    width: Annotated[Optional[int], typer.Option(help="Width in pixels (multiple of 16).")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Denoising steps; default validate.num_inference_steps.")] = None,
    guidance: Annotated[Optional[float], typer.Option(help="Classifier-free guidance scale.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the sampling noise.")] = None,
    fps: Annotated[Optional[int], typer.Option(help="Frame rate of the mp4.")] = None,
    image: Annotated[Optional[Path], typer.Option(help="First frame, for image-to-video models.")] = None,
    control: Annotated[Optional[Path], typer.Option(help="Control video steering a control model's render (a LoRA trained with data.control); its first frames are taken at the training rate, centre-cropped to the render size.")] = None,
    control_kind: Annotated[Optional[ControlKind], typer.Option(help="What --control is: 'file' = the control video itself (edges, depth, pose), 'canny' = a clip whose Canny edges are computed; default: the kind the model was trained with.")] = None,
    overrides: OverridesArg = None, params: ParamsOption = None,
) -> None:
    """Render a video with the base model, optionally with a trained LoRA (a control model with --control)."""
    extra = [f"validate.frames={frames}"] if frames else []
    extra += [f"validate.height={height}"] if height else []
    extra += [f"validate.width={width}"] if width else []
    config = resolve_config(params, [*(overrides or []), *extra])
    from cogvx import stages
    from cogvx.generate import GenerateRequest

    request = GenerateRequest(prompt=prompt or config.validate_.prompts[0], out=out_file, lora=lora,
                              lora_scale=lora_scale, transformer=transformer, weights=weights, steps=steps,
                              guidance_scale=guidance, seed=seed, fps=fps, image=image, control=control,
                              control_kind=control_kind.value if control_kind else None)
    path = stages.generate(config, request, log=out.print)
    out.print(f"wrote {path}")


@registry_app.command("list")
def registry_list(
    name: Annotated[Optional[str], typer.Option(help="Only this registered model; default: all of them.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    overrides: OverridesArg = None, params: ParamsOption = None,
) -> None:
    """List registered LoRA versions with their aliases and tags (tracking.tracking_uri)."""
    config = resolve_config(params, overrides)
    from cogvx import stages

    rows = stages.list_registered(config, name)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title=f"registered models on {config.tracking.tracking_uri}")
    for column in ("name", "version", "aliases", "variant", "adapter", "control", "rank", "alpha", "created", "run"):
        table.add_column(column)
    for row in rows:
        tags = row["tags"]
        table.add_row(row["name"], str(row["version"]), ", ".join(row["aliases"]), tags.get("variant", ""),
                      tags.get("adapter_kind", ""), tags.get("control", ""), tags.get("rank", ""),
                      tags.get("alpha", ""), row["created"] or "", row["run_id"] or "")
    out.print(table)


@registry_app.command("promote")
def registry_promote(
    version: Annotated[str, typer.Argument(help="Version number (or an alias) to promote.", show_default=False)],
    name: Annotated[Optional[str], typer.Option(help="Registered model; default: tracking.registered_model.")] = None,
    alias: Annotated[str, typer.Option(help="Alias to point at the version.")] = "champion",
    overrides: OverridesArg = None, params: ParamsOption = None,
) -> None:
    """Point an alias (default: champion) at a registered version; `generate --lora models:/NAME@ALIAS` uses it."""
    config = resolve_config(params, overrides)
    from cogvx import stages

    done = stages.promote(config, version, name, alias)
    out.print(f"{done['name']}@{done['alias']} -> version {done['version']}")


@tracking_app.command("replay")
def tracking_replay(overrides: OverridesArg = None, params: ParamsOption = None) -> None:
    """Send what training could not send to MLflow (train.output_dir/mlflow-pending.jsonl), once the
    store is back: metrics, artifacts, the run's true end, and the LoRA's registration."""
    config = resolve_config(params, overrides)
    from cogvx import stages

    done = stages.replay_tracking(config, log=out.print)
    out.print(f"{len(done)} run(s) sent to {config.tracking.tracking_uri}")


@contextmanager
def prefect_errors():
    """Prefect's own start-up failures as a message with what to do (the flow's errors pass as they are)."""
    try:
        yield
    except RuntimeError as error:
        if "Prefect API server" not in str(error):
            raise
        raise CogvxError(f"{error} The temporary Prefect server did not answer in time (its first start sets up "
                         "its database): raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS (cogvx's default "
                         "is 120), or start a server with `prefect server start` and set PREFECT_API_URL") from None


def flow_rows(summary: dict) -> list[tuple[str, str]]:
    """What a person wants to know after a flow run."""
    trained, rows = summary["train"], []
    rows.append(("trained", f"{trained['steps']} steps, final loss {trained['final_loss']}"
                 + (f" (resumed from a checkpoint at step {trained['recovered_steps']})" if trained.get("recovered_steps") else "")))
    rows.append(("weights", str(trained["weights"])))
    rows.append(("sample clip", str(summary["render"])))
    registered = summary.get("register") or {}
    if isinstance(registered, dict) and registered.get("version"):
        rows.append(("registered", f"{registered.get('name')} version {registered['version']}"))
    if trained.get("run_id"):
        rows.append(("MLflow run", str(trained["run_id"])))
    return rows


@flow_app.command("run")
def flow_run(
    overrides: OverridesArg = None, params: ParamsOption = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the flow's sample clip.")] = Path("outputs/samples"),
    as_json: JsonOption = False,
) -> None:
    """Run download -> validate -> prepare -> train -> render -> register under Prefect (no server needed)."""
    resolve_config(params, overrides)  # a bad config fails here, before Prefect starts
    from flows.finetune import finetune

    with prefect_errors():
        summary = finetune(params=params_path(params), overrides=list(overrides or []), out_dir=str(out_dir))
    if as_json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        print_summary("flow run completed", flow_rows(summary))


@flow_app.command("serve")
def flow_serve(
    cron: Annotated[str, typer.Option(help='Cron schedule, e.g. "0 3 * * *" (03:00 daily).')],
    name: Annotated[str, typer.Option(help="Deployment name.")] = "cogvx-finetune-scheduled",
    overrides: OverridesArg = None, params: ParamsOption = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for each run's sample clip.")] = Path("outputs/samples"),
) -> None:
    """Serve the flow as a deployment on a cron schedule (blocks; trigger with `prefect deployment run`)."""
    resolve_config(params, overrides)
    from flows.finetune import serve

    with prefect_errors():
        serve(cron=cron, name=name, params=params_path(params), overrides=list(overrides or []), out_dir=str(out_dir))


@bench_app.command("run")
def bench_run(
    suite: Annotated[str, typer.Option(help="Suite of cases: issue17 (the presets and every headline setting; run it with --memory-cap-gib 23), issue18 (control training and the adapter kinds; --memory-cap-gib 23 too), issue7 (real sizes, needs a CUDA GPU with 80 GB), issue10 (several GPUs) or smoke (tiny model, any machine).")] = "issue7",
    case: Annotated[Optional[list[str]], typer.Option("--case", help="Run only these cases of the suite (repeatable).")] = None,
    out_file: Annotated[Path, typer.Option("--out", help="JSON results file (rewritten after every case).")] = Path("bench/results/latest.json"),
    reference: Annotated[Optional[Path], typer.Option(help="The reference step script (anchor_lora_step.py) to run side by side.")] = None,
    clips: Annotated[Optional[Path], typer.Option(help="Clips folder (txt layout) for the prepare case; default: synthetic clips made first.")] = None,
    workdir: Annotated[Path, typer.Option(help="Scratch folder for models, latents and runs.")] = Path("outputs/bench"),
    commit: Annotated[Optional[str], typer.Option(help="Commit to record (default: git rev-parse HEAD).")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds allowed per case.")] = 900.0,
    processes: Annotated[Optional[int], typer.Option(min=1, help="GPUs for the cases run under accelerate launch (default: each case's own).")] = None,
    memory_cap_gib: Annotated[Optional[float], typer.Option(min=1.0, help="Simulate a smaller card: cap every case's CUDA allocator at this many GiB before any CUDA work (23 for a 24 GB card, whose CUDA context takes the rest); the JSON records the cap and whether each case fit. The reference step is never capped.")] = None,
) -> None:
    """Run a benchmark suite: each case in its own process, the reference step alongside; print a table, write JSON."""
    import torch

    from cogvx.benchmark.cases import check_runnable, select
    from cogvx.benchmark.report import text_table
    from cogvx.benchmark.suite import run_suite

    cases = select(suite, case)
    check_runnable(cases, torch.cuda.is_available())
    report = run_suite(cases, suite, out_file, workdir, reference, clips, commit, timeout, log=out.print,
                       processes=processes, memory_cap_gib=memory_cap_gib)
    out.print(text_table([report]), highlight=False, soft_wrap=True)
    out.print(f"results in {out_file}")
    failed = [c["case"] for c in report["cases"] if "error" in c]
    if failed:
        raise CogvxError(f"{len(failed)} case(s) failed: {', '.join(failed)} (details in {out_file})")


@bench_app.command("case", hidden=True)
def bench_case(
    name: Annotated[str, typer.Argument(help="Case name.")],
    suite: Annotated[str, typer.Option(help="Suite the case belongs to.")] = "issue7",
    workdir: Annotated[Path, typer.Option(help="Scratch folder.")] = Path("outputs/bench"),
    clips: Annotated[Optional[Path], typer.Option(help="Clips folder for prepare cases.")] = None,
) -> None:
    """Measure one case in this process and print its RESULT line (used by `bench run`)."""
    from cogvx.benchmark.cases import select
    from cogvx.benchmark.worker import run_case
    from cogvx.distributed import is_main_process

    import torch

    try:
        result = run_case(select(suite, [name])[0], workdir, clips)
    except torch.OutOfMemoryError as err:  # a result, not a crash: the case does not fit (the cap)
        from cogvx.benchmark.worker import MEMORY_CAP_ENV

        cap = os.environ.get(MEMORY_CAP_ENV) or None
        print("RESULT " + json.dumps({"case": name, "error": "out of memory" + (f" under the {cap} GiB cap" if cap else ""),
                                      "oom": True, "memory_cap_gib": float(cap) if cap else None,
                                      "fits_memory_cap": False, "detail": str(err).splitlines()[0][:300]}), flush=True)
        raise typer.Exit(1) from None
    if is_main_process():  # under accelerate launch the main process reports for all
        print("RESULT " + json.dumps(result), flush=True)


@bench_app.command("table")
def bench_table(
    results: Annotated[list[Path], typer.Argument(help="Results JSON files written by `cogvx bench run`.")],
    readme: Annotated[Optional[Path], typer.Option(help="Rewrite the generated memory table in this README.")] = None,
    markdown_out: Annotated[bool, typer.Option("--markdown", help="Print Markdown instead of plain text.")] = False,
) -> None:
    """Print the results as a table, or regenerate the README's memory table from them."""
    from cogvx.benchmark.report import load_results, markdown, text_table, update_readme

    reports = load_results(results)
    if readme is not None:
        changed = update_readme(readme, markdown(reports))
        out.print(f"{readme}: memory table {'updated' if changed else 'already up to date'}")
        return
    out.print(markdown(reports) if markdown_out else text_table(reports), highlight=False, soft_wrap=True)


@app.command("doctor")
def doctor() -> None:
    """Report versions, the compute device and which optional parts are installed."""
    from cogvx.doctor import collect_report

    report = collect_report()
    table = Table(title="cogvx doctor", show_header=False)
    table.add_column("item")
    table.add_column("value", overflow="fold")
    for key, value in report.items():
        table.add_row(key, str(value))
    out.print(table)


# Import-time chatter of optional back-ends (missing CUDA kernels on a CPU machine, deprecation
# notices, diffusers' "Unable to import `torchao` Tensor objects" while torchao is installed, MLflow's
# database set-up lines) that says nothing a cogvx user can act on; real errors from them still show.
NOISY_LOGGERS = ("torchao", "bitsandbytes", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer",
                 "mlflow.store.db.utils", "alembic", "urllib3.connectionpool")
# The temporary Prefect server's telemetry heartbeat races the flow for its SQLite file and prints
# "database is locked" tracebacks on runs that succeed.
QUIET_ENV = {"MLFLOW_LOGGING_LEVEL": "WARNING", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
             "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
             # The temporary server's first start migrates its database: Prefect's 20 s is too short
             "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}


def quiet_third_party_output() -> None:
    """Keep the console for cogvx's own messages: third-party loggers at ERROR, MLflow's INFO lines
    and download bars off, and progress bars of model loading only on a terminal."""
    import logging
    import os

    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    if not sys.stderr.isatty():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.showwarning = show_warning


_plain_showwarning = warnings.showwarning


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """cogvx's own warnings (tracking trouble mid-run, ...) as one line; others as Python prints them."""
    if issubclass(category, CogvxWarning):
        err.print(f"[bold yellow]warning:[/] {escape(str(message))}", highlight=False, soft_wrap=True)
        return
    _plain_showwarning(message, category, filename, lineno, file, line)


# typer's own command-line errors (an option's min= bound, say): in typer versions that vendor
# click they are not click.ClickException, and would otherwise end in a traceback.
TYPER_CLICK_EXCEPTION = next(cls for cls in typer.BadParameter.__mro__ if cls.__name__ == "ClickException")


def main() -> None:
    """Console-script entry point: user errors become one message and a non-zero exit code."""
    quiet_third_party_output()
    try:
        result = app(standalone_mode=False)
    except CogvxError as error:
        err.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
        sys.exit(error.exit_code)
    except (click.ClickException, TYPER_CLICK_EXCEPTION) as error:
        error.show()
        sys.exit(error.exit_code)
    except click.exceptions.Abort:
        err.print("aborted")
        sys.exit(130)
    if not result:
        from cogvx.distributed import close_process_group

        close_process_group()  # only on success: a failed process must not wait for the others
    sys.exit(result if isinstance(result, int) else 0)


if __name__ == "__main__":
    main()
