"""SVT objective (Ranasinghe et al., CVPR 2022): DINO-style self-distillation across spatio-temporal views.

For each (student view, teacher view) pair of the pair set: cross-entropy between the teacher's
sharpened, centred softmax ``softmax((t - center) / temp_t)`` and the student's
``log_softmax(s / temp_s)``, averaged over samples and pairs. The center is an EMA of the mean
teacher output, all-reduced across ranks when ``torch.distributed`` is initialised. The teacher
temperature is passed per step (from ``cosine_schedule``, warmup then constant).

Repeated sampling (``data.repeats: R > 1``): SVT (like DINO) has no negatives -- every term pairs views
of one sample -- so the R view-sets of one video need no mask. They do enter the center's batch mean
as R rows, as R distinct videos would.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["SVTLoss", "PAIR_SETS", "view_pairs"]

# Pair sets by name: which (student kind -> teacher kind) correspondences are trained; a view is
# never paired with itself. "paper" is appendix A / the official code: student global i vs teacher
# global j != i, and every local vs both teacher globals. The others are the view-correspondence
# ablations (SVT Table 4); those with a "local" teacher need the teacher to see the local views too.
PAIR_SETS: dict[str, tuple[tuple[str, str], ...]] = {
    "paper": (("global", "global"), ("local", "global")),
    "local_to_global": (("local", "global"),),
    "global_to_global": (("global", "global"),),
    "local_to_local": (("local", "local"),),
    "global_to_local": (("global", "local"),),
    "all": (("global", "global"), ("local", "global"), ("global", "local"), ("local", "local")),
}


def _kind(index: int, num_global: int) -> str:
    return "global" if index < num_global else "local"


def view_pairs(pair_set: str, num_global: int, num_local: int) -> list[tuple[int, int]]:
    """``(student_view, teacher_view)`` index pairs; views are ordered globals first, then locals."""
    if pair_set not in PAIR_SETS:
        raise ValueError(f"SVTLoss: unknown pair set {pair_set!r}; choose one of {sorted(PAIR_SETS)}")
    wanted = set(PAIR_SETS[pair_set])
    num_views = num_global + num_local
    return [(s, t) for t in range(num_views) for s in range(num_views)
            if s != t and (_kind(s, num_global), _kind(t, num_global)) in wanted]


def teacher_needs_locals(pair_set: str) -> bool:
    """Whether the pair set has local teacher views (the teacher must then run on the locals too)."""
    return any(teacher == "local" for _, teacher in PAIR_SETS[pair_set])


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # bf16/fp16 logits over 65536 prototypes lose too much in softmax; float64 stays float64 (tests).
    return torch.promote_types(x.dtype, torch.float32)


class SVTLoss(nn.Module):
    """DINO loss over SVT's global/local spatio-temporal views.

    Args:
        out_dim: head output size ``K``.
        num_global: global views (first in the student list).
        num_local: local views (after the globals).
        student_temp: student softmax temperature (0.1).
        center_momentum: EMA momentum of the center (0.9).
        pair_set: a key of ``PAIR_SETS`` ("paper" by default).

    ``forward(student_out, teacher_out, teacher_temp)``: ``student_out`` is a list of
    ``num_global + num_local`` tensors ``(B, K)`` in view order; ``teacher_out`` a list of the teacher's
    outputs for the global views (or for all views when the pair set has local teachers). Returns a
    dict: ``loss`` (differentiable), ``teacher_entropy`` (mean entropy of the teacher distributions,
    nats) and ``kl`` (mean KL(teacher || student) over the pairs) for collapse monitoring. The center
    is updated after the loss is computed (DINO order).
    """

    def __init__(self, out_dim: int, num_global: int = 2, num_local: int = 8, student_temp: float = 0.1,
                 center_momentum: float = 0.9, pair_set: str = "paper") -> None:
        super().__init__()
        if num_global < 1 or num_local < 0:
            raise ValueError(f"SVTLoss: need num_global >= 1 and num_local >= 0, got {num_global}, {num_local}")
        if not 0.0 <= center_momentum <= 1.0:
            raise ValueError(f"SVTLoss: center_momentum must be in [0, 1], got {center_momentum}")
        self.num_global = num_global
        self.num_local = num_local
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.pair_set = pair_set
        self.pairs = view_pairs(pair_set, num_global, num_local)
        if not self.pairs:
            raise ValueError(f"SVTLoss: pair set {pair_set!r} gives no pairs with {num_global} global and "
                             f"{num_local} local views")
        self.teacher_needs_locals = teacher_needs_locals(pair_set)
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_out: list[torch.Tensor], teacher_out: list[torch.Tensor],
                teacher_temp: float) -> dict[str, torch.Tensor]:
        num_views = self.num_global + self.num_local
        if len(student_out) != num_views:
            raise ValueError(f"SVTLoss: expected {num_views} student views, got {len(student_out)}")
        expected_teacher = num_views if self.teacher_needs_locals else self.num_global
        if len(teacher_out) < expected_teacher:
            raise ValueError(f"SVTLoss: pair set {self.pair_set!r} needs {expected_teacher} teacher views, "
                             f"got {len(teacher_out)}")
        dtype = _compute_dtype(student_out[0])
        center = self.center.to(dtype)
        teacher_probs = [F.softmax((t.detach().to(dtype) - center) / teacher_temp, dim=-1) for t in teacher_out]
        teacher_log_probs = [torch.log(p.clamp_min(torch.finfo(dtype).tiny)) for p in teacher_probs]
        teacher_entropies = [-(p * lp).sum(dim=-1).mean() for p, lp in zip(teacher_probs, teacher_log_probs)]
        student_log_probs = [F.log_softmax(s.to(dtype) / self.student_temp, dim=-1) for s in student_out]

        total = student_out[0].new_zeros((), dtype=dtype)
        kl = torch.zeros((), dtype=dtype, device=total.device)
        for s, t in self.pairs:
            cross_entropy = -(teacher_probs[t] * student_log_probs[s]).sum(dim=-1).mean()
            total = total + cross_entropy
            kl = kl + cross_entropy.detach() - teacher_entropies[t].detach()
        loss = total / len(self.pairs)
        used_teachers = sorted({t for _, t in self.pairs})
        metrics = {
            "loss": loss,
            "teacher_entropy": torch.stack([teacher_entropies[t] for t in used_teachers]).mean().detach(),
            "kl": kl / len(self.pairs),
        }
        self.update_center(teacher_out[:expected_teacher])
        return metrics

    @torch.no_grad()
    def update_center(self, teacher_out: list[torch.Tensor]) -> None:
        """EMA of the mean teacher output over all teacher views and samples of all ranks."""
        batch_sum = torch.stack([t.detach().float().sum(dim=0) for t in teacher_out]).sum(dim=0, keepdim=True)
        count = torch.tensor([float(sum(t.shape[0] for t in teacher_out))], device=batch_sum.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_sum)
            dist.all_reduce(count)
        batch_center = batch_sum / count
        self.center.mul_(self.center_momentum).add_(batch_center.to(self.center.dtype), alpha=1 - self.center_momentum)
