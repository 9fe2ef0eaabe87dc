"""Load a CogVideoX pipeline or one of its parts from a local folder or a hub id.

Every stage loads its model through here. A local folder is used as it is; a hub id is looked
up in the Hugging Face cache first and downloaded only when the hub answers. With no local copy
and no network the loader fails at once with a message that says how to get the weights,
instead of a long retry loop and a hub traceback.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from cogvx.errors import ConfigError, ModelNotAvailableError
from cogvx.hub import HUB_PROBE_TIMEOUT_S, hub_reachable, is_hub_id
from cogvx.models.specs import ModelSpec

# Pipelines this project loads; model_index.json naming anything else is refused, since
# from_pretrained would import whatever class a stranger's folder names.
PIPELINE_CLASSES = ("CogVideoXPipeline", "CogVideoXImageToVideoPipeline",
                    "CogVideoXVideoToVideoPipeline")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_dtype(requested: str, spec: ModelSpec, device: torch.device | str) -> torch.dtype:
    """``auto`` is the checkpoint's own dtype on a GPU and fp32 on a CPU."""
    if requested != "auto":
        return DTYPES[requested]
    if torch.device(device).type == "cpu":
        return torch.float32
    return DTYPES[spec.weights_dtype]


def _missing_weights_message(source: str, reason: str, spec: ModelSpec | None = None) -> str:
    if spec is not None and spec.tiny:
        return (f"cannot load model {source!r}: {reason}.\n"
                f"  Build the tiny model first: cogvx make-tiny-model --variant {spec.key} --out {source}")
    return (
        f"cannot load model {source!r}: {reason}.\n"
        f"  To get the weights, on a machine with network access run\n"
        f"    hf download {source} --local-dir models/{source.rstrip('/').split('/')[-1]}\n"
        f"  and set model.path to that folder (or set HF_HOME to a cache that holds the model).\n"
        f"  To try cogvx without any download: cogvx make-tiny-model --variant tiny-t2v "
        f"--out models/tiny-t2v, then use model.variant=tiny-t2v."
    )


def resolve_source(source: str, revision: str | None = None, cache_dir: str | Path | None = None,
                   spec: ModelSpec | None = None) -> Path:
    """The local folder holding ``source``: the folder itself, or the hub snapshot (cache first)."""
    path = Path(source).expanduser()
    if path.exists():
        return _check_model_folder(path)
    if not is_hub_id(source) or (spec is not None and spec.tiny):
        raise ModelNotAvailableError(_missing_weights_message(source, "no such folder", spec))
    return _hub_snapshot(source, revision, cache_dir)


def _check_model_folder(path: Path) -> Path:
    if not path.is_dir():
        raise ModelNotAvailableError(f"{path} is a file; a model is a folder in the diffusers layout")
    if not (path / "model_index.json").is_file() and not (path / "config.json").is_file():
        raise ModelNotAvailableError(
            f"{path} holds no model_index.json (pipeline) or config.json (single model); "
            "is it a diffusers model folder?")
    return path


def _hub_snapshot(repo_id: str, revision: str | None, cache_dir: str | Path | None) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    kwargs: dict[str, Any] = dict(revision=revision, cache_dir=str(cache_dir) if cache_dir else None)
    cached = _cached_snapshot(repo_id, kwargs)
    if cached is not None:
        return cached
    if constants.HF_HUB_OFFLINE:
        raise ModelNotAvailableError(_missing_weights_message(
            repo_id, "no such local folder, not in the hub cache, and HF_HUB_OFFLINE is set"))
    if not hub_reachable():
        raise ModelNotAvailableError(_missing_weights_message(
            repo_id, f"no such local folder, not in the hub cache, and {constants.ENDPOINT} "
            "cannot be reached"))
    try:
        return Path(snapshot_download(repo_id, etag_timeout=HUB_PROBE_TIMEOUT_S, **kwargs))
    except (HfHubHTTPError, OSError) as err:
        raise ModelNotAvailableError(_missing_weights_message(
            repo_id, f"download failed ({type(err).__name__}: {str(err).splitlines()[0]})")) from None


