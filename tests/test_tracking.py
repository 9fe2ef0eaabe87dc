"""MLflow tracking and registry against real stores: `mlflow server` processes and SQLite files.

No mocks: a LoRA is trained for 2 steps on the tiny model, logged to a real tracking server,
registered, promoted, fetched back by alias and loaded into the tiny pipeline; a second server
is killed mid-run to show that training-side calls keep working and nothing is lost.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from cogvx.config import load_config
from cogvx.errors import CogvxError
from cogvx.reports import TrainingReport
from cogvx.tracking import (CLIENT_ENV, PENDING_FILE, NullTracker, RunTracker, TrackingUnavailable,
                            TrackingWarning, check_tracking, list_registered, promote, register_lora,
                            replay_pending, resolve_lora, tracker_for)
from tests.helpers.processes import free_port
from tests.helpers.servers import spawn_server, stop_server, wait_healthy

REGISTERED = "cogvx-lora-test"


@pytest.fixture(scope="module", autouse=True)
def away_from_the_repo(tmp_path_factory):
    """Run the module in a temp folder: MLflow's defaults (./mlflow.db, ./mlruns) land there."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path_factory.mktemp("cwd"))
        yield


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Two servers, spawned before the training fixture so their start-up overlaps it."""
    roots = [tmp_path_factory.mktemp("mlflow-server"), tmp_path_factory.mktemp("mlflow-doomed")]
    started = [(spawn_server(root), root) for root in roots]
    yield started
    for (process, _), _ in started:
        stop_server(process)


@pytest.fixture(scope="module")
def server(servers, trained) -> str:
    (process, url), root = servers[0]
    return wait_healthy(process, url, root)


@pytest.fixture(scope="module")
def doomed_server(servers, trained) -> tuple[subprocess.Popen, str]:
    (process, url), root = servers[1]
    return process, wait_healthy(process, url, root)


def overrides(paths: dict[str, Path], out: Path) -> list[str]:
    return [f"model.path={paths['model']}", f"data.data_root={paths['raw']}",
            f"prepare.output_dir={paths['latents']}", "prepare.num_workers=0", "validate.num_inference_steps=1",
            "train.max_steps=2", "train.lora.rank=8", "train.lora.alpha=8", f"train.output_dir={out}",
            "tracking.experiment=cogvx-test", f"tracking.registered_model={REGISTERED}"]


@pytest.fixture(scope="module")
def trained(servers, tmp_path_factory, tiny_models) -> dict:
    """A real 2-step LoRA training run of the tiny model: its paths, report and overrides."""
    from cogvx.data.synthetic import make_synthetic_dataset
    from cogvx.prepare import run_prepare
    from cogvx.training.loop import train

    root = tmp_path_factory.mktemp("tracking-train")
    make_synthetic_dataset(root / "raw", 2, seed=5)
    paths = {"raw": root / "raw", "latents": root / "latents", "model": tiny_models["tiny-t2v"], "out": root / "run"}
    config = load_config(None, [*overrides(paths, paths["out"]), "tracking.enabled=false"])
    run_prepare(config, log=lambda *_: None)
    report = train(config, log=lambda *_: None)
    return {"paths": paths, "report": report, "root": root}


def config_for(trained: dict, out: Path | None = None, *extra: str):
    return load_config(None, [*overrides(trained["paths"], out or trained["paths"]["out"]), *extra])


def replay(tracker, report: TrainingReport) -> None:
    """What the training loop does per step, with the real run's losses."""
    for step, loss in report.losses:
        tracker.log_step(step, loss, lr=1e-4, grad_norm=0.5, s_per_step=report.timing.s_per_step)


# ----------------------------------------------------------------------------- failing fast


def test_check_tracking_fails_fast_with_what_to_do(monkeypatch):
    for key in CLIENT_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "33")
    uri = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(TrackingUnavailable) as info:
        check_tracking(uri)
    assert time.monotonic() - started < 15
    message = str(info.value)
    assert uri in message and "mlflow server" in message
    assert "tracking.tracking_uri=sqlite:///mlflow.db" in message and "tracking.enabled=false" in message
    assert info.value.exit_code == 5
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "33"  # what the user set stays


def test_a_server_that_never_answers_times_out():
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(TrackingUnavailable, match="does not answer"):
            check_tracking(uri, timeout_s=1.0)
        assert time.monotonic() - started < 5


