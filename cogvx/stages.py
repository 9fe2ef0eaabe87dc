"""The stages of a cogvx pipeline, each taking a :class:`~cogvx.config.Config` and returning a typed
result: the one layer the CLI, the Prefect tasks and (through the CLI) the DVC stages call.

- :func:`build_base_model`: the tiny random-weight model built locally, or a hub id / folder as configured;
- :func:`download`: data.source into data.data_root;
- :func:`validate_data`: every sample checked, the bad ones dropped (data.skip_invalid) with a report;
- :func:`prepare`: clips and captions encoded into latents;
- :func:`train`: the fine-tune, resumable, tracked in MLflow;
- :func:`generate`, :func:`check`: rendering with the trained weights, or the base model alone;
- :func:`register`, :func:`replay_tracking`: the LoRA into MLflow's model registry, and what a run
  could not send to MLflow sent once the store is back.

A stage whose config names an accelerate config (``prepare.accelerate_config``,
``train.accelerate_config``) launches its processes itself, under exactly this config, and returns
what the main process reported; inside the launched processes it runs here.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cogvx.config import Config, write_resolved_config
from cogvx.errors import CogvxError

MODEL_INDEX = "model_index.json"


@dataclass(frozen=True)
class BaseModel:
    """The base model a run uses: its folder or hub id, and whether this call built it."""

    source: str
    built: bool


def build_base_model(config: Config, target: str | Path | None = None, seed: int = 0,
                     existing: Literal["fail", "replace", "reuse"] = "reuse") -> BaseModel:
    """The configured base model, building a tiny variant into ``target`` (default: model.path or
    models/<variant>) with its resolved config beside it.

    ``existing`` says what a folder already there means: ``reuse`` it when it holds a complete
    model (the flow: re-runs do not rebuild), ``replace`` it, or ``fail`` (the CLI without
    --overwrite). A full-size variant is returned as configured (its weights are fetched when
    first loaded); asking to build one into ``target`` is refused.
    """
    spec = config.spec
    if not spec.tiny:
        if target is not None:
            raise CogvxError(f"model.variant = {spec.key!r} is a full-size model; only the tiny variants are "
                             "built locally (see `cogvx models`)")
        return BaseModel(source=str(config.model_source), built=False)
    folder = Path(target if target is not None else config.model_source)
    if existing == "reuse" and (folder / MODEL_INDEX).is_file():
        return BaseModel(source=str(folder), built=False)
    from cogvx.models.build import save_tiny_pipeline

    save_tiny_pipeline(spec.key, folder, seed=seed, overwrite=existing != "fail")
    write_resolved_config(config, folder)
    return BaseModel(source=str(folder), built=True)


def download(config: Config) -> Path:
    """data.source (synthetic clips, a hub dataset, a folder or an archive) in data.data_root;
    a data set already fetched from the same source is left as it is."""
    from cogvx.data.download import fetch_dataset

    data = config.data
    return Path(fetch_dataset(data.source, data.data_root, revision=data.revision,
                              synthetic_clips=data.synthetic_clips, seed=data.seed,
                              synthetic_controls=data.control == "file"))


@dataclass(frozen=True)
class DataCheck:
    """What validation found: samples listed, kept, dropped, the problems, and the drop report."""

    samples: int
    valid: int
    dropped: int
    problems: list[str]
    report: Path | None  # where the dropped samples are listed (None when none was dropped)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (the flow's validate summary); ``report`` only when samples were dropped."""
        figures = {"samples": self.samples, "valid": self.valid, "dropped": self.dropped, "problems": self.problems}
        return {**figures, "report": str(self.report)} if self.report else figures


def validate_data(config: Config, report: Path | None = None) -> DataCheck:
    """Check every sample; problems stop with the full report, unless data.skip_invalid drops the bad
    samples and lists them in ``report`` (default: prepare.output_dir/dropped.json, where
    `cogvx prepare` writes it too)."""
    from cogvx.data.validation import dropped_report_path, validated_samples

    path = Path(report) if report is not None else dropped_report_path(config)
    found, kept = validated_samples(config, path)
    dropped = len(found.samples) - len(kept)
    return DataCheck(samples=len(found.samples), valid=len(kept), dropped=dropped,
                     problems=[str(problem) for problem in found.problems], report=path if dropped else None)


