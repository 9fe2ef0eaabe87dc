"""One MLflow run per training run: params, provenance tags, step metrics, artifacts, its end.

The resolved config goes in as params, where the model, code and data came from as tags, loss /
learning rate / gradient norm per step, peak memory per phase and step timing as metrics, and the
validation clips, LoRA, report and config as artifacts. A store that goes away mid-run is
reported with one warning while metrics are kept in memory and in
``output_dir/mlflow-pending.jsonl``; training goes on, and :mod:`cogvx.tracking.replay` sends
them later.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any

from cogvx import __version__
from cogvx.errors import CogvxWarning
from cogvx.io import atomic_write_text
from cogvx.reports import TrackingOutcome, TrainingReport
from cogvx.tracking.registry import ensure_registered_model
from cogvx.tracking.store import (check_tracking, experiment_id, first_line, logging_errors, mlflow_client,
                                  mlflow_errors)

PENDING_FILE = "mlflow-pending.jsonl"
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value
MAX_TAG_CHARS = 8000  # MLflow's limit on a tag value
PARAMS_PER_BATCH = 100  # MLflow's limit on params per log_batch call
METRICS_PER_BATCH = 1000  # MLflow's limit on metrics per log_batch call


class TrackingWarning(CogvxWarning):
    """Logging to MLflow failed during a run; the run goes on and nothing is lost."""




def flatten_params(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config dict -> {"train.lora.rank": "64", ...}; lists as JSON; values cut to MLflow's limit."""
    flat: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_params(value, prefix=f"{name}."))
            continue
        text = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
        if len(text) > MAX_PARAM_CHARS:
            marker = f"...[{len(text)} chars, truncated]"
            text = text[: MAX_PARAM_CHARS - len(marker)] + marker
        flat[name] = text
    return flat


def git_commit(cwd: Path | None = None) -> str:
    """``git rev-parse HEAD`` of ``cwd`` (default: the working folder), or "unknown" outside a repo."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):  # no git on this machine: the commit is unknown
        return "unknown"
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and commit else "unknown"


def data_version(config) -> str:
    """First 16 hex digits of the sha256 of the latents manifest, or "none" before `cogvx prepare`."""
    manifest = Path(config.prepare.output_dir) / "manifest.json"
    if not manifest.is_file():
        return "none"
    return hashlib.sha256(manifest.read_bytes()).hexdigest()[:16]


def run_tags(config, source_dir: Path | None = None) -> dict[str, str]:
    """Where the run's model, code and data came from."""
    spec = config.spec
    commit = git_commit(source_dir)
    return {"cogvx.model": spec.key, "cogvx.model_source": config.model_source,
            "cogvx.hub_id": spec.hub_id or "none", "cogvx.git_commit": commit,
            "mlflow.source.git.commit": commit, "cogvx.data_version": data_version(config),
            "cogvx.version": __version__, "cogvx.method": config.train.method}




