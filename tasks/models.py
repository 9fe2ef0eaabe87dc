"""Prefect tasks for the base model: build the tiny one locally, check that it renders.

Each task loads the config itself from ``params`` + ``overrides`` (plain strings, cheap to pass
and to record as task parameters) and calls one stage of :mod:`cogvx.stages`; all logic stays in
cogvx. Heavy modules (torch, diffusers) are imported inside the stages, so importing the flow is fast.

Task caching is off (``cache_policy=NO_CACHE``): DVC owns staleness, and an existing model folder
is reused by the stage itself. Fault injection for tests (``COGVX_FAIL_ONCE`` /
``COGVX_FAIL_ONCE_MARKER``) is described in :mod:`tasks.common`.
"""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from cogvx import stages
from cogvx.config import load_config
from tasks.common import fail_once, worth_retrying


@task(name="build-base-model", retries=0, cache_policy=NO_CACHE)
def build_base_model(params: str | None, overrides: list[str]) -> str:
    """Return the folder or hub id of the base model, building the tiny model if it is missing.

    A tiny variant is built once (random weights, deterministic) into ``config.model_source``
    with its resolved config beside it; an existing folder with a model_index.json is reused,
    so re-running the flow does not rebuild. A full-size variant is returned as configured; its
    weights are fetched from the hub when first loaded (by prepare). No retries: the work is local and deterministic.
    """
    fail_once("build-base-model")
    return stages.build_base_model(load_config(params, overrides), existing="reuse").source


@task(name="check-model", retries=1, retry_condition_fn=worth_retrying, cache_policy=NO_CACHE)
def check_model(params: str | None, overrides: list[str], out_dir: str) -> dict[str, Any]:
    """Load the base model and render a short clip into ``out_dir``; return the check report.

    One retry covers a transient failure (e.g. a flaky hub download while loading).
    """
    fail_once("check-model")
    return stages.check(load_config(params, overrides), out_dir)
