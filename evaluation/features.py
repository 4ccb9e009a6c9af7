"""Frozen features of labelled shards: slow and fast CLS features per video, averaged over views.

The eval loader (``pipelines`` recipe ``eval``) gives, per video, ``clips`` temporal clips x ``crops``
spatial crops of a slow clip (T=8 at 224) and of a fast clip (T=64 at 96). Every view goes through
``backbone.forward_features``; the slow features are averaged over all slow views, the fast ones over
all fast views. The slow-fast feature of SVT (Fig. 3) is ``slow + fast``: with one clip and one crop
it is exactly the sum of the two clips' CLS features, and averaging is linear, so the same holds
for the averaged features.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn as nn
from einops import rearrange

from common.atomic_io import atomic_writer
from common.precision import precision_name, torch_dtype
from pipelines.config import DataConfig

__all__ = ["FEATURE_KINDS", "ExtractConfig", "FeatureSet", "group_eval_views", "extract_features",
           "slow_fast_features"]

FEATURE_KINDS = ("slowfast", "slow", "fast")
VIEW_GROUPS = ("slow", "fast")


def _eval_data() -> DataConfig:
    # the eval recipe in a fixed order: every video once, none dropped (one feature row per video)
    return DataConfig(recipe="eval", shuffle=False)


@dataclass
class ExtractConfig:
    """Args:
        data: the loader's ``DataConfig`` (section ``extract.data``, keys as in a training recipe):
            ``shards`` (labelled shards of one split), ``device`` (DALI decoder: cpu | mixed | auto),
            ``num_threads``, and ``eval`` (``pipelines.config.EvalConfig``: ``clips`` x ``crops`` per
            video, the slow and the fast clip; SVT: 1 x 3, 8 @ 224 and 64 @ 96). Its ``recipe`` is
            ``eval``; ``mean`` / ``std`` come from the checkpoint's run.
        batch_size: videos per loader step.
        views_per_forward: clips per backbone call (bounds activation memory; 0 = all views of a batch).
        device: ``cpu`` | ``cuda`` for the backbone.
        loader: ``dali`` | ``baseline`` (PyAV reference loader).
        precision: ``fp32`` | ``bf16`` (autocast on CUDA; also ``float32`` | ``bfloat16``).
        limit: stop after this many videos (0 = all); for smoke runs.
    """

    data: DataConfig = field(default_factory=_eval_data)
    batch_size: int = 8
    views_per_forward: int = 0
    device: str = "cpu"
    loader: str = "dali"
    precision: str = "fp32"
    limit: int = 0

    def __post_init__(self) -> None:
        if not self.data.shards:
            raise ValueError("extract.data.shards: a shard folder is required")
        if self.data.recipe != "eval" or self.data.drop_last:
            raise ValueError(f"extract.data: extraction reads the eval recipe without dropping videos "
                             f"(recipe eval, drop_last false), got recipe {self.data.recipe!r}, "
                             f"drop_last {self.data.drop_last}")
        if self.batch_size < 1 or self.views_per_forward < 0 or self.limit < 0:
            raise ValueError("extract.batch_size must be >= 1, views_per_forward and limit >= 0")
        self.precision = precision_name(self.precision, "extract.precision", allowed=("fp32", "bf16"))
        if self.loader not in ("dali", "baseline"):
            raise ValueError(f"extract.loader must be dali or baseline, got {self.loader!r}")


@dataclass
class FeatureSet:
    """Features of one split: row ``i`` belongs to video ``keys[i]`` with label ``labels[i]``.

    ``slow`` / ``fast`` are ``(N, D)`` float32 CLS features averaged over the views of each kind.
    """

    keys: list[str]
    labels: torch.Tensor
    slow: torch.Tensor
    fast: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.keys)
        if self.labels.shape != (n,) or self.slow.shape[0] != n or self.fast.shape != self.slow.shape:
            raise ValueError(f"FeatureSet: {n} keys, labels {tuple(self.labels.shape)}, slow "
                             f"{tuple(self.slow.shape)}, fast {tuple(self.fast.shape)} do not line up")

    def __len__(self) -> int:
        return len(self.keys)

    def feature(self, kind: str) -> torch.Tensor:
        """``slowfast`` (slow + fast, SVT Fig. 3), ``slow`` or ``fast`` features ``(N, D)``."""
        if kind == "slowfast":
            return self.slow + self.fast
        if kind in VIEW_GROUPS:
            return getattr(self, kind)
        raise ValueError(f"feature kind must be one of {FEATURE_KINDS}, got {kind!r}")

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``.pt`` (torch) or ``.npz`` (numpy; meta as a JSON string), whole or not at all."""
        path = Path(path)
        if path.suffix not in (".npz", ".pt"):
            raise ValueError(f"{path}: feature files end in .pt or .npz")
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_writer(path) as f:
            if path.suffix == ".npz":
                np.savez(f, keys=np.array(self.keys), labels=self.labels.numpy(), slow=self.slow.numpy(),
                         fast=self.fast.numpy(), meta=np.array(json.dumps(self.meta)))
            else:
                torch.save({"keys": list(self.keys), "labels": self.labels, "slow": self.slow, "fast": self.fast,
                            "meta": self.meta}, f)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FeatureSet":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: feature file does not exist (run evaluate.py extract first)")
        try:
            if path.suffix == ".npz":
                with np.load(path) as data:
                    return cls([str(k) for k in data["keys"]], torch.from_numpy(data["labels"]),
                               torch.from_numpy(data["slow"]), torch.from_numpy(data["fast"]),
                               json.loads(str(data["meta"])))
            data = torch.load(path, map_location="cpu", weights_only=True)
            return cls(list(data["keys"]), data["labels"], data["slow"], data["fast"], data["meta"])
        except Exception as error:  # not a torch / numpy file, truncated, missing entries: name the file
            raise ValueError(f"{path}: not a feature file written by evaluate.py extract ({error})") from error


