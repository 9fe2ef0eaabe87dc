"""Several processes with accelerate, for real, on the CPU (gloo): `cogvx train` and `cogvx
prepare --accelerate-config configs/accelerate/ddp-2gpu.yaml` launch 2 processes that train and
encode like one process with the same global batch, and resume under DDP."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cogvx.distributed import launch_command, shard, strip_option
from cogvx.training.checkpoint import list_checkpoints
from cogvx.training.loop import rows_of_process
from tests.helpers import REPO

DDP_2 = REPO / "configs" / "accelerate" / "ddp-2gpu.yaml"


def child_env() -> dict[str, str]:
    """The environment of launched commands: offline, one thread each, this checkout importable."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


def cogvx(*args: str, cwd: Path, timeout: int = 300, launch: list[str] | None = None) -> subprocess.CompletedProcess:
    """Run `python -m cogvx args` (under ``launch``, e.g. accelerate launch options, when given)."""
    env = child_env()
    prefix = [sys.executable, "-m", "accelerate.commands.launch", *launch] if launch else [sys.executable]
    done = subprocess.run([*prefix, "-m", "cogvx", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    clues = ("cogvx/", "Error", "terminate", "what()", "Signal")  # our frames, errors, C++ aborts
    ours = [line for line in done.stderr.splitlines() if any(clue in line for clue in clues)]
    assert done.returncode == 0, "\n".join([*ours[-40:], done.stdout[-2000:], done.stderr[-2000:]])
    return done


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_models) -> dict[str, Path]:
    """Four synthetic clips (one bucket: two global batches of 2 per epoch), tiny model."""
    from cogvx.data.synthetic import make_synthetic_dataset

    root = tmp_path_factory.mktemp("ddp")
    make_synthetic_dataset(root / "raw", 4, seed=3)
    return {"root": root, "raw": root / "raw", "model": tiny_models["tiny-t2v"]}


def common(data: dict[str, Path], latents: Path) -> list[str]:
    return [f"model.path={data['model']}", f"data.data_root={data['raw']}", f"prepare.output_dir={latents}",
            "prepare.num_workers=0", "tracking.enabled=false", "validate.num_inference_steps=2",
            "train.lora.rank=8", "train.lora.alpha=8", "train.learning_rate=1e-3", "train.max_steps=4",
            "train.gradient_accumulation_steps=2", "train.caption_dropout=0.3", "train.lr_warmup_steps=2"]


def lora(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "lora" / "pytorch_lora_weights.safetensors"))


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.safetensors"))}


@pytest.mark.slow
def test_distributed_prepare_writes_the_files_one_process_writes(data):
    root = data["root"]
    cogvx("prepare", *common(data, root / "one"), cwd=root)
    done = cogvx("prepare", "--json", "--accelerate-config", str(DDP_2), *common(data, root / "two"), cwd=root)
    summary = json.loads(done.stdout[done.stdout.index("{"):done.stdout.rindex("}") + 1])
    assert summary["processes"] == 2 and summary["videos_encoded"] == 4
    one, two = files(root / "one"), files(root / "two")
    assert len(one) == 4 + 5 and one == two  # 4 clips, 4 captions + the empty one
    manifest = lambda name: json.loads((root / name / "manifest.json").read_text())["entries"]  # noqa: E731
    assert manifest("one") == manifest("two")
    # A re-run on two processes (asked for in the config this time) finds everything done.
    again = cogvx("prepare", "--json", f"prepare.accelerate_config={DDP_2}", *common(data, root / "two"), cwd=root)
    assert '"videos_encoded": 0' in again.stdout and '"skipped": 4' in again.stdout


