"""Forward FLOPs per sample, for model-FLOP-utilisation logging: ``FlopCounterMode`` on the meta device.

The model's structure is copied with every parameter and buffer on the meta device (no data, no
hooks), one meta sample goes through it under ``torch.utils.flop_counter.FlopCounterMode``, and the
counter's total is the count: 2 FLOPs per multiply-add of the matmul-like ops (convolutions, Linear
layers, attention QK^T and AV); norms, softmax, activations and additions are not counted (a few
percent of a ViT). Nothing is computed, so a ViT-B at 16x224 counts in milliseconds, and any
backbone or head is counted without a formula of its own.

On the meta device ``F.scaled_dot_product_attention`` runs as its math decomposition (two ``bmm``),
which the counter sees; on a CPU the fused kernel is invisible to it (the tests force the math
backend there to compare). A training step costs about 3x the forward (forward + 2x for backward),
plus the teacher's forward for SVT.
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from models.multiview import MultiViewRunner

__all__ = ["forward_flops", "head_flops", "views_flops", "meta_copy"]


def _meta_tensor(tensor: torch.Tensor, memo: dict[int, torch.Tensor]) -> torch.Tensor:
    if id(tensor) not in memo:
        # ZeRO-3 empties partitioned parameters and keeps their full shape in ds_shape.
        shape = tuple(getattr(tensor, "ds_shape", tensor.shape))
        meta = torch.empty(shape, dtype=tensor.dtype, device="meta")
        memo[id(tensor)] = nn.Parameter(meta, requires_grad=False) if isinstance(tensor, nn.Parameter) else meta
    return memo[id(tensor)]


def meta_copy(module: nn.Module, memo: dict[int, object] | None = None) -> nn.Module:
    """A copy of ``module``'s structure with its parameters and buffers on the meta device, without hooks.

    Plain attributes are shared (shallow copy); submodules are copied the same way; forward / backward /
    state-dict hooks are dropped (an engine's hooks, e.g. ZeRO-3's parameter gathering, must not run).
    """
    memo = {} if memo is None else memo
    if id(module) in memo:
        return memo[id(module)]  # type: ignore[return-value]
    twin = copy.copy(module)
    memo[id(module)] = twin
    state = twin.__dict__
    for name, value in list(state.items()):
        if "hooks" in name and isinstance(value, dict):
            state[name] = type(value)()
    state["_parameters"] = {k: None if p is None else _meta_tensor(p, memo) for k, p in module._parameters.items()}
    state["_buffers"] = {k: None if b is None else _meta_tensor(b, memo) for k, b in module._buffers.items()}
    state["_modules"] = {k: None if m is None else meta_copy(m, memo) for k, m in module._modules.items()}
    return twin


def _input_dtype(module: nn.Module) -> torch.dtype:
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


def _count(module: nn.Module, shape: tuple[int, ...], call: str) -> int:
    twin = meta_copy(module).eval()  # eval: batch-1 BatchNorm works, dropout / drop path are not matmuls
    x = torch.empty(1, *shape, dtype=_input_dtype(module), device="meta")
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            if call == "runner":
                twin([x])
            elif call == "features":
                twin.forward_features(x)
            else:
                twin(x)
    except Exception as error:  # an op without a meta kernel, a shape the model rejects: one line
        raise ValueError(f"forward_flops: {type(module).__name__} does not run on the meta device with input "
                         f"{(1, *shape)} ({type(error).__name__}: {error})") from error
    return int(counter.get_total_flops())


def head_flops(head: nn.Module) -> int:
    """FLOPs of a head for one feature vector (input width from its first Linear; 0 for a head without one)."""
    in_features = next((m.in_features for m in head.modules() if isinstance(getattr(m, "in_features", None), int)),
                       None)
    return 0 if in_features is None else _count(head, (in_features,), "module")


def forward_flops(model: nn.Module, shape: Sequence[int]) -> int:
    """Forward FLOPs of ``model`` for one sample of ``shape``.

    ``shape`` is ``(C, T, H, W)`` for a backbone (its ``forward_features``: the classifier head is not
    counted) or a ``MultiViewRunner`` (backbone + head), and ``(D,)`` for a head.
    """
    shape = tuple(int(s) for s in shape)
    if isinstance(model, MultiViewRunner):
        return _count(model, shape, "runner")
    if len(shape) == 4 and hasattr(model, "forward_features"):
        return _count(model, shape, "features")
    if len(shape) == 1:
        return _count(model, shape, "module")
    raise ValueError(f"forward_flops: {type(model).__name__} with input shape {shape} is neither a backbone "
                     f"(C, T, H, W) with forward_features, a MultiViewRunner, nor a head (D,)")


def views_flops(backbone: nn.Module, head: nn.Module | None, view_shapes: Sequence[Sequence[int]]) -> int:
    """Forward FLOPs of one sample through every view (e.g. SVT's 2 global + 8 local), head included."""
    per_head = head_flops(head) if head is not None else 0
    per_shape: dict[tuple[int, ...], int] = {}
    for shape in map(tuple, view_shapes):
        if shape not in per_shape:
            per_shape[shape] = forward_flops(backbone, shape)
    return sum(per_shape[tuple(shape)] + per_head for shape in view_shapes)
