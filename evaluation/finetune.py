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

Training is ``training.Trainer`` with ``training.methods.ClassifierMethod`` (cross-entropy on a
``VideoClassifier``) and a recipe built from the protocol (``trainer_config``): SGD with momentum, the
protocol's per-epoch lr (``multistep`` / ``cosine_epochs``), weight decay on weights only, no clipping.
So it has the trainer's DeepSpeed engine (ZeRO stage, bf16), global data order, metrics
(``OUT/metrics.jsonl``) and checkpoint manager: ``OUT/checkpoints/step_N`` every ``ckpt_every_epochs``
epochs and at the end (or when ``max_steps`` stops a run), with ``portable.pt`` (fp32 weights and
SGD momentum by parameter name), so a rerun with ``--resume auto`` continues with the same next
batches in any rank layout, and ``evaluate.py`` reads a fine-tuned backbone like a pretrained one.
``batch_size`` is the global batch (the papers' figure); each rank takes ``batch_size / world_size``.
Every optimizer step appends the optimizer's param-group settings (lr, momentum, weight decay) and
the global batch to ``OUT/finetune_steps.jsonl`` (``trainer.optimizer_log``).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from common.precision import precision_name, torch_dtype
from common.typed_config import dataclass_from_dict
from evaluation.checkpoints import load_backbone
from evaluation.config import config_from_dict
from evaluation.features import group_eval_views
from evaluation.results import ResultRecord, append_result
from pipelines import DataConfig, build_loader
from pipelines.config import IMAGENET_MEAN, IMAGENET_STD, AugmentConfig, EvalConfig, LSTCLConfig, SVTConfig
from shard_tools.format import read_manifest
from training.checkpoint import TRAINER_FILE, find_latest
from training.config import Config, validate
from training.engine import init_distributed
from training.methods import ClassifierMethod, VideoClassifier
from training.trainer import Trainer
from training.trainer import epoch_lr as schedule_lr

__all__ = ["FinetuneConfig", "PROTOCOLS", "resolve_protocol", "VideoClassifier", "epoch_lr", "trainer_config",
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
                             "takes a dummy step; docs/design.md section 8)")

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
    return config_from_dict(FinetuneConfig, {**PROTOCOLS[name], "protocol": name}, "protocol")


def resolve_protocol(values: dict[str, Any], default: str, allowed: tuple[str, ...] | None = None,
                     section: str = "finetune") -> FinetuneConfig:
    """The named protocol's settings (``values["protocol"]``, else ``default``) overlaid with ``values``
    (a nested ``eval`` mapping overlays the protocol's ``eval`` key by key); a bad key is an error naming
    ``section.key``."""
    name = values.get("protocol", default)
    allowed = allowed or tuple(PROTOCOLS)
    if name not in allowed:
        raise ValueError(f"protocol {name!r} is not one of {', '.join(allowed)}")
    return dataclass_from_dict(FinetuneConfig, {**values, "protocol": name}, section, base=protocol_config(name))


def epoch_lr(cfg: FinetuneConfig, epoch: int) -> float:
    """lr of ``epoch`` (0-based): multi-step decay, or cosine from ``lr`` to 0 over ``epochs`` (per epoch, as
    the official SVT / DINO eval_linear.py's ``CosineAnnealingLR(optimizer, epochs, eta_min=0)``); the
    trainer's ``epoch_lr``, which sets it."""
    return schedule_lr(_SCHEDULES[cfg.schedule], cfg.lr, epoch, cfg.epochs, cfg.milestones, cfg.gamma)


# protocol schedule name -> the trainer's optim.schedule (both set once per epoch)
_SCHEDULES = {"multistep": "multistep", "cosine": "cosine_epochs"}


def trainer_config(cfg: FinetuneConfig, *, out: Path, rank_batch: int, steps_per_epoch: int, data: DataConfig,
                   model_name: str, model_kwargs: dict[str, Any]) -> Config:
    """The trainer recipe of a protocol run (validated like a pretraining recipe)."""
    recipe = Config(data=data)
    recipe.model.backbone, recipe.model.backbone_kwargs = model_name, dict(model_kwargs)
    o = recipe.optim
    o.optimizer, o.momentum = "sgd", cfg.momentum
    o.lr, o.lr_reference_batch = cfg.lr, 0  # the protocols state their lr at their own batch: no scaling
    o.schedule, o.milestones, o.gamma = _SCHEDULES[cfg.schedule], list(cfg.milestones), cfg.gamma
    o.weight_decay = o.weight_decay_end = cfg.weight_decay  # constant; SGD's coupled decay, as before
    o.warmup_epochs, o.clip_grad, o.freeze_last_layer_epochs = 0.0, 0.0, 0.0  # the protocols name none
    t = recipe.trainer
    t.epochs, t.max_steps, t.batch_size_per_gpu, t.grad_accum_steps = cfg.epochs, cfg.max_steps, rank_batch, 1
    t.zero_stage, t.precision, t.seed = cfg.zero_stage, cfg.precision, cfg.seed
    t.loader, t.torch_threads = cfg.loader, cfg.torch_threads
    t.output_dir = str(out)
    t.ckpt_every_steps = cfg.ckpt_every_epochs * steps_per_epoch
    t.on_nonfinite_loss = "stop"  # a diverged fine-tuning run has no result worth testing
    t.tensorboard, t.progress_bar = False, False
    t.optimizer_log = "finetune_steps.jsonl"
    validate(recipe, check_data=False)
    return recipe


def _train_data_config(cfg: FinetuneConfig, shards: str, mean, std):
    """Training clips: the SVT recipe's views (slow = global_0, fast = local_0) or, for a strided single clip,
    the LSTCL recipe's short clip (its long clip is one frame and unused). No colour augmentation."""
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
    views = cfg.eval if cfg.inputs == "slowfast" else replace(cfg.eval, fast_frames=1, fast_size=16)
    return DataConfig(shards=shards, recipe="eval", num_threads=cfg.num_threads, mean=tuple(mean), std=tuple(std),
                      shuffle=False, eval=views)


@torch.no_grad()
def evaluate_classifier(model: nn.Module, loader, device: torch.device, dtype: torch.dtype = torch.float32,
                        slowfast: bool = False) -> dict[str, float]:
    """Top-1 / top-5 (percent) with softmax scores averaged over the test views of a video (each slow view,
    or each slow view with the fast view of the same clip and crop), each video counted once over all
    ranks: the global order fills a partial last step by wrapping to the start (pipelines/order.py), and
    those repeats are not counted again (as ``features.FeatureSet`` keeps a repeated key once)."""
    model.eval()
    slow_views = group_eval_views(loader.view_names)["slow"]
    # slow_K_J pairs with fast_K_J: the same clip position and crop.
    pairs = [(v, "fast" + v[len("slow"):] if slowfast else None) for v in slow_views]
    hits: dict[str, tuple[bool, bool]] = {}  # key -> (top-1 hit, top-5 hit), first occurrence
    for batch in loader:
        labels = torch.as_tensor(batch["label"]).view(-1).long()
        scores = sum(F.softmax(model([batch[v].to(device, dtype) for v in (s, f) if v]).float(), dim=1).cpu()
                     for s, f in pairs) / len(pairs)
        ranked = scores.argsort(dim=1, descending=True, stable=True).eq(labels.view(-1, 1))
        for key, row in zip(batch["key"], ranked):
            hits.setdefault(key, (bool(row[:1].any()), bool(row[: min(5, scores.shape[1])].any())))
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[dict] = [{} for _ in range(dist.get_world_size())]
        dist.all_gather_object(gathered, hits)
        hits = {}
        for part in gathered:
            for key, value in part.items():
                hits.setdefault(key, value)
    model.train()
    videos = max(len(hits), 1)
    return {"top1": 100.0 * sum(h[0] for h in hits.values()) / videos,
            "top5": 100.0 * sum(h[1] for h in hits.values()) / videos, "num_val": len(hits)}


def describe(cfg: FinetuneConfig) -> str:
    """The variant column of the results table: what the classifier saw and how it was tested."""
    e = cfg.eval
    inputs = (f"slow-fast ({e.slow_frames}x{e.slow_size} + {e.fast_frames}x{e.fast_size})"
              if cfg.inputs == "slowfast" else f"{e.slow_frames}x{e.slow_size} clip")
    stride = f" stride {e.stride}" if e.stride else ""
    crops = "centre crop" if e.crops == 1 else f"{e.crops} crops"
    return f"{'frozen backbone, ' if cfg.freeze_backbone else ''}{inputs}; test {e.clips} clip(s){stride} x {crops}"


def run_finetune_cli(args: argparse.Namespace, values: dict[str, Any], *, default_protocol: str = "svt-finetune",
                     allowed: tuple[str, ...] = FINETUNE_PROTOCOLS, section: str = "finetune") -> int:
    """``evaluate.py finetune`` / ``probe``: train (``training.Trainer``), test, append to the results table."""
    out = Path(args.out)
    resume = {"auto": "auto", "none": None}.get(args.resume, str(out / "checkpoints" / str(args.resume)))
    if resume not in ("auto", None) and not any(Path(resume).glob("*model_states.pt")):
        # checked before DeepSpeed, whose loader only asserts on a folder without its files
        raise ValueError(f"--resume {args.resume}: {resume} is not a fine-tuning checkpoint (no DeepSpeed "
                         f"model states); give 'auto', 'none' or an epoch folder under {out / 'checkpoints'}")
    cfg = resolve_protocol(values, default_protocol, allowed, section)
    variant, changes = describe(cfg), cfg.changes()  # printed at the start, recorded with the result
    dist_info = init_distributed("auto", torch_threads=cfg.torch_threads)
    rank, world = dist_info.rank, dist_info.world_size
    if cfg.batch_size % world:
        raise ValueError(f"finetune.batch_size {cfg.batch_size} (global) does not split over {world} ranks")
    rank_batch = cfg.batch_size // world

    loaded = load_backbone(args.checkpoint, which=args.backbone, model_name=args.model,
                           model_kwargs=args.model_kwargs, seed=cfg.seed)
    mean = tuple(loaded.data_config.get("mean", IMAGENET_MEAN))
    std = tuple(loaded.data_config.get("std", IMAGENET_STD))
    label_map = read_manifest(args.train_shards).label_map
    if not label_map:
        raise ValueError(f"{args.train_shards}/manifest.json: no label_map; fine-tuning needs labelled shards")
    torch.manual_seed(cfg.seed)
    model = VideoClassifier(loaded.model.train(), num_classes=len(label_map), head_init_std=cfg.head_init_std,
                            freeze_backbone=cfg.freeze_backbone)
    train_data = _train_data_config(cfg, args.train_shards, mean, std)
    train_loader = build_loader(train_data, batch_size=rank_batch, shard_id=rank, num_shards=world, seed=cfg.seed,
                                loader=cfg.loader)
    if len(train_loader) == 0:
        raise ValueError(f"{args.train_shards}: too few videos for one batch of {cfg.batch_size} "
                         f"(finetune.batch_size is the global batch)")
    recipe = trainer_config(cfg, out=out, rank_batch=rank_batch, steps_per_epoch=len(train_loader), data=train_data,
                            model_name=loaded.model_name, model_kwargs=loaded.model_kwargs)
    slow_view, fast_view = _train_views(cfg)
    trainer = Trainer(recipe, ClassifierMethod(model, [slow_view] + ([fast_view] if fast_view else [])),
                      train_loader, dist_info)
    ckpt = find_latest(out / "checkpoints") if resume == "auto" else (Path(resume) if resume else None)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        print(f"protocol {cfg.protocol}: {variant}" + (f"; changed from the protocol: {changes}" if changes else ""))
        if ckpt is not None and (ckpt / TRAINER_FILE).is_file():
            state = torch.load(ckpt / TRAINER_FILE, map_location="cpu", weights_only=False)
            print(f"resumed {ckpt}: continuing at epoch {state['epoch']}, step {state['step']}", flush=True)
    trainer.fit(resume=resume)
    step = trainer.step

    test_loader = build_loader(_test_data_config(cfg, args.val_shards, mean, std), batch_size=rank_batch,
                               shard_id=rank, num_shards=world, seed=cfg.seed, loader=cfg.loader)
    metrics = evaluate_classifier(trainer.engine, test_loader, dist_info.device, torch_dtype(cfg.precision),
                                  slowfast=cfg.inputs == "slowfast")
    if rank == 0:
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
