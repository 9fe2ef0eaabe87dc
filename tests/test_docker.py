"""Container images run as an unprivileged user and carry no secrets (checked on the files: no
Docker engine runs here)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SECRET = re.compile(r"(TOKEN|PASSWORD|SECRET|API_KEY)", re.IGNORECASE)


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


def test_every_image_runs_as_a_non_root_user_without_baked_secrets():
    dockerfiles = sorted((REPO / "docker").glob("Dockerfile*"))
    assert dockerfiles, "no Dockerfile in docker/"
    for dockerfile in dockerfiles:
        steps = instructions(dockerfile)
        users = [args for word, args in steps if word == "USER"]
        assert users and users[-1].split(":")[0] not in ("root", "0"), f"{dockerfile.name} runs as root"
        last_user = max(i for i, (word, _) in enumerate(steps) if word == "USER")
        assert not [w for w, _ in steps[last_user:] if w == "RUN"], f"{dockerfile.name}: RUN after USER"
        for word, args in steps:
            if word in ("ENV", "ARG"):
                assert not SECRET.search(args), f"{dockerfile.name}: {word} {args}"
