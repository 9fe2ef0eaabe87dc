"""Prefect tasks for the training data: fetch it into data.data_root, then validate it.

Like every cogvx task, each one takes ``params`` (a params.yaml path, or None for the built-in
defaults) and ``overrides`` (dotted ``section.key=value`` strings), loads the config itself and
calls one library function; all logic stays in cogvx. Plain strings are cheap to pass and are
recorded by Prefect as the task run's parameters.

Task caching is off (``cache_policy=NO_CACHE``): DVC owns staleness, and the library already
skips work that is done (a data set already fetched from the same source is not fetched again).
Fault injection for tests (``COGVX_FAIL_ONCE`` / ``COGVX_FAIL_ONCE_MARKER``) is described in
:mod:`tasks.common`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from cogvx.config import load_config
from tasks.common import fail_once, run_logger, worth_retrying


@task(name="download", retries=3, retry_delay_seconds=[1, 2, 4], retry_condition_fn=worth_retrying,
      cache_policy=NO_CACHE)
def download(params: str | None, overrides: list[str]) -> str:
    """Fetch data.source into data.data_root; return data_root.

    Three retries with a short backoff cover a flaky hub or network; a data set already fetched
    from the same source is left as it is.
    """
    fail_once("download")
    from cogvx.data.download import fetch_dataset

    data = load_config(params, overrides).data
    root = fetch_dataset(data.source, data.data_root, revision=data.revision,
                         synthetic_clips=data.synthetic_clips, seed=data.seed)
    run_logger().info("data set from %s is in %s", data.source, root)
    return str(root)


@task(name="validate", retries=0, cache_policy=NO_CACHE)
def validate(params: str | None, overrides: list[str]) -> dict[str, Any]:
    """Check every sample of the data set; return how many there are and how many are kept.

    No retries: reading local files gives the same answer every time. Problems stop the flow with
    the full report, unless data.skip_invalid=true, which drops the bad samples and writes what
    was dropped to ``prepare.output_dir/dropped.json`` (where `cogvx prepare` writes it too).
    """
    fail_once("validate")
    from cogvx.data.validation import apply_policy, validate_dataset

    config = load_config(params, overrides)
    report = validate_dataset(config.data, min_frames=min(b.frames for b in config.buckets))
    report_path = Path(config.prepare.output_dir) / "dropped.json"
    kept = apply_policy(report, config.data.skip_invalid, report_path)
    dropped = len(report.samples) - len(kept)
    run_logger().info("%d valid samples in %s%s", len(kept), config.data.data_root,
                          f", dropped {dropped} (report: {report_path})" if dropped else "")
    return {"samples": len(report.samples), "valid": len(kept), "dropped": dropped,
            "problems": [str(problem) for problem in report.problems]}
