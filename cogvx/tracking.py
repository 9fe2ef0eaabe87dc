"""MLflow experiment tracking and Model Registry for cogvx training runs.

One training run is one MLflow run: the resolved config as params, where the model, code and data
came from as tags, loss / learning rate / gradient norm per step, peak memory per phase and step
timing as metrics, and the validation clips, LoRA, report and config as artifacts. The trained
LoRA can then be registered, promoted with an alias and fetched back by ``models:/NAME@ALIAS``.

Tracking must never cost a training run: :func:`check_tracking` fails fast (before any model is
loaded) when the tracking store is unreachable, the MLflow client's HTTP retries are bounded, and
a store that goes away mid-run is reported with one warning while metrics are kept in memory and
in ``output_dir/mlflow-pending.jsonl``; training goes on.

MLflow is imported lazily so that ``import cogvx.tracking`` stays cheap for the CLI.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import time
import urllib.error
import urllib.request
import warnings
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

from cogvx import __version__
from cogvx.errors import CogvxError, CogvxWarning
from cogvx.io import atomic_write_text

PENDING_FILE = "mlflow-pending.jsonl"
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value
MAX_TAG_CHARS = 8000  # MLflow's limit on a tag value
PARAMS_PER_BATCH = 100  # MLflow's limit on params per log_batch call
METRICS_PER_BATCH = 1000  # MLflow's limit on metrics per log_batch call
# Defaults for the MLflow HTTP client when the user set none: without them a dead server makes
# every call retry with exponential backoff for minutes (7 retries, 120 s timeout).
CLIENT_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
              "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5"}


class TrackingUnavailable(CogvxError):
    """The MLflow tracking store (server, SQLite file) cannot be reached or written."""

    exit_code = 5


class TrackingWarning(CogvxWarning):
    """Logging to MLflow failed during a run; the run goes on and nothing is lost."""


# ----------------------------------------------------------------------------- the store


def bound_client_retries() -> None:
    """Bound the MLflow HTTP client's retries and timeout (only where the user set nothing)."""
    for key, value in CLIENT_ENV.items():
        os.environ.setdefault(key, value)


