"""The MLflow store: checked before a run needs it, one client per process, its errors in words.

Tracking must never cost a training run: :func:`check_tracking` fails fast (before any model is
loaded) when the tracking store is unreachable, and the MLflow client's HTTP retries are bounded.
MLflow is imported lazily so that importing cogvx's tracking stays cheap for the CLI.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

from cogvx.errors import CogvxError

# Defaults for the MLflow HTTP client when the user set none: without them a dead server makes
# every call retry with exponential backoff for minutes (7 retries, 120 s timeout).
CLIENT_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
              "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5"}



class TrackingUnavailable(CogvxError):
    """The MLflow tracking store (server, SQLite file) cannot be reached or written."""

    exit_code = 5




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


def mlflow_client(uri: str):
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
            raise TrackingUnavailable(f"{action} on {uri}: {first_line(err)}; {_advice(uri)}") from err
        raise CogvxError(f"{action} on {uri}: {first_line(err)}") from err


def logging_errors() -> tuple[type[BaseException], ...]:
    """What a failed logging call raises: MLflow errors, HTTP errors, file errors."""
    from mlflow.exceptions import MlflowException
    from requests import RequestException

    return MlflowException, RequestException, OSError


def first_line(err: BaseException) -> str:
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
