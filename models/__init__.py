"""Video backbones (TimeSformer, Space-Time Swin), pretrained weights, SSL heads, the multi-view runner, the
video classifier, FLOP counts."""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

from models import stswin, timesformer
from models.heads import (BYOLPredictor, BYOLProjector, DINOHead, MoCoPredictor, MoCoProjector,
                          SimSiamPredictor, SimSiamProjector)
from models.classifier import VideoClassifier
from models.multiview import ContrastiveEncoder, MultiViewRunner
from models.pretrained import PretrainedUnavailable, resolve_pretrained
from models.stswin import SpaceTimeSwin
from models.timesformer import TimeSformer, load_pretrained, split_checkpoint

__all__ = [
    "BACKBONES", "build_backbone", "TimeSformer", "SpaceTimeSwin", "MultiViewRunner", "ContrastiveEncoder", "DINOHead",
    "PretrainedUnavailable", "load_pretrained", "resolve_pretrained", "split_checkpoint", "VideoClassifier",
    "MoCoProjector", "MoCoPredictor", "BYOLProjector", "BYOLPredictor", "SimSiamProjector", "SimSiamPredictor",
]

# Named variants; a plain dict (no registry decorators): adding a model is one line here.
BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "timesformer_tiny_patch16": timesformer.timesformer_tiny_patch16,
    "timesformer_small_patch16": timesformer.timesformer_small_patch16,
    "timesformer_base_patch16": timesformer.timesformer_base_patch16,
    "stswin_tiny_test": stswin.stswin_tiny_test,
    "stswin_t": stswin.stswin_t,
    "stswin_s": stswin.stswin_s,
    "stswin_b": stswin.stswin_b,
}


def build_backbone(name: str, **kwargs) -> nn.Module:
    """Build a named backbone; ``kwargs`` go to the model (e.g. ``num_frames``, ``depth``,
    ``drop_path_rate``, ``grad_checkpointing``; TimeSformers also take ``pretrained`` = a checkpoint file or a
    timm tag, and ``temporal_init``). Unknown names raise with the list."""
    if name not in BACKBONES:
        raise ValueError(f"build_backbone: unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
    return BACKBONES[name](**kwargs)