def check_tracking(uri: str, timeout_s: float = 10.0) -> None:
    """Fail at once, with what to do, when the tracking store at ``uri`` cannot be used.

    http(s): the server must answer ``/health`` within ``timeout_s``. sqlite: the database's
    folder must be (made) writable. A folder or file: URI is MLflow's file store, which MLflow 3
    keeps in maintenance mode behind MLFLOW_ALLOW_FILE_STORE: naming one in the config is taken
    as that opt-in, and its folder must be writable. Other schemes (postgresql, databricks, ...)
    are left to the MLflow client.
    """
    bound_client_retries()
    scheme = urlparse(uri).scheme.lower()
    if scheme in ("http", "https"):
        _probe_server(uri, timeout_s)
    elif scheme == "sqlite":
        path = _sqlite_path(uri)
        if path is not None:
            _check_writable(path.parent, uri)
    elif scheme in ("", "file"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        _check_writable(Path(urlparse(uri).path if scheme else uri), uri)


def _advice(uri: str) -> str:
    """What the user can do when the store at ``uri`` fails."""
    if urlparse(uri).scheme.lower() in ("http", "https"):
        return (f"start it (e.g. `mlflow server --host 127.0.0.1 --port {urlparse(uri).port or 5000} "
                "--backend-store-uri sqlite:///mlflow.db`), or log to a local file with "
                "tracking.tracking_uri=sqlite:///mlflow.db, or turn tracking off with tracking.enabled=false")
    return "check that it is reachable and writable, or turn tracking off with tracking.enabled=false"


def _probe_server(uri: str, timeout_s: float) -> None:
    """GET ``uri/health``; any answer below 500 means a server is there."""
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            response.read(64)
    except urllib.error.HTTPError as err:
        if err.code >= 500:
            raise TrackingUnavailable(f"MLflow tracking server {uri} answers {url} with HTTP {err.code}; "
                                      f"check its log, or {_advice(uri)}") from None
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise TrackingUnavailable(f"MLflow tracking server {uri} does not answer ({reason}); "
                                  f"{_advice(uri)}") from None


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a SQLAlchemy sqlite URI (None for an in-memory database)."""
    rest = uri.split("://", 1)[1] if "://" in uri else ""
    rest = rest.split("?", 1)[0]
    if not rest.startswith("/") or rest in ("/", "/:memory:"):
        return None
    return Path(rest[1:])  # sqlite:///rel.db -> rel.db, sqlite:////abs.db -> /abs.db


def _check_writable(folder: Path, uri: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise TrackingUnavailable(f"tracking.tracking_uri = {uri!r}: cannot create {folder} ({err.strerror}); "
                                  "pick another path or set tracking.enabled=false") from None
    if not os.access(folder, os.W_OK):
        raise TrackingUnavailable(f"tracking.tracking_uri = {uri!r}: {folder} is not writable; "
                                  "pick another path or set tracking.enabled=false")


def _client(uri: str):
    """An MLflow client bound to ``uri`` for tracking and registry.

    MLflow resolves some URIs through its process-wide tracking and registry URIs whatever the
    client was given (a model version's ``models:/<id>`` source, artifact downloads): left at the
    default they would look in, and create, ./mlflow.db and ./mlruns. So the process-wide URIs
    are pointed at ``uri`` too; cogvx talks to one store per process.
    """
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def artifact_location(uri: str) -> str | None:
    """Where a new experiment of a SQLite store keeps its artifacts: ``mlruns`` beside the database
    file (MLflow's own default is ./mlruns in whatever folder the process runs in). None for
    stores that choose themselves (a server, a file store, other databases)."""
    if urlparse(uri).scheme.lower() != "sqlite":
        return None
    path = _sqlite_path(uri)
    return None if path is None else (path.parent.resolve() / "mlruns").as_uri()


# MLflow error codes of a store that failed (connection, database), not of a refused request.
STORE_FAILURES = ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED")
NOT_FOUND = ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE")


@contextmanager
def mlflow_errors(action: str, uri: str) -> Iterator[None]:
    """Re-raise MLflow client errors as cogvx errors saying what failed where.

    A refused request (unknown name, bad value) becomes a CogvxError; a store that cannot be
    reached or fails a TrackingUnavailable.
    """
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as err:
        if err.error_code in STORE_FAILURES:
            raise TrackingUnavailable(f"{action} on {uri}: {_first_line(err)}; {_advice(uri)}") from err
        raise CogvxError(f"{action} on {uri}: {_first_line(err)}") from err


def _logging_errors() -> tuple[type[BaseException], ...]:
    """What a failed logging call raises: MLflow errors, HTTP errors, file errors."""
    from mlflow.exceptions import MlflowException
    from requests import RequestException

    return MlflowException, RequestException, OSError


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0][:300]


def experiment_id(client, name: str, uri: str) -> str:
    """The id of experiment ``name`` on the store at ``uri``, created when missing (a deleted one is
    restored)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return client.create_experiment(name, artifact_location=artifact_location(uri))
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    return experiment.experiment_id


# ----------------------------------------------------------------------------- run metadata


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


# ----------------------------------------------------------------------------- runs


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
            self.client = _client(self.uri)
            self.experiment_id = experiment_id(self.client, config.tracking.experiment, self.uri)
            run = self.client.create_run(self.experiment_id, run_name=Path(config.train.output_dir).name or None,
                                         tags=run_tags(config, self.source_dir))
            self.run_id = run.info.run_id
            self._log_params(flatten_params(config.to_dict()))
            if config.train.method == "lora":  # the registry must take the LoRA at the end: try it now
                _ensure_registered_model(self.client, config.tracking.registered_model)
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
        except _logging_errors() as err:
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
        message = f"{what}: {_first_line(err)}"
        self.problems.append(message)
        if not self._warned:
            self._warned = True
            warnings.warn(f"MLflow ({self.uri}, run {self.run_id}): {message}. Training goes on; metrics "
                          f"are kept and written to {self.pending_path}", TrackingWarning, stacklevel=3)

    def finish(self, report: dict[str, Any], output_dir: Path) -> dict[str, Any]:
        """Log the summary metrics and artifacts, end the run FINISHED; says whether all got through.

        When something did not get through, the pending file also records how the run ended, so
        that ``cogvx tracking replay`` can finish it once the store is back."""
        output_dir = Path(output_dir)
        self._enqueue(summary_metrics(report), int(report.get("steps") or 0))
        complete = self.flush(force=True) and self._log_artifacts(report, output_dir) and self._end("FINISHED")
        if not complete:
            self._record_end("FINISHED", None, output_dir)
            warnings.warn(f"MLflow run {self.run_id} on {self.uri} is incomplete ({len(self.problems)} "
                          f"problem(s), last: {self.problems[-1]}); the outputs are in {output_dir}, unsent "
                          f"metrics in {self.pending_path}; once the store is back, "
                          f"`cogvx tracking replay` sends them and ends the run", TrackingWarning, stacklevel=2)
        return {"run_id": self.run_id, "experiment_id": self.experiment_id, "complete": complete,
                "problems": list(self.problems)}

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

    def _log_artifacts(self, report: dict[str, Any], output_dir: Path) -> bool:
        """Validation clips of every step under validation/, the LoRA under lora/, report.json and the config."""
        try:
            videos = set(map(Path, report.get("validation_videos") or []))
            videos |= set((output_dir / "validation").glob("step-*/*.mp4"))
            for video in sorted(videos):
                self.client.log_artifact(self.run_id, str(video), _validation_path(video, output_dir))
            weights = Path(report["weights"]) if report.get("weights") else None
            if report.get("method") == "lora" and weights is not None and weights.is_dir():
                self.client.log_artifacts(self.run_id, str(weights), "lora")
            for name in ("report.json", "cogvx-config.yaml"):
                if (output_dir / name).is_file():
                    self.client.log_artifact(self.run_id, str(output_dir / name))
        except _logging_errors() as err:
            self._problem("uploading artifacts failed", err)
            return False
        return True

    def _end(self, status: str, message: str | None = None) -> bool:
        try:
            if message:
                self.client.set_tag(self.run_id, "cogvx.error", message[:MAX_TAG_CHARS])
            self.client.set_terminated(self.run_id, status)
        except _logging_errors() as err:
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
            tracker.client = _client(uri)
            tracker.experiment_id = tracker.client.get_run(run_id).info.experiment_id
        return tracker


def _pending_record(line: str) -> dict[str, Any] | None:
    """One pending-file line; None for a line torn by a crash or not cogvx's (it cannot be sent)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and record.get("run_id") else None


def _line_run_id(line: str) -> str | None:
    """The run a pending-file line belongs to; None for a torn line (it is kept)."""
    return (_pending_record(line) or {}).get("run_id")


def _validation_path(video: Path, output_dir: Path) -> str:
    """validation/step-000012 for output_dir/validation/step-000012/prompt-00.mp4."""
    try:
        return str(video.parent.relative_to(output_dir)).replace(os.sep, "/")
    except ValueError:
        return "validation"


def summary_metrics(report: dict[str, Any]) -> dict[str, float | None]:
    """memory/<phase>/<peak>, timing/<name> and final_loss from a training report."""
    values: dict[str, float | None] = {"final_loss": report.get("final_loss")}
    for phase, peaks in (report.get("memory") or {}).get("phases", {}).items():
        values.update({f"memory/{phase}/{name}": value for name, value in peaks.items()})
    values.update({f"timing/{name}": value for name, value in (report.get("timing") or {}).items()})
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

    def finish(self, report: dict[str, Any], output_dir: Path) -> dict[str, Any]:
        return {"run_id": None, "experiment_id": None, "complete": True, "problems": []}

    def fail(self, message: str, status: str = "FAILED") -> None:
        return None


def tracker_for(config, **options) -> RunTracker | NullTracker:
    """The tracker config.tracking asks for (not started): RunTracker, or NullTracker when disabled."""
    return RunTracker(**options) if config.tracking.enabled else NullTracker()


# ----------------------------------------------------------------------------- registry


def register_lora(lora_dir: Path, config, run_id: str | None = None) -> dict[str, str]:
    """Register a LoRA folder as a new version of config.tracking.registered_model.

    MLflow 3 registers raw files only through a logged model: create it (linked to the training
    run), upload the folder, mark it READY, then create the registry version from models:/<id>.
    """
    from cogvx.training.lora import read_lora_metadata

    lora_dir = Path(lora_dir)
    if not (lora_dir / LORA_WEIGHT_NAME).is_file():
        raise CogvxError(f"{lora_dir}: no {LORA_WEIGHT_NAME} to register (pass the lora/ folder `cogvx train` wrote)")
    tags = version_tags(read_lora_metadata(lora_dir / LORA_WEIGHT_NAME), config)
    uri, name = config.tracking.tracking_uri, config.tracking.registered_model
    check_tracking(uri)
    client = _client(uri)
    with mlflow_errors(f"registering {lora_dir} as {name!r}", uri):
        model = client.create_logged_model(experiment_id(client, config.tracking.experiment, uri), name=name,
                                           source_run_id=run_id, tags=tags, model_type="lora")
        try:
            client.log_model_artifacts(model.model_id, str(lora_dir))
        except Exception:
            client.finalize_logged_model(model.model_id, "FAILED")
            raise
        client.finalize_logged_model(model.model_id, "READY")
        _ensure_registered_model(client, name)
        version = client.create_model_version(name, source=f"models:/{model.model_id}", run_id=run_id,
                                              tags=tags, model_id=model.model_id)
    return {"name": name, "version": str(version.version), "model_id": model.model_id}


def version_tags(meta: dict[str, Any], config) -> dict[str, str]:
    """base_model, variant, rank, alpha (and target modules) of a LoRA, from its file first."""
    record, lora = meta.get("cogvx") or {}, config.train.lora
    alpha = meta.get("alpha") if meta.get("alpha") is not None else lora.alpha
    return {"base_model": str(record.get("base_model") or config.model_source),
            "variant": str(record.get("variant") or config.spec.key),
            "rank": str(meta.get("rank") or lora.rank), "alpha": f"{float(alpha):g}",
            "target_modules": ",".join(sorted(meta.get("target_modules") or [])), "cogvx_version": __version__}


def _ensure_registered_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as err:
        if err.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise


def _all_pages(search, **kwargs) -> list:
    """Every result of a paged MLflow search call."""
    results, token = [], None
    while True:
        page = search(page_token=token, **kwargs)
        results.extend(page)
        token = page.token
        if not token:
            return results


def _name_filter(name: str) -> str:
    quote = "'" if "'" not in name else '"'
    return f"name = {quote}{name}{quote}"


def list_registered(uri: str, name: str | None = None) -> list[dict[str, Any]]:
    """Every registered version (of ``name``, or of all models): name, version, aliases, tags, created."""
    check_tracking(uri)
    client = _client(uri)
    with mlflow_errors("listing registered models", uri):
        models = _all_pages(client.search_registered_models,
                            filter_string=_name_filter(name) if name else None)
        if name is not None and not models:
            raise CogvxError(_missing_model_message(client, name, uri))
        rows = []
        for model in models:
            for version in _all_pages(client.search_model_versions, filter_string=_name_filter(model.name)):
                rows.append({"name": model.name, "version": str(version.version),
                             "aliases": sorted(a for a, v in model.aliases.items() if str(v) == str(version.version)),
                             "tags": dict(version.tags), "run_id": version.run_id or None,
                             "created": _iso(version.creation_timestamp)})
    return sorted(rows, key=lambda row: (row["name"], int(row["version"])))


def _iso(millis: int | None) -> str | None:
    return datetime.fromtimestamp(millis / 1000, tz=timezone.utc).isoformat(timespec="seconds") if millis else None


def promote(uri: str, name: str, version: str | int, alias: str = "champion") -> dict[str, str]:
    """Point ``alias`` of registered model ``name`` at ``version`` (moving it from any other)."""
    check_tracking(uri)
    client = _client(uri)
    with mlflow_errors(f"setting alias {alias!r} of {name!r}", uri):
        found = _find_version(client, name, str(version), uri)
        client.set_registered_model_alias(name, alias, found.version)
    return {"name": name, "version": str(found.version), "alias": alias}


def _find_version(client, name: str, ref: str, uri: str):
    """Model version ``ref`` (a number, "latest" or an alias) of ``name``; a CogvxError listing what exists."""
    from mlflow.exceptions import MlflowException

    try:
        if ref == "latest":
            versions = _all_pages(client.search_model_versions, filter_string=_name_filter(name))
            if versions:
                return max(versions, key=lambda v: int(v.version))
            raise CogvxError(_missing_model_message(client, name, uri))
        if ref.isdigit():
            return client.get_model_version(name, ref)
        return client.get_model_version_by_alias(name, ref)
    except MlflowException as err:
        if err.error_code not in NOT_FOUND:
            raise
        raise CogvxError(_missing_version_message(client, name, ref, uri)) from err


def _missing_model_message(client, name: str, uri: str) -> str:
    names = sorted(model.name for model in _all_pages(client.search_registered_models))
    return (f"no registered model {name!r} on {uri}; registered models: {', '.join(names) or 'none'} "
            "(register one with tracking enabled, see `cogvx registry list`)")


def _missing_version_message(client, name: str, ref: str, uri: str) -> str:
    models = _all_pages(client.search_registered_models, filter_string=_name_filter(name))
    if not models:
        return _missing_model_message(client, name, uri)
    versions = _all_pages(client.search_model_versions, filter_string=_name_filter(name))
    numbers = ", ".join(sorted((str(v.version) for v in versions), key=int)) or "none"
    aliases = ", ".join(f"{a} -> {v}" for a, v in sorted(models[0].aliases.items())) or "none"
    what = "version" if ref.isdigit() else "alias"
    return f"registered model {name!r} on {uri} has no {what} {ref!r}; versions: {numbers}; aliases: {aliases}"


def parse_models_uri(uri: str) -> tuple[str, str]:
    """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` (or /latest) -> (NAME, ALIAS or VERSION)."""
    rest = uri[len("models:/"):]
    name, sep, ref = rest.partition("@") if "@" in rest else rest.rpartition("/")
    if not sep or not name or not ref or "/" in ref or (sep == "/" and not (ref.isdigit() or ref == "latest")):
        raise CogvxError(f"{uri!r}: expected models:/NAME@ALIAS (e.g. models:/cogvx-lora@champion) "
                         "or models:/NAME/VERSION (a number or 'latest')")
    return name, ref


def resolve_lora(uri_or_path: str, tracking_uri: str, dest: Path) -> Path:
    """A local LoRA path as is; a registry URI downloaded into ``dest`` -> the folder holding the weights."""
    import mlflow.artifacts

    text = str(uri_or_path)
    if not text.startswith("models:/"):
        return Path(text)
    name, ref = parse_models_uri(text)
    check_tracking(tracking_uri)
    client = _client(tracking_uri)
    with mlflow_errors(f"fetching {text}", tracking_uri):
        version = _find_version(client, name, ref, tracking_uri)
        target = Path(dest) / f"{re.sub(r'[^A-Za-z0-9._-]', '_', name)}-v{version.version}"
        # The version's own artifact URI: MLflow resolves models:/ URIs through the process-wide
        # registry URI, not the one passed in, so they would be looked up in the wrong store.
        source = client.get_model_version_download_uri(name, version.version)
        local = mlflow.artifacts.download_artifacts(source, dst_path=str(target), tracking_uri=tracking_uri)
    found = sorted(Path(local).rglob(LORA_WEIGHT_NAME))
    if not found:
        raise CogvxError(f"{text} (version {version.version}) holds no {LORA_WEIGHT_NAME}; was it registered "
                         f"by `cogvx`? (downloaded to {local})")
    return found[0].parent


# ----------------------------------------------------------------------------- replay


def read_pending(path: Path) -> dict[str, dict[str, Any]]:
    """The pending file's lines by run: {"metrics": [line, ...], "end": {...} or None}. Lines torn
    by a crash are left out (they cannot be sent)."""
    runs: dict[str, dict[str, Any]] = {}
    records = (_pending_record(line) for line in Path(path).read_text(encoding="utf-8").splitlines())
    for record in filter(None, records):
        run = runs.setdefault(record["run_id"], {"metrics": [], "end": None})
        if "end" in record:
            run["end"] = record["end"]
        elif "key" in record:
            run["metrics"].append(record)
    return runs


def replay_pending(config, log=print) -> list[dict[str, Any]]:
    """Send what training runs in train.output_dir could not send to the store (metrics, the
    artifacts, the run's end), end each run with its true status and register a finished LoRA.

    A run whose process died without recording an end (SIGKILL, power loss) is ended KILLED. The
    caller makes sure no training is writing to the folder. Sent runs leave the pending file;
    a store that fails again leaves it as it was (run the command again later).
    """
    from mlflow.entities import Metric

    out = Path(config.train.output_dir)
    pending = out / PENDING_FILE
    if not pending.is_file():
        raise CogvxError(f"nothing to replay: {pending} does not exist (every run in {out} reached MLflow)")
    uri = config.tracking.tracking_uri
    done = []
    for run_id, run in read_pending(pending).items():
        tracker = RunTracker.attach(uri, run_id, pending)
        tracker._queue = [Metric(m["key"], float(m["value"]), int(m["timestamp"]), int(m["step"]))
                          for m in run["metrics"]]
        tracker._spilled = len(tracker._queue)
        done.append(_replay_run(tracker, run["end"], config, out))
        log(f"run {run_id}: {len(run['metrics'])} metric values sent, ended {done[-1]['status']}"
            + (f", registered as version {done[-1]['registered']['version']}" if done[-1].get("registered") else ""))
    return done


def _replay_run(tracker: RunTracker, end: dict[str, Any] | None, config, out: Path) -> dict[str, Any]:
    """Send one run's metrics, artifacts (a finished run's) and end; raise when the store fails."""
    status = end["status"] if end else "KILLED"
    message = end.get("message") if end else "the training process ended without reporting (killed?)"
    report_file = out / "report.json"
    report = json.loads(report_file.read_text(encoding="utf-8")) if report_file.is_file() else {}
    sent = tracker.flush(force=True)
    if sent and status == "FINISHED":
        sent = tracker._log_artifacts(report, out)
    if sent:
        sent = tracker._end(status, message if status != "FINISHED" else None)
    if not sent:
        raise TrackingUnavailable(f"replaying run {tracker.run_id} on {tracker.uri} failed "
                                  f"({tracker.problems[-1]}); the pending file is kept, try again later")
    tracker._forget_spilled()
    result = {"run_id": tracker.run_id, "status": status}
    weights = report.get("weights")
    if status == "FINISHED" and report.get("method") == "lora" and weights and Path(weights).is_dir():
        result["registered"] = register_lora(Path(weights), config, tracker.run_id)
    return result
