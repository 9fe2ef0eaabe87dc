"""Training progress a person can follow: a live bar on a terminal, plain lines everywhere else.

On a terminal tqdm draws one bar (step/total, loss, lr, grad norm, s/step, ETA). Where output goes
to a file, DVC, a Prefect worker or a CI log, a bar is either invisible or a mess of carriage
returns, so a line is printed at the first step, then every ``every_steps`` steps or
``every_s`` seconds, whichever comes first, and at the last step.
"""

from __future__ import annotations

import sys
import time
from datetime import timedelta


def _eta(seconds: float) -> str:
    return str(timedelta(seconds=round(max(0.0, seconds))))


class StepProgress:
    """Reports optimizer steps ``initial+1 .. total``; ``log`` prints a line (non-terminal mode)."""

    def __init__(self, total: int, initial: int = 0, log=print, enabled: bool = True,
                 every_steps: int | None = None, every_s: float = 30.0, terminal: bool | None = None) -> None:
        self.total, self.initial, self.log, self.enabled = total, initial, log, enabled
        self.every_steps = every_steps or max(1, total // 20)
        self.every_s = every_s
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self._started = time.monotonic()
        self._last_line = 0.0
        self._bar = None
        if enabled and self.terminal:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, unit="step", desc="training", file=sys.stderr)

    def update(self, step: int, loss: float, lr: float, grad_norm: float, step_s: float) -> None:
        """One optimizer step done (``step`` counts from 1)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", grad=f"{grad_norm:.3f}", s_step=f"{step_s:.2f}")
            return
        now = time.monotonic()
        due = (step == self.initial + 1 or step == self.total or (step - self.initial) % self.every_steps == 0
               or now - self._last_line >= self.every_s)
        if not due:
            return
        self._last_line = now
        done = step - self.initial
        remaining = (now - self._started) / done * (self.total - step) if done else 0.0
        self.log(f"step {step}/{self.total} ({100 * step // max(1, self.total)}%)  loss {loss:.4f}  lr {lr:.2e}  "
                 f"grad {grad_norm:.3f}  {step_s:.2f} s/step  ETA {_eta(remaining)}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> StepProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
