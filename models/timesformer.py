"""TimeSformer: ViT with divided space-time attention (Bertasius et al., 2021), SVT flavour.

Layout follows timm's ``vision_transformer.py``: blocks, model class, init, ``checkpoint_filter_fn``,
factory, named variants. Parameter names are the official TimeSformer / timm ViT names
(``cls_token``, ``pos_embed``, ``time_embed``, ``patch_embed.proj``, ``blocks.N.{norm1, attn,
temporal_norm1, temporal_attn, temporal_fc, norm2, mlp}``, ``norm``, ``head``) so that timm / DINO
image checkpoints and official TimeSformer checkpoints load from a local file.

Dynamic positional embeddings (SVT Sec. 3.2.3): ``pos_embed`` is stored for the largest spatial grid
(``img_size // patch_size``) and ``time_embed`` for ``num_frames`` frames; each forward resamples them to
the input's grid and length. The default is the official SVT / TimeSformer code's: ``F.interpolate(...,
mode="nearest")`` on the 2-D grid and on the time axis, in the model's own dtype (kahnchana/svt
``models/timesformer.py``, ``VisionTransformer.forward_features``), so official checkpoints give the
official features at every view size. ``space_interp="bicubic"`` (timm's ``resample_abs_pos_embed``)
and ``time_interp="linear"`` are selectable. At the native size the stored embedding is used unchanged.

Token layout inside the blocks: ``b (t n) d`` with the CLS token in front, i.e. patches of frame 0,
then frame 1, ... The official code orders ``(h w t)``; the order has no parameters, and ``(t n)``
makes the spatial step a free view.
"""
from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from timm.layers import DropPath, Mlp, PatchEmbed, resample_abs_pos_embed, trunc_normal_
from torch.utils.checkpoint import checkpoint

from models.layers import Attention, Tokens, call_packed, init_vit_weights, map_tokens
from models.pretrained import pretrained_state_dict

__all__ = [
    "DividedSpaceTimeBlock",
    "TimeSformer",
    "checkpoint_filter_fn",
    "interpolate_pos_embed",
    "interpolate_time_embed",
    "load_pretrained",
    "split_checkpoint",
    "timesformer_tiny_patch16",
    "timesformer_small_patch16",
    "timesformer_base_patch16",
]

SpaceInterp = Literal["nearest", "bicubic"]
TimeInterp = Literal["nearest", "linear"]
TemporalInit = Literal["fresh", "copy"]