def test_unusable_local_stores_are_refused(tmp_path):
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(TrackingUnavailable, match="cannot create"):
        check_tracking(f"sqlite:///{tmp_path / 'a-file' / 'mlflow.db'}")
    (tmp_path / "read-only").mkdir(mode=0o500)
    if os.geteuid() != 0:  # root writes anywhere
        with pytest.raises(TrackingUnavailable, match="not writable"):
            check_tracking((tmp_path / "read-only").as_uri())
    check_tracking(f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}")
    assert (tmp_path / "new").is_dir()


@pytest.mark.slow
def test_disabled_tracking_does_nothing(trained):
    config = config_for(trained, None, "tracking.enabled=false", "tracking.tracking_uri=http://127.0.0.1:9")
    tracker = tracker_for(config)
    assert isinstance(tracker, NullTracker)
    tracker.start(config).log_step(1, 0.5, 1e-4, 1.0, 0.1)
    assert tracker.finish(trained["report"], trained["paths"]["out"]).run_id is None
    tracker.fail("boom")


# ----------------------------------------------------------------------------- a run on a server


@pytest.fixture(scope="module")
def logged_run(server, trained, tmp_path_factory) -> dict:
    config = config_for(trained, None, f"tracking.tracking_uri={server}")
    tracker = RunTracker(flush_every=10, source_dir=tmp_path_factory.mktemp("not-a-repo")).start(config)
    replay(tracker, trained["report"])
    result = tracker.finish(trained["report"], trained["paths"]["out"])
    return {"config": config, "result": result, "client": MlflowClient(tracking_uri=server, registry_uri=server)}


@pytest.mark.slow
def test_run_records_config_provenance_metrics_and_files(logged_run, trained):
    client, run_id = logged_run["client"], logged_run["result"].run_id
    assert logged_run["result"].complete and not logged_run["result"].problems
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.experiment_id == logged_run["result"].experiment_id
    params, tags, metrics = run.data.params, run.data.tags, run.data.metrics
    assert params["train.lora.rank"] == "8" and params["train.max_steps"] == "2"
    assert params["tracking.tracking_uri"] == logged_run["config"].tracking.tracking_uri
    assert json.loads(params["validate.prompts"]) == logged_run["config"].validate_.prompts
    manifest = trained["paths"]["latents"] / "manifest.json"
    assert tags["cogvx.data_version"] == hashlib.sha256(manifest.read_bytes()).hexdigest()[:16]
    assert tags["cogvx.model"] == "tiny-t2v" and tags["cogvx.model_source"] == str(trained["paths"]["model"])
    assert tags["cogvx.git_commit"] == "unknown" and tags["cogvx.version"]
    history = client.get_metric_history(run_id, "train/loss")
    assert [(m.step, round(m.value, 6)) for m in history] == [tuple(x) for x in trained["report"].losses]
    assert len(client.get_metric_history(run_id, "train/grad_norm")) == 2
    phases = trained["report"].memory.phases
    for phase in ("load", "train", "validation"):
        assert metrics[f"memory/{phase}/peak_allocated_gib"] == pytest.approx(phases[phase].peak_allocated_gib)
    assert metrics["timing/s_per_step"] > 0 and metrics["final_loss"] == pytest.approx(trained["report"].final_loss)
    files = {a.path for a in client.list_artifacts(run_id)}
    assert {"report.json", "cogvx-config.yaml", "lora", "validation"} <= files
    assert [a.path for a in client.list_artifacts(run_id, "lora")] == ["lora/pytorch_lora_weights.safetensors"]
    clips = client.list_artifacts(run_id, "validation/step-000002")
    assert [a.path for a in clips] == ["validation/step-000002/prompt-00.mp4"] and clips[0].file_size > 0


@pytest.mark.slow
def test_step_metrics_are_sent_in_batches(server, trained, tmp_path):
    config = config_for(trained, tmp_path / "run", f"tracking.tracking_uri={server}")
    tracker = RunTracker(flush_every=3, source_dir=tmp_path).start(config)
    client = MlflowClient(tracking_uri=server)
    tracker.log_step(1, 0.9, 1e-4, 1.0, 0.1)
    tracker.log_step(2, 0.8, 1e-4, 1.0, 0.1)
    assert client.get_metric_history(tracker.run_id, "train/loss") == []
    tracker.log_step(3, 0.7, 1e-4, 1.0, 0.1)
    assert [m.step for m in client.get_metric_history(tracker.run_id, "train/loss")] == [1, 2, 3]
    tracker.log_step(4, 0.6, 1e-4, 1.0, 0.1)
    tracker.fail("stopped by the test")
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FAILED" and run.data.tags["cogvx.error"] == "stopped by the test"
    assert len(client.get_metric_history(tracker.run_id, "train/loss")) == 4


