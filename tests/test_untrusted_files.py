"""Files from strangers never run code: a pickle offered as a LoRA is refused before anything
unpickles it, with a message naming it, a non-zero exit and nothing written."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from tests.helpers import offline_env

pytestmark = pytest.mark.slow  # both tests run the `cogvx` CLI with models, one a whole prepare-train-generate run


class _Payload:
    """Unpickling this creates a file: proof that something unpickled it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_offered_as_lora_is_refused_unopened(run_cli, tiny_models, tmp_path):
    marker = tmp_path / "code-ran"
    for name in ("pytorch_lora_weights.bin", "adapter.pt", "pytorch_lora_weights.safetensors"):
        lora = tmp_path / name
        lora.write_bytes(pickle.dumps({"weights": _Payload(marker)}))
        result = run_cli("generate", "--prompt", "x", "--lora", str(lora), "--steps", "1", "--frames", "9",
                         "--out", "never.mp4", f"model.path={tiny_models['tiny-t2v']}", "tracking.enabled=false")
        assert result.returncode != 0, name
        assert f"{lora} is not a readable safetensors LoRA file" in result.stderr.replace("\n", ""), result.stderr
        assert "Traceback" not in result.stderr
        assert not marker.exists(), f"{name} was unpickled"
        assert not (tmp_path / "never.mp4").exists()


def test_secrets_in_the_environment_end_up_in_no_file(run_cli, tiny_models, tmp_path):
    """An HF token and MLflow credentials set for a whole run (data, prepare, train with MLflow
    tracking to a local store, generate) appear in none of the files it writes."""
    secrets = {"HF_TOKEN": "hf_cogvxSECRETtoken123", "HUGGING_FACE_HUB_TOKEN": "hf_cogvxSECRETtoken456",
               "MLFLOW_TRACKING_PASSWORD": "mlflowSECRETpass789"}
    env = {**offline_env(tmp_path), **secrets}
    common = [f"model.path={tiny_models['tiny-t2v']}", "data.synthetic_clips=2", "prepare.num_workers=0",
              f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "train.max_steps=2",
              "train.lora.rank=4", "validate.num_inference_steps=1", "validate.every_n_steps=0"]
    for command in (["data", "download"], ["prepare"], ["train"],
                    ["generate", "--prompt", "x", "--steps", "1", "--frames", "9", "--out", "outputs/g.mp4"]):
        done = run_cli(*command, *common, env=env, timeout=600)
        assert done.returncode == 0, (command, done.stdout[-2000:], done.stderr[-2000:])
        for value in secrets.values():
            assert value not in done.stdout + done.stderr
    written = [p for p in tmp_path.rglob("*") if p.is_file() and "hf-home" not in p.parts]
    assert any(p.name == "mlflow.db" for p in written) and any(p.suffix == ".safetensors" for p in written)
    for path in written:
        data = path.read_bytes()
        for value in secrets.values():
            assert value.encode() not in data, f"{value} written to {path}"
