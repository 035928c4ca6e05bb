"""Learning-rate schedules: linear warm-up, then cosine or linear decay (pure functions)."""

from __future__ import annotations

import math

from ..errors import ConfigError

SCHEDULES = ("cosine", "linear", "constant")


def lr_factor(step: int, total_steps: int, warmup_steps: int = 0, schedule: str = "cosine",
              min_factor: float = 0.0) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based).

    Warm-up: (step + 1) / warmup_steps for step < warmup_steps, so the first step is not wasted
    at lr 0. Then decay from 1 to min_factor at step total_steps - 1 (cosine or linear), or stay 1.
    """
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown schedule {schedule!r}; use one of {SCHEDULES}")
    if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
        raise ConfigError(f"need total_steps >= 1 and 0 <= warmup_steps <= total_steps, got "
                          f"{total_steps} and {warmup_steps}")
    if not 0.0 <= min_factor <= 1.0:
        raise ConfigError(f"min_factor must be in [0, 1], got {min_factor}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    decay_steps = total_steps - warmup_steps
    progress = 1.0 if decay_steps <= 1 else min(1.0, (step - warmup_steps) / (decay_steps - 1))
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
    return min_factor + (1.0 - min_factor) * shape
