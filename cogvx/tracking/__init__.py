"""MLflow experiment tracking and Model Registry for cogvx training runs.

- :mod:`~cogvx.tracking.store`: the store (checked before a run, one client, errors in words);
- :mod:`~cogvx.tracking.runs`: one MLflow run per training run, which never costs the training;
- :mod:`~cogvx.tracking.registry`: registering LoRAs, aliases, fetching ``models:/NAME@ALIAS``;
- :mod:`~cogvx.tracking.replay`: sending what a run could not send, once the store is back.

MLflow is imported lazily, inside the functions, so importing this package stays cheap.
"""

from cogvx.tracking.registry import list_registered, parse_models_uri, promote, register_lora, resolve_lora
from cogvx.tracking.replay import read_pending, replay_pending
from cogvx.tracking.runs import (MAX_PARAM_CHARS, PENDING_FILE, NullTracker, RunTracker, TrackingWarning,
                                 flatten_params, run_tags, summary_metrics, tracker_for)
from cogvx.tracking.store import CLIENT_ENV, TrackingUnavailable, check_tracking

__all__ = ["CLIENT_ENV", "MAX_PARAM_CHARS", "PENDING_FILE", "NullTracker", "RunTracker", "TrackingUnavailable",
           "TrackingWarning", "check_tracking", "flatten_params", "list_registered", "parse_models_uri", "promote",
           "read_pending", "register_lora", "replay_pending", "resolve_lora", "run_tags", "summary_metrics",
           "tracker_for"]
