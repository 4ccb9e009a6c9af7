"""LSTCL objectives (Wang et al., 2022): MoCo v3, BYOL and SimSiam between a short and a long clip.

All are symmetric in the two clips: ``loss(view1 -> view2) + loss(view2 -> view1)`` as in the
original papers. Inputs are ``(B, D)`` head outputs; every module returns a dict with ``loss``.

Repeated sampling (``data.repeats: R > 1``, docs/design.md section 2) puts R view-sets of one video in
a batch. Only MoCo v3 compares a query with other samples (its negatives), so only MoCo v3 needs to
know which rows share a video (``video_ids``); BYOL and SimSiam regress each row onto its own
target and see no other row, so copies change nothing in their losses.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["MoCoV3Loss", "BYOLLoss", "SimSiamLoss", "gather_with_grad", "gather_ids"]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All-gather ``x`` (equal shapes on every rank) along dim 0 with a gradient path back to each rank.

    Returns the concatenation and the offset of this rank's rows in it. Uses
    ``torch.distributed.nn.functional.all_gather``, whose backward sums the gradients of every rank's
    loss into the owning rank (a plain ``dist.all_gather`` would cut the graph).
    """
    if not _distributed():
        return x, 0
    gathered = dist_fn.all_gather(x)
    rank = dist.get_rank()
    return torch.cat(gathered, dim=0), sum(g.shape[0] for g in gathered[:rank])


def gather_ids(ids: torch.Tensor) -> torch.Tensor:
    """All-gather integer ids (equal shapes on every rank) along dim 0, in rank order; no gradient."""
    if not _distributed():
        return ids
    gathered = [torch.empty_like(ids) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, ids)
    return torch.cat(gathered, dim=0)


class MoCoV3Loss(nn.Module):
    """Symmetric MoCo v3 InfoNCE: ``ctr(q1, k2) + ctr(q2, k1)`` with keys from every rank as negatives.

    ``ctr(q, k) = CE(q_n k_n^T / tau, labels) * 2 tau`` with L2-normalised q (predictor outputs of the
    base encoder) and k (momentum-encoder projections), the positives at ``arange(N) + N * rank``;
    the ``2 tau`` factor is MoCo v3's. Args: temperature ``tau`` (0.2, the MoCo v3 ViT value).
    Returns ``loss`` and ``accuracy`` (fraction of queries whose positive scores highest).

    ``video_ids`` (``(N,)`` integers, optional): the video each row came from. With repeated sampling
    the other view-sets of a query's video are in the batch, on this rank or another; they are not
    negatives (they show the same video), so their logits are masked to ``-inf`` before the softmax
    (the keys of every rank carry their ids through ``gather_ids``). The positive is never masked.
    Rows of distinct videos mask nothing, so with one view-set per video the loss is bit-identical
    to the unmasked one. Every rank must pass ids, or none (the id gather is a collective).
    """

    def __init__(self, temperature: float = 0.2) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"MoCoV3Loss: temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def contrastive(self, q: torch.Tensor, k: torch.Tensor, video_ids: torch.Tensor | None = None,
                    key_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One direction; ``video_ids`` (this rank's rows) and ``key_ids`` (every rank's keys) or neither."""
        dtype = torch.promote_types(q.dtype, torch.float32)
        q = F.normalize(q.to(dtype), dim=1)
        k = F.normalize(k.to(dtype), dim=1)
        all_keys, offset = gather_with_grad(k)
        logits = q @ all_keys.T / self.temperature
        labels = torch.arange(q.shape[0], device=q.device) + offset
        if video_ids is not None:
            same_video = video_ids.view(-1, 1).to(q.device) == key_ids.view(1, -1).to(q.device)
            same_video[torch.arange(q.shape[0], device=q.device), labels] = False   # the positive stays
            logits = logits.masked_fill(same_video, float("-inf"))
        loss = F.cross_entropy(logits, labels) * (2 * self.temperature)
        accuracy = (logits.detach().argmax(dim=1) == labels).to(dtype).mean()
        return loss, accuracy

    def forward(self, q1: torch.Tensor, q2: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor,
                video_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        key_ids = gather_ids(video_ids) if video_ids is not None else None
        loss_12, acc_12 = self.contrastive(q1, k2, video_ids, key_ids)
        loss_21, acc_21 = self.contrastive(q2, k1, video_ids, key_ids)
        return {"loss": loss_12 + loss_21, "accuracy": (acc_12 + acc_21) / 2}


class BYOLLoss(nn.Module):
    """Symmetric BYOL regression: ``mean(2 - 2 cos(p1, z2)) + mean(2 - 2 cos(p2, z1))``, targets detached.

    ``p*``: online predictor outputs; ``z*``: target (EMA) projections. No negatives: a row's loss
    sees only its own target, so repeated view-sets of one video need no mask.
    """

    def forward(self, p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> dict[str, torch.Tensor]:
        def regression(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
            dtype = torch.promote_types(p.dtype, torch.float32)
            return (2 - 2 * F.cosine_similarity(p.to(dtype), z.detach().to(dtype), dim=-1)).mean()

        return {"loss": regression(p1, z2) + regression(p2, z1)}


class SimSiamLoss(nn.Module):
    """Symmetric SimSiam: ``-(cos(p1, sg(z2)) + cos(p2, sg(z1))) / 2``, means over the batch.

    ``p*``: predictor outputs; ``z*``: projector outputs of the same network (stop-gradient here).
    No negatives: repeated view-sets of one video need no mask.
    """

    def forward(self, p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> dict[str, torch.Tensor]:
        def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
            dtype = torch.promote_types(p.dtype, torch.float32)
            return -F.cosine_similarity(p.to(dtype), z.detach().to(dtype), dim=-1).mean()

        return {"loss": 0.5 * (negative_cosine(p1, z2) + negative_cosine(p2, z1))}
