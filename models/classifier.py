"""The video classifier of the fine-tuning and linear-probe protocols: a backbone and a linear head on its
CLS feature, on one clip or on a slow-fast pair (SVT Fig. 3)."""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["VideoClassifier"]


class VideoClassifier(nn.Module):
    """``backbone`` + a linear ``head`` on its CLS feature (an SSL head is not carried over).

    ``forward([slow])`` classifies ``CLS(slow)``, ``forward([slow, fast])`` ``CLS(slow) + CLS(fast)``
    (SVT slow-fast, Fig. 3: one sum, no extra parameters). With ``freeze_backbone`` the backbone stays
    in eval mode and runs without gradients (linear probe).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, *, head_init_std: float = 0.02,
                 freeze_backbone: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.freeze_backbone = freeze_backbone
        self.head = nn.Linear(backbone.embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=head_init_std)
        nn.init.zeros_(self.head.bias)
        if freeze_backbone:
            self.backbone.requires_grad_(False)
            self.backbone.eval()

    def train(self, mode: bool = True) -> "VideoClassifier":
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()  # frozen features: no dropout / drop-path, as DINO's eval_linear
        return self

    def features(self, clip: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_backbone):
            return self.backbone.forward_features(clip)

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        return self.head(sum(self.features(v) for v in views))
