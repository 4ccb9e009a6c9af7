"""CLS-to-patch attention of the last block, drawn as a grid over frames (SVT appendix E).

In a divided space-time block the CLS token takes part only in the spatial attention, once per
frame (``DividedSpaceTimeBlock``: CLS copied into every frame's sequence). So the last block's
spatial ``attn`` gives, for every frame and head, how much the CLS query attends to each patch of
that frame. The attention module computes it inside ``F.scaled_dot_product_attention`` and never
materialises the weights, so a forward pre-hook captures the module's input (the normalised
``(b t) (1 + n) d`` tokens) and the weights are recomputed here from the module's own ``qkv``
projection: ``softmax(q k^T / sqrt(d_head))``, exactly what the fused kernel uses.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from einops import rearrange

__all__ = ["last_block_cls_attention", "save_attention_grid"]


@torch.no_grad()
def last_block_cls_attention(backbone: nn.Module, clip: torch.Tensor) -> torch.Tensor:
    """CLS-to-patch attention ``(B, T, heads, Gh, Gw)`` of the last block's spatial attention.

    Args:
        backbone: a TimeSformer-like model with ``blocks[-1].attn`` (``qkv`` Linear, ``num_heads``)
            and ``patch_size``.
        clip: ``(B, C, T, H, W)`` normalised input.
    """
    blocks = getattr(backbone, "blocks", None)
    attn = getattr(blocks[-1], "attn", None) if blocks is not None and len(blocks) else None
    if attn is None or not hasattr(attn, "qkv") or not hasattr(attn, "num_heads"):
        raise ValueError(f"attention maps need a ViT-style backbone with blocks[-1].attn.qkv; "
                         f"{type(backbone).__name__} has none")
    captured: list[torch.Tensor] = []
    handle = attn.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach()))
    try:
        backbone.eval().forward_features(clip)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"expected one call of the last attention module, saw {len(captured)}")
    tokens = captured[0]                                                      # (b t) (1 + n) d
    batch, num_frames, height, width = clip.shape[0], clip.shape[2], clip.shape[3], clip.shape[4]
    grid_h, grid_w = height // backbone.patch_size, width // backbone.patch_size
    if tokens.shape[0] != batch * num_frames or tokens.shape[1] != 1 + grid_h * grid_w:
        raise ValueError(f"last attention input {tuple(tokens.shape)} is not (B*T, 1 + Gh*Gw, D) for "
                         f"B={batch}, T={num_frames}, grid {grid_h}x{grid_w}")
    q, k, _ = rearrange(attn.qkv(tokens), "bt n (three h d) -> three bt h n d", three=3, h=attn.num_heads)
    cls_query = q[:, :, :1]                                                   # bt h 1 d
    weights = torch.softmax((cls_query @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5, dim=-1)
    cls_to_patch = weights[:, :, 0, 1:]                                       # bt h n
    return rearrange(cls_to_patch, "(b t) h (gh gw) -> b t h gh gw", b=batch, gh=grid_h)


def denormalize(clip: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """One normalised ``(C, T, H, W)`` clip back to ``(T, H, W, C)`` RGB in [0, 1] for display."""
    mean_t = torch.tensor(mean).view(-1, 1, 1, 1)
    std_t = torch.tensor(std).view(-1, 1, 1, 1)
    return rearrange((clip.float().cpu() * std_t + mean_t).clamp(0, 1), "c t h w -> t h w c").numpy()


def save_attention_grid(path: str | os.PathLike, frames: np.ndarray, attention: torch.Tensor, *,
                        title: str = "") -> Path:
    """PNG: top row the frames, then one row per head with its CLS attention over the frame, and a
    last row with the head mean. ``frames`` ``(T, H, W, 3)`` in [0, 1]; ``attention`` ``(T, heads, Gh, Gw)``."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt
    import torch.nn.functional as F

    num_frames, num_heads = attention.shape[0], attention.shape[1]
    if frames.shape[0] != num_frames:
        raise ValueError(f"{num_frames} attention frames for {frames.shape[0]} video frames")
    height, width = frames.shape[1:3]
    # Nearest upsampling keeps the patch grid visible: each map cell is one 16x16 patch.
    maps = F.interpolate(attention.float().cpu(), size=(height, width), mode="nearest")   # t h H W
    maps = torch.cat([maps, maps.mean(dim=1, keepdim=True)], dim=1).numpy()
    rows = 1 + num_heads + 1
    fig, axes = plt.subplots(rows, num_frames, figsize=(1.6 * num_frames, 1.6 * rows), squeeze=False)
    for t in range(num_frames):
        axes[0, t].imshow(frames[t])
        axes[0, t].set_title(f"frame {t}", fontsize=7)
        for r in range(num_heads + 1):
            axes[1 + r, t].imshow(frames[t])
            axes[1 + r, t].imshow(maps[t, r], cmap="inferno", alpha=0.6)
        for r in range(rows):
            axes[r, t].axis("off")
    for r in range(num_heads + 1):
        axes[1 + r, 0].text(-0.1, 0.5, "mean" if r == num_heads else f"head {r}", fontsize=7, rotation=90,
                            transform=axes[1 + r, 0].transAxes, ha="right", va="center")
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
