"""What a training run reports: one typed record shared by the loop, the CLI, the Prefect tasks,
MLflow tracking and the DVC metrics writer.

``report.json`` in the run folder is this record as JSON (:meth:`TrainingReport.to_json`); a caller
that launched the run on other processes reads it back with :meth:`TrainingReport.read`. The JSON
keeps the field names below, which are also what ``cogvx train --json`` prints.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPORT_NAME = "report.json"


@dataclass(frozen=True)
class PhaseMemory:
    """The peak memory of one phase (load, train, validation) in GiB."""

    peak_allocated_gib: float
    peak_reserved_gib: float


@dataclass(frozen=True)
class MemoryReport:
    """Peak memory per phase, and what was measured (the CUDA allocator, or the process RSS on a CPU)."""

    device: str
    measure: str
    phases: dict[str, PhaseMemory] = field(default_factory=dict)

    @property
    def peak_allocated_gib(self) -> float:
        """The highest allocated peak of any phase."""
        return max((phase.peak_allocated_gib for phase in self.phases.values()), default=0.0)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MemoryReport:
        phases = {name: PhaseMemory(**values) for name, values in (data.get("phases") or {}).items()}
        return cls(device=data.get("device", ""), measure=data.get("measure", ""), phases=phases)


@dataclass(frozen=True)
class StepTiming:
    """Median seconds per optimizer step (the first step, a warm-up, left out) and samples per second."""

    s_per_step: float = 0.0
    samples_per_s: float = 0.0
    steps_timed: int = 0


@dataclass
class TrackingOutcome:
    """What became of the run's MLflow run: its id, whether everything reached the store, the
    problems met, and the registry version when the LoRA was registered."""

    run_id: str | None = None
    experiment_id: str | None = None
    complete: bool = True
    problems: list[str] = field(default_factory=list)
    registered: dict[str, str] | None = None


@dataclass
class TrainingReport:
    """A finished (or resumed and finished) training run."""

    steps: int
    resumed_from_step: int  # steps taken over from a checkpoint: 0 on a fresh start
    setup_s: float  # seconds to load the model and data and restore a checkpoint
    final_loss: float | None
    weights: str  # the lora/ folder, or the full/ transformer folder
    method: str  # train.method: lora or full
    validation_videos: list[str]
    processes: int
    engine: str  # accelerate's distributed type: NO, MULTI_GPU, FSDP, DEEPSPEED
    global_batch: int
    replica_digests: list[str] | None  # one weights digest per DDP process (None on one process)
    memory: MemoryReport
    timing: StepTiming
    losses: list[tuple[int, float]]
    tracking: TrackingOutcome | None = None  # None until tracking has finished (or when it never ran)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (report.json); ``tracking`` only once it is known."""
        data = asdict(self)
        if self.tracking is None:
            data.pop("tracking")
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingReport:
        tracking = data.get("tracking")
        return cls(**{**data, "memory": MemoryReport.from_dict(data.get("memory") or {}),
                      "timing": StepTiming(**(data.get("timing") or {})),
                      "losses": [tuple(pair) for pair in data.get("losses") or []],
                      "tracking": TrackingOutcome(**tracking) if tracking else None})

    @classmethod
    def read(cls, folder: str | Path) -> TrainingReport:
        """The report a run wrote into ``folder`` (train.output_dir)."""
        return cls.from_dict(json.loads((Path(folder) / REPORT_NAME).read_text(encoding="utf-8")))