@pytest.mark.slow
def test_two_process_ddp_equals_one_process_with_the_same_global_batch_and_resumes(data):
    root = data["root"]
    latents = root / "one"
    if not (latents / "manifest.json").is_file():
        cogvx("prepare", *common(data, latents), cwd=root)
    settings = [*common(data, latents), "train.checkpointing_steps=2", "validate.every_n_steps=2"]
    cogvx("train", *settings, "train.batch_size=2", f"train.output_dir={root / 'single'}", cwd=root)
    cogvx("train", "--accelerate-config", str(DDP_2), *settings, f"train.output_dir={root / 'ddp'}", cwd=root)
    report = json.loads((root / "ddp" / "report.json").read_text())
    assert report["processes"] == 2 and report["global_batch"] == 4
    digests = report["replica_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]  # both ranks hold the same LoRA
    single, ddp = lora(root / "single"), lora(root / "ddp")
    assert single.keys() == ddp.keys()
    for key in single:
        torch.testing.assert_close(ddp[key], single[key], rtol=1e-4, atol=1e-6)
    assert any(t.abs().sum() > 0 for k, t in ddp.items() if "lora_B" in k)
    single_losses = json.loads((root / "single" / "report.json").read_text())["losses"]
    assert [s for s, _ in report["losses"]] == [1, 2, 3, 4]
    for (_, a), (_, b) in zip(report["losses"], single_losses):
        assert a == pytest.approx(b, rel=1e-4)
    # Validation mid-run (step 2) on the main process only, while the other waited.
    assert sorted(p.name for p in (root / "ddp" / "validation").iterdir()) == ["step-000002", "step-000004"]

    # Resume under DDP: cut a copy back to its step-2 checkpoint and continue on 2 processes.
    shutil.copytree(root / "ddp", root / "resumed")
    for later in list_checkpoints(root / "resumed" / "checkpoints")[1:]:
        shutil.rmtree(later)
    shutil.rmtree(root / "resumed" / "lora")
    cogvx("train", f"train.accelerate_config={DDP_2}", *settings, f"train.output_dir={root / 'resumed'}",
          "--resume", "latest", cwd=root)
    resumed = lora(root / "resumed")
    assert json.loads((root / "resumed" / "report.json").read_text())["resumed_from_step"] == 2
    assert all(torch.equal(resumed[k], ddp[k]) for k in ddp)


@pytest.mark.slow
def test_prefect_tasks_run_their_stage_on_the_processes_the_config_asks_for(data, tmp_path, monkeypatch):
    """The flow's prepare and train tasks, with prepare/train.accelerate_config set, launch
    2 processes and return what the one-process tasks return."""
    from tasks.training import prepare, train

    monkeypatch.setenv("PYTHONPATH", child_env()["PYTHONPATH"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    overrides = [*common(data, tmp_path / "latents"), f"prepare.accelerate_config={DDP_2}",
                 f"train.accelerate_config={DDP_2}", f"train.output_dir={tmp_path / 'run'}", "train.max_steps=2"]
    summary = prepare.fn(None, overrides)
    assert summary["processes"] == 2 and summary["videos_encoded"] == 4
    trained = train.fn(None, overrides)
    report = json.loads(Path(trained["report"]).read_text())
    assert trained["steps"] == 2 and report["processes"] == 2 and trained["recovered_steps"] == 0
    assert (Path(trained["weights"]) / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.slow
def test_sigterm_stops_every_process_at_one_step_with_a_checkpoint(data, tmp_path):
    """SIGTERM to `cogvx train --accelerate-config` (as a job manager sends it) reaches both
    processes; they agree on the step, save one checkpoint there, and the command exits 130."""
    import re
    import signal
    import time

    root = data["root"]
    latents = root / "one"
    if not (latents / "manifest.json").is_file():
        cogvx("prepare", *common(data, latents), cwd=root)
    settings = [*common(data, latents), "train.max_steps=100000", "train.checkpointing_steps=100000"]
    env = {**child_env(), "PYTHONUNBUFFERED": "1"}  # progress lines reach the pipe as they are printed
    process = subprocess.Popen([sys.executable, "-m", "cogvx", "train", "--accelerate-config", str(DDP_2), *settings,
                                f"train.output_dir={tmp_path / 'run'}"], cwd=root, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Both processes are in the loop once the main one reports step 1 (a DDP step is collective);
    # the launched processes' output comes on the command's standard error.
    seen, started = [], time.monotonic()
    while time.monotonic() - started < 180 and (line := process.stderr.readline()):
        seen.append(line)
        if line.startswith("step 1/"):
            break
    time.sleep(1.0)  # then some steps
    process.send_signal(signal.SIGTERM)
    stdout, rest = process.communicate(timeout=120)
    stderr = "".join(seen) + rest
    assert process.returncode == 130, stderr[-3000:]
    steps = {int(s) for s in re.findall(r"interrupted at step (\d+)", stderr)}
    assert len(re.findall(r"interrupted at step", stderr)) == 2 and len(steps) == 1, stderr[-3000:]
    (step,) = steps
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == [f"checkpoint-{step:06d}"]


def test_each_process_gets_equal_rows_of_every_global_batch():
    assert rows_of_process([7, 3, 5, 1], 0, 2) == (0, [7, 3])
    assert rows_of_process([7, 3, 5, 1], 1, 2) == (2, [5, 1])
    # A short batch (end of a bucket) is filled up by repeating its samples.
    assert rows_of_process([7, 3, 5], 1, 2) == (2, [5, 7])
    assert rows_of_process([9], 1, 2) == (1, [9])
    assert rows_of_process([7, 3, 5], 0, 1) == (0, [7, 3, 5])


def test_shards_cover_every_item_once():
    items = list(range(11))
    shares = [shard(items, index, 3) for index in range(3)]
    assert sorted(sum(shares, [])) == items and {len(s) for s in shares} == {3, 4}


def test_the_launch_command_drops_the_option_and_keeps_the_rest():
    command = launch_command(DDP_2, ["train", "--accelerate-config", str(DDP_2), "train.max_steps=3",
                                     f"--accelerate-config={DDP_2}", "--resume", "latest"])
    assert command[1:5] == ["-m", "accelerate.commands.launch", "--config_file", str(DDP_2)]
    assert command[5:] == ["-m", "cogvx", "train", "train.max_steps=3", "--resume", "latest"]
    assert strip_option(["--accelerate-config"]) == []


def test_a_missing_accelerate_config_is_a_config_error(run_cli, tmp_path):
    result = run_cli("train", "--accelerate-config", str(tmp_path / "nope.yaml"), "tracking.enabled=false")
    assert result.returncode == 2 and "configs/accelerate/" in result.stderr and "Traceback" not in result.stderr


def test_shipped_accelerate_configs_name_their_engine():
    import yaml

    expected = {"ddp-1gpu.yaml": ("NO", 1), "ddp-2gpu.yaml": ("MULTI_GPU", 2), "ddp-8gpu.yaml": ("MULTI_GPU", 8),
                "fsdp2.yaml": ("FSDP", 8), "zero2.yaml": ("DEEPSPEED", 8), "zero3.yaml": ("DEEPSPEED", 8)}
    found = {p.name: yaml.safe_load(p.read_text()) for p in (REPO / "configs" / "accelerate").glob("*.yaml")}
    assert set(found) == set(expected)
    for name, (kind, processes) in expected.items():
        assert (found[name]["distributed_type"], found[name]["num_processes"]) == (kind, processes), name
    assert found["fsdp2.yaml"]["fsdp_config"]["fsdp_version"] == 2
    from diffusers.models.transformers import cogvideox_transformer_3d

    block = found["fsdp2.yaml"]["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"]
    assert hasattr(cogvideox_transformer_3d, block)  # the class FSDP wraps exists in diffusers
    assert [found[f"zero{z}.yaml"]["deepspeed_config"]["zero_stage"] for z in (2, 3)] == [2, 3]


@pytest.mark.slow
def test_fsdp_asked_for_on_a_cpu_is_refused_not_silently_replaced_by_ddp(data, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("on a GPU accelerate runs FSDP")
    config = tmp_path / "fsdp2-2.yaml"
    config.write_text((REPO / "configs" / "accelerate" / "fsdp2.yaml").read_text().replace("num_processes: 8", "num_processes: 2"))
    env = child_env()
    done = subprocess.run([sys.executable, "-m", "cogvx", "train", "--accelerate-config", str(config),
                           *common(data, tmp_path / "latents"), f"train.output_dir={tmp_path / 'out'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "asks for FSDP" in done.stderr and "GPUs only" in done.stderr
    assert not (tmp_path / "out" / "checkpoints").exists()


def final_weights(out: Path, method: str) -> dict[str, torch.Tensor]:
    if method == "lora":
        return lora(out)
    tensors: dict[str, torch.Tensor] = {}
    for shard_file in sorted((out / "full").glob("*.safetensors")):
        tensors |= load_file(str(shard_file))
    return tensors


@pytest.fixture
def gpu_run(tmp_path, tiny_models) -> dict[str, Path]:
    """Random latents of four samples in prepare's layout (no clip decoding: the GPU image may
    lack ffmpeg and decord) and the tiny model."""
    from cogvx.benchmark.assets import write_random_latents
    from cogvx.config import load_config

    paths = {"root": tmp_path, "raw": tmp_path / "raw", "model": tiny_models["tiny-t2v"]}
    write_random_latents(load_config(None, common(paths, tmp_path / "latents")), tmp_path / "latents", samples=4)
    return paths


@pytest.mark.slow
@pytest.mark.gpu
@pytest.mark.parametrize("engine, method", [("fsdp2.yaml", "lora"), ("fsdp2.yaml", "full"), ("zero2.yaml", "lora"),
                                            ("zero2.yaml", "full"), ("zero3.yaml", "full")])
def test_sharded_engines_train_validate_checkpoint_and_resume(engine, method, gpu_run):
    """FSDP2 and DeepSpeed on the GPUs of this machine: the run trains, validates mid-run, writes
    its checkpoints through the engine, resumes from one, and ends with the straight run's weights."""
    import importlib.util

    if engine.startswith("zero"):
        pytest.importorskip("deepspeed")
    root = gpu_run["root"]
    launch = ["--config_file", str(REPO / "configs" / "accelerate" / engine),
              "--num_processes", str(torch.cuda.device_count())]
    # Without ffmpeg (imageio-ffmpeg) clips cannot be written: validation then assembles its
    # pipeline around the sharded transformer but renders no prompt.
    prompts = [] if importlib.util.find_spec("imageio_ffmpeg") is None else ["validation clip"]
    settings = [*common(gpu_run, root / "latents"), f"train.method={method}", "train.checkpointing_steps=2",
                "validate.every_n_steps=2", "train.mixed_precision=bf16", f"validate.prompts={prompts}"]
    cogvx("train", *settings, f"train.output_dir={root / 'straight'}", cwd=root, launch=launch)
    report = json.loads((root / "straight" / "report.json").read_text())
    assert report["engine"] == ("FSDP" if engine.startswith("fsdp") else "DEEPSPEED"), report["engine"]
    shutil.copytree(root / "straight", root / "resumed")
    for later in list_checkpoints(root / "resumed" / "checkpoints")[1:]:
        shutil.rmtree(later)
    shutil.rmtree(root / "resumed" / method)
    cogvx("train", *settings, f"train.output_dir={root / 'resumed'}", "--resume", "latest", cwd=root, launch=launch)
    assert json.loads((root / "resumed" / "report.json").read_text())["resumed_from_step"] == 2
    straight, resumed = final_weights(root / "straight", method), final_weights(root / "resumed", method)
    assert straight.keys() == resumed.keys() and straight
    for key in straight:
        torch.testing.assert_close(resumed[key].float(), straight[key].float(), rtol=2e-2, atol=1e-3)


def test_weights_gathered_from_shards_are_saved_in_the_diffusers_layout(tiny_models, tmp_path):
    """Under FSDP / ZeRO-3 the final full weights come as a gathered state dict: they are written
    as diffusers writes them, and load back with from_pretrained."""
    from diffusers import CogVideoXTransformer3DModel

    from cogvx.training.outputs import save_transformer

    model = CogVideoXTransformer3DModel.from_pretrained(tiny_models["tiny-t2v"], subfolder="transformer")
    state = {name: tensor + 1.0 for name, tensor in model.state_dict().items()}  # not the module's own
    save_transformer(model, tmp_path, state)
    loaded = CogVideoXTransformer3DModel.from_pretrained(tmp_path)
    assert loaded.state_dict().keys() == state.keys()
    assert all(torch.equal(loaded.state_dict()[k], state[k]) for k in state)