def prepare(config: Config, prune: bool = False, log=print, metrics_dir: Path | None = None):
    """Validate, then encode the clips and captions not encoded yet; the run's PrepareSummary (on
    the processes of prepare.accelerate_config when it names one). ``metrics_dir`` gets DVC's
    metrics files (written by the main process)."""
    from cogvx.distributed import is_main_process, run_launched, should_launch
    from cogvx.prepare import PrepareSummary, run_prepare, write_prepare_metrics

    if should_launch(config.prepare.accelerate_config):
        with tempfile.TemporaryDirectory(prefix="cogvx-prepare-") as folder:
            summary_file = Path(folder) / "summary.json"
            run_launched(config, "prepare", ["--summary", str(summary_file), *(["--prune"] if prune else [])])
            summary = PrepareSummary(**json.loads(summary_file.read_text(encoding="utf-8")))
    else:
        summary = run_prepare(config, prune=prune, log=log)
    if metrics_dir is not None and is_main_process():
        write_prepare_metrics(summary, metrics_dir)
    return summary


def train(config: Config, resume: str | None = None, log=print, on_step=None, metrics_dir: Path | None = None):
    """Fine-tune (resuming from ``resume``: 'latest' or a checkpoint folder); the TrainingReport
    (on the processes of train.accelerate_config when it names one, ``on_step`` then unused).
    A train.preset or train.fp8_compute this device cannot run is refused first, before any load."""
    if config.train.preset != "none" or config.train.fp8_compute:
        from cogvx.training.presets import check_preset_for_device, training_device

        check_preset_for_device(config, training_device())
    from cogvx.distributed import run_launched, should_launch
    from cogvx.reports import TrainingReport
    from cogvx.training.loop import train as run_training

    if not should_launch(config.train.accelerate_config):
        return run_training(config, resume=resume, log=log, on_step=on_step, metrics_dir=metrics_dir)
    extra = [*(["--resume", resume] if resume else []), *(["--metrics", str(metrics_dir)] if metrics_dir else [])]
    run_launched(config, "train", extra)
    return TrainingReport.read(config.train.output_dir)


def generate(config: Config, request, log=print) -> Path:
    """Render one clip (GenerateRequest) with the base model and the request's weights; the mp4's path."""
    from cogvx.generate import generate as render_clip

    return render_clip(config, request, log=log)


def check(config: Config, out_dir: str | Path, steps: int = 2) -> dict[str, Any]:
    """Load the base model and render a short clip into ``out_dir``; the check report."""
    from cogvx.check import run_check

    return run_check(config, out_dir, steps=steps)


def register(config: Config, weights: Path, run_id: str | None = None) -> dict[str, str]:
    """Register a LoRA folder as a new version of tracking.registered_model (linked to ``run_id``)."""
    from cogvx.tracking import register_lora

    return register_lora(Path(weights), config, run_id)


def replay_tracking(config: Config, log=print) -> list[dict[str, Any]]:
    """Send what training runs in train.output_dir could not send to MLflow, holding the folder's
    run lock (so never beside a live training); one record per run sent."""
    from cogvx.runlock import run_lock
    from cogvx.tracking import replay_pending

    with run_lock(config.train.output_dir, "train.output_dir", log=log):
        return replay_pending(config, log=log)


def list_registered(config: Config, name: str | None = None) -> list[dict[str, Any]]:
    """Every registered LoRA version (of ``name``, or of all models) on tracking.tracking_uri."""
    from cogvx.tracking import list_registered as registered_versions

    return registered_versions(config.tracking.tracking_uri, name)


def promote(config: Config, version: str, name: str | None = None, alias: str = "champion") -> dict[str, str]:
    """Point ``alias`` of ``name`` (default: tracking.registered_model) at ``version``."""
    from cogvx.tracking import promote as set_alias

    return set_alias(config.tracking.tracking_uri, name or config.tracking.registered_model, version, alias)
