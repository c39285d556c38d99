"""The learning-rate schedule (cosine with linear warm-up), and which one a resumed run keeps.

The rate of a step is a pure function of the step and four numbers (peak, length, warm-up
steps, floor), saved in every checkpoint. Resuming with other settings (a larger
`--max-steps`, another `--lr`) would silently re-stretch the curve: at the step resumed the
rate would jump to where the new curve is. So a resumed run keeps the saved schedule, and
steps past its end run at its floor rate (the usual way to extend a finished run); a run
asks for the new one with `--reschedule`. Either way it says so on stderr.

Reference: the cosine decay with linear warm-up of GPT-NeoX / nanoGPT (SGDR without restarts,
Loshchilov and Hutter 2017).
"""

from __future__ import annotations

import math
from typing import Any


class CosineSchedule:
    """Linear warm-up to the peak rate, then cosine decay to peak * min_lr_ratio."""

    def __init__(self, peak: float, max_steps: int, warmup: float, min_lr_ratio: float):
        self.peak, self.max_steps, self.min_lr_ratio = peak, max_steps, min_lr_ratio
        self.warmup_steps = int(round(warmup * max_steps)) if warmup < 1 else int(warmup)

    def lr(self, step: int) -> float:
        """Rate of the update made at 0-based `step`."""
        if step < self.warmup_steps:
            return self.peak * (step + 1) / self.warmup_steps
        span = max(1, self.max_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        low = self.peak * self.min_lr_ratio
        return low + (self.peak - low) * 0.5 * (1 + math.cos(math.pi * progress))

    def state_dict(self) -> dict[str, Any]:
        return {"peak": self.peak, "max_steps": self.max_steps, "warmup_steps": self.warmup_steps,
                "min_lr_ratio": self.min_lr_ratio}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> CosineSchedule:
        # warmup_steps is a whole number of steps; 0 stays 0 (0 * max_steps)
        return cls(state["peak"], state["max_steps"], state["warmup_steps"], state["min_lr_ratio"])

    def describe(self) -> str:
        return (f"peak {self.peak:.3g} over {self.max_steps} steps ({self.warmup_steps} of warm-up), "
                f"floor {self.peak * self.min_lr_ratio:.3g}")


def resumed_schedule(saved: dict[str, Any], asked: CosineSchedule, step: int,
                     reschedule: bool) -> tuple[CosineSchedule, str | None]:
    """The schedule a run resumed at `step` follows, and what to tell the user (None: no change)."""
    old = CosineSchedule.from_state(saved)
    if old.state_dict() == asked.state_dict():
        return asked, None
    if reschedule:
        return asked, (f"--reschedule: the learning-rate schedule is now {asked.describe()} (was {old.describe()}); "
                       f"the rate of step {step + 1} is {asked.lr(step):.3g} instead of {old.lr(step):.3g}")
    past = (f"; steps {old.max_steps + 1}-{asked.max_steps} run at its floor rate {old.lr(old.max_steps):.3g}"
            if asked.max_steps > old.max_steps else "")
    return old, (f"keeping the learning-rate schedule of the run being resumed: {old.describe()}{past} "
                 f"(the settings now give {asked.describe()}; pass --reschedule to follow that instead)")
