"""One run of a clip-level protocol (``evaluation/protocols.py``): a linear classifier trained on video clips
through the backbone, then tested.

Slow-fast (SVT Fig. 3): the classifier sees ``CLS(slow) + CLS(fast)``, one sum, no extra parameters.
Training clips are the SVT recipe's views without colour augmentation: the slow clip is a global view
(8 frames at 224), the fast clip a view of 64 frames at 96 over the same kind of span (a random 90%
of the video, random resized crop + flip, each clip drawn independently). At test time the softmax
scores of the views (crop pairs / clips) are averaged.

Training is ``training.Trainer`` with ``training.methods.ClassifierMethod`` (cross-entropy on a
``models.VideoClassifier``) and a recipe built from the protocol (``trainer_config``): SGD with momentum,
the protocol's per-epoch lr (``multistep`` / ``cosine_epochs``), weight decay on weights only, no clipping.
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

from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from common.atomic_io import atomic_write_json
from common.precision import torch_dtype
from evaluation.checkpoints import load_backbone
from evaluation.features import group_eval_views
from evaluation.protocols import OPTIM_SCHEDULES, FinetuneConfig, describe
from evaluation.results import ResultRecord, append_result
from models import VideoClassifier
from pipelines import DataConfig, build_loader
from pipelines.config import AugmentConfig, LSTCLConfig, SVTConfig
from shard_tools.format import read_manifest
from training.checkpoint import TRAINER_FILE, find_latest
from training.config import Config, validate
from training.engine import init_distributed
from training.methods import ClassifierMethod
from training.trainer import Trainer

__all__ = ["trainer_config", "evaluate_classifier", "run_finetune"]


def trainer_config(cfg: FinetuneConfig, *, out: Path, rank_batch: int, steps_per_epoch: int, data: DataConfig,
                   model_name: str, model_kwargs: dict[str, Any]) -> Config:
    """The trainer recipe of a protocol run (validated like a pretraining recipe)."""
    recipe = Config(data=data)
    recipe.model.backbone, recipe.model.backbone_kwargs = model_name, dict(model_kwargs)
    o = recipe.optim
    o.optimizer, o.momentum = "sgd", cfg.momentum
    o.lr, o.lr_reference_batch = cfg.lr, 0  # the protocols state their lr at their own batch: no scaling
    o.schedule, o.milestones, o.gamma = OPTIM_SCHEDULES[cfg.schedule], list(cfg.milestones), cfg.gamma
    o.weight_decay = o.weight_decay_end = cfg.weight_decay  # constant, coupled into SGD's update (torch SGD)
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


def run_finetune(cfg: FinetuneConfig, *, checkpoint: str, which: str = "teacher", model_name: str | None = None,
                 model_kwargs: dict[str, Any] | None = None, train_shards: str, val_shards: str, out: Path,
                 resume: str | None = "auto", results: str | None = None) -> dict[str, Any]:
    """Train the classifier of protocol settings ``cfg`` (``training.Trainer``), test it, write
    ``OUT/finetune_results.json`` and append to the results table ``results``; returns the test metrics.

    Args:
        checkpoint, which, model_name, model_kwargs: the backbone (``evaluation.checkpoints.load_backbone``).
        train_shards, val_shards: labelled shard folders.
        out: run folder (checkpoints, metrics, results).
        resume: ``auto`` (newest checkpoint under ``out``), a checkpoint folder, or None.
    """
    out = Path(out)
    variant, changes = describe(cfg), cfg.changes()  # printed at the start, recorded with the result
    dist_info = init_distributed("auto", torch_threads=cfg.torch_threads)
    rank, world = dist_info.rank, dist_info.world_size
    if cfg.batch_size % world:
        raise ValueError(f"finetune.batch_size {cfg.batch_size} (global) does not split over {world} ranks")
    rank_batch = cfg.batch_size // world

    loaded = load_backbone(checkpoint, which=which, model_name=model_name, model_kwargs=model_kwargs, seed=cfg.seed)
    mean, std = loaded.normalization()
    label_map = read_manifest(train_shards).label_map
    if not label_map:
        raise ValueError(f"{train_shards}/manifest.json: no label_map; fine-tuning needs labelled shards")
    torch.manual_seed(cfg.seed)
    model = VideoClassifier(loaded.model.train(), num_classes=len(label_map), head_init_std=cfg.head_init_std,
                            freeze_backbone=cfg.freeze_backbone)
    train_data = _train_data_config(cfg, train_shards, mean, std)
    train_loader = build_loader(train_data, batch_size=rank_batch, shard_id=rank, num_shards=world, seed=cfg.seed,
                                loader=cfg.loader)
    if len(train_loader) == 0:
        raise ValueError(f"{train_shards}: too few videos for one batch of {cfg.batch_size} "
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

    test_loader = build_loader(_test_data_config(cfg, val_shards, mean, std), batch_size=rank_batch,
                               shard_id=rank, num_shards=world, seed=cfg.seed, loader=cfg.loader)
    metrics = evaluate_classifier(trainer.engine, test_loader, dist_info.device, torch_dtype(cfg.precision),
                                  slowfast=cfg.inputs == "slowfast")
    if rank == 0:
        print(f"{cfg.protocol} test ({variant}): top-1 {metrics['top1']:.1f}  top-5 {metrics['top5']:.1f} "
              f"on {metrics['num_val']} videos" + (f"  [changed from the protocol: {changes}]" if changes else ""))
        atomic_write_json(out / "finetune_results.json",
                          {**metrics, "step": step, "protocol": cfg.protocol, "changes": changes})
        if results:
            append_result(results, ResultRecord(
                protocol=cfg.protocol, variant=variant,
                feature="slow+fast CLS" if cfg.inputs == "slowfast" else "CLS",
                checkpoint=loaded.source, backbone=loaded.which, train_data=str(train_shards),
                val_data=str(val_shards), metrics={**metrics, "num_classes": len(label_map), "steps": step},
                settings=asdict(cfg), changes=changes))
    return metrics