class RunTracker:
    """One MLflow run for one training run; logging failures never stop the training.

    Step metrics are queued and sent with ``log_batch`` every ``flush_every`` steps (or every
    ``flush_interval_s`` seconds). When a send fails the metrics stay queued, are appended to
    ``train.output_dir/mlflow-pending.jsonl``, one TrackingWarning is emitted, the problem is
    remembered in ``problems``, and the next try waits ``retry_after_s``.
    """

    def __init__(self, flush_every: int = 10, flush_interval_s: float = 30.0, retry_after_s: float = 60.0,
                 source_dir: Path | None = None) -> None:
        self.flush_every, self.flush_interval_s, self.retry_after_s = flush_every, flush_interval_s, retry_after_s
        self.source_dir = source_dir
        self.client = None
        self.uri = self.run_id = self.experiment_id = None
        self.pending_path: Path | None = None
        self.problems: list[str] = []
        self._queue: list = []  # mlflow Metric objects not sent yet
        self._spilled = 0  # how many of _queue are already in the pending file
        self._steps = 0  # steps queued since the last successful send
        self._last_send = time.monotonic()
        self._retry_at = 0.0
        self._warned = False

    def start(self, config) -> RunTracker:
        """Check the store, open (or create) the experiment, start a run with params and tags."""
        self.uri = config.tracking.tracking_uri
        check_tracking(self.uri)
        self.pending_path = Path(config.train.output_dir) / PENDING_FILE
        with mlflow_errors("starting an MLflow run", self.uri):
            self.client = mlflow_client(self.uri)
            self.experiment_id = experiment_id(self.client, config.tracking.experiment, self.uri)
            run = self.client.create_run(self.experiment_id, run_name=Path(config.train.output_dir).name or None,
                                         tags=run_tags(config, self.source_dir))
            self.run_id = run.info.run_id
            self._log_params(flatten_params(config.to_dict()))
            if config.train.method == "lora":  # the registry must take the LoRA at the end: try it now
                ensure_registered_model(self.client, config.tracking.registered_model)
        return self

    def _log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(key, value) for key, value in params.items()]
        for start in range(0, len(items), PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[start:start + PARAMS_PER_BATCH])

    def log_step(self, step: int, loss: float, lr: float | None = None, grad_norm: float | None = None,
                 s_per_step: float | None = None) -> None:
        """Queue one optimizer step's metrics; send the queue when it is due."""
        values = {"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm, "train/s_per_step": s_per_step}
        self._enqueue(values, step)
        self._steps += 1
        if self._steps >= self.flush_every or time.monotonic() - self._last_send >= self.flush_interval_s:
            self.flush()

    def _enqueue(self, values: dict[str, float | None], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._queue.extend(Metric(key, float(value), now, int(step)) for key, value in values.items()
                           if value is not None)

    def flush(self, force: bool = False) -> bool:
        """Send the queued metrics; True when all were sent. ``force`` ignores the retry pause."""
        if not self._queue:
            return True
        if not force and time.monotonic() < self._retry_at:
            self._spill()
            return False
        try:
            while self._queue:
                batch = self._queue[:METRICS_PER_BATCH]
                self.client.log_batch(self.run_id, metrics=batch)
                del self._queue[:len(batch)]
                self._spilled = max(0, self._spilled - len(batch))
        except logging_errors() as err:
            self._problem("sending metrics failed", err)
            self._spill()
            self._retry_at = time.monotonic() + self.retry_after_s
            return False
        self._steps, self._last_send = 0, time.monotonic()
        self._forget_spilled()
        return True

    def _spill(self) -> None:
        """Append the queued metrics not yet in the pending file to it (so a crash loses nothing)."""
        fresh = self._queue[self._spilled:]
        if not fresh or self.pending_path is None:
            return
        lines = [json.dumps({"run_id": self.run_id, "key": m.key, "value": m.value, "step": m.step,
                             "timestamp": m.timestamp}) for m in fresh]
        try:
            self.pending_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.pending_path, "a", encoding="utf-8") as handle:
                handle.write("\n".join(lines) + "\n")
        except OSError as err:
            self._problem(f"writing {self.pending_path} failed (metrics stay in memory)", err)
            return
        self._spilled = len(self._queue)

    def _forget_spilled(self) -> None:
        """After a successful send, drop this run's lines from the pending file: they reached MLflow."""
        if self.pending_path is None or not self.pending_path.is_file():
            return
        try:
            lines = self.pending_path.read_text(encoding="utf-8").splitlines()
            keep = [line for line in lines if line.strip() and _line_run_id(line) != self.run_id]
            if len(keep) == len(lines):
                return
            if keep:
                atomic_write_text(self.pending_path, "\n".join(keep) + "\n")
            else:
                self.pending_path.unlink()
        except OSError as err:
            self._problem(f"cleaning {self.pending_path} failed (its lines of this run were sent)", err)

    def _problem(self, what: str, err: BaseException) -> None:
        """Remember a logging failure; warn the first time (training goes on)."""
        message = f"{what}: {first_line(err)}"
        self.problems.append(message)
        if not self._warned:
            self._warned = True
            warnings.warn(f"MLflow ({self.uri}, run {self.run_id}): {message}. Training goes on; metrics "
                          f"are kept and written to {self.pending_path}", TrackingWarning, stacklevel=3)

    def finish(self, report: TrainingReport, output_dir: Path) -> TrackingOutcome:
        """Log the summary metrics and artifacts, end the run FINISHED; says whether all got through.

        When something did not get through, the pending file also records how the run ended, so
        that ``cogvx tracking replay`` can finish it once the store is back."""
        output_dir = Path(output_dir)
        self._enqueue(summary_metrics(report), report.steps)
        complete = self.flush(force=True) and self._log_artifacts(report, output_dir) and self._end("FINISHED")
        if not complete:
            self._record_end("FINISHED", None, output_dir)
            warnings.warn(f"MLflow run {self.run_id} on {self.uri} is incomplete ({len(self.problems)} "
                          f"problem(s), last: {self.problems[-1]}); the outputs are in {output_dir}, unsent "
                          f"metrics in {self.pending_path}; once the store is back, "
                          f"`cogvx tracking replay` sends them and ends the run", TrackingWarning, stacklevel=2)
        return TrackingOutcome(run_id=self.run_id, experiment_id=self.experiment_id, complete=complete,
                               problems=list(self.problems))

    def _record_end(self, status: str, message: str | None, output_dir: Path | None) -> None:
        """Append to the pending file how this run ended (read by :func:`replay_pending`)."""
        if self.pending_path is None:
            return
        end = {"status": status, "message": message, "output_dir": str(output_dir) if output_dir else None}
        try:
            self.pending_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.pending_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"run_id": self.run_id, "end": end}) + "\n")
        except OSError as err:
            self._problem(f"writing {self.pending_path} failed", err)

    def _log_artifacts(self, report: TrainingReport | None, output_dir: Path) -> bool:
        """Validation clips of every step under validation/, the LoRA under lora/, report.json and the config."""
        try:
            videos = set(map(Path, report.validation_videos if report else []))
            videos |= set((output_dir / "validation").glob("step-*/*.mp4"))
            for video in sorted(videos):
                self.client.log_artifact(self.run_id, str(video), _validation_path(video, output_dir))
            weights = Path(report.weights) if report and report.weights else None
            if report and report.method == "lora" and weights is not None and weights.is_dir():
                self.client.log_artifacts(self.run_id, str(weights), "lora")
            for name in ("report.json", "cogvx-config.yaml"):
                if (output_dir / name).is_file():
                    self.client.log_artifact(self.run_id, str(output_dir / name))
        except logging_errors() as err:
            self._problem("uploading artifacts failed", err)
            return False
        return True

    def _end(self, status: str, message: str | None = None) -> bool:
        try:
            if message:
                self.client.set_tag(self.run_id, "cogvx.error", message[:MAX_TAG_CHARS])
            self.client.set_terminated(self.run_id, status)
        except logging_errors() as err:
            self._problem(f"ending the run {status} failed", err)
            return False
        return True

    def fail(self, message: str, status: str = "FAILED") -> None:
        """End the run FAILED (or KILLED) with the error as a tag; never raises over the real error.
        When the store cannot be reached the ending is kept in the pending file for replay."""
        if self.run_id is None:
            return
        if not (self.flush(force=True) and self._end(status, message)):
            self._record_end(status, message, None)

    @classmethod
    def attach(cls, uri: str, run_id: str, pending_path: Path) -> RunTracker:
        """A tracker for an existing run (to replay what its training could not send)."""
        tracker = cls()
        tracker.uri, tracker.run_id, tracker.pending_path = uri, run_id, Path(pending_path)
        check_tracking(uri)
        with mlflow_errors(f"opening MLflow run {run_id}", uri):
            tracker.client = mlflow_client(uri)
            tracker.experiment_id = tracker.client.get_run(run_id).info.experiment_id
        return tracker


