"""Every schedule of the project: per-step values from one helper (DINO ``cosine_scheduler``), indexed by
global step, and the per-epoch lr of the fine-tuning protocols.

lr: ``cosine_schedule(lr, min_lr, total, warmup_steps=w)``; weight decay:
``cosine_schedule(wd, wd_end, total)``; EMA momentum to 1: ``cosine_schedule(0.996, 1.0, total)``;
teacher temperature warmup then constant: ``cosine_schedule(t, t, total, warmup_steps=w, warmup_start=t0)``;
fine-tuning lr set once per epoch: ``epoch_lr("multistep" | "cosine_epochs", lr, epoch, epochs, ...)``.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["cosine_schedule", "epoch_lr", "EPOCH_SCHEDULES"]

EPOCH_SCHEDULES = ("multistep", "cosine_epochs")


def cosine_schedule(base: float, final: float, total_steps: int, warmup_steps: int = 0,
                    warmup_start: float = 0.0) -> np.ndarray:
    """Linear warmup ``warmup_start -> base`` over ``warmup_steps``, then a half cosine ``base -> final``.

    Returns a float64 array of length ``total_steps``; entry ``i`` is the value at global step ``i``
    (the last entry is exactly ``final`` when the cosine part has more than one step).
    """
    if total_steps < 1:
        raise ValueError(f"cosine_schedule: total_steps must be >= 1, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"cosine_schedule: warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
    warmup = np.linspace(warmup_start, base, warmup_steps, endpoint=False) if warmup_steps else np.empty(0)
    cosine_steps = total_steps - warmup_steps
    # Denominator cosine_steps - 1 so the schedule reaches `final` on its last step (DINO divides by
    # the length and never quite gets there, which matters for momentum -> 1).
    progress = np.arange(cosine_steps) / max(cosine_steps - 1, 1)
    cosine = final + 0.5 * (base - final) * (1.0 + np.cos(np.pi * progress))
    return np.concatenate((warmup, cosine)).astype(np.float64)


def epoch_lr(schedule: str, lr: float, epoch: int, epochs: float, milestones=(), gamma: float = 0.1) -> float:
    """lr of ``epoch`` (0-based) for the per-epoch schedules of the fine-tuning protocols.

    ``multistep``: ``lr * gamma ** (milestones <= epoch)`` (TimeSformer's / SVT's fine-tuning);
    ``cosine_epochs``: cosine from ``lr`` to 0 over ``epochs``, as the official SVT / DINO
    eval_linear.py's ``CosineAnnealingLR(optimizer, epochs, eta_min=0)`` stepped once per epoch.
    """
    if schedule == "cosine_epochs":
        return lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    if schedule == "multistep":
        return lr * gamma ** sum(epoch >= m for m in milestones)
    raise ValueError(f"epoch_lr: schedule must be one of {', '.join(EPOCH_SCHEDULES)}, got {schedule!r}")
