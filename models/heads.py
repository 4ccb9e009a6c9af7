"""Projection heads for the SSL objectives: DINO (SVT), MoCo v3, BYOL and SimSiam (LSTCL).

Each head maps a backbone feature ``(B, in_dim)`` to the vectors its objective compares.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

__all__ = [
    "WeightNormLinear",
    "DINOHead",
    "MoCoProjector",
    "MoCoPredictor",
    "BYOLProjector",
    "BYOLPredictor",
    "SimSiamProjector",
    "SimSiamPredictor",
    "build_mlp",
]


class WeightNormLinear(nn.Module):
    """Bias-free linear layer ``W = g * v / ||v||`` (rows), with DINO's parameter names ``weight_g`` / ``weight_v``.

    Written out instead of ``torch.nn.utils.weight_norm`` (deprecated) or its parametrization
    (renames the parameters and is awkward under ZeRO partitioning): two plain parameters, so DINO
    checkpoints load and optimizers/engines see ordinary tensors.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))
        trunc_normal_(self.weight_v, std=0.02)

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class DINOHead(nn.Module):
    """DINO projection head: MLP -> L2-normalised bottleneck -> weight-normed last layer (DINO ``DINOHead``).

    Args:
        in_dim: backbone feature width.
        out_dim: prototypes (``K``; DINO/SVT default 65536).
        hidden_dim: MLP width.
        bottleneck_dim: width before the last layer.
        nlayers: MLP layers (>= 1).
        use_bn: BatchNorm after the hidden Linear layers.
        norm_last_layer: fix ``weight_g`` to 1 (not trained), as DINO's default for ViTs.
    """

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 nlayers: int = 3, use_bn: bool = False, norm_last_layer: bool = True) -> None:
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"DINOHead: nlayers must be >= 1, got {nlayers}")
        if nlayers == 1:
            self.mlp: nn.Module = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim)]
            for _ in range(nlayers - 2):
                layers += [nn.BatchNorm1d(hidden_dim) if use_bn else nn.Identity(), nn.GELU(),
                           nn.Linear(hidden_dim, hidden_dim)]
            layers += [nn.BatchNorm1d(hidden_dim) if use_bn else nn.Identity(), nn.GELU(),
                       nn.Linear(hidden_dim, bottleneck_dim)]
            self.mlp = nn.Sequential(*[layer for layer in layers if not isinstance(layer, nn.Identity)])
        self.mlp.apply(_init_linear)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        self.norm_last_layer = norm_last_layer
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        return self.last_layer(x)

    def last_layer_parameters(self) -> list[nn.Parameter]:
        """Parameters of the last layer that are trained (DINO freezes these during the first epoch)."""
        return [p for p in self.last_layer.parameters() if p.requires_grad]

    def cancel_last_layer_gradients(self) -> None:
        """Drop the last layer's gradients after backward (DINO ``cancel_gradients_last_layer``).

        Under an engine that owns gradients (DeepSpeed), give these parameters their own param group
        and set its lr to 0 for the frozen steps instead.
        """
        for p in self.last_layer.parameters():
            p.grad = None


def build_mlp(num_layers: int, input_dim: int, mlp_dim: int, output_dim: int, last_bn: bool = True,
              last_bn_affine: bool = False, hidden_bias: bool = False) -> nn.Sequential:
    """MoCo v3 ``_build_mlp``: (Linear, BN, ReLU) x (num_layers - 1), Linear, optional affine-free BN."""
    if num_layers < 1:
        raise ValueError(f"build_mlp: num_layers must be >= 1, got {num_layers}")
    layers: list[nn.Module] = []
    for layer in range(num_layers):
        dim_in = input_dim if layer == 0 else mlp_dim
        dim_out = output_dim if layer == num_layers - 1 else mlp_dim
        layers.append(nn.Linear(dim_in, dim_out, bias=hidden_bias))
        if layer < num_layers - 1:
            layers += [nn.BatchNorm1d(dim_out), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(dim_out, affine=last_bn_affine))
    return nn.Sequential(*layers)


class MoCoProjector(nn.Sequential):
    """MoCo v3 projector for ViTs: 3 layers, BN after each (last BN without affine), ReLU between.

    BN statistics are per process; wrap with ``nn.SyncBatchNorm.convert_sync_batchnorm`` for the
    global-batch BN that MoCo v3 uses.
    """

    def __init__(self, in_dim: int, mlp_dim: int = 4096, out_dim: int = 256, num_layers: int = 3) -> None:
        super().__init__(*build_mlp(num_layers, in_dim, mlp_dim, out_dim, last_bn=True))


class MoCoPredictor(nn.Sequential):
    """MoCo v3 predictor: 2 layers (Linear, BN, ReLU, Linear), no BN at the output."""

    def __init__(self, dim: int = 256, mlp_dim: int = 4096, num_layers: int = 2) -> None:
        super().__init__(*build_mlp(num_layers, dim, mlp_dim, dim, last_bn=False))


class BYOLProjector(nn.Sequential):
    """BYOL projector / predictor MLP: Linear(bias), BN, ReLU, Linear(bias)."""

    def __init__(self, in_dim: int, hidden_dim: int = 4096, out_dim: int = 256) -> None:
        super().__init__(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, out_dim))


class BYOLPredictor(BYOLProjector):
    """BYOL predictor: the same MLP shape as the projector, ``dim -> hidden -> dim``."""

    def __init__(self, dim: int = 256, hidden_dim: int = 4096) -> None:
        super().__init__(dim, hidden_dim, dim)


class SimSiamProjector(nn.Sequential):
    """SimSiam projector: 3 layers (Linear, BN, ReLU) x 2, Linear, BN without affine (SimSiam paper)."""

    def __init__(self, in_dim: int, dim: int = 2048) -> None:
        super().__init__(*build_mlp(3, in_dim, dim, dim, last_bn=True))


class SimSiamPredictor(nn.Sequential):
    """SimSiam predictor bottleneck: Linear, BN, ReLU, Linear(bias)."""

    def __init__(self, dim: int = 2048, pred_dim: int = 512) -> None:
        super().__init__(nn.Linear(dim, pred_dim, bias=False), nn.BatchNorm1d(pred_dim), nn.ReLU(inplace=True),
                         nn.Linear(pred_dim, dim))


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
