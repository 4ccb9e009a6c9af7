"""Analytic forward FLOPs per sample, for model-FLOP-utilisation logging.

Convention (that of ``torch.utils.flop_counter.FlopCounterMode``, which the tests compare against):
2 FLOPs per multiply-add of the matmul-like ops (convolutions, Linear layers, attention QK^T and AV);
norms, softmax, activations and additions are not counted (a few percent of a ViT). A training
step costs about 3x the forward (forward + 2x for backward), plus the teacher's forward for SVT.
"""
from __future__ import annotations

from typing import Sequence

import torch.nn as nn

from models.heads import WeightNormLinear
from models.multiview import MultiViewRunner

__all__ = ["forward_flops", "head_flops", "views_flops"]


def head_flops(head: nn.Module) -> int:
    """FLOPs of an MLP head for one feature vector: every Linear applied once."""
    total = 0
    for module in head.modules():
        # Sizes from the module attributes, not parameter numel (ZeRO-3 empties partitioned tensors).
        if isinstance(module, (nn.Linear, WeightNormLinear)):
            total += 2 * module.in_features * module.out_features
    return total


def forward_flops(model: nn.Module, shape: Sequence[int]) -> int:
    """Forward FLOPs of ``model`` for one sample of ``shape``.

    ``shape`` is ``(C, T, H, W)`` for a backbone (any model with ``flops(shape)``) or a
    ``MultiViewRunner`` (backbone + head), and ``(D,)`` for a head.
    """
    shape = tuple(int(s) for s in shape)
    if isinstance(model, MultiViewRunner):
        return forward_flops(model.backbone, shape) + head_flops(model.head)
    if len(shape) == 4 and hasattr(model, "flops"):
        return int(model.flops(shape))
    if len(shape) == 1:
        return head_flops(model)
    raise ValueError(f"forward_flops: no FLOP formula for {type(model).__name__} with input shape {shape}")


def views_flops(backbone: nn.Module, head: nn.Module | None, view_shapes: Sequence[Sequence[int]]) -> int:
    """Forward FLOPs of one sample through every view (e.g. SVT's 2 global + 8 local), head included."""
    per_head = head_flops(head) if head is not None else 0
    return sum(forward_flops(backbone, shape) + per_head for shape in view_shapes)