class DividedSpaceTimeBlock(nn.Module):
    """One TimeSformer block: temporal attention, spatial attention, MLP (all pre-norm, residual).

    Temporal step: each spatial location attends over the T frames (CLS excluded); the result goes
    through ``temporal_fc`` (zero-initialised, so a fresh block starts as a ViT block) and is added to
    the patch tokens. Spatial step: the CLS token is copied to every frame, each frame attends over
    its N patches plus CLS, and the per-frame CLS outputs are averaged back into one CLS residual.

    Args:
        dim, num_heads, mlp_ratio, qkv_bias: ViT block sizes (timm names).
        drop: dropout in the projections / MLP.
        attn_drop: attention dropout.
        drop_path: stochastic depth rate of this block.
        act_layer, norm_layer: swappable layer types (timm convention).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 act_layer: type[nn.Module] = nn.GELU, norm_layer: type[nn.Module] = nn.LayerNorm) -> None:
        super().__init__()
        self.temporal_norm1 = norm_layer(dim)
        self.temporal_attn = Attention(dim, num_heads, qkv_bias, attn_drop, drop)
        self.temporal_fc = nn.Linear(dim, dim)
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=drop)

    def forward(self, x: Tokens, num_frames: int | Sequence[int]) -> torch.Tensor | list[torch.Tensor]:
        """x: ``(B, 1 + T*N, D)`` laid out ``b (1 + (t n)) d``; returns the same shape.

        Also takes several clips at once (any T, any grid): a list of ``(B_i, 1 + T_i*N_i, D)`` with a
        list of their ``T_i``. Every matmul then runs once over the tokens of all clips and attention
        once per distinct sequence length; equals the block on each clip (up to float rounding).
        """
        if isinstance(x, torch.Tensor):
            return self._forward([x], [int(num_frames)])[0]  # type: ignore[arg-type]
        return self._forward(list(x), [int(t) for t in num_frames])  # type: ignore[union-attr]

    def _forward(self, xs: list[torch.Tensor], frames: list[int]) -> list[torch.Tensor]:
        cls_tokens = [x[:, :1] for x in xs]
        patches = [x[:, 1:] for x in xs]
        # Temporal attention: one sequence of T tokens per spatial location. Drop path per (b n)
        # sequence, as the official block (kahnchana/svt models/timesformer.py Block.forward).
        xt = [rearrange(p, "b (t n) d -> (b n) t d", t=t) for p, t in zip(patches, frames)]
        res_temporal = call_packed(self.temporal_attn, map_tokens(self.temporal_norm1, xt))
        res_temporal = [rearrange(self.drop_path(r), "(b n) t d -> b (t n) d", b=x.shape[0])
                        for r, x in zip(res_temporal, xs)]
        patches = [p + r for p, r in zip(patches, map_tokens(self.temporal_fc, res_temporal))]

        # Spatial attention: one sequence of 1 + N tokens per frame, CLS copied into every frame.
        xs_spatial = []
        for cls_token, p, t in zip(cls_tokens, patches, frames):
            cls_per_frame = rearrange(cls_token.expand(-1, t, -1), "b t d -> (b t) 1 d")
            xs_spatial.append(torch.cat((cls_per_frame, rearrange(p, "b (t n) d -> (b t) n d", t=t)), dim=1))
        res_spatial = call_packed(self.attn, map_tokens(self.norm1, xs_spatial))
        outputs = []
        for cls_token, p, r, t in zip(cls_tokens, patches, res_spatial, frames):
            r = self.drop_path(r)
            res_cls = rearrange(r[:, :1], "(b t) 1 d -> b t d", t=t).mean(dim=1, keepdim=True)
            res_patches = rearrange(r[:, 1:], "(b t) n d -> b (t n) d", t=t)
            outputs.append(torch.cat((cls_token, p), dim=1) + torch.cat((res_cls, res_patches), dim=1))
        mlp_out = map_tokens(lambda y: self.mlp(self.norm2(y)), outputs)
        return [x + self.drop_path(m) for x, m in zip(outputs, mlp_out)]


def interpolate_pos_embed(pos_embed: torch.Tensor, grid_hw: tuple[int, int], mode: SpaceInterp = "nearest",
                          num_prefix_tokens: int = 1) -> torch.Tensor:
    """Resample a ViT ``pos_embed`` ``(1, prefix + Gh*Gw, D)`` to ``grid_hw``; square stored grid assumed.

    ``nearest`` is the official SVT / TimeSformer op (``F.interpolate(grid, size=(H, W), mode="nearest")``,
    i.e. source index ``floor(dst * stored / new)`` per axis), computed in the tensor's own dtype so a
    float64 model stays float64. ``bicubic`` goes through timm's ``resample_abs_pos_embed`` (which works in
    float32) without antialiasing, as DINO's ``interpolate_pos_encoding``. The prefix (CLS) embedding is
    kept as is; at the native grid the stored tensor itself is returned.
    """
    patch_count = pos_embed.shape[1] - num_prefix_tokens
    stored = int(math.isqrt(patch_count))
    if stored * stored != patch_count:
        raise ValueError(f"pos_embed holds {patch_count} patch positions, not a square grid")
    grid_hw = (int(grid_hw[0]), int(grid_hw[1]))
    if (stored, stored) == grid_hw:
        return pos_embed
    if mode == "bicubic":
        return resample_abs_pos_embed(pos_embed, list(grid_hw), old_size=[stored, stored],
                                      num_prefix_tokens=num_prefix_tokens, interpolation="bicubic", antialias=False)
    if mode != "nearest":
        raise ValueError(f"interpolate_pos_embed: mode must be 'nearest' or 'bicubic', got {mode!r}")
    prefix, patch_pos = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    grid = rearrange(patch_pos, "1 (gh gw) d -> 1 d gh gw", gh=stored)
    grid = F.interpolate(grid, size=grid_hw, mode="nearest")
    return torch.cat((prefix, rearrange(grid, "1 d gh gw -> 1 (gh gw) d")), dim=1)


def interpolate_time_embed(time_embed: torch.Tensor, num_frames: int, mode: TimeInterp = "nearest") -> torch.Tensor:
    """Resample ``time_embed`` ``(1, T_stored, D)`` to ``num_frames`` in its own dtype.

    ``nearest`` is the official op (``F.interpolate(time_embed.transpose(1, 2), size=T, mode="nearest")``);
    ``linear`` uses ``align_corners=False``. The stored tensor itself at the native length.
    """
    if time_embed.shape[1] == num_frames:
        return time_embed
    if mode not in ("nearest", "linear"):
        raise ValueError(f"interpolate_time_embed: mode must be 'nearest' or 'linear', got {mode!r}")
    kwargs = {"align_corners": False} if mode == "linear" else {}
    seq = F.interpolate(rearrange(time_embed, "1 t d -> 1 d t"), size=num_frames, mode=mode, **kwargs)
    return rearrange(seq, "1 d t -> 1 t d")


class TimeSformer(nn.Module):
    """Video ViT with divided space-time attention taking ``(B, C, T, H, W)``.

    Args:
        img_size: largest spatial input; ``pos_embed`` is stored for ``img_size // patch_size`` squared.
        patch_size: spatial patch (frames are not merged in time, as in TimeSformer).
        in_chans: input channels.
        num_classes: classifier outputs; 0 makes ``head`` an ``nn.Identity`` (SSL pretraining).
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: ViT sizes.
        num_frames: length ``time_embed`` is stored for (SVT paper: the largest training T, 16; the
            official code and its checkpoints: 8).
        drop_rate, attn_drop_rate, drop_path_rate: regularisation (stochastic depth grows linearly).
        space_interp: ``nearest`` (official SVT / TimeSformer) or ``bicubic`` resampling of ``pos_embed``,
            per input and when a checkpoint is loaded.
        time_interp: ``nearest`` (official) or ``linear`` resampling of ``time_embed``, likewise.
        grad_checkpointing: recompute each block in backward (activation checkpointing).
        norm_layer: normalisation type (timm uses LayerNorm eps 1e-6).
    """

    # forward_features takes a list of clips of any shapes and packs them (MultiViewRunner(packed=True))
    packs_clips = True

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 0,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, num_frames: int = 8, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 space_interp: SpaceInterp = "nearest", time_interp: TimeInterp = "nearest",
                 grad_checkpointing: bool = False, norm_layer: type[nn.Module] | None = None) -> None:
        super().__init__()
        if img_size % patch_size != 0:
            raise ValueError(f"TimeSformer: img_size {img_size} is not a multiple of patch_size {patch_size}")
        if space_interp not in ("nearest", "bicubic"):
            raise ValueError(f"TimeSformer: space_interp must be 'nearest' or 'bicubic', got {space_interp!r}")
        if time_interp not in ("nearest", "linear"):
            raise ValueError(f"TimeSformer: time_interp must be 'nearest' or 'linear', got {time_interp!r}")
        if num_frames < 1 or depth < 1:
            raise ValueError(f"TimeSformer: num_frames ({num_frames}) and depth ({depth}) must be >= 1")
        norm_layer = norm_layer or (lambda d: nn.LayerNorm(d, eps=1e-6))
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.embed_dim = self.num_features = embed_dim
        self.depth = depth
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.num_frames = num_frames
        self.grid_size = img_size // patch_size
        self.space_interp = space_interp
        self.time_interp = time_interp
        self.grad_checkpointing = grad_checkpointing

        # timm's per-image patch embedding (same ``patch_embed.proj`` names as timm / DINO ViTs); any H, W
        # that are multiples of the patch (``strict_img_size=False``), tokens flattened to ``(gh gw)``.
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, strict_img_size=False)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid_size ** 2, embed_dim))
        self.time_embed = nn.Parameter(torch.zeros(1, num_frames, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        self.time_drop = nn.Dropout(drop_rate)
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # works on the meta device too
        self.blocks = nn.ModuleList([
            DividedSpaceTimeBlock(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, dpr[i],
                                  norm_layer=norm_layer)
            for i in range(depth)
        ])
        self.norm = norm_layer(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    def init_weights(self) -> None:
        """timm ViT init; ``time_embed`` starts at zero and every ``temporal_fc`` at zero (TimeSformer)."""
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        init_vit_weights(self)
        for block in self.blocks:
            # The official code zeroes blocks 1.. only; zeroing all makes a fresh model an exact
            # ViT at init, which the image-weight loading relies on.
            nn.init.zeros_(block.temporal_fc.weight)
            nn.init.zeros_(block.temporal_fc.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "time_embed"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Patchify and add interpolated space/time embeddings: ``(B, C, T, H, W)`` -> ``(B, 1 + T*N, D)``."""
        if x.ndim != 5 or x.shape[1] != self.in_chans:
            raise ValueError(f"TimeSformer expects (B, {self.in_chans}, T, H, W), got {tuple(x.shape)}")
        batch, _, num_frames, height, width = x.shape
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"TimeSformer: H={height}, W={width} must be multiples of patch {self.patch_size}")
        tokens = self.patch_embed(rearrange(x, "b c t h w -> (b t) c h w"))   # (b t) (gh gw) d
        grid_hw = self.patch_embed.dynamic_feat_size((height, width))
        pos_embed = interpolate_pos_embed(self.pos_embed, grid_hw, self.space_interp)
        # CLS gets its position embedding once (official code adds it per frame, then keeps frame 0's).
        tokens = self.pos_drop(tokens + pos_embed[:, 1:])
        cls_token = self.cls_token + pos_embed[:, :1]
        time_embed = interpolate_time_embed(self.time_embed, num_frames, self.time_interp)
        tokens = rearrange(tokens, "(b t) n d -> b t n d", b=batch) + rearrange(time_embed, "1 t d -> 1 t 1 d")
        tokens = self.time_drop(rearrange(tokens, "b t n d -> b (t n) d"))
        return torch.cat((cls_token.expand(batch, -1, -1), tokens), dim=1), num_frames

    def _blocks(self, clips: list[torch.Tensor]) -> list[torch.Tensor]:
        """Embedded clips through every block (packed when there are several); un-normalised tokens."""
        embedded = [self.embed(c) for c in clips]
        tokens, frames = [e[0] for e in embedded], [e[1] for e in embedded]
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                tokens = checkpoint(call_packed, block, tokens, frames, use_reentrant=False)
            else:
                tokens = call_packed(block, tokens, frames)
        return tokens

    def forward_tokens(self, x: Tokens) -> torch.Tensor | list[torch.Tensor]:
        """All normalised tokens ``(B, 1 + T*N, D)`` (CLS first, then ``(t n)``); a list for a list of clips."""
        if isinstance(x, torch.Tensor):
            return self.norm(self._blocks([x])[0])
        return map_tokens(self.norm, self._blocks(list(x)))

    def forward_features(self, x: Tokens) -> torch.Tensor | list[torch.Tensor]:
        """CLS feature ``(B, embed_dim)`` of a ``(B, C, T, H, W)`` clip.

        A list of clips of any shapes (SVT's views: different T and size) gives a list of features from
        one packed pass: every matmul of every block runs once over the tokens of all clips, attention
        once per sequence length. Equals the features of each clip alone up to float rounding;
        ``MultiViewRunner(packed=True)`` calls it so.
        """
        if isinstance(x, torch.Tensor):
            return self.norm(self._blocks([x])[0][:, 0])
        return map_tokens(self.norm, [t[:, 0] for t in self._blocks(list(x))])

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return features if pre_logits else self.head(features)

    def forward(self, x: Tokens) -> torch.Tensor | list[torch.Tensor]:
        """Classifier output of a clip (the features when ``num_classes=0``), or a list for a list of clips."""
        features = self.forward_features(x)
        if isinstance(features, torch.Tensor):
            return self.forward_head(features)
        return [self.forward_head(f) for f in features]