# ----------------------------------------------------------------------------- registry


@pytest.fixture(scope="module")
def registered(logged_run, trained) -> dict:
    return register_lora(Path(trained["report"].weights), logged_run["config"], logged_run["result"].run_id)


@pytest.mark.slow
def test_register_promote_and_fetch_by_alias(registered, logged_run, server, trained, tmp_path, tiny_models):
    from cogvx.generate import attach_lora
    from cogvx.models.loader import load_pipeline
    from cogvx.models.specs import get_spec

    weights = Path(trained["report"].weights)
    assert (registered["name"], registered["version"]) == (REGISTERED, "1")
    assert registered["model_id"].startswith("m-")
    version = logged_run["client"].get_model_version(REGISTERED, "1")
    assert version.tags["rank"] == "8" and version.tags["alpha"] == "8" and version.tags["variant"] == "tiny-t2v"
    assert version.tags["adapter_kind"] == "lora" and version.tags["control"] == "none"
    assert version.tags["base_model"] == str(trained["paths"]["model"])
    assert version.run_id == logged_run["result"].run_id
    assert list_registered(server, REGISTERED)[0]["aliases"] == []

    assert promote(server, REGISTERED, 1)["alias"] == "champion"
    rows = list_registered(server)
    assert [(r["name"], r["version"], r["aliases"]) for r in rows] == [(REGISTERED, "1", ["champion"])]
    assert rows[0]["tags"]["rank"] == "8" and rows[0]["created"]

    folder = resolve_lora(f"models:/{REGISTERED}@champion", server, tmp_path / "fetched")
    fetched, original = folder / "pytorch_lora_weights.safetensors", weights / "pytorch_lora_weights.safetensors"
    assert fetched.read_bytes() == original.read_bytes()
    pipe = load_pipeline(str(tiny_models["tiny-t2v"]), get_spec("tiny-t2v"))
    meta = attach_lora(pipe, folder, scale=1.0, log=lambda *_: None)
    assert meta["rank"] == 8 and "cogvx" in pipe.get_active_adapters()
    assert resolve_lora(f"models:/{REGISTERED}/1", server, tmp_path / "by-number").is_dir()
    assert resolve_lora(str(weights), server, tmp_path / "unused") == weights


@pytest.mark.slow
def test_missing_registry_entries_name_what_exists(registered, server, tmp_path):
    with pytest.raises(CogvxError, match=rf"no registered model 'nope' .*registered models: {REGISTERED}"):
        resolve_lora("models:/nope@champion", server, tmp_path)
    with pytest.raises(CogvxError, match=r"no alias 'staging'; versions: 1; aliases: "):
        resolve_lora(f"models:/{REGISTERED}@staging", server, tmp_path)
    with pytest.raises(CogvxError, match="no version '9'"):
        promote(server, REGISTERED, 9)
    with pytest.raises(CogvxError, match="expected models:/NAME@ALIAS"):
        resolve_lora(f"models:/{REGISTERED}", server, tmp_path)
    with pytest.raises(CogvxError, match="no registered model 'nope'"):
        list_registered(server, "nope")


# ----------------------------------------------------------------------------- the server goes away