def pending_record(line: str) -> dict[str, Any] | None:
    """One pending-file line; None for a line torn by a crash or not cogvx's (it cannot be sent)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and record.get("run_id") else None


def _line_run_id(line: str) -> str | None:
    """The run a pending-file line belongs to; None for a torn line (it is kept)."""
    return (pending_record(line) or {}).get("run_id")


def _validation_path(video: Path, output_dir: Path) -> str:
    """validation/step-000012 for output_dir/validation/step-000012/prompt-00.mp4."""
    try:
        return str(video.parent.relative_to(output_dir)).replace(os.sep, "/")
    except ValueError:
        return "validation"


def summary_metrics(report: TrainingReport) -> dict[str, float | None]:
    """memory/<phase>/<peak>, timing/<name> and final_loss from a training report."""
    figures = report.to_dict()
    values: dict[str, float | None] = {"final_loss": report.final_loss}
    for phase, peaks in figures["memory"]["phases"].items():
        values.update({f"memory/{phase}/{name}": value for name, value in peaks.items()})
    values.update({f"timing/{name}": value for name, value in figures["timing"].items()})
    return values


class NullTracker:
    """Stands in for RunTracker when tracking.enabled is false: every call does nothing."""

    run_id = experiment_id = None

    @property
    def problems(self) -> list[str]:
        return []

    def start(self, config) -> NullTracker:
        return self

    def log_step(self, step: int, loss: float, lr: float | None = None, grad_norm: float | None = None,
                 s_per_step: float | None = None) -> None:
        return None

    def flush(self, force: bool = False) -> bool:
        return True

    def finish(self, report: TrainingReport, output_dir: Path) -> TrackingOutcome:
        return TrackingOutcome()

    def fail(self, message: str, status: str = "FAILED") -> None:
        return None


def tracker_for(config, **options) -> RunTracker | NullTracker:
    """The tracker config.tracking asks for (not started): RunTracker, or NullTracker when disabled."""
    return RunTracker(**options) if config.tracking.enabled else NullTracker()
