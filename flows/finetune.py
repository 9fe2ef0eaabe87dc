"""The cogvx fine-tuning flow: base model -> download -> validate -> prepare -> train -> render -> register.

Every step is a task in :mod:`tasks`, a thin wrapper over the cogvx library, so the flow runs the
same code as the CLI and the DVC stages. Every task gets the same two plain inputs, ``params`` (a
params.yaml path) and ``overrides`` (dotted ``section.key=value`` strings, as on the cogvx command
line), and loads the config itself; nothing of the config is mirrored here.

Run it once (from the project folder that holds params.yaml)::

    python -m flows run [--params params.yaml] [--out-dir outputs/samples] [train.max_steps=50 ...]

With no PREFECT_API_URL set, Prefect starts a temporary local server for the run. Run it on a
schedule, without a work pool (the process stays up and runs each scheduled run itself)::

    python -m flows serve --cron "0 3 * * *" [--name cogvx-finetune-scheduled] [overrides ...]

or deploy it to the ``cogvx-process`` work pool with ``prefect deploy`` (see prefect.yaml).
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from tasks.data import download, validate
from tasks.models import build_base_model
from tasks.training import prepare, register, render, train

FLOW_NAME = "cogvx-finetune"
SERVED_NAME = "cogvx-finetune-scheduled"


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


def serve(cron: str, name: str = SERVED_NAME, params: str | None = "params.yaml",
          overrides: list[str] | None = None, out_dir: str = "outputs/samples") -> None:
    """Serve ``finetune`` as deployment ``cogvx-finetune/<name>`` on a cron schedule (blocks).

    No work pool is needed: this process polls the Prefect API and runs scheduled (and manually
    triggered) runs itself, in a subprocess. Stopping it leaves the schedule active
    (``pause_on_shutdown=False``), so a restarted server picks it up again.
    """
    finetune.serve(name=name, cron=cron, pause_on_shutdown=False,
                   parameters={"params": params, "overrides": list(overrides or []), "out_dir": out_dir})


if __name__ == "__main__":
    finetune()
