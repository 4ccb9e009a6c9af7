"""Clip-level protocols of the papers: a linear classifier trained on video clips through the backbone.

One training loop serves three named protocols (``PROTOCOLS``); every result records which one it
used and any setting changed from it.

* ``svt-finetune`` (SVT Sec. 4.1 "Fine-tuning"): the SSL head replaced by a linear layer, the whole
  network trained on slow-fast clips for 15 epochs with SGD (lr 5e-3, /10 at epochs 11 and 14,
  momentum 0.9, weight decay 1e-4, batch 32), tested with slow-fast inference (Sec. 3.4: two clips,
  (8, 224) and (64, 96), 3 spatial crops each).
* ``svt-linear`` (SVT Sec. 4.1 "Linear"): the same clips, the backbone frozen, only the linear layer
  trained: SGD lr 8e-3, cosine decay, momentum 0.9, batch 32, 20 epochs; same slow-fast test.
* ``lstcl-finetune`` (LSTCL Sec. 4): one 8-frame clip at stride 8 from a random start, 200 epochs;
  test: 5 clips of stride 8 placed uniformly over the video, centre crop, predictions averaged.

Slow-fast (SVT Fig. 3): the classifier sees ``CLS(slow) + CLS(fast)``, one sum, no extra parameters.
Training clips are the SVT recipe's views without colour augmentation: the slow clip is a global view
(8 frames at 224), the fast clip a view of 64 frames at 96 over the same kind of span (a random 90%
of the video, random resized crop + flip, each clip drawn independently). At test time the softmax
scores of the views (crop pairs / clips) are averaged.

It runs through the trainer's DeepSpeed machinery (``training.engine``: process group, param groups
without decay on biases / norms, the DeepSpeed JSON incl. ZeRO stage and bf16), so the same command
runs on one CPU process, under ``torchrun`` or ``deepspeed``. ``batch_size`` is the global batch (the
papers' figure); each rank takes ``batch_size / world_size``. Every optimizer step appends the
optimizer's param-group settings (lr, momentum, weight decay) and the global batch to
``OUT/finetune_steps.jsonl``. Checkpoints are DeepSpeed's own files (``engine.save_checkpoint``) plus
the epoch in the client state and each rank's loader position, every ``ckpt_every_epochs`` epochs and
when ``max_steps`` stops a run, under ``OUT/checkpoints/step_N``; a rerun with ``--resume auto``
continues from the newest one with the same next batches. Resuming needs the same ZeRO stage and
world size (DeepSpeed's own files; DESIGN.md section 8).

Not the trainer's ``CheckpointManager``: its portable state stores AdamW moments by name and does
not fit SGD's momentum buffer.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipelines.config import EvalConfig
from typed_config import precision_name, torch_dtype

__all__ = ["FinetuneConfig", "PROTOCOLS", "resolve_protocol", "VideoClassifier", "epoch_lr", "multistep_lr",
           "evaluate_classifier", "run_finetune_cli"]

# The papers' protocols. Each entry names every setting that defines the protocol; run mechanics
# (threads, loader, ZeRO stage, precision, checkpoint period, seed) are not part of it.
PROTOCOLS: dict[str, dict[str, Any]] = {
    "svt-finetune": dict(
        epochs=15, lr=5e-3, schedule="multistep", milestones=(11, 14), gamma=0.1,  # SVT Sec. 4.1 (TimeSformer's)
        momentum=0.9, weight_decay=1e-4, batch_size=32,                             # SVT Sec. 4.1
        freeze_backbone=False, head_init_std=0.02,   # linear layer init as TimeSformer's / timm's head
        inputs="slowfast",                            # SVT Sec. 4.1: "two clips ... during fine-tuning"
        # Our choice: the SVT global view's temporal span and crop scale (the paper names no fine-tuning
        # augmentation; the official SVT code releases no fine-tuning script).
        train_span=0.9, train_scale=(0.4, 1.0), train_stride=0,
        eval=dict(slow_frames=8, slow_size=224, fast_frames=64, fast_size=96,   # SVT Sec. 3.4 / Fig. 3
                  clips=1, crops=3, stride=0)),  # SVT Sec. 4.1: 2 clips x 3 crops = 6 views
    "svt-linear": dict(
        # SVT Sec. 4.1 "Linear": SGD lr 8e-3 (used as stated, at batch 32; the official eval_linear.py scales
        # its lr by batch / 256 and its script passes 1e-3 at batch 16), cosine decay to 0 per epoch as
        # the official eval_linear.py (CosineAnnealingLR over the epochs), momentum 0.9, batch 32, 20 epochs.
        epochs=20, lr=8e-3, schedule="cosine", milestones=(), gamma=1.0,
        momentum=0.9, weight_decay=0.0, batch_size=32,  # weight decay 0: official eval_linear.py
        freeze_backbone=True, head_init_std=0.01,       # N(0, 0.01): official LinearClassifier (DINO's)
        inputs="slowfast",
        train_span=0.9, train_scale=(0.4, 1.0), train_stride=0,  # as svt-finetune (our choice)
        eval=dict(slow_frames=8, slow_size=224, fast_frames=64, fast_size=96, clips=1, crops=3, stride=0)),
    "lstcl-finetune": dict(
        # LSTCL Sec. 4: fine-tuning for 200 epochs with one T=8 clip at stride 8 from a random start.
        # The paper names no optimizer for it: TimeSformer's fine-tuning SGD (lr 5e-3, momentum 0.9,
        # weight decay 1e-4, /10 at 11/15 and 14/15 of the run, here scaled to 200 epochs) and SVT's
        # batch 32 are our choice.
        epochs=200, lr=5e-3, schedule="multistep", milestones=(147, 187), gamma=0.1,
        momentum=0.9, weight_decay=1e-4, batch_size=32,
        freeze_backbone=False, head_init_std=0.02,
        inputs="single",
        train_span=1.0, train_scale=(0.4, 1.0), train_stride=8,
        # LSTCL Sec. 4: "we sample uniformly 5 clip with center cropping"; stride 8 (Sec. 4.1, Fig. 4).
        eval=dict(slow_frames=8, slow_size=224, fast_frames=64, fast_size=96, clips=5, crops=1, stride=8)),
}
FINETUNE_PROTOCOLS = ("svt-finetune", "lstcl-finetune")
PROBE_PROTOCOLS = ("svt-linear",)


@dataclass
class FinetuneConfig:
    """Args (defaults: the ``svt-finetune`` protocol; ``PROTOCOLS`` gives each protocol's values):
        protocol: the named protocol these settings start from (recorded with every result).
        epochs, lr, schedule, milestones, gamma: ``multistep`` (lr * gamma ** milestones passed) or
            ``cosine`` (lr * (1 + cos(pi * epoch / epochs)) / 2), set once per epoch.
        momentum, weight_decay: SGD (no decay on biases and norms).
        batch_size: videos per optimizer step over all ranks.
        freeze_backbone: train only the linear layer (linear probe; backbone in eval mode, no gradients).
        head_init_std: std of the linear layer's (truncated) normal init.
        inputs: ``slowfast`` (classifier on CLS(slow) + CLS(fast)) or ``single`` (slow clip only).
        train_span, train_scale: training clips spread over a random ``train_span`` of the video, random
            resized crops of ``train_scale`` of the frame area, flipped with p 0.5.
        train_stride: > 0: the training clip takes a frame every ``train_stride`` from a random start.
        eval: the clips and the test views, the eval recipe's ``pipelines.config.EvalConfig``:
            ``slow_frames`` x ``slow_size`` and ``fast_frames`` x ``fast_size`` (the training clips have
            the same shapes), ``clips`` x ``crops`` test views per video (``stride`` 0: each clip spread
            over its 1/clips of the video; > 0: strided clips placed uniformly).
        zero_stage, precision: DeepSpeed ZeRO stage (0-3) and fp32 | bf16 (bf16 needs stage >= 1).
        num_threads, loader: DALI threads; dali | baseline loader.
        max_steps: stop after this many optimizer steps in total (0 = run every epoch); for smoke runs.
        ckpt_every_epochs: checkpoint period in epochs (the last epoch is always saved).
        torch_threads: torch CPU threads per rank (0 = torch's default).
        seed: seeds the head init and the loader.
    """

    # the flat keys of earlier versions and where they live now (an old config fails naming the new key)
    MOVED_KEYS: ClassVar[dict[str, str]] = {
        "clip_frames": "eval.slow_frames", "clip_size": "eval.slow_size", "fast_frames": "eval.fast_frames",
        "fast_size": "eval.fast_size", "test_clips": "eval.clips", "test_crops": "eval.crops",
        "test_stride": "eval.stride"}

    protocol: str = "svt-finetune"
    epochs: int = 15
    lr: float = 5e-3
    schedule: str = "multistep"
    milestones: tuple[int, ...] = (11, 14)
    gamma: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 32
    freeze_backbone: bool = False
    head_init_std: float = 0.02
    inputs: str = "slowfast"
    train_span: float = 0.9
    train_scale: tuple[float, float] = (0.4, 1.0)
    train_stride: int = 0
    eval: EvalConfig = field(default_factory=EvalConfig)
    zero_stage: int = 0
    precision: str = "fp32"
    num_threads: int = 2
    loader: str = "dali"
    max_steps: int = 0
    ckpt_every_epochs: int = 1
    torch_threads: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"finetune.protocol must be one of {sorted(PROTOCOLS)}, got {self.protocol!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.ckpt_every_epochs < 1 or self.max_steps < 0:
            raise ValueError("finetune.epochs, batch_size, ckpt_every_epochs must be >= 1 and max_steps >= 0")
        if self.lr <= 0 or not 0 < self.gamma <= 1 or not 0 <= self.momentum < 1 or self.weight_decay < 0:
            raise ValueError(f"finetune: need lr > 0, 0 < gamma <= 1, 0 <= momentum < 1, weight_decay >= 0 "
                             f"(got {self.lr}, {self.gamma}, {self.momentum}, {self.weight_decay})")
        if self.schedule not in ("multistep", "cosine"):
            raise ValueError(f"finetune.schedule must be multistep or cosine, got {self.schedule!r}")
        if list(self.milestones) != sorted(self.milestones):
            raise ValueError(f"finetune.milestones must be increasing epochs, got {self.milestones}")
        if self.inputs not in ("slowfast", "single"):
            raise ValueError(f"finetune.inputs must be slowfast or single, got {self.inputs!r}")
        if self.inputs == "slowfast" and self.train_stride:
            raise ValueError("finetune.train_stride applies to single-clip inputs; slow-fast clips are spread "
                             "over train_span")
        if not 0 < self.train_span <= 1 or self.train_stride < 0 or self.head_init_std <= 0:
            raise ValueError(f"finetune: need 0 < train_span <= 1, train_stride >= 0, head_init_std > 0 "
                             f"(got {self.train_span}, {self.train_stride}, {self.head_init_std})")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"finetune.zero_stage must be 0-3, got {self.zero_stage}")
        self.precision = precision_name(self.precision, "finetune.precision", allowed=("fp32", "bf16"))
        if self.precision == "bf16" and self.zero_stage == 0:
            raise ValueError("finetune: bf16 needs zero_stage >= 1 (DeepSpeed's stage-0 bf16 optimizer "
                             "takes a dummy step; DESIGN.md section 8)")

    def changes(self) -> dict[str, Any]:
        """Settings that differ from the named protocol, by dotted name (``eval.slow_frames``); a
        truncated run (``max_steps``) is one."""
        reference = _flat(asdict(protocol_config(self.protocol)))
        changed = {name: value for name, value in _flat(asdict(self)).items()
                   if name in _flat(PROTOCOLS[self.protocol]) and _plain(value) != _plain(reference[name])}
        if self.max_steps:
            changed["max_steps"] = self.max_steps
        return changed


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, (tuple, list)) else value


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"eval": {"clips": 5}}`` -> ``{"eval.clips": 5}``."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def protocol_config(name: str) -> FinetuneConfig:
    """The settings of protocol ``name`` (``PROTOCOLS``), run mechanics at their defaults."""
    from evaluation.config import config_from_dict

    return config_from_dict(FinetuneConfig, {**PROTOCOLS[name], "protocol": name}, "protocol")


def resolve_protocol(values: dict[str, Any], default: str, allowed: tuple[str, ...] | None = None,
                     section: str = "finetune") -> FinetuneConfig:
    """The named protocol's settings (``values["protocol"]``, else ``default``) overlaid with ``values``
    (a nested ``eval`` mapping overlays the protocol's ``eval`` key by key); a bad key is an error naming
    ``section.key``."""
    from typed_config import dataclass_from_dict

    name = values.get("protocol", default)
    allowed = allowed or tuple(PROTOCOLS)
    if name not in allowed:
        raise ValueError(f"protocol {name!r} is not one of {', '.join(allowed)}")
    return dataclass_from_dict(FinetuneConfig, {**values, "protocol": name}, section, base=protocol_config(name))


def epoch_lr(cfg: FinetuneConfig, epoch: int) -> float:
    """lr of ``epoch`` (0-based): multi-step decay, or cosine from ``lr`` to 0 over ``epochs`` (per epoch, as
    the official SVT / DINO eval_linear.py's ``CosineAnnealingLR(optimizer, epochs, eta_min=0)``)."""
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / cfg.epochs))
    return multistep_lr(cfg, epoch)


def multistep_lr(cfg: FinetuneConfig, epoch: int) -> float:
    """lr of ``epoch`` (0-based): ``lr * gamma ** (number of milestones <= epoch)``."""
    return cfg.lr * cfg.gamma ** sum(epoch >= m for m in cfg.milestones)


class VideoClassifier(nn.Module):
    """``backbone`` + a linear ``head`` on its CLS feature (the SSL head is not carried over).

    ``forward(slow, fast)`` classifies ``CLS(slow) + CLS(fast)`` (SVT slow-fast, Fig. 3). With
    ``freeze_backbone`` the backbone stays in eval mode and runs without gradients (linear probe).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, *, head_init_std: float = 0.02,
                 freeze_backbone: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.freeze_backbone = freeze_backbone
        self.head = nn.Linear(backbone.embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=head_init_std)
        nn.init.zeros_(self.head.bias)
        if freeze_backbone:
            self.backbone.requires_grad_(False)
            self.backbone.eval()

    def train(self, mode: bool = True) -> "VideoClassifier":
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()  # frozen features: no dropout / drop-path, as DINO's eval_linear
        return self

    def features(self, clip: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_backbone):
            return self.backbone.forward_features(clip)

    def forward(self, clip: torch.Tensor, fast: torch.Tensor | None = None) -> torch.Tensor:
        features = self.features(clip)
        if fast is not None:
            features = features + self.features(fast)
        return self.head(features)


def _train_data_config(cfg: FinetuneConfig, shards: str, mean, std):
    """Training clips: the SVT recipe's views (slow = global_0, fast = local_0) or, for a strided single clip,
    the LSTCL recipe's short clip (its long clip is one frame and unused). No colour augmentation."""
    from pipelines import DataConfig
    from pipelines.config import AugmentConfig, LSTCLConfig, SVTConfig

    clips = cfg.eval
    common = dict(shards=shards, num_threads=cfg.num_threads, mean=tuple(mean), std=tuple(std), shuffle=True,
                  drop_last=True, augment=AugmentConfig(jitter_p=0.0, grayscale_p=0.0, blur=False, solarize=False))
    if cfg.train_stride:
        return DataConfig(recipe="lstcl", **common,
                          lstcl=LSTCLConfig(short_frames=clips.slow_frames, short_stride=cfg.train_stride,
                                            long_frames=1, long_stride=cfg.train_stride, size=clips.slow_size,
                                            scale=tuple(cfg.train_scale)))
    fast = (clips.fast_frames,) if cfg.inputs == "slowfast" else ()
    return DataConfig(recipe="svt", **common,
                      svt=SVTConfig(global_frames=(clips.slow_frames,), global_size=clips.slow_size,
                                    global_span=cfg.train_span, global_scale=tuple(cfg.train_scale),
                                    local_frames=fast, local_size=clips.fast_size, local_span=cfg.train_span,
                                    local_scale=tuple(cfg.train_scale)))


def _train_views(cfg: FinetuneConfig) -> tuple[str, str | None]:
    """(slow view, fast view or None) of the training loader's batches."""
    if cfg.train_stride:
        return "short", None
    return "global_0", ("local_0" if cfg.inputs == "slowfast" else None)


def _test_data_config(cfg: FinetuneConfig, shards: str, mean, std):
    """Test views: the eval recipe. Single-clip protocols ignore its fast clips (made one small frame)."""
    import dataclasses

    from pipelines import DataConfig

    views = cfg.eval if cfg.inputs == "slowfast" else dataclasses.replace(cfg.eval, fast_frames=1, fast_size=16)
    return DataConfig(shards=shards, recipe="eval", num_threads=cfg.num_threads, mean=tuple(mean), std=tuple(std),
                      shuffle=False, eval=views)


@torch.no_grad()
def evaluate_classifier(model: nn.Module, loader, device: torch.device, dtype: torch.dtype = torch.float32,
                        slowfast: bool = False) -> dict[str, float]:
    """Top-1 / top-5 (percent) with softmax scores averaged over the test views of a video (each slow view,
    or each slow view with the fast view of the same clip and crop); summed over ranks (each rank reads
    its own part of the shards)."""
    import torch.distributed as dist

    from evaluation.features import group_eval_views

    model.eval()
    slow_views = group_eval_views(loader.view_names)["slow"]
    # slow_K_J pairs with fast_K_J: the same clip position and crop.
    pairs = [(v, "fast" + v[len("slow"):] if slowfast else None) for v in slow_views]
    counts = torch.zeros(3, dtype=torch.float64)  # top-1 hits, top-5 hits, videos
    for batch in loader:
        labels = torch.as_tensor(batch["label"]).view(-1).long()
        scores = sum(F.softmax(model(batch[s].to(device, dtype),
                                     batch[f].to(device, dtype) if f else None).float(), dim=1).cpu()
                     for s, f in pairs) / len(pairs)
        ranked = scores.argsort(dim=1, descending=True, stable=True)
        hits = ranked.eq(labels.view(-1, 1))
        counts += torch.tensor([hits[:, :1].any(1).sum().item(), hits[:, : min(5, scores.shape[1])].any(1).sum().item(),
                                len(labels)], dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(counts)
    model.train()
    return {"top1": 100.0 * counts[0].item() / max(counts[2].item(), 1),
            "top5": 100.0 * counts[1].item() / max(counts[2].item(), 1), "num_val": int(counts[2].item())}


def describe(cfg: FinetuneConfig) -> str:
    """The variant column of the results table: what the classifier saw and how it was tested."""
    e = cfg.eval
    inputs = (f"slow-fast ({e.slow_frames}x{e.slow_size} + {e.fast_frames}x{e.fast_size})"
              if cfg.inputs == "slowfast" else f"{e.slow_frames}x{e.slow_size} clip")
    stride = f" stride {e.stride}" if e.stride else ""
    crops = "centre crop" if e.crops == 1 else f"{e.crops} crops"
    return f"{'frozen backbone, ' if cfg.freeze_backbone else ''}{inputs}; test {e.clips} clip(s){stride} x {crops}"


def _latest_epoch_tag(ckpt_root: Path) -> str | None:
    latest = ckpt_root / "latest"  # written by DeepSpeed only after every rank saved
    return latest.read_text().strip() if latest.is_file() else None


def run_finetune_cli(args: argparse.Namespace, values: dict[str, Any], *, default_protocol: str = "svt-finetune",
                     allowed: tuple[str, ...] = FINETUNE_PROTOCOLS, section: str = "finetune") -> int:
    """``evaluate.py finetune`` / ``probe``: train, checkpoint every epoch, test, append to the results table."""
    from evaluation.checkpoints import load_backbone
    from evaluation.results import ResultRecord, append_result
    from pipelines import build_loader
    from pipelines.config import IMAGENET_MEAN, IMAGENET_STD
    from training.config import Config
    from training.engine import build_param_groups, deepspeed_config, init_distributed

    cfg = resolve_protocol(values, default_protocol, allowed, section)
    dist_info = init_distributed("auto", torch_threads=cfg.torch_threads)
    rank, world = dist_info.rank, dist_info.world_size
    if cfg.batch_size % world:
        raise ValueError(f"finetune.batch_size {cfg.batch_size} (global) does not split over {world} ranks")
    rank_batch = cfg.batch_size // world
    out = Path(args.out)
    ckpt_root = out / "checkpoints"

    loaded = load_backbone(args.checkpoint, which=args.backbone, model_name=args.model,
                           model_kwargs=args.model_kwargs, seed=cfg.seed)
    mean = tuple(loaded.data_config.get("mean", IMAGENET_MEAN))
    std = tuple(loaded.data_config.get("std", IMAGENET_STD))
    label_map = json.loads((Path(args.train_shards) / "manifest.json").read_text()).get("label_map", {})
    if not label_map:
        raise ValueError(f"{args.train_shards}/manifest.json: no label_map; fine-tuning needs labelled shards")
    torch.manual_seed(cfg.seed)
    model = VideoClassifier(loaded.model.train(), num_classes=len(label_map), head_init_std=cfg.head_init_std,
                            freeze_backbone=cfg.freeze_backbone)

    trainer_cfg = Config()
    trainer_cfg.trainer.batch_size_per_gpu = rank_batch
    trainer_cfg.trainer.grad_accum_steps = 1
    trainer_cfg.trainer.zero_stage = cfg.zero_stage
    trainer_cfg.trainer.precision = cfg.precision
    trainer_cfg.optim.clip_grad = 0.0
    groups, infos = build_param_groups(model)  # trainable parameters only: the head alone when frozen
    for group, info in zip(groups, infos):
        group["weight_decay"] = cfg.weight_decay if info.weight_decay else 0.0
    optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           config=deepspeed_config(trainer_cfg, world))

    train_loader = build_loader(_train_data_config(cfg, args.train_shards, mean, std), batch_size=rank_batch,
                                shard_id=rank, num_shards=world, seed=cfg.seed, loader=cfg.loader)
    if len(train_loader) == 0:
        raise ValueError(f"{args.train_shards}: too few videos for one batch of {cfg.batch_size} "
                         f"(finetune.batch_size is the global batch)")
    slow_view, fast_view = _train_views(cfg)
    start_epoch, step = 0, 0
    tag = _latest_epoch_tag(ckpt_root) if args.resume == "auto" else (None if args.resume == "none" else args.resume)
    if tag is not None:
        load_path, client = engine.load_checkpoint(str(ckpt_root), tag=tag)
        if load_path is None:
            raise ValueError(f"{ckpt_root / tag}: DeepSpeed could not load this fine-tuning checkpoint")
        start_epoch, step = int(client["epoch"]), int(client["step"])
        if client.get("mid_epoch"):
            # Stopped inside an epoch (max_steps): continue from this rank's exact loader position.
            loader_file = ckpt_root / tag / f"loader_rank{rank:05d}.pt"
            train_loader.load_state_dict(torch.load(loader_file, map_location="cpu", weights_only=False))
        if rank == 0:
            print(f"resumed {ckpt_root / tag}: continuing at epoch {start_epoch}, step {step}")
    metrics_path, steps_path = out / "finetune_metrics.jsonl", out / "finetune_steps.jsonl"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        print(f"protocol {cfg.protocol}: {describe(cfg)}"
              + (f"; changed from the protocol: {cfg.changes()}" if cfg.changes() else ""))
    # bf16 engines hold bf16 module weights: the clips must match them.
    input_dtype = torch_dtype(cfg.precision)
    done = False
    for epoch in range(start_epoch, cfg.epochs):
        lr = epoch_lr(cfg, epoch)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        train_loader.set_epoch(epoch)
        started, losses = time.time(), []
        for batch in train_loader:
            clip = batch[slow_view].to(dist_info.device, input_dtype)
            fast = batch[fast_view].to(dist_info.device, input_dtype) if fast_view else None
            labels = torch.as_tensor(batch["label"]).view(-1).long().to(dist_info.device)
            loss = F.cross_entropy(engine(clip, fast).float(), labels)
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"fine-tuning loss is {loss.item()} at epoch {epoch}, step {step}")
            engine.backward(loss)
            if rank == 0:
                # What the optimizer is about to apply: the protocol's settings as they reach it.
                record = {"step": step, "epoch": epoch, "batch": len(labels) * world, "loss": loss.item(),
                          "optimizer": type(optimizer).__name__,
                          "param_groups": [{k: g[k] for k in ("lr", "momentum", "weight_decay")}
                                           | {"params": sum(p.numel() for p in g["params"])}
                                           for g in engine.optimizer.param_groups]}
                with open(steps_path, "a") as fh:
                    fh.write(json.dumps(record) + "\n")
            engine.step()
            losses.append(loss.item())
            step += 1
            if cfg.max_steps and step >= cfg.max_steps:
                done = True
                break
        mid_epoch = done and len(losses) < len(train_loader)
        if (epoch + 1) % cfg.ckpt_every_epochs == 0 or done or epoch == cfg.epochs - 1:
            tag = f"step_{step:08d}"
            (ckpt_root / tag).mkdir(parents=True, exist_ok=True)
            # The loader position goes in first: DeepSpeed names the tag in `latest` when it is done.
            torch.save(train_loader.state_dict(), ckpt_root / tag / f"loader_rank{rank:05d}.pt")
            engine.save_checkpoint(str(ckpt_root), tag=tag,
                                   client_state={"epoch": epoch if mid_epoch else epoch + 1, "step": step,
                                                 "mid_epoch": mid_epoch, "config": asdict(cfg),
                                                 "label_map": label_map})
        if rank == 0:
            record = {"epoch": epoch, "step": step, "lr": lr, "loss": sum(losses) / max(len(losses), 1),
                      "seconds": time.time() - started}
            with open(metrics_path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
            print(f"{cfg.protocol} epoch {epoch}: loss {record['loss']:.4f} lr {lr:.2e} ({len(losses)} steps)")
        if done:
            break

    test_loader = build_loader(_test_data_config(cfg, args.val_shards, mean, std), batch_size=rank_batch,
                               shard_id=rank, num_shards=world, seed=cfg.seed, loader=cfg.loader)
    metrics = evaluate_classifier(engine, test_loader, dist_info.device, input_dtype,
                                  slowfast=cfg.inputs == "slowfast")
    if rank == 0:
        variant = describe(cfg)
        changes = cfg.changes()
        print(f"{cfg.protocol} test ({variant}): top-1 {metrics['top1']:.1f}  top-5 {metrics['top5']:.1f} "
              f"on {metrics['num_val']} videos" + (f"  [changed from the protocol: {changes}]" if changes else ""))
        (out / "finetune_results.json").write_text(
            json.dumps({**metrics, "step": step, "protocol": cfg.protocol, "changes": changes}, indent=2) + "\n")
        if args.results:
            append_result(args.results, ResultRecord(
                protocol=cfg.protocol, variant=variant,
                feature="slow+fast CLS" if cfg.inputs == "slowfast" else "CLS",
                checkpoint=loaded.source, backbone=loaded.which, train_data=str(args.train_shards),
                val_data=str(args.val_shards), metrics={**metrics, "num_classes": len(label_map), "steps": step},
                settings=asdict(cfg), changes=changes))
    return 0
