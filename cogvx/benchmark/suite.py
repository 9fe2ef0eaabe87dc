"""`cogvx bench run`: every case of a suite in its own process, side by side with the
reference step on the same GPU, written to JSON after each case (a cut-off run keeps what it
measured) and printed as a table."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from cogvx.benchmark.cases import REFERENCE_VARIANTS, Case
from cogvx.benchmark.worker import MEMORY_CAP_ENV
from cogvx.io import atomic_write_text

RESULT_PREFIX = "RESULT "
ACCELERATE_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "accelerate"
HIGHER_IS_BETTER = ("clips_per_s", "scaling_efficiency")


def last_result_line(output: str) -> dict[str, Any] | None:
    """The JSON of the last ``RESULT {...}`` line a worker (or the reference script) printed."""
    for line in reversed(output.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    return None


def _run_json(command: list[str], timeout: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run a measuring process; its RESULT (also a failure's, e.g. out of memory under the
    cap), or an error record with the output's tail."""
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    result = last_result_line(done.stdout)
    if result is not None and "error" in result:
        return result
    if done.returncode != 0 or result is None:
        lines = (done.stdout + done.stderr).strip().splitlines()
        errors = [line for line in lines if "Error" in line or "error:" in line][-8:]
        return {"error": f"exit {done.returncode}", "error_lines": errors, "output_tail": lines[-12:]}
    result.setdefault("wall_s", round(time.perf_counter() - started, 1))
    return result


def run_reference(anchor: Path, model: str, steps: int, warmup: int, timeout: float,
                  variant: str | None = None) -> dict[str, Any]:
    """The reference LoRA step (rank 64, 49x480x720, batch 1) for ``model`` ("2b"/"5b"), eager
    or as ``variant`` (e.g. "compile": the reference with per-block torch.compile). Never
    capped: it is what every case is compared with."""
    command = [sys.executable, str(anchor), "--model", model, "--rank", "64", "--steps", str(steps),
               "--warmup", str(warmup), *(["--variant", variant] if variant else [])]
    return {"anchor": str(anchor.name), **_run_json(command, timeout, {MEMORY_CAP_ENV: ""})}


def worker_command(case: Case, suite: str, workdir: Path, clips: Path | None, processes: int) -> list[str]:
    """`cogvx bench case ...`, under accelerate launch on ``processes`` GPUs for a launch case
    (DDP on one process is a plain process: accelerate's multi-GPU launcher wants two or more)."""
    args = ["-m", "cogvx", "bench", "case", case.name, "--suite", suite, "--workdir", str(workdir)]
    if clips is not None:
        args += ["--clips", str(clips)]
    if case.launch is None or (processes == 1 and case.launch.startswith("ddp-")):
        return [sys.executable, *args]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_CONFIGS / case.launch),
            "--num_processes", str(processes), *args]


def run_worker(case: Case, suite: str, workdir: Path, clips: Path | None, timeout: float,
               processes: int | None = None, memory_cap_gib: float | None = None) -> dict[str, Any]:
    processes = processes or case.processes
    command = worker_command(case, suite, workdir, clips, processes)
    return {"case": case.name, "kind": case.kind, "variant": case.variant, "size": case.size_text,
            "overrides": list(case.overrides), "launch": case.launch, "processes": processes,
            **({"env": dict(case.env)} if case.env else {}),
            **({"memory_cap_gib": memory_cap_gib} if memory_cap_gib else {}),
            **_run_json(command, timeout, worker_env(case, memory_cap_gib))}


def worker_env(case: Case, memory_cap_gib: float | None) -> dict[str, str]:
    """What a case's process gets on top of this one's environment: the simulated card's cap
    (empty: none) and the case's own settings (e.g. the CUDA allocator's)."""
    return {MEMORY_CAP_ENV: str(memory_cap_gib) if memory_cap_gib else "", **dict(case.env)}


def add_scaling(result: dict[str, Any], case: Case, done: list[dict[str, Any]]) -> None:
    """Scaling efficiency against the case's one-process baseline: throughput on N processes
    over N times the baseline's."""
    base = next((r for r in done if r["case"] == case.baseline and "error" not in r), None)
    if base is None or "error" in result:
        return
    key = "samples_per_s" if "samples_per_s" in result else "clips_per_s"
    if key in result and key in base:
        ideal = base[key] * result["processes"] / base.get("processes", 1)
        result["scaling_efficiency"] = round(result[key] / ideal, 3)


