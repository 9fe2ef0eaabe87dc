"""The cogvx fine-tuning flow: base model -> download -> validate -> prepare -> train -> render -> register.

Every step is a task in :mod:`tasks`, a thin wrapper over one stage of :mod:`cogvx.stages`, so the
flow runs the same code as the CLI and the DVC stages. Every task gets the same two plain inputs, ``params`` (a
params.yaml path) and ``overrides`` (dotted ``section.key=value`` strings, as on the cogvx command
line), and loads the config itself; nothing of the config is mirrored here.

Run it once (from the project folder that holds params.yaml)::

    cogvx flow run [--params params.yaml] [--out outputs/samples] [train.max_steps=50 ...]

With no PREFECT_API_URL set, Prefect starts a temporary local server for the run. Run it on a
schedule, without a work pool (the process stays up and runs each scheduled run itself)::

    cogvx flow serve --cron "0 3 * * *" [--name cogvx-finetune-scheduled] [overrides ...]

or deploy it to the ``cogvx-process`` work pool with ``prefect deploy`` (see prefect.yaml).
Either way the deployment runs one flow run at a time (:data:`CONCURRENCY`): a run that comes
due while another still trains waits (Prefect state ``AwaitingConcurrencySlot``) and starts when
that one ends, instead of writing into the same ``train.output_dir``.
"""

from __future__ import annotations

import logging
from typing import Any

from prefect import flow
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

from tasks.data import download, validate
from tasks.models import build_base_model
from tasks.training import prepare, register, render, train

FLOW_NAME = "cogvx-finetune"
SERVED_NAME = "cogvx-finetune-scheduled"
# One run of the deployment at a time; the others queue (prefect.yaml says the same).
CONCURRENCY = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)
# The logger of the runner's state proposals, which reports a run held back by the limit.
RUNNER_STATE_LOGGER = "prefect.runner.state_proposer"


@flow(name=FLOW_NAME)
def finetune(params: str | None = "params.yaml", overrides: list[str] | None = None,
             out_dir: str = "outputs/samples") -> dict[str, Any]:
    """Fine-tune end to end; return a summary of every stage.

    ``params`` is a params.yaml path (None for the built-in defaults) and ``overrides`` dotted
    ``section.key=value`` settings applied on top, exactly as on the cogvx command line. The
    sample clip is rendered to ``out_dir/flow-sample.mp4``.
    """
    overrides = list(overrides or [])
    # Each stage needs the one before, and tasks are called, not submitted: they run in this
    # (main) thread, where train can install its SIGINT/SIGTERM checkpoint-and-stop handlers.
    model = build_base_model(params, overrides)
    data_root = download(params, overrides)
    data = validate(params, overrides)
    prepared = prepare(params, overrides)
    trained = train(params, overrides)
    sample = render(params, overrides, trained["weights"], out_dir)
    registered = register(params, overrides, trained["weights"], trained["run_id"], trained["registered"])
    return {
        "model": model,
        "data_root": data_root,
        "validate": data,
        "prepare": prepared,
        "train": {key: trained[key] for key in ("steps", "final_loss", "weights", "recovered_steps", "recovery_s", "run_id")},
        "render": sample,
        "register": registered,
    }


def served_deployment(cron: str, name: str = SERVED_NAME, params: str | None = "params.yaml",
                      overrides: list[str] | None = None, out_dir: str = "outputs/samples"):
    """The RunnerDeployment :func:`serve` serves: ``finetune`` on ``cron``, one run at a time."""
    return finetune.to_deployment(name=name, cron=cron, concurrency_limit=CONCURRENCY,
                                  parameters={"params": params, "overrides": list(overrides or []),
                                              "out_dir": out_dir})


def serve(cron: str, name: str = SERVED_NAME, params: str | None = "params.yaml",
          overrides: list[str] | None = None, out_dir: str = "outputs/samples") -> None:
    """Serve ``finetune`` as deployment ``cogvx-finetune/<name>`` on a cron schedule (blocks).

    No work pool is needed: this process polls the Prefect API and runs scheduled (and manually
    triggered) runs itself, in a subprocess, one at a time (a run due while another is running
    waits for it, and this process says so). Stopping it leaves the schedule active
    (``pause_on_shutdown=False``), so a restarted server picks it up again.
    """
    from prefect import serve as serve_deployments

    logging.getLogger(RUNNER_STATE_LOGGER).addFilter(ConcurrencyWaitNotice())
    serve_deployments(served_deployment(cron, name, params, overrides, out_dir), pause_on_shutdown=False)


class ConcurrencyWaitNotice(logging.Filter):
    """Say what Prefect's runner means by "Aborted submission of flow run ...: Server returned a
    non-pending state 'SCHEDULED'": the server held the run back for the deployment's
    concurrency limit (state AwaitingConcurrencySlot) and will offer it again later."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        if str(record.msg).startswith("Aborted submission") and len(args) == 2 and args[1] == "SCHEDULED":
            record.msg = ("flow run '%s' waits (AwaitingConcurrencySlot): another run of this deployment "
                          "is still running and the deployment runs one at a time; it starts once that "
                          "run has ended")
            record.args = (args[0],)
        return True


if __name__ == "__main__":
    finetune()