def _cached_snapshot(repo_id: str, kwargs: dict[str, Any]) -> Path | None:
    """The snapshot folder in the Hugging Face cache, or None when it is not cached."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True, **kwargs))
    except LocalEntryNotFoundError:
        return None


def read_model_index(folder: Path) -> dict[str, Any]:
    """model_index.json of a pipeline folder, checked to name a CogVideoX pipeline."""
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise ModelNotAvailableError(f"{folder} has no model_index.json: not a pipeline folder")
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelNotAvailableError(f"{index_file} is not valid JSON: {err}") from None
    if index.get("_class_name") not in PIPELINE_CLASSES:
        raise ModelNotAvailableError(f"{index_file} names pipeline {index.get('_class_name')!r}; "
                                     f"cogvx loads {', '.join(PIPELINE_CLASSES)}")
    return index


def load_pipeline(source: str, spec: ModelSpec, dtype: torch.dtype = torch.float32,
                  revision: str | None = None, cache_dir: str | Path | None = None,
                  skip: tuple[str, ...] = (), transformer: str | Path | None = None):
    """The diffusers pipeline at ``source``, checked against ``spec`` before any weight loads.

    ``skip`` names components not to load (e.g. ``("transformer",)`` for encoding, which needs
    only the VAE and the text encoder); they are None in the returned pipeline. ``transformer``
    is a fully fine-tuned transformer folder to use instead of the pipeline's own.
    """
    import diffusers

    folder = resolve_source(source, revision, cache_dir, spec)
    index = read_model_index(folder)
    check_matches_spec(read_transformer_config(folder), spec, source)
    parts: dict[str, Any] = {name: None for name in skip}
    if transformer is not None:
        parts["transformer"] = load_transformer(str(transformer), spec, dtype=dtype)
    pipeline_cls = getattr(diffusers, index["_class_name"])
    diffusers.utils.logging.disable_progress_bar()  # a bar per component: noise, the load takes seconds
    pipe = pipeline_cls.from_pretrained(folder, dtype=dtype, **parts)
    pipe.set_progress_bar_config(disable=None)  # the denoising bar on a terminal only, never in a log
    return pipe


def load_transformer(source: str, spec: ModelSpec, dtype: torch.dtype = torch.float32,
                     revision: str | None = None, cache_dir: str | Path | None = None):
    """Only the transformer of the pipeline at ``source`` (what training needs), checked against ``spec``."""
    from diffusers import CogVideoXTransformer3DModel

    folder = resolve_source(source, revision, cache_dir, spec)
    check_matches_spec(read_transformer_config(folder), spec, source)
    subfolder = "transformer" if (folder / "transformer").is_dir() else None
    return CogVideoXTransformer3DModel.from_pretrained(folder, subfolder=subfolder, dtype=dtype)


def read_transformer_config(folder: Path) -> SimpleNamespace:
    """The transformer's config.json (of a pipeline folder or a bare transformer folder)."""
    config_file = folder / "transformer" / "config.json"
    if not config_file.is_file():
        config_file = folder / "config.json"
    try:
        data = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelNotAvailableError(f"cannot read the transformer config {config_file}: {err}") from None
    return SimpleNamespace(**{"patch_size_t": None, **data})


def check_matches_spec(config: Any, spec: ModelSpec, source: str) -> None:
    """Refuse weights whose architecture contradicts the chosen variant (task, 1.0 vs 1.5)."""
    task = "i2v" if config.in_channels == 2 * config.out_channels else "t2v"
    generation = "1.5" if (config.patch_size_t or 1) > 1 else "1.0"
    if (task, generation) != (spec.task, spec.generation):
        raise ConfigError(
            f"model.path = {source!r} holds a CogVideoX {generation} {task} transformer "
            f"(in_channels={config.in_channels}, patch_size_t={config.patch_size_t}), but "
            f"model.variant = {spec.key!r} is CogVideoX {spec.generation} {spec.task}; "
            "pick the variant that matches the weights")
