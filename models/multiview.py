"""Multi-view runner: one backbone pass per group of equal-shape views, one head pass on all of them.

DINO's ``MultiCropWrapper`` groups *consecutive* crops of equal resolution; SVT's views differ in
T as well as H/W and repeat shapes out of order (local T = 2, 2, 4, 4, ...), so here views are grouped
by their full ``(C, T, H, W)`` shape wherever they sit in the list, and outputs are put back in view
order.
"""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["MultiViewRunner", "group_views_by_shape"]


def group_views_by_shape(views: list[torch.Tensor]) -> list[list[int]]:
    """Indices of ``views`` grouped by per-sample shape ``(C, T, H, W)``, groups in first-appearance order."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, view in enumerate(views):
        if view.ndim != 5:
            raise ValueError(f"MultiViewRunner: view {index} must be (B, C, T, H, W), got {tuple(view.shape)}")
        groups.setdefault(tuple(view.shape[1:]), []).append(index)
    return list(groups.values())


class MultiViewRunner(nn.Module):
    """Runs ``backbone.forward_features`` once per equal-shape group and ``head`` once on the concatenation.

    Args:
        backbone: module with ``forward_features((B, C, T, H, W)) -> (B, D)``.
        head: module applied to features ``(N, D)``; ``None`` gives ``nn.Identity``.
        packed: run all groups in one ``backbone.forward_features_multi`` call (TimeSformer), so
            every matmul covers the tokens of all views (views of different T or size included);
            attention still runs per sequence length.

    Calling it with a list of view tensors returns a list of head outputs, one ``(B_i, K)`` per view,
    in the order of the input list. Note that a head with BatchNorm sees all views in one batch (as
    in DINO's wrapper), which differs from running the head per view in training mode.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module | None = None, packed: bool = False) -> None:
        super().__init__()
        if packed and not hasattr(backbone, "forward_features_multi"):
            raise ValueError(f"MultiViewRunner: packed=True needs a backbone with forward_features_multi; "
                             f"{type(backbone).__name__} has none")
        self.backbone = backbone
        self.head = head if head is not None else nn.Identity()
        self.packed = packed

    def forward_features(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """Backbone features, one ``(B_i, D)`` per view, in view order."""
        if len(views) == 0:
            raise ValueError("MultiViewRunner: got an empty list of views")
        features: list[torch.Tensor | None] = [None] * len(views)
        groups = group_views_by_shape(views)
        group_inputs = [views[g[0]] if len(g) == 1 else torch.cat([views[i] for i in g], dim=0) for g in groups]
        if self.packed:
            group_features = self.backbone.forward_features_multi(group_inputs)
        else:
            group_features = [self.backbone.forward_features(x) for x in group_inputs]
        for group, output in zip(groups, group_features):
            for index, feature in zip(group, torch.split(output, [views[i].shape[0] for i in group], dim=0)):
                features[index] = feature
        return features  # type: ignore[return-value]

    def forward(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        features = self.forward_features(views)
        outputs = self.head(torch.cat(features, dim=0))
        return list(torch.split(outputs, [f.shape[0] for f in features], dim=0))
