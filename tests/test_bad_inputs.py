"""Every input of the bad-input corpus is refused by the real command: the expected exit code,
one message naming the input, no traceback, nothing written anywhere, nothing unpickled."""

from __future__ import annotations

import pytest

from tests.data.make_bad_corpus import make_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("bad")
    return root, {case.name: case for case in make_corpus(root, tiny_models["tiny-t2v"])}


def files_under(root):
    return {p for p in root.rglob("*") if p.is_file()}


def test_corpus_covers_params_data_and_lora(corpus):
    _, cases = corpus
    kinds = {name.split("/")[0] for name in cases}
    assert kinds == {"params", "data", "lora"} and len(cases) >= 20


@pytest.mark.slow
@pytest.mark.parametrize("name", [
    "params/wrong-types.yaml", "params/unknown-key.yaml", "params/yaml-bomb.yaml", "params/not-a-mapping.yaml",
    "params/huge.yaml", "params/latin1.yaml", "data/one-frame", "data/text-as-mp4", "data/empty-mp4",
    "data/megabyte-caption", "data/huge-resolution", "data/traversal", "data/absolute", "data/listing-prompts_file",
    "data/listing-videos_file", "data/listing-images_file", "data/listing-metadata_file", "lora/mismatch.safetensors", "lora/pickle.bin",
    "lora/truncated.safetensors", "lora/other-base.safetensors", "lora/pickle-named.st", "data/symlink-loop",
    "data/fifo-clip", "data/audio-only", "data/nul-caption", "data/two-listings"])
def test_bad_input_is_refused_cleanly(corpus, name, run_cli, tmp_path):
    root, cases = corpus
    case = cases[name]
    work = tmp_path / "work"
    work.mkdir()
    before = files_under(root) | files_under(work)
    result = run_cli(*case.args, cwd=work)
    assert result.returncode == case.exit_code, (result.stdout[-1500:], result.stderr[-1500:])
    stderr = result.stderr.replace("\n", " ")
    assert case.message in stderr, stderr[-1500:]
    assert "Traceback" not in result.stderr
    assert files_under(root) | files_under(work) == before, "a refused input left files behind"
    assert not list(root.rglob("CODE-RAN")), "a pickle was unpickled"
    assert "do-not-echo-this" not in result.stdout + result.stderr, "a file outside data_root was read"


def test_nothing_listens_beyond_localhost_by_default():
    """No server the project starts or configures binds to every interface."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    files = [p for folder in ("cogvx", "flows", "tasks") for p in (repo / folder).rglob("*.py")]
    files += [repo / "prefect.yaml", repo / "dvc.yaml", repo / "Makefile"]
    assert [str(p) for p in files if "0.0.0.0" in p.read_text(encoding="utf-8")] == []


def test_remote_code_is_never_trusted():
    """No loader of the project passes trust_remote_code (hub repos cannot run code here)."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    sources = [p for folder in ("cogvx", "flows", "tasks", "bench") for p in (repo / folder).rglob("*.py")]
    assert len(sources) > 20
    offenders = [str(p) for p in sources if "trust_remote_code" in p.read_text(encoding="utf-8")]
    assert offenders == []