def group_eval_views(view_names: Iterable[str]) -> dict[str, list[str]]:
    """Split the eval loader's view names into ``{"slow": [...], "fast": [...]}`` by their prefix."""
    groups: dict[str, list[str]] = {group: [] for group in VIEW_GROUPS}
    for name in view_names:
        group = name.split("_", 1)[0]
        if group not in groups:
            raise ValueError(f"eval view {name!r} is neither a slow nor a fast view")
        groups[group].append(name)
    missing = [g for g, names in groups.items() if not names]
    if missing:
        raise ValueError(f"eval loader gives no {' / '.join(missing)} views (got {list(view_names)})")
    return groups


def slow_fast_features(model: nn.Module, slow: torch.Tensor, fast: torch.Tensor) -> torch.Tensor:
    """Slow-fast inference (SVT Fig. 3): the sum of the CLS features of a slow and a fast clip."""
    return model.forward_features(slow) + model.forward_features(fast)


@torch.no_grad()
def mean_view_features(backbone: nn.Module, views: list[torch.Tensor], views_per_forward: int = 0) -> torch.Tensor:
    """Mean CLS feature ``(B, D)`` over equal-shape views, each ``(B, C, T, H, W)``."""
    stacked = torch.cat(views, dim=0)                               # (v b) c t h w
    step = stacked.shape[0] if views_per_forward == 0 else views_per_forward
    features = torch.cat([backbone.forward_features(chunk) for chunk in torch.split(stacked, step)])
    return rearrange(features.float(), "(v b) d -> v b d", v=len(views)).mean(dim=0)


@torch.no_grad()
def extract_features(backbone: nn.Module, loader: Iterable[dict], view_names: list[str], *,
                     device: str = "cpu", precision: str = "fp32", views_per_forward: int = 0,
                     limit: int = 0, meta: dict[str, Any] | None = None) -> FeatureSet:
    """Run the frozen ``backbone`` over every eval batch of ``loader``.

    A key seen twice (a padded last batch) keeps its first features; ``meta["duplicates"]`` counts them.
    """
    groups = group_eval_views(view_names)
    backbone = backbone.eval().to(device)
    dtype = torch_dtype(precision)
    autocast = torch.autocast(device_type="cuda", dtype=dtype,
                              enabled=dtype != torch.float32 and device.startswith("cuda"))
    keys: list[str] = []
    seen: set[str] = set()
    labels, slow, fast = [], [], []
    duplicates = 0
    for batch in loader:
        with autocast:
            per_group = {group: mean_view_features(backbone, [batch[v].to(device) for v in names], views_per_forward)
                         for group, names in groups.items()}
        batch_labels = torch.as_tensor(batch["label"]).view(-1).long().cpu()
        for row, key in enumerate(batch["key"]):
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
            keys.append(key)
            labels.append(batch_labels[row])
            slow.append(per_group["slow"][row].cpu())
            fast.append(per_group["fast"][row].cpu())
        if limit and len(keys) >= limit:
            break
    if not keys:
        raise ValueError("feature extraction saw no videos: the shard folder is empty or all samples failed")
    n = min(len(keys), limit) if limit else len(keys)
    return FeatureSet(keys[:n], torch.stack(labels[:n]), torch.stack(slow[:n]), torch.stack(fast[:n]),
                      {**(meta or {}), "duplicates": duplicates, "views": groups})
