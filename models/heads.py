"""Projection heads for the SSL objectives: DINO (SVT), MoCo v3, BYOL and SimSiam (LSTCL).

Each head maps a backbone feature ``(B, in_dim)`` to the vectors its objective compares.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

from models.layers import init_vit_weights

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
    "SyncBatchNorm",
    "convert_sync_batchnorm",
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
        init_vit_weights(self.mlp)  # DINO's _init_weights: trunc-normal(0.02) Linear weights, zero biases
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

        Under an engine that owns gradients (DeepSpeed) this cannot work at ZeRO 1-3;
        ``training.engine.LastLayerFreezer`` freezes them there and leaves AdamW's state as this would.
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
    """MoCo v3 projector for ViTs (``MoCo_ViT``): 3 layers, BN after each (last BN without affine), ReLU between.

    BN statistics are per process until ``convert_sync_batchnorm`` (done by ``training.engine.build_engine``
    when the world size is above 1) makes them global, as MoCo v3 trains.
    """

    def __init__(self, in_dim: int, mlp_dim: int = 4096, out_dim: int = 256, num_layers: int = 3) -> None:
        super().__init__(*build_mlp(num_layers, in_dim, mlp_dim, out_dim, last_bn=True))


class MoCoPredictor(nn.Sequential):
    """MoCo v3 predictor: 2 layers (Linear, BN, ReLU, Linear, BN without affine).

    facebookresearch/moco-v3 ``moco/builder.py``: ``MoCo_ViT`` builds ``_build_mlp(2, dim, mlp_dim, dim)``
    (``last_bn=True``: the predictor ends in an affine-free BN, as the projector); only ``MoCo_ResNet``
    passes ``last_bn=False``. ``last_bn=False`` gives the ResNet variant.
    """

    def __init__(self, dim: int = 256, mlp_dim: int = 4096, num_layers: int = 2, last_bn: bool = True) -> None:
        super().__init__(*build_mlp(num_layers, dim, mlp_dim, dim, last_bn=last_bn))


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


class SyncBatchNorm(nn.SyncBatchNorm):
    """``nn.SyncBatchNorm`` whose batch statistics are global on every device, CPU (gloo) included.

    torch's SyncBatchNorm raises on CPU tensors ("expected input tensor to be on GPU", torch 2.14),
    so on CPU the statistics come from differentiable all-reduces instead: the global mean, then the
    global biased variance ``sum((x - mean)^2) / N`` (two passes: no ``E[x^2] - E[x]^2`` cancellation),
    computed in fp32 (or the input's wider type). Gradients flow through the all-reduces (``torch.distributed.nn``), so each rank's
    input gradient includes every rank's loss, as torch's GPU kernel does. Running statistics use the
    unbiased global variance, as ``F.batch_norm``. On GPUs, or outside training / a process group,
    torch's own path runs. Parameter and buffer names are BatchNorm's, so checkpoints do not change.

    With repeated sampling (``data.repeats: R > 1``) the statistics are over the whole batch, the R
    view-sets of each video included: a batch of G view-sets holds G / R videos, and the copies count
    as rows like any other (no de-duplication; the statistics are of what the head sees).
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and input.device.type == "cpu" and dist.is_available() and dist.is_initialized()
                and dist.get_world_size(self.process_group or dist.group.WORLD) > 1):
            return super().forward(input)
        self._check_input_dim(input)
        group = self.process_group or dist.group.WORLD
        dims = [d for d in range(input.dim()) if d != 1]
        shape = [1, -1] + [1] * (input.dim() - 2)
        x = input.to(torch.promote_types(input.dtype, torch.float32))
        count = torch.tensor([float(input.numel() // input.shape[1])], dtype=x.dtype)
        stats = dist_fn.all_reduce(torch.cat([x.sum(dim=dims), count]), group=group)
        total = stats[-1]
        mean = stats[:-1] / total
        centred = x - mean.view(shape)
        var = dist_fn.all_reduce(centred.pow(2).sum(dim=dims), group=group) / total
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.to(x.dtype).view(shape) + self.bias.to(x.dtype).view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = (1.0 / float(self.num_batches_tracked)) if self.momentum is None else self.momentum
                unbiased = var.detach() * (total / (total - 1).clamp_min(1.0))
                self.running_mean.mul_(1 - factor).add_(mean.detach().to(self.running_mean.dtype), alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)
        return y.to(input.dtype)


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Every BatchNorm in ``module`` becomes ``SyncBatchNorm`` (same parameters and buffers, same objects).

    ``nn.SyncBatchNorm.convert_sync_batchnorm`` with this module's CPU-capable class (torch's method
    always builds ``nn.SyncBatchNorm``). Returns the converted module (the input itself unless it is a
    BatchNorm); submodules are replaced in place.
    """
    output = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, SyncBatchNorm):
        output = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats, process_group)
        if module.affine:
            with torch.no_grad():
                output.weight = module.weight
                output.bias = module.bias
        output.running_mean = module.running_mean
        output.running_var = module.running_var
        output.num_batches_tracked = module.num_batches_tracked
        output.training = module.training
    for name, child in module.named_children():
        output.add_module(name, convert_sync_batchnorm(child, process_group))
    return output
