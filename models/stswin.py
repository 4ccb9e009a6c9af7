"""Space-Time Swin Transformer (Video Swin, Liu et al. 2022), the LSTCL Sec. 3.3 backbone.

Layout after timm: blocks, model class, init, factory, named variants. Parameter names follow the
Video Swin reference code (``patch_embed.proj``, ``layers.N.blocks.M.attn.relative_position_bias_table``,
``layers.N.downsample.reduction``, ``norm``).

- 3-D non-overlapping windows over (T, H, W) tokens, shifted by half a window in every other block
  (cyclic roll + attention mask), 3-D relative position bias per head.
- Patch merging in space only (2x2 -> 1, width doubles); time keeps its token count.
- Any input T/H/W: the clip is padded to the patch size, the tokens of each block to the window,
  and a window larger than the input shrinks to the input (no shift on that axis), as in Video Swin.
  The relative position index is built for the window actually used, so a shrunk window reads the
  right offsets of the bias table (the reference slices the full index instead).

Note on ``embed_dim``: the constructor's ``embed_dim`` is the stage-1 width (Swin convention); the
attribute ``embed_dim`` is the width of ``forward_features``' output (``embed_dim * 2**(stages-1)``),
which is the contract every backbone here follows. ``stem_dim`` keeps the stage-1 width.
"""
from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from timm.layers import DropPath, Mlp, trunc_normal_
from torch.utils.checkpoint import checkpoint

from models.layers import PatchEmbed3D, attention, init_vit_weights

__all__ = [
    "SpaceTimeSwin",
    "stswin_tiny_test",
    "stswin_t",
    "stswin_s",
    "stswin_b",
    "effective_window",
]

Size3 = tuple[int, int, int]


def effective_window(input_size: Size3, window: Size3, shift: Size3) -> tuple[Size3, Size3]:
    """Window and shift actually used: an axis no longer than its window uses the whole axis, no shift."""
    used_window = tuple(min(w, s) for w, s in zip(window, input_size))
    used_shift = tuple(0 if s <= w else sh for w, s, sh in zip(window, input_size, shift))
    return used_window, used_shift  # type: ignore[return-value]


@lru_cache(maxsize=64)
def _relative_position_index(window: Size3, table_window: Size3) -> torch.Tensor:
    """``(N, N)`` indices into a bias table sized for ``table_window`` for a ``window`` (<= it) of tokens."""
    coords = torch.stack(torch.meshgrid(*[torch.arange(w) for w in window], indexing="ij")).flatten(1)
    relative = coords[:, :, None] - coords[:, None, :]  # (3, N, N), each in (-w+1 .. w-1)
    td, th, tw = table_window
    relative = relative + torch.tensor([td - 1, th - 1, tw - 1]).view(3, 1, 1)
    return relative[0] * (2 * th - 1) * (2 * tw - 1) + relative[1] * (2 * tw - 1) + relative[2]


@lru_cache(maxsize=64)
def _shift_attention_mask(padded_size: Size3, window: Size3, shift: Size3) -> torch.Tensor:
    """``(num_windows, N, N)`` additive mask: -inf-like between tokens from different regions after the roll."""
    region = torch.zeros(padded_size)
    label = 0
    # Along a shifted axis the roll brings the last `s` tokens next to the first ones: three regions.
    slices = [(slice(0, -w), slice(-w, -s), slice(-s, None)) if s else (slice(None),) for w, s in zip(window, shift)]
    for d in slices[0]:
        for h in slices[1]:
            for w in slices[2]:
                region[d, h, w] = label
                label += 1
    windows = rearrange(region, "(nd wd) (nh wh) (nw ww) -> (nd nh nw) (wd wh ww)",
                        wd=window[0], wh=window[1], ww=window[2])
    different = windows[:, :, None] != windows[:, None, :]
    return torch.zeros(different.shape).masked_fill(different, -100.0)


class WindowAttention3D(nn.Module):
    """Multi-head attention inside 3-D windows with a learned relative position bias.

    Args:
        dim: token width; num_heads: heads; window_size: largest window (sizes the bias table);
        qkv_bias, attn_drop, proj_drop: as in timm.
    """

    def __init__(self, dim: int, num_heads: int, window_size: Size3, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"WindowAttention3D: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.window_size = window_size
        table = (2 * window_size[0] - 1) * (2 * window_size[1] - 1) * (2 * window_size[2] - 1)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(table, num_heads))
        trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, windows: torch.Tensor, window: Size3, mask: torch.Tensor | None) -> torch.Tensor:
        """windows: ``(B, nW, N, C)``; mask: ``(nW, N, N)`` or None. Returns ``(B, nW, N, C)``."""
        q, k, v = rearrange(self.qkv(windows), "b w n (three h d) -> three b w h n d", three=3, h=self.num_heads)
        index = _relative_position_index(window, self.window_size).to(windows.device)
        bias = rearrange(self.relative_position_bias_table[index.reshape(-1)], "(n m) h -> h n m", n=index.shape[0])
        attn_bias = bias.unsqueeze(0) if mask is None else bias.unsqueeze(0) + mask.to(bias).unsqueeze(1)
        x = attention(q, k, v, attn_mask=attn_bias.to(q.dtype), dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(rearrange(x, "b w h n d -> b w n (h d)")))


