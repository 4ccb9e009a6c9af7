"""Layers shared by the video backbones: the attention call, multi-head self-attention, the 3-D patch
embedding, timm's ViT init, and the helpers that run one module over a list of token tensors.

The 2-D (per-frame) patch embedding is timm's ``timm.layers.PatchEmbed`` itself (TimeSformer);
``PatchEmbed3D`` is its 3-D counterpart (Space-Time Swin), with the same ``proj`` / ``norm`` names.

Packed inputs: a module that takes "a tensor or a list of tensors" runs every per-token layer once
over the tokens of all tensors (``map_tokens``: one large matmul instead of one per clip) and
attention once per distinct sequence length. A plain tensor in gives a plain tensor out, and a list
of one tensor is handed to submodules as that tensor, so hooks and single-clip callers see tensors.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Hashable, Iterable, Sequence, TypeVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from timm.models import named_apply
from timm.models.vision_transformer import init_weights_vit_timm
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = ["attention", "Attention", "PatchEmbed3D", "init_vit_weights", "map_tokens", "call_packed", "group_by"]

Tokens = torch.Tensor | Sequence[torch.Tensor]
T = TypeVar("T")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
              dropout_p: float = 0.0) -> torch.Tensor:
    """``F.scaled_dot_product_attention``; on a CPU in bf16 / fp16 through its math backend.

    PyTorch's fused CPU attention kernel is slow in bf16: in a ViT-S SVT step under bf16 autocast its
    backward took 38% of the step, and the math backend (matmuls on AMX + softmax) made the whole
    step 1.7x faster (`bench.py model --dtype bfloat16`). In fp32 and on GPUs the fused kernels win.
    """
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)


def group_by(key: Callable[[T], Hashable], items: Iterable[T]) -> list[list[T]]:
    """``items`` grouped by ``key``, groups in first-appearance order, items in input order."""
    groups: dict = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return list(groups.values())


def map_tokens(module: Callable[[torch.Tensor], torch.Tensor], xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Apply a per-token module (Linear, MLP, norm) to all tokens of several ``(..., D)`` tensors in one call.

    One large matmul instead of one per tensor: the point of the packed multi-clip forward. With one
    tensor the module sees that tensor unchanged.
    """
    if len(xs) == 1:
        return [module(xs[0])]
    flat = torch.cat([rearrange(x, "... d -> (...) d") for x in xs])
    out = torch.split(module(flat), [x[..., 0].numel() for x in xs])
    return [piece.reshape(*x.shape[:-1], piece.shape[-1]) for piece, x in zip(out, xs)]


def call_packed(module: nn.Module, xs: Sequence[torch.Tensor], *per_input: Sequence) -> list[torch.Tensor]:
    """``module`` (which takes a tensor or a list) on ``xs``: the tensor itself when there is one.

    ``per_input``: further arguments with one entry per tensor (e.g. each clip's frame count), passed
    the same way (the entry itself with one tensor, the list otherwise).
    """
    if len(xs) == 1:
        return [module(xs[0], *(arg[0] for arg in per_input))]
    return list(module(list(xs), *(list(arg) for arg in per_input)))


class Attention(nn.Module):
    """Multi-head self-attention over the token axis of ``(B, N, D)`` via ``F.scaled_dot_product_attention``.

    ``forward`` also takes a list of ``(B_i, N_i, D)`` tensors (any B, N): one qkv and one proj matmul
    over all their tokens, one attention call per distinct N; equals ``[self(x) for x in xs]``.

    Args:
        dim: token width.
        num_heads: heads; must divide ``dim``.
        qkv_bias: bias in the fused qkv projection (timm ``qkv``).
        attn_drop: attention dropout (training only).
        proj_drop: dropout after the output projection (timm ``proj``).
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"Attention: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tokens) -> torch.Tensor | list[torch.Tensor]:
        xs = [x] if isinstance(x, torch.Tensor) else list(x)
        qkv = map_tokens(self.qkv, xs)
        outputs: list[torch.Tensor | None] = [None] * len(xs)
        for indices in group_by(lambda i: xs[i].shape[1], range(len(xs))):
            batch = torch.cat([qkv[i] for i in indices]) if len(indices) > 1 else qkv[indices[0]]
            q, k, v = rearrange(batch, "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
            out = attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
            out = rearrange(out, "b h n d -> b n (h d)")
            for i, piece in zip(indices, torch.split(out, [xs[i].shape[0] for i in indices])):
                outputs[i] = piece
        ys = [self.proj_drop(y) for y in map_tokens(self.proj, outputs)]  # type: ignore[arg-type]
        return ys[0] if isinstance(x, torch.Tensor) else ys


class PatchEmbed3D(nn.Module):
    """3-D patch embedding ``(B, C, T, H, W)`` -> ``(B, T', H', W', D)`` (channels last), padded to the patch.

    timm's ``PatchEmbed`` for video (Video Swin ``PatchEmbed3D``): a strided ``Conv3d`` ``proj`` and a
    ``norm`` (``nn.Identity`` when ``norm_layer`` is None), so checkpoints keep ``patch_embed.proj.*``
    and ``patch_embed.norm.*``. Inputs that are not a multiple of the patch are zero-padded at the end.
    """

    def __init__(self, patch_size: tuple[int, int, int] = (2, 4, 4), in_chans: int = 3, embed_dim: int = 96,
                 norm_layer: Callable[[int], nn.Module] | None = None) -> None:
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = [(-size) % p for size, p in zip(x.shape[2:], self.patch_size)]
        x = F.pad(x, (0, pads[2], 0, pads[1], 0, pads[0]))
        return self.norm(rearrange(self.proj(x), "b c d h w -> b d h w c"))


# timm's ViT init ("timm" mode of VisionTransformer.init_weights): trunc-normal(std 0.02) Linear weights,
# zero biases, a submodule's own init_weights(). needs_reset=False leaves Conv / LayerNorm / BatchNorm at
# their construction init (LayerNorm: ones / zeros, as timm's), so no random draw is spent on them.
_VIT_INIT = partial(init_weights_vit_timm, needs_reset=False)


def init_vit_weights(model: nn.Module) -> None:
    """timm's ViT init on every submodule of ``model`` (``timm.models.vision_transformer.init_weights_vit_timm``).

    The root is included when it has no ``init_weights`` of its own (a bare ``nn.Linear`` head gets
    initialised); a model calling this from its ``init_weights`` is not re-entered.
    """
    named_apply(_VIT_INIT, model, include_root=not hasattr(model, "init_weights"))
