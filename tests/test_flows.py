"""End-to-end test of the Prefect flow on the tiny model, against a throwaway Prefect server.

The flow is run once per module (starting Prefect's test server costs tens of seconds on a
small machine); the tests then check what that one run produced. PREFECT_HOME points into the
test's temporary folder so nothing is read from or written to the user's ~/.prefect.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

TINY = "tiny-t2v"


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """Run ``finetune`` once on the tiny model in a temp folder; return (folder, report)."""
    tmp = tmp_path_factory.mktemp("flow")
    home = tmp / "prefect-home"
    with pytest.MonkeyPatch.context() as patch:
        # Importing prefect creates its home folder, so point PREFECT_HOME here first ...
        patch.setenv("PREFECT_HOME", str(home))
        from prefect.settings import (PREFECT_HOME, PREFECT_SERVER_ANALYTICS_ENABLED,
                                      temporary_settings)
        from prefect.testing.utilities import prefect_test_harness

        from flows.finetune import finetune

    # ... and set it again as a setting, which holds even if prefect was imported earlier in the
    # session; the test server subprocess inherits these settings. Analytics off: the server
    # would otherwise try to send telemetry and log an error where there is no network.
    isolated = {PREFECT_HOME: home, PREFECT_SERVER_ANALYTICS_ENABLED: False}
    with temporary_settings(updates=isolated), prefect_test_harness(server_startup_timeout=120):
        report = finetune(params=None, overrides=[f"model.path={tmp}/models/{TINY}"],
                          out_dir=str(tmp / "check"))
    return tmp, report


def test_flow_builds_and_checks_tiny_model(flow_run: tuple[Path, dict[str, Any]]) -> None:
    """The flow builds the missing tiny model and renders a clip of the tiny model's size."""
    tmp, report = flow_run
    assert (report["frames"], report["height"], report["width"]) == (9, 64, 96)
    assert report["model"] == TINY
    sample = tmp / "check" / "sample.mp4"
    assert sample.is_file() and sample.stat().st_size > 0
    assert (tmp / "models" / TINY / "model_index.json").is_file()


def test_build_base_model_reuses_existing_model(flow_run: tuple[Path, dict[str, Any]]) -> None:
    """A second build finds model_index.json and returns the folder without rebuilding."""
    from tasks.models import build_base_model

    tmp, _ = flow_run
    folder = tmp / "models" / TINY
    index = folder / "model_index.json"
    before = index.stat().st_mtime_ns
    assert build_base_model.fn(None, [f"model.path={folder}"]) == str(folder)
    assert index.stat().st_mtime_ns == before
