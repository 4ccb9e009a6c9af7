"""Weighted k-nearest-neighbour classifier on frozen features (DINO / SVT ``eval_knn``).

Features are L2-normalised, so the similarity is the cosine. Each of the ``k`` nearest training
samples votes for its label with weight ``exp(cosine / temperature)``; classes are ranked by their
summed votes. Top-1 / top-5 are percentages over the test set.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from evaluation.results import topk_accuracy
from common.seeding import derive_seed

__all__ = ["KNNConfig", "knn_predict_scores", "knn_classify", "knn_shuffled_label_control"]


@dataclass
class KNNConfig:
    """Args:
        ks: neighbour counts evaluated (SVT reports 20; DINO also 10, 100, 200).
        temperature: vote sharpness (DINO / SVT: 0.07).
        chunk_size: test samples per similarity matmul (bounds memory at ``chunk_size x N_train``).
    """

    ks: tuple[int, ...] = (20, 5)
    temperature: float = 0.07
    chunk_size: int = 1024

    def __post_init__(self) -> None:
        if not self.ks or any(k < 1 for k in self.ks):
            raise ValueError(f"knn.ks must be positive neighbour counts, got {self.ks}")
        if self.temperature <= 0:
            raise ValueError(f"knn.temperature must be > 0, got {self.temperature}")
        if self.chunk_size < 1:
            raise ValueError(f"knn.chunk_size must be >= 1, got {self.chunk_size}")


@torch.no_grad()
def knn_predict_scores(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                       *, k: int, temperature: float, num_classes: int, chunk_size: int = 1024) -> torch.Tensor:
    """Summed neighbour votes ``(N_test, num_classes)``; ``k`` is capped at the training-set size."""
    if train_features.ndim != 2 or test_features.ndim != 2 or train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"knn: features must be (N, D) with equal D, got {tuple(train_features.shape)} "
                         f"and {tuple(test_features.shape)}")
    if train_labels.shape != (train_features.shape[0],):
        raise ValueError(f"knn: {train_features.shape[0]} training features but labels of shape "
                         f"{tuple(train_labels.shape)}")
    if train_labels.min() < 0 or train_labels.max() >= num_classes:
        raise ValueError(f"knn: training labels must lie in [0, {num_classes}), got "
                         f"[{int(train_labels.min())}, {int(train_labels.max())}] (unlabelled data has -1)")
    k = min(k, train_features.shape[0])
    train_t = F.normalize(train_features.float(), dim=1).t()
    test_n = F.normalize(test_features.float(), dim=1)
    scores = []
    for chunk in torch.split(test_n, chunk_size):
        similarity, neighbours = (chunk @ train_t).topk(k, dim=1, largest=True, sorted=True)
        neighbour_labels = train_labels[neighbours]                                  # (n, k)
        votes = torch.zeros(chunk.shape[0], num_classes, dtype=torch.float32)
        votes.scatter_add_(1, neighbour_labels, (similarity / temperature).exp())
        scores.append(votes)
    return torch.cat(scores)


def knn_classify(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, cfg: KNNConfig, num_classes: int | None = None) -> dict[str, dict]:
    """kNN top-1 / top-5 (percent) per ``k`` of ``cfg.ks``: ``{"k20": {"top1": .., "top5": ..}, ...}``."""
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    results = {}
    for k in cfg.ks:
        scores = knn_predict_scores(train_features, train_labels, test_features, k=k,
                                    temperature=cfg.temperature, num_classes=num_classes,
                                    chunk_size=cfg.chunk_size)
        results[f"k{k}"] = {**topk_accuracy(scores, test_labels), "k_used": min(k, train_features.shape[0])}
    return results


def knn_shuffled_label_control(train_features: torch.Tensor, train_labels: torch.Tensor,
                               test_features: torch.Tensor, test_labels: torch.Tensor, cfg: KNNConfig,
                               repeats: int, seed: int = 1, num_classes: int | None = None) -> dict[str, dict] | None:
    """kNN with randomly permuted training labels, ``repeats`` times; mean top-1 / top-5 per ``k``.

    The neighbours are unchanged but their votes carry no information, so this sits at chance
    unless the protocol leaks labels. ``None`` when ``repeats`` is 0.
    """
    if repeats < 0:
        raise ValueError(f"control repeats must be >= 0, got {repeats}")
    if repeats == 0:
        return None
    runs = []
    for r in range(repeats):
        # run r's own stream of the control seed (seed + r would replay run 0 of control seed + r)
        permutation = torch.randperm(train_labels.shape[0], generator=torch.Generator().manual_seed(derive_seed(seed, r)))
        runs.append(knn_classify(train_features, train_labels[permutation], test_features, test_labels, cfg,
                                 num_classes))
    return {name: {"top1": sum(run[name]["top1"] for run in runs) / repeats,
                   "top5": sum(run[name]["top5"] for run in runs) / repeats,
                   "top1_runs": [run[name]["top1"] for run in runs], "repeats": repeats}
            for name in runs[0]}
