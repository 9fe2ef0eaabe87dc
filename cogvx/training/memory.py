"""Peak memory per phase (model load, training, validation) and step timing."""

from __future__ import annotations

import resource
import statistics
import torch

from cogvx.reports import MemoryReport, PhaseMemory, StepTiming

GIB = 2**30


class MemoryMeter:
    """Records the peak allocated and reserved memory of each named phase.

    On CUDA the allocator's peak counters are reset at the start of a phase; on a CPU the
    process's peak resident set is reported (it only grows, so it is the peak so far).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.phases: dict[str, dict[str, float]] = {}

    def start(self, phase: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.phases.setdefault(phase, {})

    def stop(self, phase: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            allocated = torch.cuda.max_memory_allocated(self.device) / GIB
            reserved = torch.cuda.max_memory_reserved(self.device) / GIB
        else:
            allocated = reserved = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        previous = self.phases.get(phase, {})
        self.phases[phase] = {
            "peak_allocated_gib": round(max(allocated, previous.get("peak_allocated_gib", 0.0)), 3),
            "peak_reserved_gib": round(max(reserved, previous.get("peak_reserved_gib", 0.0)), 3),
        }

    def report(self) -> MemoryReport:
        kind = "cuda allocator" if self.device.type == "cuda" else "process peak RSS (CPU)"
        return MemoryReport(device=str(self.device), measure=kind,
                            phases={name: PhaseMemory(**peaks) for name, peaks in self.phases.items()})


def step_timing(step_seconds: list[float], samples_per_step: int) -> StepTiming:
    """Median seconds per optimizer step (first step left out: warm-up) and samples per second."""
    timed = step_seconds[1:] or step_seconds
    if not timed:
        return StepTiming()
    median = statistics.median(timed)
    return StepTiming(s_per_step=round(median, 4), samples_per_s=round(samples_per_step / median, 3) if median else 0.0,
                      steps_timed=len(timed))
