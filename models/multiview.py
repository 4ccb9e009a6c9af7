"""Multi-view runners: one backbone pass per group of equal-shape views, then the heads.

DINO's ``MultiCropWrapper`` groups *consecutive* crops of equal resolution; SVT's views differ in
T as well as H/W and repeat shapes out of order (local T = 2, 2, 4, 4, ...), so here views are grouped
by their full ``(C, T, H, W)`` shape wherever they sit in the list, and outputs are put back in view
order. ``MultiViewRunner`` (SVT) runs its head once on all views; ``ContrastiveEncoder`` (LSTCL) shares
the backbone grouping and runs its projector and predictor once per clip.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from models.layers import group_by

__all__ = ["MultiViewRunner", "ContrastiveEncoder", "group_views_by_shape"]


def group_views_by_shape(views: list[torch.Tensor]) -> list[list[int]]:
    """Indices of ``views`` grouped by per-sample shape ``(C, T, H, W)``, groups in first-appearance order."""
    for index, view in enumerate(views):
        if view.ndim != 5:
            raise ValueError(f"MultiViewRunner: view {index} must be (B, C, T, H, W), got {tuple(view.shape)}")
    return group_by(lambda i: tuple(views[i].shape[1:]), range(len(views)))


class MultiViewRunner(nn.Module):
    """Runs ``backbone.forward_features`` once per equal-shape group and ``head`` once on the concatenation.

    Args:
        backbone: module with ``forward_features((B, C, T, H, W)) -> (B, D)``.
        head: module applied to features ``(N, D)``; ``None`` gives ``nn.Identity``.
        packed: hand all groups to one ``backbone.forward_features([...])`` call (a backbone with
            ``packs_clips = True``: TimeSformer), so every matmul covers the tokens of all views
            (views of different T or size included); attention still runs per sequence length.

    Calling it with a list of view tensors returns a list of head outputs, one ``(B_i, K)`` per view,
    in the order of the input list. Note that a head with BatchNorm sees all views in one batch (as
    in DINO's wrapper), which differs from running the head per view in training mode
    (``ContrastiveEncoder`` does the latter).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module | None = None, packed: bool = False) -> None:
        super().__init__()
        if packed and not getattr(backbone, "packs_clips", False):
            raise ValueError(f"MultiViewRunner: packed=True needs a backbone whose forward_features takes a list "
                             f"of clips (packs_clips = True); {type(backbone).__name__} has none")
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
            group_features = self.backbone.forward_features(group_inputs)
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


class ContrastiveEncoder(MultiViewRunner):
    """Backbone + projector (+ predictor) on a list of clips; returns (predictions, projections).

    The backbone batches clips of equal shape (``MultiViewRunner``'s grouping; it has no batch
    statistics); the projector and the predictor see one clip at a time, so their BatchNorms never
    mix clips.

    Parameter names are ``backbone.*``, ``head.*`` (the projector) and ``predictor.*``, so exports
    and evaluation find the backbone under the same prefix as SVT's. The momentum encoder is the same
    class with ``predictor=None`` (an ``nn.Identity``): its names are a subset of the query encoder's
    and the EMA pairs them by name.
    """

    def __init__(self, backbone: nn.Module, projector: nn.Module, predictor: nn.Module | None = None) -> None:
        super().__init__(backbone, projector)
        self.predictor = predictor if predictor is not None else nn.Identity()

    def forward(self, views: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        features = self.forward_features(views)  # one backbone pass per equal-shape group
        # Heads run once per clip: their BatchNorms normalise the short and the long clip each over its
        # own batch, as MoCo v3 / BYOL / SimSiam forward each crop separately (a joint pass would mix
        # the two clips' statistics, and each clip's output would depend on the other clip).
        projections = [self.head(f) for f in features]
        predictions = [self.predictor(z) for z in projections]
        return predictions, projections