@pytest.mark.slow
def test_server_killed_mid_run_loses_nothing(doomed_server, trained, tmp_path):
    process, url = doomed_server
    out = tmp_path / "run"
    config = config_for(trained, out, f"tracking.tracking_uri={url}")
    tracker = RunTracker(flush_every=2, source_dir=tmp_path).start(config)
    tracker.log_step(1, 0.9, 1e-4, 1.0, 0.1)
    tracker.log_step(2, 0.8, 1e-4, 1.0, 0.1)  # sent
    stop_server(process)
    started = time.monotonic()
    with pytest.warns(TrackingWarning, match="Training goes on"):
        for step in range(3, 7):
            tracker.log_step(step, 1.0 / step, 1e-4, 1.0, 0.1)
    assert time.monotonic() - started < 20
    pending = [json.loads(line) for line in (out / PENDING_FILE).read_text().splitlines()]
    assert sorted(p["step"] for p in pending if p["key"] == "train/loss") == [3, 4, 5, 6]
    assert {p["run_id"] for p in pending} == {tracker.run_id}
    assert tracker.problems and "sending metrics failed" in tracker.problems[0]
    with pytest.warns(TrackingWarning, match="incomplete"):
        result = tracker.finish(trained["report"], trained["paths"]["out"])
    assert result.run_id == tracker.run_id and not result.complete
    records = [json.loads(line) for line in (out / PENDING_FILE).read_text().splitlines()]
    assert {"final_loss", "memory/train/peak_allocated_gib", "train/loss"} <= {r.get("key") for r in records}
    assert [r["end"]["status"] for r in records if "end" in r] == ["FINISHED"]  # for `cogvx tracking replay`


# ----------------------------------------------------------------------------- local stores


