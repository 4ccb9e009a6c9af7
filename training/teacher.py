"""EMA teacher (SVT) / momentum key encoder (MoCo v3, BYOL), kept outside the DeepSpeed engine.

The teacher's parameter names are a subset of the student's (the student may carry a predictor the
teacher lacks), and ``teacher = m * teacher + (1 - m) * student`` is applied name by name after each
real optimizer step, always from the student's fp32 values. Where they live depends on the engine:
- no ZeRO, or ZeRO 1/2 in fp32: the module parameters are the full fp32 weights on every rank, so
  the update reads them directly (no collective);
- bf16 (ZeRO 1-3) or ZeRO-3: each rank holds a piece of every fp32 master, so the pieces are
  all-gathered once per update (``LocalPartitions.gather_masters``: one collective, whatever the
  parameter count) and the update runs on the full tensors, the same arithmetic on the same values as
  reading each full master on its own (``safe_get_full_fp32_param``: one collective per parameter).

The teacher's weights stay fp32 (DINO / SVT keep the teacher in the student's master precision);
its forward runs under the student's autocast (``Trainer._teacher_forward``).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from training.partitions import LocalPartitions

__all__ = ["EMATeacher", "teacher_autocast"]


def teacher_autocast(device: torch.device, bf16: bool):
    """The autocast the teacher's forward runs under: the student's precision (bf16 matmuls with the
    fp32 EMA weights cast per op), as the official SVT code runs teacher and student in one autocast
    region (kahnchana/svt train_ssl.py, train_one_epoch: ``with torch.cuda.amp.autocast(fp16_scaler is
    not None)`` around ``student(images)`` and ``teacher(images[:2])``; it uses fp16, bf16 here).
    Outside bf16 nothing changes: fp32 weights, fp32 inputs."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


class EMATeacher:
    """Holds the teacher module and updates it from the engine's student.

    Args:
        teacher: module whose parameter names all exist in the student; kept in fp32, no grads.
        engine: the DeepSpeed engine around the student (``engine.module``).
        zero_stage: the engine's ZeRO stage.
        bf16: whether the engine trains in bf16 (then fp32 masters are read from the optimizer).
    """

    def __init__(self, teacher: nn.Module, engine, *, zero_stage: int, bf16: bool) -> None:
        student_params = dict(engine.module.named_parameters())
        self.pairs: list[tuple[nn.Parameter, nn.Parameter]] = []
        for name, param in teacher.named_parameters():
            if name not in student_params:
                raise ValueError(f"EMATeacher: teacher parameter {name!r} has no student counterpart")
            param.requires_grad_(False)
            # A frozen student parameter (DINO's weight_g with norm_last_layer) never changes and the
            # teacher starts as a copy, so the EMA would leave it as it is; skipping it also avoids
            # reading a parameter that has no fp32 master in bf16.
            if student_params[name].requires_grad:
                self.pairs.append((param, student_params[name]))
        self.teacher = teacher
        self.zero_stage = zero_stage
        self.bf16 = bf16
        # collective at construction (every rank builds its teacher in the same order)
        self.partitions = (LocalPartitions(engine, [s for _, s in self.pairs]) if bf16 or zero_stage == 3
                           else None)

    @torch.no_grad()
    def update(self, momentum: float) -> None:
        """One EMA step from the student's fp32 values (collective under bf16 or ZeRO-3)."""
        if self.partitions is not None:
            students = self.partitions.gather_masters()
        else:
            students = [s.detach() for _, s in self.pairs]
        for (t, _), full in zip(self.pairs, students):
            t.mul_(momentum).add_(full.to(t.dtype).view_as(t), alpha=1.0 - momentum)

    def state_dict(self) -> dict:
        return self.teacher.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.teacher.load_state_dict(state, strict=True)
