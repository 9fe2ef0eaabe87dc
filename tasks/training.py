"""Prefect tasks for training and what follows it: prepare -> train -> render -> register.

Like every cogvx task, each one takes ``params`` (a params.yaml path, or None for the built-in
defaults) and ``overrides`` (dotted ``section.key=value`` strings), loads the config itself and
calls one stage of :mod:`cogvx.stages`; all logic stays in cogvx. Heavy modules (torch, diffusers,
mlflow) are imported inside the stages, so importing the flow is fast. A stage whose config names
an accelerate config launches its processes itself.

Task caching is off (``cache_policy=NO_CACHE``): DVC owns staleness, and the library skips
finished work itself (content-addressed latents, ``train(resume="latest")``), so a Prefect cache
would only risk returning a stale result for inputs it cannot see (files on disk).

Retries: ``train`` retries twice and always resumes from the newest checkpoint of the same
settings and data, so a retry continues where the failed attempt stopped instead of starting
over; the number of steps recovered is logged. Fault injection for tests (``COGVX_FAIL_ONCE`` /
``COGVX_FAIL_ONCE_MARKER``) is described in :mod:`tasks.common`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from cogvx import stages
from cogvx.config import load_config
from cogvx.reports import REPORT_NAME, TrackingOutcome
from tasks.common import fail_once, run_logger, worth_retrying
from tasks.forking import install as install_fork_fix

# prepare's DataLoader workers are forked: let them exit cleanly inside a Prefect run.
install_fork_fix()

SAMPLE_NAME = "flow-sample.mp4"


@task(name="prepare", retries=1, retry_delay_seconds=2, retry_condition_fn=worth_retrying,
      cache_policy=NO_CACHE)
def prepare(params: str | None, overrides: list[str]) -> dict[str, Any]:
    """Encode the clips and captions not encoded yet; return the prepare summary.

    One retry: the latents are content-addressed, so a retry only encodes what is missing.
    """
    fail_once("prepare")
    logger = run_logger()
    summary = stages.prepare(load_config(params, overrides), log=logger.info).as_dict()
    logger.info("prepare: %s", summary)
    return summary


@task(name="train", retries=2, retry_delay_seconds=2, retry_condition_fn=worth_retrying,
      cache_policy=NO_CACHE)
def train(params: str | None, overrides: list[str]) -> dict[str, Any]:
    """Fine-tune, resuming from the latest checkpoint of this run; return the run's key figures.

    ``steps``, ``final_loss``, ``weights`` (the LoRA folder, or the full transformer folder),
    ``validation_videos``, ``report`` (the full report.json), ``recovered_steps`` (steps taken
    over from a checkpoint: 0 on a fresh start, > 0 when a retry or a re-run resumed),
    ``recovery_s`` (seconds the resuming attempt took to load and restore its checkpoint), ``run_id``
    (the MLflow run, None when tracking is off) and ``registered`` (the registry version when
    train registered the LoRA itself, else None).
    """
    fail_once("train")
    from prefect.runtime import task_run

    logger = run_logger()
    config = load_config(params, overrides)
    report = stages.train(config, resume="latest", log=logger.info,
                          on_step=lambda step, *_: fail_once("train", step))
    recovered = report.resumed_from_step
    tracking = report.tracking or TrackingOutcome()  # the MLflow run, when tracking.enabled
    logger.info("train attempt %s: recovered %d of %d steps from a checkpoint, trained %d; "
                "final loss %s; weights in %s", task_run.run_count, recovered, report.steps,
                report.steps - recovered, report.final_loss, report.weights)
    return {"steps": report.steps, "final_loss": report.final_loss, "weights": report.weights,
            "method": report.method, "validation_videos": report.validation_videos,
            "recovered_steps": recovered, "recovery_s": report.setup_s if recovered else 0.0,
            "run_id": tracking.run_id, "registered": tracking.registered,
            "report": str(Path(config.train.output_dir) / REPORT_NAME)}


@task(name="render", retries=2, retry_delay_seconds=2, retry_condition_fn=worth_retrying,
      cache_policy=NO_CACHE)
def render(params: str | None, overrides: list[str], weights: str,
           out_dir: str = "outputs/samples") -> str:
    """Render the first validation prompt with the trained weights to ``out_dir/flow-sample.mp4``.

    ``weights`` is what ``train`` returned: a LoRA folder (train.method=lora) or a fully tuned
    transformer folder (train.method=full).
    """
    fail_once("render")
    from cogvx.generate import GenerateRequest

    config = load_config(params, overrides)
    logger = run_logger()
    request = GenerateRequest(prompt=config.validate_.prompts[0], out=Path(out_dir) / SAMPLE_NAME,
                              weights=Path(weights))
    path = stages.generate(config, request, log=logger.info)
    logger.info("rendered %s", path)
    return str(path)


@task(name="register", retries=3, retry_delay_seconds=[1, 2, 4], retry_condition_fn=worth_retrying,
      cache_policy=NO_CACHE)
def register(params: str | None, overrides: list[str], weights: str, run_id: str | None = None,
             registered: dict[str, Any] | None = None) -> dict[str, Any]:
    """Register the trained LoRA in the MLflow model registry (:func:`cogvx.stages.register`).

    ``run_id`` links the version to the training run. Returns ``{"skipped": "tracking disabled"}``
    without importing MLflow when tracking.enabled is false, and ``registered`` as it is when
    train already registered this LoRA (so one run makes one registry version). Full fine-tunes
    are not registered (only LoRA folders are). Three retries cover a tracking server that is
    briefly away.
    """
    fail_once("register")
    config = load_config(params, overrides)
    logger = run_logger()
    if not config.tracking.enabled:
        logger.info("tracking.enabled is false: nothing registered")
        return {"skipped": "tracking disabled"}
    if config.train.method != "lora":
        logger.info("train.method is %s: only LoRA weights are registered", config.train.method)
        return {"skipped": f"train.method is {config.train.method}"}
    if registered:
        logger.info("train already registered %s: %s", weights, registered)
        return dict(registered)
    result = stages.register(config, Path(weights), run_id)
    logger.info("registered %s: %s", weights, result)
    return result