@pytest.mark.slow
def test_default_sqlite_store_in_the_working_folder(trained, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = config_for(trained, tmp_path / "run")
    assert config.tracking.tracking_uri == "sqlite:///mlflow.db"
    tracker = tracker_for(config, source_dir=tmp_path).start(config)
    replay(tracker, trained["report"])
    result = tracker.finish(trained["report"], trained["paths"]["out"])
    assert result.complete and (tmp_path / "mlflow.db").is_file()
    assert list((tmp_path / "mlruns").rglob("pytorch_lora_weights.safetensors"))
    client = MlflowClient(tracking_uri="sqlite:///mlflow.db")
    assert len(client.get_metric_history(result.run_id, "train/loss")) == 2
    registered = register_lora(Path(trained["report"].weights), config, result.run_id)
    promote("sqlite:///mlflow.db", registered["name"], registered["version"])
    folder = resolve_lora(f"models:/{registered['name']}@champion", "sqlite:///mlflow.db", tmp_path / "fetched")
    assert (folder / "pytorch_lora_weights.safetensors").is_file()
    with pytest.raises(CogvxError, match="no version '7'; versions: 1; aliases: champion -> 1") as info:
        promote("sqlite:///mlflow.db", registered["name"], 7)
    assert not isinstance(info.value, TrackingUnavailable)
    with pytest.raises(CogvxError, match="no alias 'staging'"):
        resolve_lora(f"models:/{registered['name']}@staging", "sqlite:///mlflow.db", tmp_path / "fetched")


@pytest.mark.slow
def test_postgres_store_when_available(trained, tmp_path):
    """Optional: a PostgreSQL tracking store, when one answers on 127.0.0.1:5432 and psycopg2 is installed."""
    pytest.importorskip("psycopg2")
    with socket.socket() as sock:
        sock.settimeout(1)
        if sock.connect_ex(("127.0.0.1", 5432)) != 0:
            pytest.skip("no PostgreSQL on 127.0.0.1:5432")
    uri = os.environ.get("COGVX_TEST_POSTGRES_URI", "postgresql://postgres@127.0.0.1:5432/postgres")
    config = config_for(trained, tmp_path / "run", f"tracking.tracking_uri={uri}")
    tracker = RunTracker(source_dir=tmp_path).start(config)
    replay(tracker, trained["report"])
    assert tracker.finish(trained["report"], trained["paths"]["out"]).complete


def test_params_are_dotted_strings_within_mlflow_limits():
    from cogvx.tracking import MAX_PARAM_CHARS, flatten_params

    flat = flatten_params({"train": {"lora": {"rank": 8, "target_modules": None}},
                           "validate": {"prompts": ["a" * 7000]}})
    assert flat["train.lora.rank"] == "8" and flat["train.lora.target_modules"] == "None"
    assert len(flat["validate.prompts"]) == MAX_PARAM_CHARS and flat["validate.prompts"].endswith("truncated]")


@pytest.mark.slow
def test_train_tracks_and_registers_through_the_server(trained, server, tmp_path):
    """The training loop's own wiring: `train()` logs per step, finishes the run, registers the LoRA."""
    from cogvx.training.loop import train

    config = config_for(trained, tmp_path / "tracked", f"tracking.tracking_uri={server}",
                        "tracking.registered_model=cogvx-wired")
    report = train(config, log=lambda *_: None)
    tracking = report.tracking
    assert tracking.complete and tracking.registered["name"] == "cogvx-wired"
    client = MlflowClient(tracking_uri=server, registry_uri=server)
    history = client.get_metric_history(tracking.run_id, "train/loss")
    assert [m.step for m in history] == [1, 2]
    assert client.get_run(tracking.run_id).info.status == "FINISHED"
    assert client.get_model_version("cogvx-wired", tracking.registered["version"]).tags["rank"] == "8"


# ----------------------------------------------------------------------------- any store


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite-elsewhere", "sqlite-relative", "file-store"])
def test_training_registers_and_downloads_on_the_configured_store_only(kind, trained, tmp_path, monkeypatch):
    """Train, register, alias and fetch by models:/ on a store other than ./mlflow.db; the working
    folder gets nothing the config did not name."""
    from cogvx.training.loop import train

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    uri = {"sqlite-elsewhere": f"sqlite:///{tmp_path / 'stores' / 'tracking.db'}",
           "sqlite-relative": "sqlite:///stores/tracking.db",
           "file-store": (tmp_path / "file-store").as_uri()}[kind]
    config = config_for(trained, tmp_path / "run", f"tracking.tracking_uri={uri}")
    report = train(config, log=lambda *_: None)
    assert report.tracking.complete, report.tracking
    version = report.tracking.registered["version"]
    promote(uri, REGISTERED, version)
    fetched = resolve_lora(f"models:/{REGISTERED}@champion", uri, tmp_path / "fetched")
    name = "pytorch_lora_weights.safetensors"
    assert (fetched / name).read_bytes() == (Path(report.weights) / name).read_bytes()
    assert sorted(p.name for p in work.iterdir()) == (["stores"] if kind == "sqlite-relative" else [])
    if kind.startswith("sqlite"):
        db = Path("stores/tracking.db") if kind == "sqlite-relative" else tmp_path / "stores" / "tracking.db"
        assert db.is_file() and list((db.parent / "mlruns").rglob(name))  # artifacts beside the database


@pytest.mark.slow
def test_replay_sends_what_a_dead_server_missed_and_ends_runs_truly(trained, tmp_path):
    """A server dies mid-run; once it is back on the same store, `cogvx tracking replay` sends the
    metrics and artifacts, ends the finished run FINISHED (and registers its LoRA) and a run whose
    process vanished KILLED, and empties the pending file."""
    root, port = tmp_path / "server", free_port()
    process, url = spawn_server(root, port=port)
    wait_healthy(process, url, root)
    out = tmp_path / "run"
    config = config_for(trained, out, f"tracking.tracking_uri={url}")
    finished, vanished = (RunTracker(flush_every=1, source_dir=tmp_path).start(config) for _ in range(2))
    finished.log_step(1, 0.9, 1e-4, 1.0, 0.1)
    stop_server(process)
    with pytest.warns(TrackingWarning):
        for tracker in (finished, vanished):
            tracker.log_step(2, 0.8, 1e-4, 1.0, 0.1)
        (out / "report.json").write_text(trained["report"].to_json())
        assert not finished.finish(trained["report"], out).complete  # `vanished` never finishes
    process, url = spawn_server(root, port=port)
    try:
        wait_healthy(process, url, root)
        done = {row["run_id"]: row for row in replay_pending(config, log=lambda *_: None)}
        client = MlflowClient(tracking_uri=url)
        assert done[finished.run_id]["status"] == "FINISHED" and done[vanished.run_id]["status"] == "KILLED"
        assert client.get_run(finished.run_id).info.status == "FINISHED"
        assert client.get_run(vanished.run_id).info.status == "KILLED"
        assert [m.step for m in client.get_metric_history(finished.run_id, "train/loss")] == [1, 2]
        assert [m.step for m in client.get_metric_history(vanished.run_id, "train/loss")] == [2]
        assert client.get_run(finished.run_id).data.metrics["final_loss"] == trained["report"].final_loss
        assert done[finished.run_id]["registered"]["name"] == REGISTERED
        assert not (out / PENDING_FILE).exists()
        with pytest.raises(CogvxError, match="nothing to replay"):
            replay_pending(config)
    finally:
        stop_server(process)
