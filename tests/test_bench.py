"""`cogvx bench`: the smoke suite runs the real code paths on the tiny model, results become
tables, and the README's memory table is the one generated from the committed results."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from cogvx.benchmark.cases import ISSUE7, ISSUE10, ISSUE17, ISSUE18, Case, select
from cogvx.benchmark.report import README_BEGIN, README_END, load_results, markdown, update_readme
from cogvx.benchmark.suite import compare, last_result_line, run_references
from cogvx.errors import CogvxError
from tests.helpers import REPO


@pytest.mark.slow
def test_smoke_suite_runs_every_kind_through_the_cli(run_cli, tmp_path):
    out = tmp_path / "smoke.json"
    done = run_cli("bench", "run", "--suite", "smoke", "--out", str(out), "--workdir", str(tmp_path / "wd"),
                   timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    cases = {case["case"]: case for case in report["cases"]}
    assert set(cases) == {"tiny-lora", "tiny-lora-fp8-offload", "tiny-lora-ddp", "tiny-validate", "tiny-generate",
                          "tiny-generate-cache", "tiny-control-lokr-validate"}
    # The launched case: 2 processes under accelerate (gloo here), both measured, scaling computed.
    ddp = cases["tiny-lora-ddp"]
    assert ddp["processes"] == 2 and ddp["distributed_type"] == "MULTI_CPU", ddp
    assert len(ddp["peak_allocated_gib_per_process"]) == 2 and ddp["scaling_efficiency"] > 0
    for name in ("tiny-lora", "tiny-lora-fp8-offload", "tiny-validate"):
        assert len(cases[name]["step_s"]) == 2 or name == "tiny-validate", cases[name]
        assert math.isfinite(cases[name]["loss"]), cases[name]
    assert "validation" in cases["tiny-validate"]["phases"]
    control = cases["tiny-control-lokr-validate"]
    assert "validation" in control["phases"] and control["in_channels"] == 2 * cases["tiny-lora"]["in_channels"], control
    assert control["trainable_params"] > 0, control
    assert cases["tiny-generate"]["frames"] == 9 and cases["tiny-generate"]["seconds"] > 0
    cached = cases["tiny-generate-cache"]  # the same render with the cache off, in the same process
    assert cached["uncached_seconds"] > 0 and cached["cache_speedup"] > 0, cached
    assert 0 < cached["cache_relative_difference"] < 0.5, cached
    assert "x the uncached" in done.stdout and "apart)" in done.stdout  # its table row says both
    assert "tiny-lora-fp8-offload" in done.stdout  # the table is printed


def test_every_real_size_case_is_a_valid_config(tmp_path):
    from cogvx.benchmark.worker import case_config

    for case in (*ISSUE7, *ISSUE10, *ISSUE17, *ISSUE18):
        config = case_config(case, tmp_path)  # raises ConfigError on a bad override
        assert config.spec.key == case.variant and (config.frames, config.height, config.width) == case.size


def test_compare_computes_ratios_and_targets():
    case = Case("x", "train", "tiny-t2v", (9, 64, 96), targets={"time_ratio": 0.6, "peak_gib": 12.0})
    reference = {"s_per_step_median": 4.0, "peak_gb": 20.0}
    fast = compare({"s_per_step_median": 2.0, "peak_allocated_gib": 13.0}, case, reference)
    assert fast["time_ratio"] == 0.5 and fast["mem_ratio"] == 0.65
    assert fast["targets_met"] == {"time_ratio": True, "peak_gib": False}
    failed = compare({"error": "exit 1"}, case, reference)
    assert "targets_met" not in failed


def test_generation_runs_the_plain_reference_step_and_training_its_variants_too(tmp_path):
    """A render is anchored by the eager reference step in its invocation; the compiled variant
    only gives training steps their second ratio, so a generation-only run skips it."""
    renders = select("issue17", ["5b-generate-fa4-t5-stream"])
    with_training = select("issue17", ["5b-generate-fa4-t5-stream", "5b-speed"])
    keys = []
    for cases in (renders, with_training):
        report = {"references": {}}
        run_references(cases, "issue17", None, 10, report, tmp_path / "out.json", log=lambda line: None)
        keys.append(sorted(report["references"]))
    assert keys == [["5b"], ["5b", "5b-compile"]]
    assert "pass --reference" in report["references"]["5b"]["error"]


def test_result_line_parsing_takes_the_last_result():
    text = 'noise\nRESULT {"a": 1}\nmore\nRESULT {"a": 2}\n'
    assert last_result_line(text) == {"a": 2}
    assert last_result_line("no result here") is None


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="on a GPU the suite would run")
def test_real_size_suite_on_a_cpu_is_refused_at_once(run_cli, tmp_path):
    done = run_cli("bench", "run", "--suite", "issue7", "--out", str(tmp_path / "r.json"))
    assert done.returncode == 1 and "need a CUDA GPU" in done.stderr and "--suite smoke" in done.stderr
    assert not (tmp_path / "r.json").exists()


def test_unknown_suite_or_case_is_a_clear_error():
    with pytest.raises(CogvxError, match="no benchmark suite"):
        select("nope")
    with pytest.raises(CogvxError, match="has no case"):
        select("issue7", ["5b-lora-nope"])


def test_readme_memory_table_is_generated_from_the_committed_results():
    results = sorted((REPO / "bench" / "results").glob("issue1[78]-h200-*.json"))
    assert results, "no committed benchmark results"
    reports = load_results(results)
    assert all(report["memory_cap_gib"] == 23 for report in reports), "the README's figures come from the capped suite"
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    block = readme.split(README_BEGIN, 1)[1].split(README_END, 1)[0]
    assert block == "\n" + markdown(reports), "run `cogvx bench table bench/results/issue1[78]-h200-*.json --readme README.md`"


def test_update_readme_replaces_only_the_marked_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{README_BEGIN}\nold\n{README_END}\noutro\n", encoding="utf-8")
    assert update_readme(readme, "new table\n")
    assert readme.read_text() == f"intro\n{README_BEGIN}\nnew table\n{README_END}\noutro\n"
    assert not update_readme(readme, "new table\n")
    (tmp_path / "plain.md").write_text("no markers")
    with pytest.raises(CogvxError, match="markers"):
        update_readme(tmp_path / "plain.md", "x")


def test_scaling_efficiency_and_launch_commands(tmp_path):
    from cogvx.benchmark.suite import add_scaling, worker_command

    case = next(c for c in ISSUE10 if c.name == "5b-lora-ddp")
    result = {"case": case.name, "processes": 2, "samples_per_s": 0.45}
    add_scaling(result, case, [{"case": "5b-lora-1gpu", "processes": 1, "samples_per_s": 0.25}])
    assert result["scaling_efficiency"] == 0.9
    assert compare(result, case, None)["targets_met"] == {"scaling_efficiency": True}
    command = worker_command(case, "issue10", tmp_path, None, 2)
    assert command[1:3] == ["-m", "accelerate.commands.launch"] and command[command.index("--num_processes") + 1] == "2"
    assert Path(command[command.index("--config_file") + 1]).is_file()
    # DDP on one process runs without a launcher; FSDP keeps it (one shard).
    assert "accelerate.commands.launch" not in worker_command(case, "issue10", tmp_path, None, 1)
    fsdp = next(c for c in ISSUE10 if c.launch == "fsdp2.yaml")
    assert "accelerate.commands.launch" in worker_command(fsdp, "issue10", tmp_path, None, 1)


def test_a_case_environment_reaches_its_process_and_its_table_row():
    """A case's own environment (here the CUDA allocator's settings) is set in the measuring
    process beside the simulated card's cap, recorded in the result and named in the table."""
    import sys

    from cogvx.benchmark.report import rows
    from cogvx.benchmark.suite import RESULT_PREFIX, _run_json, worker_env

    case = next(c for c in ISSUE17 if c.name == "5b-generate-fa4-untiled-expandable")
    env = worker_env(case, 23.0)
    probe = (f"import json, os; print({RESULT_PREFIX!r} + json.dumps({{'alloc': os.environ.get('PYTORCH_CUDA_ALLOC_CONF'), "
             "'cap': os.environ.get('COGVX_BENCH_MEMORY_CAP_GIB')}))")
    seen = _run_json([sys.executable, "-c", probe], timeout=60, env=env)
    assert seen["alloc"] == "expandable_segments:True" and seen["cap"] == "23.0"
    assert worker_env(next(c for c in ISSUE17 if c.name == "5b-generate-fa4"), None) == {"COGVX_BENCH_MEMORY_CAP_GIB": ""}
    result = {"case": case.name, "kind": "generate", "overrides": list(case.overrides), "env": dict(case.env), "seconds": 70.0}
    assert "expandable allocator segments" in rows([{"cases": [result]}])[0][1]
