"""SSL methods: which module is the student (in the engine), which the EMA teacher, and the loss.

``SSLMethod`` is what the trainer needs; ``build_method(cfg, view_names)`` makes the recipes'
methods from models/ and objectives/:
- SVT: student = MultiViewRunner(backbone, DINOHead) on all views; teacher (same structure, EMA)
  on the global views; ``objectives.SVTLoss`` (centering + sharpening, center in a buffer).
- MoCo v3 / BYOL: query encoder = backbone + projector + predictor on both clips; momentum key
  encoder = backbone + projector (EMA); symmetric loss.
- SimSiam: one encoder, no teacher; the stop-gradient branch is the student's own projection.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from training.config import Config

__all__ = ["SSLMethod", "SVTMethod", "ContrastiveEncoder", "TwoViewMethod", "build_method"]


class SSLMethod:
    """The trainer's view of a method.

    Attributes:
        student: module wrapped by the DeepSpeed engine; called with a list of view tensors.
        teacher: EMA module (parameter names a subset of the student's) or None.
        objective: loss module; its buffers (e.g. SVT's center) are checkpointed.
        student_views / teacher_views: view names fed to each.
        backbone_prefix: prefix of the backbone's parameters in student/teacher state dicts.
    """

    student: nn.Module
    teacher: nn.Module | None
    objective: nn.Module
    student_views: list[str]
    teacher_views: list[str]
    backbone_prefix: str = "backbone."

    def to(self, device: torch.device) -> "SSLMethod":
        self.student.to(device)
        if self.teacher is not None:
            self.teacher.to(device)
        self.objective.to(device)
        return self

    def split_views(self, batch: dict, device: torch.device, bf16: bool) -> tuple[list, list]:
        dtype = torch.bfloat16 if bf16 else torch.float32
        tensors = {name: batch[name].to(device=device, dtype=dtype, non_blocking=True)
                   for name in dict.fromkeys(self.student_views + self.teacher_views)}
        return [tensors[n] for n in self.student_views], [tensors[n] for n in self.teacher_views]

    def loss(self, student_out, teacher_out, *, teacher_temp: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def throughput_counts(self, batch: dict) -> tuple[float, float, float]:
        """(views, backbone tokens, training FLOPs) per sample, for the throughput metrics."""
        return float(len(self.student_views)), 0.0, 0.0


def _throughput_counts(runner: nn.Module, backbone: nn.Module, shapes: list[tuple[int, ...]],
                       teacher_shapes: list[tuple[int, ...]]) -> tuple[float, float, float]:
    """(views, tokens, training FLOPs) per sample: 3x forward for the student (fwd + bwd), 1x for the teacher.

    ``runner`` should be an unpartitioned module (the teacher where there is one: ZeRO-3 empties the
    student's parameter tensors, and the head FLOPs are read from their sizes).
    """
    patch = getattr(backbone, "patch_size", 16)
    patch = patch[-1] if isinstance(patch, (tuple, list)) else patch
    tubelet = getattr(backbone, "tubelet_size", 1)
    tubelet = tubelet[0] if isinstance(tubelet, (tuple, list)) else tubelet
    tokens = sum(math.ceil(t / tubelet) * (h // patch) * (w // patch) for _, t, h, w in shapes)
    try:
        from models.flops import forward_flops

        cache: dict[tuple[int, ...], int] = {}
        flops = 0.0
        for shape, factor in [(s, 3.0) for s in shapes] + [(s, 1.0) for s in teacher_shapes]:
            if shape not in cache:
                cache[shape] = forward_flops(runner, shape)
            flops += factor * cache[shape]
    except (ImportError, ValueError):  # a model without a FLOP formula: MFU is not reported
        flops = 0.0
    return float(len(shapes)), float(tokens), flops


class SVTMethod(SSLMethod):
    """SVT: student on all views, teacher on the global views, SVT (DINO) loss with collapse monitors."""

    def __init__(self, student: nn.Module, teacher: nn.Module, objective: nn.Module, view_names: list[str],
                 global_views: list[str]) -> None:
        self.student, self.teacher, self.objective = student, teacher, objective
        self.student_views = list(view_names)
        self.teacher_views = list(global_views)
        self.backbone_prefix = "backbone."
        self._counts: tuple[float, float, float] | None = None

    def loss(self, student_out, teacher_out, *, teacher_temp: float):
        center = getattr(self.objective, "center", None)
        with torch.no_grad():  # collapse monitors, before the loss updates the center
            teacher_logits = torch.cat([t.float() for t in teacher_out])
            centered = teacher_logits - center if center is not None else teacher_logits
            teacher_probs = torch.softmax(centered / teacher_temp, dim=-1)
            entropy = -(teacher_probs * torch.log(teacher_probs.clamp_min(1e-12))).sum(-1).mean()
            student_temp = getattr(self.objective, "student_temp", 0.1)
            student_logp = torch.log_softmax(torch.cat([s.float() for s in student_out[: len(teacher_out)]])
                                             / student_temp, dim=-1)
            kl = (teacher_probs * (torch.log(teacher_probs.clamp_min(1e-12)) - student_logp)).sum(-1).mean()
        loss = self.objective(student_out, teacher_out, teacher_temp=teacher_temp)
        return loss, {"teacher_entropy": entropy, "student_teacher_kl": kl}

    def _flops_module(self) -> nn.Module:
        return self.teacher

    def throughput_counts(self, batch: dict) -> tuple[float, float, float]:
        if self._counts is None:
            shapes = [tuple(batch[n].shape[1:]) for n in self.student_views]
            teacher_shapes = [tuple(batch[n].shape[1:]) for n in self.teacher_views]
            self._counts = _throughput_counts(self._flops_module(), self.student.backbone, shapes, teacher_shapes)
        return self._counts


class ContrastiveEncoder(nn.Module):
    """Backbone + projector (+ predictor) on a list of clips; returns (predictions, projections).

    The momentum encoder is the same class with ``predictor=None`` (an ``nn.Identity``), so its
    parameter names are a subset of the query encoder's and the EMA pairs them by name.
    """

    def __init__(self, backbone: nn.Module, projector: nn.Module, predictor: nn.Module | None = None) -> None:
        super().__init__()
        from models.multiview import MultiViewRunner

        self.runner = MultiViewRunner(backbone, projector)
        self.predictor = predictor if predictor is not None else nn.Identity()

    @property
    def backbone(self) -> nn.Module:
        return self.runner.backbone

    def forward(self, views: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        projections = self.runner(views)
        # one predictor pass on all clips (BatchNorm sees the same batch as the projector)
        predictions = self.predictor(torch.cat(projections, dim=0))
        return list(torch.split(predictions, [p.shape[0] for p in projections], dim=0)), projections


class TwoViewMethod(SSLMethod):
    """LSTCL with MoCo v3 / BYOL (momentum teacher) or SimSiam (no teacher), symmetric over two clips."""

    def __init__(self, kind: str, student: ContrastiveEncoder, teacher: ContrastiveEncoder | None,
                 objective: nn.Module, view_names: list[str]) -> None:
        if len(view_names) != 2:
            raise ValueError(f"TwoViewMethod: expected two clips (short, long), got views {view_names}")
        self.kind = kind
        self.student, self.teacher, self.objective = student, teacher, objective
        self.student_views = list(view_names)
        self.teacher_views = list(view_names) if teacher is not None else []
        self.backbone_prefix = "runner.backbone."
        self._counts: tuple[float, float, float] | None = None

    def loss(self, student_out, teacher_out, *, teacher_temp: float):
        (p1, p2), (z1, z2) = student_out
        if self.kind == "simsiam":
            return self.objective(p1, p2, z1.detach(), z2.detach()), {}
        _, (k1, k2) = teacher_out
        return self.objective(p1, p2, k1.float(), k2.float()), {}

    def _flops_module(self) -> nn.Module:
        return (self.teacher or self.student).runner

    def throughput_counts(self, batch: dict) -> tuple[float, float, float]:
        if self._counts is None:
            shapes = [tuple(batch[n].shape[1:]) for n in self.student_views]
            teacher_shapes = [tuple(batch[n].shape[1:]) for n in self.teacher_views]
            self._counts = _throughput_counts(self._flops_module(), self.student.backbone, shapes, teacher_shapes)
        return self._counts


def build_method(cfg: Config, view_names: list[str]) -> SSLMethod:
    """The recipe's method from models/ and objectives/ (call under the same seed on every rank)."""
    raise NotImplementedError  # filled in below once models/objectives signatures are fixed
