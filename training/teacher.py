"""EMA teacher (SVT) / momentum key encoder (MoCo v3, BYOL), kept outside the DeepSpeed engine.

The teacher's parameter names are a subset of the student's (the student may carry a predictor the
teacher lacks), and ``teacher = m * teacher + (1 - m) * student`` is applied name by name after each
real optimizer step. Where the student's fp32 values live depends on the engine:
- ZeRO 0-2, fp32: the module parameters are the full fp32 weights on every rank;
- bf16 (ZeRO 1-3): the module holds bf16 copies, so the fp32 master is assembled with
  ``safe_get_full_fp32_param`` (a collective: every rank calls it in the same order);
- ZeRO-3, fp32: parameters are partitioned; ``GatheredParameters`` materialises them for the update.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

__all__ = ["EMATeacher"]


class EMATeacher:
    """Holds the teacher module and updates it from the engine's student.

    Args:
        teacher: module whose parameter names all exist in the student; kept in fp32, no grads.
        student: the module inside the engine (``engine.module``).
        zero_stage: the engine's ZeRO stage.
        bf16: whether the engine trains in bf16 (then fp32 masters are read from the optimizer).
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, *, zero_stage: int, bf16: bool) -> None:
        student_params = dict(student.named_parameters())
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

    @torch.no_grad()
    def update(self, momentum: float) -> None:
        student_params = [s for _, s in self.pairs]
        if self.bf16:
            # local: importing deepspeed reads DS_ACCELERATOR, set by init_distributed first
            from deepspeed.utils import safe_get_full_fp32_param

            for t, s in self.pairs:
                full = safe_get_full_fp32_param(s)  # collective; None only without ZeRO (not allowed in bf16)
                t.mul_(momentum).add_(full.to(t.dtype).view_as(t), alpha=1.0 - momentum)
            return
        gather = contextlib.nullcontext()
        if self.zero_stage == 3:
            import deepspeed  # local: after init_distributed set DS_ACCELERATOR

            gather = deepspeed.zero.GatheredParameters(student_params, modifier_rank=None)
        with gather:
            for t, s in self.pairs:
                t.mul_(momentum).add_(s.detach().to(t.dtype).view_as(t), alpha=1.0 - momentum)

    def state_dict(self) -> dict:
        return self.teacher.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.teacher.load_state_dict(state, strict=True)
