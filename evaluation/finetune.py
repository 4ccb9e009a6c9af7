"""End-to-end fine-tuning: the pretrained backbone with a linear classifier instead of the SSL head.

Protocol (SVT Sec. 4.1): SGD, momentum 0.9, lr 5e-3 divided by 10 at epochs 11 and 14, 15 epochs,
one T=8 224x224 clip per video with random resized crop + flip (the SVT recipe's first global view,
colour augmentation off). Testing: ``test_clips`` temporal clips x ``test_crops`` spatial crops per
video, softmax scores averaged (LSTCL: 5 clips x 1 centre crop; SVT: 1 x 3).

It runs through the trainer's DeepSpeed machinery (``training.engine``: process group, param groups
without decay on biases / norms, the DeepSpeed JSON incl. ZeRO stage and bf16), so the same command
runs on one CPU process, under ``torchrun`` or ``deepspeed``. Checkpoints are DeepSpeed's own files
(``engine.save_checkpoint``) plus the epoch in the client state and each rank's loader position, every
``ckpt_every_epochs`` epochs and when ``max_steps`` stops a run, under ``OUT/checkpoints/step_N``; a
rerun with ``--resume auto`` continues from the newest one with the same next batches. Resuming needs
the same ZeRO stage and world size (DeepSpeed's own files; DESIGN.md section 8).

Not the trainer's ``CheckpointManager``: its portable state stores AdamW moments by name and does
not fit SGD's momentum buffer.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["FinetuneConfig", "VideoClassifier", "multistep_lr", "run_finetune_cli"]


@dataclass
class FinetuneConfig:
    """Args:
        epochs, lr, milestones, gamma: multi-step schedule (SVT: 15 epochs, 5e-3, /10 at 11 and 14).
        momentum, weight_decay: SGD (no decay on biases and norms).
        batch_size: clips per rank per step.
        zero_stage, precision: DeepSpeed ZeRO stage (0-3) and fp32 | bf16 (bf16 needs stage >= 1).
        clip_frames, clip_size: the training / test clip (SVT: 8 frames at 224).
        test_clips, test_crops: test views per video (LSTCL: 5 x 1 centre crop; SVT: 1 x 3).
        num_threads, loader: DALI threads; dali | baseline loader.
        max_steps: stop after this many optimizer steps in total (0 = run every epoch); for smoke runs.
        ckpt_every_epochs: checkpoint period in epochs (the last epoch is always saved).
        torch_threads: torch CPU threads per rank (0 = torch's default).
        seed: seeds the head init and the loader.
    """

    epochs: int = 15
    lr: float = 5e-3
    milestones: tuple[int, ...] = (11, 14)
    gamma: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 8
    zero_stage: int = 0
    precision: str = "fp32"
    clip_frames: int = 8
    clip_size: int = 224
    test_clips: int = 1
    test_crops: int = 3
    num_threads: int = 2
    loader: str = "dali"
    max_steps: int = 0
    ckpt_every_epochs: int = 1
    torch_threads: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.ckpt_every_epochs < 1 or self.max_steps < 0:
            raise ValueError("finetune.epochs, batch_size, ckpt_every_epochs must be >= 1 and max_steps >= 0")
        if self.lr <= 0 or not 0 < self.gamma <= 1 or not 0 <= self.momentum < 1:
            raise ValueError(f"finetune: need lr > 0, 0 < gamma <= 1, 0 <= momentum < 1 "
                             f"(got {self.lr}, {self.gamma}, {self.momentum})")
        if list(self.milestones) != sorted(self.milestones):
            raise ValueError(f"finetune.milestones must be increasing epochs, got {self.milestones}")
        if self.zero_stage not in (0, 1, 2, 3) or self.precision not in ("fp32", "bf16"):
            raise ValueError(f"finetune.zero_stage must be 0-3 and precision fp32|bf16, got "
                             f"{self.zero_stage}, {self.precision!r}")
        if self.precision == "bf16" and self.zero_stage == 0:
            raise ValueError("finetune: bf16 needs zero_stage >= 1 (DeepSpeed's stage-0 bf16 optimizer "
                             "takes a dummy step; DESIGN.md section 8)")
        if self.test_clips < 1 or self.test_crops not in (1, 3):
            raise ValueError(f"finetune.test_clips must be >= 1 and test_crops 1 or 3, got "
                             f"{self.test_clips}, {self.test_crops}")


def multistep_lr(cfg: FinetuneConfig, epoch: int) -> float:
    """lr of ``epoch`` (0-based): ``lr * gamma ** (number of milestones <= epoch)``."""
    return cfg.lr * cfg.gamma ** sum(epoch >= m for m in cfg.milestones)


class VideoClassifier(nn.Module):
    """``backbone`` + a linear ``head`` on its CLS feature (the SSL head is not carried over)."""

    def __init__(self, backbone: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, clip: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone.forward_features(clip))


def _data_configs(cfg: FinetuneConfig, shards: str, mean, std, *, train: bool):
    from pipelines import DataConfig
    from pipelines.config import AugmentConfig, EvalConfig, SVTConfig

    if train:
        # SVT recipe cut down to its first global view: random resized crop + flip, no colour jitter,
        # grayscale, blur or solarize (the fine-tuning augmentation of SVT / TimeSformer).
        return DataConfig(shards=shards, recipe="svt", num_threads=cfg.num_threads, mean=tuple(mean), std=tuple(std),
                          shuffle=True, drop_last=True,
                          svt=SVTConfig(global_frames=(cfg.clip_frames,), global_size=cfg.clip_size, local_frames=()),
                          augment=AugmentConfig(jitter_p=0.0, grayscale_p=0.0, blur=False, solarize=False))
    # Test views: the eval recipe's slow clips; its fast clips are made minimal and ignored.
    return DataConfig(shards=shards, recipe="eval", num_threads=cfg.num_threads, mean=tuple(mean), std=tuple(std),
                      shuffle=False, eval=EvalConfig(slow_frames=cfg.clip_frames, slow_size=cfg.clip_size,
                                                     fast_frames=1, fast_size=cfg.clip_size,
                                                     clips=cfg.test_clips, crops=cfg.test_crops))


@torch.no_grad()
def evaluate_classifier(model: nn.Module, loader, device: torch.device,
                        dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """Top-1 / top-5 (percent) with softmax scores averaged over every slow view of a video; summed
    over ranks (each rank reads its own part of the shards)."""
    import torch.distributed as dist

    from evaluation.features import group_eval_views

    model.eval()
    slow_views = group_eval_views(loader.view_names)["slow"]
    counts = torch.zeros(3, dtype=torch.float64)  # top-1 hits, top-5 hits, videos
    for batch in loader:
        labels = torch.as_tensor(batch["label"]).view(-1).long()
        scores = sum(F.softmax(model(batch[v].to(device, dtype)).float(), dim=1).cpu() for v in slow_views) / len(slow_views)
        ranked = scores.argsort(dim=1, descending=True, stable=True)
        hits = ranked.eq(labels.view(-1, 1))
        counts += torch.tensor([hits[:, :1].any(1).sum().item(), hits[:, : min(5, scores.shape[1])].any(1).sum().item(),
                                len(labels)], dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(counts)
    model.train()
    return {"top1": 100.0 * counts[0].item() / max(counts[2].item(), 1),
            "top5": 100.0 * counts[1].item() / max(counts[2].item(), 1), "num_val": int(counts[2].item())}


def _latest_epoch_tag(ckpt_root: Path) -> str | None:
    latest = ckpt_root / "latest"  # written by DeepSpeed only after every rank saved
    return latest.read_text().strip() if latest.is_file() else None


def run_finetune_cli(args: argparse.Namespace, values: dict[str, Any]) -> int:
    """``evaluate.py finetune``: train, checkpoint every epoch, test, append to the results table."""
    from evaluation.checkpoints import load_backbone
    from evaluation.config import config_from_dict
    from evaluation.results import ResultRecord, append_result
    from pipelines import build_loader
    from pipelines.config import IMAGENET_MEAN, IMAGENET_STD
    from training.config import Config
    from training.engine import build_param_groups, deepspeed_config, init_distributed

    cfg = config_from_dict(FinetuneConfig, values, "finetune")
    dist_info = init_distributed("auto", torch_threads=cfg.torch_threads)
    rank, world = dist_info.rank, dist_info.world_size
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
    model = VideoClassifier(loaded.model.train(), num_classes=len(label_map))

    trainer_cfg = Config()
    trainer_cfg.trainer.batch_size_per_gpu = cfg.batch_size
    trainer_cfg.trainer.grad_accum_steps = 1
    trainer_cfg.trainer.zero_stage = cfg.zero_stage
    trainer_cfg.trainer.precision = cfg.precision
    trainer_cfg.optim.clip_grad = 0.0
    groups, infos = build_param_groups(model)
    for group, info in zip(groups, infos):
        group["weight_decay"] = cfg.weight_decay if info.weight_decay else 0.0
    optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           config=deepspeed_config(trainer_cfg, world))

    train_loader = build_loader(_data_configs(cfg, args.train_shards, mean, std, train=True), batch_size=cfg.batch_size,
                                shard_id=rank, num_shards=world, seed=cfg.seed, loader=cfg.loader)
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
    metrics_path = out / "finetune_metrics.jsonl"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    # bf16 engines hold bf16 module weights: the clips must match them.
    input_dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    done = False
    for epoch in range(start_epoch, cfg.epochs):
        lr = multistep_lr(cfg, epoch)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        train_loader.set_epoch(epoch)
        started, losses = time.time(), []
        for batch in train_loader:
            clip = batch["global_0"].to(dist_info.device, input_dtype)
            labels = torch.as_tensor(batch["label"]).view(-1).long().to(dist_info.device)
            loss = F.cross_entropy(engine(clip).float(), labels)
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"fine-tuning loss is {loss.item()} at epoch {epoch}, step {step}")
            engine.backward(loss)
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
            print(f"finetune epoch {epoch}: loss {record['loss']:.4f} lr {lr:.2e} ({len(losses)} steps)")
        if done:
            break

    test_loader = build_loader(_data_configs(cfg, args.val_shards, mean, std, train=False), batch_size=cfg.batch_size,
                               shard_id=rank, num_shards=world, seed=cfg.seed, loader=cfg.loader)
    metrics = evaluate_classifier(engine, test_loader, dist_info.device, input_dtype)
    if rank == 0:
        variant = f"{cfg.test_clips}-clip x {cfg.test_crops}-crop test"
        print(f"finetune test ({variant}): top-1 {metrics['top1']:.1f}  top-5 {metrics['top5']:.1f} "
              f"on {metrics['num_val']} videos")
        (out / "finetune_results.json").write_text(json.dumps({**metrics, "step": step}, indent=2) + "\n")
        if args.results:
            append_result(args.results, ResultRecord(
                protocol="finetune", variant=variant, feature="end-to-end", checkpoint=loaded.source,
                backbone=loaded.which, train_data=str(args.train_shards), val_data=str(args.val_shards),
                metrics={**metrics, "num_classes": len(label_map), "steps": step}, settings=asdict(cfg)))
    return 0
