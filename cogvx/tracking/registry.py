"""MLflow's Model Registry for cogvx LoRAs: register a LoRA folder, list versions, set aliases,
fetch a version back by ``models:/NAME@ALIAS``."""

from __future__ import annotations

import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cogvx import __version__
from cogvx.errors import CogvxError
from cogvx.models.lora import LORA_WEIGHT_NAME
from cogvx.tracking.store import NOT_FOUND, check_tracking, experiment_id, mlflow_client, mlflow_errors




def register_lora(lora_dir: Path, config, run_id: str | None = None) -> dict[str, str]:
    """Register a LoRA folder as a new version of config.tracking.registered_model.

    MLflow 3 registers raw files only through a logged model: create it (linked to the training
    run), upload the folder, mark it READY, then create the registry version from models:/<id>.
    """
    from cogvx.models.lora import read_lora_metadata

    lora_dir = Path(lora_dir)
    if not (lora_dir / LORA_WEIGHT_NAME).is_file():
        raise CogvxError(f"{lora_dir}: no {LORA_WEIGHT_NAME} to register (pass the lora/ folder `cogvx train` wrote)")
    tags = version_tags(read_lora_metadata(lora_dir / LORA_WEIGHT_NAME), config)
    uri, name = config.tracking.tracking_uri, config.tracking.registered_model
    check_tracking(uri)
    client = mlflow_client(uri)
    with mlflow_errors(f"registering {lora_dir} as {name!r}", uri):
        model = client.create_logged_model(experiment_id(client, config.tracking.experiment, uri), name=name,
                                           source_run_id=run_id, tags=tags, model_type="lora")
        try:
            client.log_model_artifacts(model.model_id, str(lora_dir))
        except Exception:
            client.finalize_logged_model(model.model_id, "FAILED")
            raise
        client.finalize_logged_model(model.model_id, "READY")
        ensure_registered_model(client, name)
        version = client.create_model_version(name, source=f"models:/{model.model_id}", run_id=run_id,
                                              tags=tags, model_id=model.model_id)
    return {"name": name, "version": str(version.version), "model_id": model.model_id}


def version_tags(meta: dict[str, Any], config) -> dict[str, str]:
    """base_model, variant, adapter kind, control kind (none, file, canny), rank, alpha (and
    target modules) of a LoRA, from its file first."""
    record, lora = meta.get("cogvx") or {}, config.train.lora
    alpha = meta.get("alpha") if meta.get("alpha") is not None else lora.alpha
    return {"base_model": str(record.get("base_model") or config.model_source),
            "variant": str(record.get("variant") or config.spec.key),
            "rank": str(meta.get("rank") or lora.rank), "alpha": f"{float(alpha):g}",
            "adapter_kind": str(meta.get("kind") or lora.kind),
            "control": str((meta.get("control") or {}).get("kind") or "none"),
            "target_modules": ",".join(sorted(meta.get("target_modules") or [])), "cogvx_version": __version__}


def ensure_registered_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as err:
        if err.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise


def _all_pages(search, **kwargs) -> list:
    """Every result of a paged MLflow search call."""
    results, token = [], None
    while True:
        page = search(page_token=token, **kwargs)
        results.extend(page)
        token = page.token
        if not token:
            return results


def _name_filter(name: str) -> str:
    quote = "'" if "'" not in name else '"'
    return f"name = {quote}{name}{quote}"


def list_registered(uri: str, name: str | None = None) -> list[dict[str, Any]]:
    """Every registered version (of ``name``, or of all models): name, version, aliases, tags, created."""
    check_tracking(uri)
    client = mlflow_client(uri)
    with mlflow_errors("listing registered models", uri):
        models = _all_pages(client.search_registered_models,
                            filter_string=_name_filter(name) if name else None)
        if name is not None and not models:
            raise CogvxError(_missing_model_message(client, name, uri))
        rows = []
        for model in models:
            for version in _all_pages(client.search_model_versions, filter_string=_name_filter(model.name)):
                rows.append({"name": model.name, "version": str(version.version),
                             "aliases": sorted(a for a, v in model.aliases.items() if str(v) == str(version.version)),
                             "tags": dict(version.tags), "run_id": version.run_id or None,
                             "created": _iso(version.creation_timestamp)})
    return sorted(rows, key=lambda row: (row["name"], int(row["version"])))


