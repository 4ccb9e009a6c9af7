"""DALI data pipelines: shards -> decode each video once -> every SVT / LSTCL / eval view.

Public entry points: ``DataConfig`` (typed config) and ``build_loader`` (DALI or baseline loader).
"""

from __future__ import annotations

from .config import DataConfig
from .protocol import Loader


def build_loader(cfg: DataConfig, *, batch_size: int, shard_id: int = 0, num_shards: int = 1,
                 seed: int = 0, loader: str = "dali") -> Loader:
    """Loader yielding ``{view_name: (B, C, T, H, W), "label": (B,), "key": [str]}`` per step.

    Args:
        cfg: data configuration (shards folder, recipe, device, ...).
        batch_size: samples per step on this rank.
        shard_id, num_shards: this rank and the number of ranks; rank r takes slice r of every step
            of the global order (pipelines/order.py), so the global batch is batch_size * num_shards.
        seed: seed for the order, frame plans and augmentation.
        loader: ``dali`` (the fast path) or ``baseline`` (PyAV + torchvision via a torch DataLoader).
    """
    if loader == "dali":
        from .loader import DALILoader
        return DALILoader(cfg, batch_size=batch_size, shard_id=shard_id, num_shards=num_shards, seed=seed)
    if loader == "baseline":
        from .baseline import BaselineLoader
        return BaselineLoader(cfg, batch_size=batch_size, shard_id=shard_id, num_shards=num_shards, seed=seed)
    raise ValueError(f"loader must be 'dali' or 'baseline', got {loader!r}")


__all__ = ["DataConfig", "Loader", "build_loader"]