# Keys of image / TimeSformer checkpoints that this model has no counterpart for; dropped.
_IGNORED_SOURCE_KEYS = ("fc_norm.weight", "fc_norm.bias", "norm_pre.weight", "norm_pre.bias",
                        "head_drop", "reg_token", "dist_token", "head_dist.weight", "head_dist.bias")
# Outer dicts of checkpoint files: TimeSformer "model_state", DeiT/MAE "model", timm "state_dict",
# DINO / SVT training checkpoints "teacher" (the network DINO and SVT evaluate and release).
_WRAPPERS = ("model_state", "model", "state_dict", "teacher")


def split_checkpoint(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Unwrap a checkpoint into ``(backbone entries, projection-head entries)``, prefixes removed.

    A DINO / SVT layout (``{"teacher": {"backbone.*", "head.*"}}``, DINO's ``MultiCropWrapper``) splits
    into its backbone and its DINO head (DINO's names, loadable into ``models.DINOHead``); a timm, DINO
    image or TimeSformer state dict (``module.`` / ``model.`` prefixes) is all backbone (its ``head.*``
    is a classifier). Nothing is dropped here: every source tensor lands in one of the two dicts.
    """
    for wrapper in _WRAPPERS:
        if isinstance(state_dict.get(wrapper), dict):
            state_dict = state_dict[wrapper]
            break
    cleaned: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        for prefix in ("module.", "model."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        cleaned[key] = value
    if not any(key.startswith("backbone.") for key in cleaned):
        return cleaned, {}
    backbone = {k[len("backbone."):]: v for k, v in cleaned.items() if k.startswith("backbone.")}
    head = {k[len("head."):]: v for k, v in cleaned.items() if k.startswith("head.")}
    other = sorted(k for k in cleaned if not k.startswith(("backbone.", "head.")))
    if other:
        raise ValueError(f"checkpoint: keys outside backbone.* / head.* in a DINO-layout state dict: {other[:5]}")
    return backbone, head


def checkpoint_filter_fn(state_dict: dict, model: TimeSformer,
                         temporal_init: TemporalInit = "fresh") -> dict[str, torch.Tensor]:
    """Adapt a timm / DINO ViT, official TimeSformer or SVT release state dict to ``model``.

    Handles the wrappers and prefixes of ``split_checkpoint`` (a DINO / SVT ``head.*`` is not the
    backbone's and is left out: load it with ``split_checkpoint``). ``pos_embed`` / ``time_embed`` of another
    size are resampled with the model's own ``space_interp`` / ``time_interp`` (nearest by default, as the
    official TimeSformer ``load_pretrained`` does for ``time_embed``; its 1-D resampling of the flattened
    ``pos_embed`` is not copied: a 2-D grid is resampled in 2-D). Stored nearest resampling composes
    exactly with the per-input one when the new length is a multiple of the old (8 -> 16 frames), so an
    official 8-frame checkpoint in a 16-frame model gives the official features at every T.
    Image checkpoints get the temporal weights of every block copied from the spatial ones
    (``temporal_init="copy"``, the official TimeSformer / SVT code) or left at the model's fresh random
    init (``"fresh"``, SVT paper Sec. 4: "We randomly initialize weights relevant to temporal attention"),
    always with zero ``temporal_fc`` (so the temporal branch starts as a no-op; on a 1-frame clip the
    model equals the image ViT) and zero ``time_embed``. A classifier ``head.*`` is dropped when its
    shape differs from the model's. Every other tensor is kept as stored.

    Returns a dict that ``model.load_state_dict(..., strict=True)`` accepts.
    """
    if temporal_init not in ("copy", "fresh"):
        raise ValueError(f"checkpoint_filter_fn: temporal_init must be 'copy' or 'fresh', got {temporal_init!r}")
    backbone, _ = split_checkpoint(state_dict)
    model_state = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, value in backbone.items():
        if key in _IGNORED_SOURCE_KEYS:
            continue
        if key == "patch_embed.proj.weight" and value.ndim == 5:
            raise ValueError("checkpoint_filter_fn: 3-D patch embedding (ViViT-style tubelets) is not supported")
        if key == "pos_embed":
            value = interpolate_pos_embed(value, (model.grid_size, model.grid_size), model.space_interp)
        elif key == "time_embed":
            value = interpolate_time_embed(value, model.num_frames, model.time_interp)
        elif key.startswith("head.") and (key not in model_state or model_state[key].shape != value.shape):
            continue
        out[key] = value

    is_image_checkpoint = "time_embed" not in out
    if is_image_checkpoint:
        out["time_embed"] = torch.zeros_like(model_state["time_embed"])
        for i in range(model.depth):
            block = f"blocks.{i}."
            for name in ("weight", "bias"):
                out[f"{block}temporal_fc.{name}"] = torch.zeros_like(model_state[f"{block}temporal_fc.{name}"])
                out[f"{block}temporal_norm1.{name}"] = (out[f"{block}norm1.{name}"].clone() if temporal_init == "copy"
                                                        else model_state[f"{block}temporal_norm1.{name}"])
            for sub in ("qkv.weight", "qkv.bias", "proj.weight", "proj.bias"):
                target = f"{block}temporal_attn.{sub}"
                if target not in model_state:
                    continue
                # "fresh" keeps the model's random init here: zero attention weights behind a zero
                # temporal_fc would get no gradient at all and the branch would stay dead.
                out[target] = out[f"{block}attn.{sub}"].clone() if temporal_init == "copy" else model_state[target]
    if "head.weight" in model_state and "head.weight" not in out:
        # Fresh classifier for a new label set: keep the model's own init.
        out["head.weight"] = model_state["head.weight"]
        out["head.bias"] = model_state["head.bias"]
    return out


def load_pretrained(model: TimeSformer, source: str | None, temporal_init: TemporalInit = "fresh") -> None:
    """Load ``source`` (a ``model.pretrained`` value: file or timm tag, ``models.pretrained``) into ``model``
    strictly, after ``checkpoint_filter_fn``."""
    weights = pretrained_state_dict(source)
    if weights is None:
        return
    path, state_dict = weights
    try:
        model.load_state_dict(checkpoint_filter_fn(state_dict, model, temporal_init), strict=True)
    except (RuntimeError, KeyError, ValueError) as error:
        raise ValueError(f"{path}: checkpoint does not fit {type(model).__name__}: {error}") from error


def _create_timesformer(pretrained: str | None = None, temporal_init: TemporalInit = "fresh", **kwargs) -> TimeSformer:
    model = TimeSformer(**kwargs)
    load_pretrained(model, pretrained, temporal_init)
    return model


def timesformer_tiny_patch16(**kwargs) -> TimeSformer:
    """Tiny (ViT-Ti/16: 192 wide, 12 deep, 3 heads) — CPU tests use fewer blocks via ``depth=``."""
    return _create_timesformer(**{"embed_dim": 192, "depth": 12, "num_heads": 3, **kwargs})


def timesformer_small_patch16(**kwargs) -> TimeSformer:
    """ViT-S/16 sized TimeSformer (384 wide, 12 deep, 6 heads)."""
    return _create_timesformer(**{"embed_dim": 384, "depth": 12, "num_heads": 6, **kwargs})


def timesformer_base_patch16(**kwargs) -> TimeSformer:
    """ViT-B/16 sized TimeSformer (768 wide, 12 deep, 12 heads): the SVT backbone."""
    return _create_timesformer(**{"embed_dim": 768, "depth": 12, "num_heads": 12, **kwargs})