def _iso(millis: int | None) -> str | None:
    return datetime.fromtimestamp(millis / 1000, tz=timezone.utc).isoformat(timespec="seconds") if millis else None


def promote(uri: str, name: str, version: str | int, alias: str = "champion") -> dict[str, str]:
    """Point ``alias`` of registered model ``name`` at ``version`` (moving it from any other)."""
    check_tracking(uri)
    client = mlflow_client(uri)
    with mlflow_errors(f"setting alias {alias!r} of {name!r}", uri):
        found = _find_version(client, name, str(version), uri)
        client.set_registered_model_alias(name, alias, found.version)
    return {"name": name, "version": str(found.version), "alias": alias}


def _find_version(client, name: str, ref: str, uri: str):
    """Model version ``ref`` (a number, "latest" or an alias) of ``name``; a CogvxError listing what exists."""
    from mlflow.exceptions import MlflowException

    try:
        if ref == "latest":
            versions = _all_pages(client.search_model_versions, filter_string=_name_filter(name))
            if versions:
                return max(versions, key=lambda v: int(v.version))
            raise CogvxError(_missing_model_message(client, name, uri))
        if ref.isdigit():
            return client.get_model_version(name, ref)
        return client.get_model_version_by_alias(name, ref)
    except MlflowException as err:
        if err.error_code not in NOT_FOUND:
            raise
        raise CogvxError(_missing_version_message(client, name, ref, uri)) from err


def _missing_model_message(client, name: str, uri: str) -> str:
    names = sorted(model.name for model in _all_pages(client.search_registered_models))
    return (f"no registered model {name!r} on {uri}; registered models: {', '.join(names) or 'none'} "
            "(register one with tracking enabled, see `cogvx registry list`)")


def _missing_version_message(client, name: str, ref: str, uri: str) -> str:
    models = _all_pages(client.search_registered_models, filter_string=_name_filter(name))
    if not models:
        return _missing_model_message(client, name, uri)
    versions = _all_pages(client.search_model_versions, filter_string=_name_filter(name))
    numbers = ", ".join(sorted((str(v.version) for v in versions), key=int)) or "none"
    aliases = ", ".join(f"{a} -> {v}" for a, v in sorted(models[0].aliases.items())) or "none"
    what = "version" if ref.isdigit() else "alias"
    return f"registered model {name!r} on {uri} has no {what} {ref!r}; versions: {numbers}; aliases: {aliases}"


def parse_models_uri(uri: str) -> tuple[str, str]:
    """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` (or /latest) -> (NAME, ALIAS or VERSION)."""
    rest = uri[len("models:/"):]
    name, sep, ref = rest.partition("@") if "@" in rest else rest.rpartition("/")
    if not sep or not name or not ref or "/" in ref or (sep == "/" and not (ref.isdigit() or ref == "latest")):
        raise CogvxError(f"{uri!r}: expected models:/NAME@ALIAS (e.g. models:/cogvx-lora@champion) "
                         "or models:/NAME/VERSION (a number or 'latest')")
    return name, ref


def resolve_lora(uri_or_path: str, tracking_uri: str, dest: Path) -> Path:
    """A local LoRA path as is; a registry URI downloaded into ``dest`` -> the folder holding the weights."""
    import mlflow.artifacts

    text = str(uri_or_path)
    if not text.startswith("models:/"):
        return Path(text)
    name, ref = parse_models_uri(text)
    check_tracking(tracking_uri)
    client = mlflow_client(tracking_uri)
    with mlflow_errors(f"fetching {text}", tracking_uri):
        version = _find_version(client, name, ref, tracking_uri)
        target = Path(dest) / f"{re.sub(r'[^A-Za-z0-9._-]', '_', name)}-v{version.version}"
        # The version's own artifact URI: MLflow resolves models:/ URIs through the process-wide
        # registry URI, not the one passed in, so they would be looked up in the wrong store.
        source = client.get_model_version_download_uri(name, version.version)
        local = mlflow.artifacts.download_artifacts(source, dst_path=str(target), tracking_uri=tracking_uri)
    found = sorted(Path(local).rglob(LORA_WEIGHT_NAME))
    if not found:
        raise CogvxError(f"{text} (version {version.version}) holds no {LORA_WEIGHT_NAME}; was it registered "
                         f"by `cogvx`? (downloaded to {local})")
    return found[0].parent
