"""Linear probe on frozen features (SVT Sec. 4.1: SGD, momentum 0.9, cosine lr, 20 epochs).

The classifier is one ``nn.Linear`` (DINO ``LinearClassifier`` init: weights N(0, 0.01), bias 0)
on features standardised with the training split's mean and std (what MAE's probe does with a
non-affine BatchNorm; it makes one learning rate fit backbones whose feature scales differ).
The lr follows a per-step cosine from ``lr * batch_size / 256`` to 0 (DINO's linear scaling rule).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from evaluation.results import topk_accuracy
from objectives.schedules import cosine_schedule
from common.seeding import derive_seed

__all__ = ["LinearProbeConfig", "train_linear_probe", "shuffled_label_control"]


@dataclass
class LinearProbeConfig:
    """Args:
        epochs: passes over the training features (SVT: 20).
        batch_size: features per SGD step.
        lr: learning rate at batch 256 (scaled linearly with ``batch_size``).
        momentum, weight_decay: SGD settings.
        standardize: subtract the training mean and divide by the training std first.
        seed: initialisation and shuffling seed.
    """

    epochs: int = 20
    batch_size: int = 256
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    standardize: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"linear.epochs and linear.batch_size must be >= 1, got {self.epochs}, {self.batch_size}")
        if self.lr <= 0 or not 0 <= self.momentum < 1 or self.weight_decay < 0:
            raise ValueError(f"linear: need lr > 0, 0 <= momentum < 1, weight_decay >= 0 "
                             f"(got {self.lr}, {self.momentum}, {self.weight_decay})")


def train_linear_probe(train_features: torch.Tensor, train_labels: torch.Tensor, val_features: torch.Tensor,
                       val_labels: torch.Tensor, cfg: LinearProbeConfig, num_classes: int | None = None) -> dict:
    """Train the probe; returns val ``top1`` / ``top5`` (percent), train top-1, final loss, and the head."""
    if train_features.shape[1] != val_features.shape[1]:
        raise ValueError(f"linear probe: train features are {train_features.shape[1]}-d, val {val_features.shape[1]}-d")
    if train_labels.min() < 0:
        raise ValueError("linear probe: training labels must be >= 0 (unlabelled data has -1)")
    if num_classes is None:
        num_classes = int(max(train_labels.max(), val_labels.max())) + 1
    generator = torch.Generator().manual_seed(cfg.seed)
    train_x, val_x = train_features.float(), val_features.float()
    if cfg.standardize:
        mean, std = train_x.mean(dim=0), train_x.std(dim=0, unbiased=False).clamp_min(1e-6)
        train_x, val_x = (train_x - mean) / std, (val_x - mean) / std

    head = nn.Linear(train_x.shape[1], num_classes)
    with torch.no_grad():
        head.weight.normal_(0.0, 0.01, generator=generator)
        head.bias.zero_()
    optimizer = torch.optim.SGD(head.parameters(), lr=0.0, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    steps_per_epoch = -(-train_x.shape[0] // cfg.batch_size)
    lr_schedule = cosine_schedule(cfg.lr * cfg.batch_size / 256, 0.0, cfg.epochs * steps_per_epoch)
    step, loss = 0, torch.tensor(float("nan"))
    for _ in range(cfg.epochs):
        order = torch.randperm(train_x.shape[0], generator=generator)
        for batch in torch.split(order, cfg.batch_size):
            for group in optimizer.param_groups:
                group["lr"] = float(lr_schedule[step])
            loss = F.cross_entropy(head(train_x[batch]), train_labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    with torch.no_grad():
        metrics = topk_accuracy(head(val_x), val_labels)
        train_top1 = topk_accuracy(head(train_x), train_labels, ks=(1,))["top1"]
    return {**metrics, "train_top1": train_top1, "final_loss": float(loss.detach()), "num_train": int(train_x.shape[0]),
            "num_val": int(val_x.shape[0]), "steps": step, "head": head}


def shuffled_label_control(train_features: torch.Tensor, train_labels: torch.Tensor, val_features: torch.Tensor,
                           val_labels: torch.Tensor, cfg: LinearProbeConfig, repeats: int,
                           num_classes: int | None = None) -> dict:
    """The same probe trained on randomly permuted training labels, ``repeats`` times (seeds
    ``derive_seed(cfg.seed, 1, r)``); its mean accuracy should sit at chance, else the protocol leaks labels."""
    if repeats < 1:
        raise ValueError(f"control repeats must be >= 1, got {repeats}")
    runs = []
    for r in range(repeats):
        seed = derive_seed(cfg.seed, 1, r)  # cfg.seed + 1 + r would be the real probe of seed cfg.seed + 1 + r
        permutation = torch.randperm(train_labels.shape[0], generator=torch.Generator().manual_seed(seed))
        probe_cfg = LinearProbeConfig(**{**cfg.__dict__, "seed": seed})
        runs.append(train_linear_probe(train_features, train_labels[permutation], val_features, val_labels,
                                       probe_cfg, num_classes))
    return {"top1": sum(r["top1"] for r in runs) / repeats, "top5": sum(r["top5"] for r in runs) / repeats,
            "repeats": repeats, "top1_runs": [r["top1"] for r in runs]}
