"""The cogvx fine-tuning flow.

It grows, issue by issue, into download -> prepare -> train -> render -> register; today it
builds the base model (the tiny one locally, when that is the configured variant) and checks
that it loads and renders a short clip. Every step is a task in :mod:`tasks`, a thin wrapper
over the cogvx library, so the flow runs the same code as the CLI and the DVC stages.

Run it with ``python -m flows.finetune`` (or ``python flows/finetune.py``) from the project
folder that holds params.yaml.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from tasks.models import build_base_model, check_model


@flow(name="cogvx-finetune")
def finetune(params: str | None = "params.yaml", overrides: list[str] | None = None,
             out_dir: str = "outputs/check") -> dict[str, Any]:
    """Build (or reuse) the base model, then check it; return the check report.

    ``params`` is a params.yaml path (None for the built-in defaults) and ``overrides`` dotted
    ``section.key=value`` settings applied on top, exactly as on the cogvx command line.
    """
    overrides = list(overrides or [])
    build_base_model(params, overrides)
    return check_model(params, overrides, out_dir)


if __name__ == "__main__":
    finetune()
