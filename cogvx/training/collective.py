"""What the processes of a launched training run do together: meet after the main process's work,
average a figure, agree to stop, and check that DDP replicas ended with the same weights.

Every function returns at once on one process; with several, every process must call it.
"""

from __future__ import annotations

import hashlib

import torch

from cogvx.errors import CogvxError


def main_process_then_meet(accelerator, work, everyone: bool = False):
    """Run ``work()`` on the main process (on every process when ``everyone``), then let all
    processes meet; its error is raised after the meeting, so no process is left waiting for one
    that failed. Returns what ``work`` returned (None where it did not run)."""
    result, failure = None, None
    if accelerator.is_main_process or everyone:
        try:
            result = work()
        except Exception as err:  # re-raised once the other processes are released
            failure = err
    accelerator.wait_for_everyone()
    if failure is not None:
        raise failure
    return result


def mean_across_processes(accelerator, value: float) -> float:
    """The mean of ``value`` over all processes (the loss of the global batch)."""
    if accelerator.num_processes == 1:
        return value
    return float(accelerator.reduce(torch.tensor([value], device=accelerator.device), reduction="mean").item())


def stop_requested_anywhere(accelerator, here: bool) -> bool:
    """Whether any process got SIGINT/SIGTERM, so that all of them checkpoint and stop together."""
    if accelerator.num_processes == 1:
        return here
    flag = torch.tensor([1.0 if here else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


def replica_digests(accelerator, trainable: dict[str, torch.Tensor]) -> list[str]:
    """One digest of the trainable weights per process, in rank order; processes that diverged
    (DDP must keep every replica equal) fail the run."""
    from accelerate.utils import gather_object

    digest = hashlib.sha256()
    for name, tensor in sorted(trainable.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    digests = gather_object([digest.hexdigest()])
    if len(set(digests)) > 1:
        raise CogvxError(f"the {len(digests)} processes ended with different weights ({', '.join(d[:12] for d in digests)}); "
                         "the saved weights are the main process's. Report this with the accelerate config used")
    return digests
