"""Prefect tasks for the training data: fetch it into data.data_root, then validate it.

Like every cogvx task, each one takes ``params`` (a params.yaml path, or None for the built-in
defaults) and ``overrides`` (dotted ``section.key=value`` strings), loads the config itself and
calls one stage of :mod:`cogvx.stages`; all logic stays in cogvx. Plain strings are cheap to pass
and are recorded by Prefect as the task run's parameters.

Task caching is off (``cache_policy=NO_CACHE``): DVC owns staleness, and the library already
skips work that is done (a data set already fetched from the same source is not fetched again).
Fault injection for tests (``COGVX_FAIL_ONCE`` / ``COGVX_FAIL_ONCE_MARKER``) is described in
:mod:`tasks.common`.
"""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from cogvx import stages
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
    config = load_config(params, overrides)
    root = stages.download(config)
    run_logger().info("data set from %s is in %s", config.data.source, root)
    return str(root)


@task(name="validate", retries=0, cache_policy=NO_CACHE)
def validate(params: str | None, overrides: list[str]) -> dict[str, Any]:
    """Check every sample of the data set; return how many there are and how many are kept.

    No retries: reading local files gives the same answer every time. Problems stop the flow with
    the full report, unless data.skip_invalid=true, which drops the bad samples and writes what
    was dropped to ``prepare.output_dir/dropped.json`` (where `cogvx prepare` writes it too).
    """
    fail_once("validate")
    config = load_config(params, overrides)
    checked = stages.validate_data(config)
    run_logger().info("%d valid samples in %s%s", checked.valid, config.data.data_root,
                      f", dropped {checked.dropped} (report: {checked.report})" if checked.dropped else "")
    return checked.to_dict()