def compare(result: dict[str, Any], case: Case, reference: dict[str, Any] | None,
            compiled: dict[str, Any] | None = None) -> dict[str, Any]:
    """Ratios against the reference step and whether each target of the case is met."""
    if "error" in result:
        return result
    if reference and "error" not in reference and "s_per_step_median" in result:
        result["time_ratio"] = round(result["s_per_step_median"] / reference["s_per_step_median"], 3)
        result["mem_ratio"] = round(result["peak_allocated_gib"] / reference["peak_gb"], 3)
    if compiled and "error" not in compiled and "s_per_step_median" in result:
        result["time_ratio_vs_compiled_reference"] = round(result["s_per_step_median"] / compiled["s_per_step_median"], 3)
    met = {}
    for key, bound in case.targets.items():
        value = result.get("peak_allocated_gib" if key == "peak_gib" else key)
        if value is not None:
            met[key] = value >= bound if key in HIGHER_IS_BETTER else value <= bound
    result["targets"] = case.targets
    result["targets_met"] = met
    return result


def run_references(cases: list[Case], suite: str, anchor: Path | None, timeout: float, report: dict[str, Any],
                   out: Path, log: Callable[[str], None]) -> None:
    """The reference step once per model that cases compare with (and per reference variant
    of the suite, keyed "<model>-<variant>"). The variants only give training steps a second
    ratio, so a run of generate or validate cases alone runs the plain reference step only."""
    for model in sorted({case.reference for case in cases if case.reference}):
        warmup = max(2, next(c.warmup for c in cases if c.reference == model))
        trains = any(c.kind == "train" and c.reference == model for c in cases)
        variants = REFERENCE_VARIANTS.get(suite, {}).get(model, ()) if trains else ()
        for variant in (None, *variants):
            key = f"{model}-{variant}" if variant else model
            if anchor is None or not anchor.is_file():
                report["references"][key] = {"error": f"no reference script at {anchor}; pass --reference"}
                continue
            log(f"reference step {key} ...")
            report["references"][key] = run_reference(anchor, model, steps=5, warmup=warmup, timeout=timeout,
                                                      variant=variant)
            _save(out, report)


def run_suite(cases: list[Case], suite: str, out: Path, workdir: Path, anchor: Path | None,
              clips: Path | None = None, commit: str | None = None, timeout: float = 900,
              log: Callable[[str], None] = print, processes: int | None = None,
              memory_cap_gib: float | None = None) -> dict[str, Any]:
    """Run the reference steps, then every case (``processes`` replaces the process count of
    launch cases; ``memory_cap_gib`` caps each case's CUDA allocator: a simulated smaller card)."""
    report: dict[str, Any] = {"suite": suite, "commit": commit or git_commit(), "python": platform.python_version(),
                              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "memory_cap_gib": memory_cap_gib,
                              "references": {}, "cases": []}
    run_references(cases, suite, anchor, timeout, report, out, log)
    for case in cases:
        log(f"case {case.name} ...")
        result = run_worker(case, suite, workdir, clips, timeout, processes if case.launch else None, memory_cap_gib)
        add_scaling(result, case, report["cases"])
        references = report["references"]
        report["cases"].append(compare(result, case, references.get(case.reference),
                                       references.get(f"{case.reference}-compile")))
        _save(out, report)
        log(f"  {summary_line(report['cases'][-1])}")
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    _save(out, report)
    return report


def summary_line(result: dict[str, Any]) -> str:
    """One line per finished case for the console (the table comes at the end)."""
    if "error" in result:
        return f"{result['case']}: FAILED ({result['error']})"
    figures = [f"{key}={result[key]}" for key in ("s_per_step_median", "seconds", "clips_per_s", "peak_allocated_gib",
                                                  "peak_reserved_gib", "time_ratio", "mem_ratio",
                                                  "time_ratio_vs_compiled_reference", "grad_rel_err_median",
                                                  "loss_curve_rel_diff") if key in result]
    missed = [key for key, ok in (result.get("targets_met") or {}).items() if not ok]
    return f"{result['case']}: {' '.join(figures)}" + (f" MISSED {','.join(missed)}" if missed else "")


def _save(out: Path, report: dict[str, Any]) -> None:
    atomic_write_text(out, json.dumps(report, indent=1) + "\n")


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