class SwinBlock3D(nn.Module):
    """Pre-norm (shifted) window attention + MLP on ``(B, D, H, W, C)`` tokens."""

    def __init__(self, dim: int, num_heads: int, window_size: Size3, shift_size: Size3, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 norm_layer: type[nn.Module] = nn.LayerNorm) -> None:
        super().__init__()
        if any(not 0 <= s < w for s, w in zip(shift_size, window_size)):
            raise ValueError(f"SwinBlock3D: shift {shift_size} must be in [0, window {window_size})")
        self.window_size = window_size
        self.shift_size = shift_size
        self.norm1 = norm_layer(dim)
        self.attn = WindowAttention3D(dim, num_heads, window_size, qkv_bias, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), drop=drop)

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        _, depth, height, width, _ = x.shape
        window, shift = effective_window((depth, height, width), self.window_size, self.shift_size)
        pads = [(-size) % w for size, w in zip((depth, height, width), window)]
        x = F.pad(self.norm1(x), (0, 0, 0, pads[2], 0, pads[1], 0, pads[0]))
        padded = tuple(x.shape[1:4])
        if any(shift):
            x = torch.roll(x, shifts=tuple(-s for s in shift), dims=(1, 2, 3))
            mask = _shift_attention_mask(padded, window, shift).to(x.device)
        else:
            mask = None
        windows = rearrange(x, "b (nd wd) (nh wh) (nw ww) c -> b (nd nh nw) (wd wh ww) c",
                            wd=window[0], wh=window[1], ww=window[2])
        windows = self.attn(windows, window, mask)
        x = rearrange(windows, "b (nd nh nw) (wd wh ww) c -> b (nd wd) (nh wh) (nw ww) c",
                      nd=padded[0] // window[0], nh=padded[1] // window[1],
                      wd=window[0], wh=window[1], ww=window[2])
        if any(shift):
            x = torch.roll(x, shifts=shift, dims=(1, 2, 3))
        return x[:, :depth, :height, :width]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self._attention(x))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging2D(nn.Module):
    """Merge 2x2 neighbouring tokens in space only (time untouched): width C -> 2C, H and W halve (padded)."""

    def __init__(self, dim: int, norm_layer: type[nn.Module] = nn.LayerNorm) -> None:
        super().__init__()
        self.norm = norm_layer(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[2], x.shape[3]
        x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2))
        # Channel order (0,0), (1,0), (0,1), (1,1) of (h, w) offsets, as Swin's x0..x3.
        x = rearrange(x, "b d (h dh) (w dw) c -> b d h w (dw dh c)", dh=2, dw=2)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    def __init__(self, dim: int, depth: int, num_heads: int, window_size: Size3, mlp_ratio: float, qkv_bias: bool,
                 drop: float, attn_drop: float, drop_path: list[float], downsample: bool,
                 norm_layer: type[nn.Module]) -> None:
        super().__init__()
        shift = tuple(w // 2 for w in window_size)
        self.blocks = nn.ModuleList([
            SwinBlock3D(dim, num_heads, window_size, (0, 0, 0) if i % 2 == 0 else shift, mlp_ratio, qkv_bias, drop,
                        attn_drop, drop_path[i], norm_layer)
            for i in range(depth)
        ])
        self.downsample = PatchMerging2D(dim, norm_layer) if downsample else nn.Identity()
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.grad_checkpointing and torch.is_grad_enabled() \
                else block(x)
        return self.downsample(x)


class SpaceTimeSwin(nn.Module):
    """Video Swin Transformer taking ``(B, C, T, H, W)``; ``forward_features`` -> mean-pooled ``(B, embed_dim)``.

    Args:
        patch_size: (t, h, w) of the 3-D patch embedding (Video Swin: (2, 4, 4)).
        in_chans: input channels.
        embed_dim: stage-1 width (see the module note: the attribute is the output width).
        depths, num_heads: blocks and heads per stage.
        window_size: (t, h, w) attention window (Video Swin: (8, 7, 7)).
        mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, drop_path_rate: as in Swin.
        num_classes: classifier outputs; 0 gives ``nn.Identity``.
        grad_checkpointing: recompute blocks in backward.
    """

    def __init__(self, patch_size: Size3 = (2, 4, 4), in_chans: int = 3, embed_dim: int = 96,
                 depths: tuple[int, ...] = (2, 2, 6, 2), num_heads: tuple[int, ...] = (3, 6, 12, 24),
                 window_size: Size3 = (8, 7, 7), mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.2,
                 num_classes: int = 0, grad_checkpointing: bool = False,
                 norm_layer: type[nn.Module] = nn.LayerNorm) -> None:
        super().__init__()
        if len(depths) != len(num_heads) or not depths:
            raise ValueError(f"SpaceTimeSwin: depths {depths} and num_heads {num_heads} must be non-empty, same length")
        if len(patch_size) != 3 or len(window_size) != 3:
            raise ValueError(f"SpaceTimeSwin: patch_size {patch_size} and window_size {window_size} must be (t, h, w)")
        self.patch_size = tuple(patch_size)
        self.in_chans = in_chans
        self.stem_dim = embed_dim
        self.depths = tuple(depths)
        self.num_heads = tuple(num_heads)
        self.window_size = tuple(window_size)
        self.mlp_ratio = mlp_ratio
        self.num_classes = num_classes
        self.embed_dim = self.num_features = embed_dim * 2 ** (len(depths) - 1)

        self.patch_embed = PatchEmbed3D(self.patch_size, in_chans, embed_dim, norm_layer)
        self.pos_drop = nn.Dropout(drop_rate)
        # Python floats, not torch.linspace(...).tolist(): construction also works on the meta device.
        dpr = [drop_path_rate * i / max(sum(depths) - 1, 1) for i in range(sum(depths))]
        self.layers = nn.ModuleList([
            SwinStage(embed_dim * 2 ** i, depths[i], num_heads[i], self.window_size, mlp_ratio, qkv_bias, drop_rate,
                      attn_drop_rate, dpr[sum(depths[:i]):sum(depths[:i + 1])], i < len(depths) - 1, norm_layer)
            for i in range(len(depths))
        ])
        self.norm = norm_layer(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        init_vit_weights(self)
        self.set_grad_checkpointing(grad_checkpointing)

    @torch.jit.ignore
    def no_weight_decay_keywords(self) -> set[str]:
        return {"relative_position_bias_table"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.layers:
            stage.grad_checkpointing = enable

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised last-stage tokens ``(B, D', H', W', embed_dim)``."""
        if x.ndim != 5 or x.shape[1] != self.in_chans:
            raise ValueError(f"SpaceTimeSwin expects (B, {self.in_chans}, T, H, W), got {tuple(x.shape)}")
        x = self.pos_drop(self.patch_embed(x))  # (B, D', H', W', C), padded to the patch size
        for stage in self.layers:
            x = stage(x)
        return self.norm(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_tokens(x).mean(dim=(1, 2, 3))

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return features if pre_logits else self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def stswin_tiny_test(**kwargs) -> SpaceTimeSwin:
    """A few-thousand-parameter Swin for CPU tests: 2 stages of 2 blocks, windows (2, 3, 3)."""
    return SpaceTimeSwin(**{"embed_dim": 12, "depths": (2, 2), "num_heads": (1, 2), "window_size": (2, 3, 3),
                            "drop_path_rate": 0.0, **kwargs})


def stswin_t(**kwargs) -> SpaceTimeSwin:
    """Swin-T: 96 wide, depths (2, 2, 6, 2), heads (3, 6, 12, 24)."""
    return SpaceTimeSwin(**{"embed_dim": 96, "depths": (2, 2, 6, 2), "num_heads": (3, 6, 12, 24), **kwargs})


def stswin_s(**kwargs) -> SpaceTimeSwin:
    """Swin-S: 96 wide, depths (2, 2, 18, 2), heads (3, 6, 12, 24)."""
    return SpaceTimeSwin(**{"embed_dim": 96, "depths": (2, 2, 18, 2), "num_heads": (3, 6, 12, 24),
                            "drop_path_rate": 0.3, **kwargs})


def stswin_b(**kwargs) -> SpaceTimeSwin:
    """Swin-B: 128 wide, depths (2, 2, 18, 2), heads (4, 8, 16, 32)."""
    return SpaceTimeSwin(**{"embed_dim": 128, "depths": (2, 2, 18, 2), "num_heads": (4, 8, 16, 32),
                            "drop_path_rate": 0.3, **kwargs})
