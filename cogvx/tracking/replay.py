"""`cogvx tracking replay`: send what training could not send to MLflow, once the store is back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cogvx.errors import CogvxError
from cogvx.reports import REPORT_NAME, TrainingReport
from cogvx.tracking.registry import register_lora
from cogvx.tracking.runs import PENDING_FILE, RunTracker, pending_record
from cogvx.tracking.store import TrackingUnavailable




def read_pending(path: Path) -> dict[str, dict[str, Any]]:
    """The pending file's lines by run: {"metrics": [line, ...], "end": {...} or None}. Lines torn
    by a crash are left out (they cannot be sent)."""
    runs: dict[str, dict[str, Any]] = {}
    records = (pending_record(line) for line in Path(path).read_text(encoding="utf-8").splitlines())
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
    report = TrainingReport.read(out) if (out / REPORT_NAME).is_file() else None
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
    if status == "FINISHED" and report and report.method == "lora" and Path(report.weights).is_dir():
        result["registered"] = register_lora(Path(report.weights), config, tracker.run_id)
    return result
