"""``train.py``'s command line: parse, validate the recipe, build loader + method, train or export."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

import torch
import yaml

from common.errors import run_cli, writing_to
from common.seeding import seed_all
from models import resolve_pretrained
from pipelines import build_loader
from training.checkpoint import export_weights, find_latest
from training.config import ConfigError, config_to_dict, load_config
from training.engine import init_distributed
from training.methods import build_method
from training.metrics import format_summary
from training.trainer import Trainer

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="SVT / LSTCL pretraining with DeepSpeed",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", required=True, help="recipe YAML (configs/*.yaml)")
    parser.add_argument("--resume", default=None,
                        help="'auto' (newest complete checkpoint in trainer.output_dir, else start fresh) "
                             "or a checkpoint folder")
    parser.add_argument("--export", default=None, metavar="OUT.pt",
                        help="do not train: write consolidated fp32 weights of the checkpoint named by --resume "
                             "(default: the newest in trainer.output_dir)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. trainer.zero_stage=3")
    return parser


def _checkpoint_to_export(cfg, resume: str | None) -> Path | None:
    if resume not in (None, "auto"):
        return Path(resume) if (Path(resume) / "trainer.pt").is_file() else None
    return find_latest(Path(cfg.trainer.output_dir) / "checkpoints")


def main(argv: list[str]) -> int:
    """Exit status 0 on success; 2 with one ``error: <field or file>: <reason>`` line for bad input."""
    return run_cli(_run, argv)


# a checkpoint counts only once it is named in checkpoints/latest, so a half-written one is ignored
FULL_DISK_HINT = "free space and rerun: --resume auto continues from the newest complete checkpoint"


def _run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    try:
        cfg = load_config(args.config, args.overrides)
        outputs = [Path(args.export).parent] if args.export else []
        with writing_to(*outputs, Path(cfg.trainer.output_dir), hint=FULL_DISK_HINT):
            if args.export:
                return _export(cfg, args)
            resume_from = _checkpoint_to_export(cfg, args.resume) if args.resume else None
            if resume_from is None:
                # missing initial weights stop the run here, before any loader or process group
                resolve_pretrained(cfg.model.pretrained)
            return _train(cfg, args, resuming=resume_from is not None)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _export(cfg, args) -> int:
    ckpt = _checkpoint_to_export(cfg, args.resume)
    if ckpt is None:
        raise ValueError(f"no complete checkpoint to export (--resume {args.resume or 'auto'}, "
                         f"trainer.output_dir {cfg.trainer.output_dir})")
    out = export_weights(ckpt, Path(args.export))
    print(f"exported {ckpt} -> {out}")
    return 0


def _train(cfg, args, resuming: bool = False) -> int:
    if not cfg.data.shards.strip():
        raise ConfigError(f"{args.config}: data.shards: missing (the data section names the shards to train on)")
    if args.resume not in (None, "auto") and not (Path(args.resume) / "trainer.pt").is_file():
        # checked before any model or engine is built
        raise FileNotFoundError(f"--resume {args.resume}: not a complete checkpoint (no trainer.pt); give a "
                                f"checkpoints/step_N folder or 'auto'")

    t = cfg.trainer
    info = init_distributed(t.dist_backend, timeout_s=t.dist_timeout_s, torch_threads=t.torch_threads)
    seed_all(t.seed)  # the same seed on every rank: student and teacher start identical everywhere
    # every rank takes the same number of equal-sized steps: the loaders slice one global order
    # (pipelines/order.py), whose partial last step is filled, so drop_last stays the user's choice
    # and the order does not depend on the world size
    run_dir = Path(t.output_dir)
    if info.rank == 0:  # before the model is built: an output folder that cannot be written fails at once
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    loader = build_loader(cfg.data, batch_size=t.batch_size_per_gpu, shard_id=info.rank, num_shards=info.world_size,
                          seed=t.seed, loader=t.loader)
    # a resumed run restores every weight from its checkpoint: the initial weights (model.pretrained) are
    # not needed and may no longer be reachable (a preempted job restarting on offline nodes)
    build_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pretrained="none")) if resuming else cfg
    try:
        method = build_method(build_cfg, list(loader.view_names))
    except TypeError as exc:  # a misspelt model.backbone_kwargs key
        raise ConfigError(f"model.backbone_kwargs: cannot build {cfg.model.backbone} with "
                          f"{cfg.model.backbone_kwargs}: {exc}") from exc
    trainer = Trainer(cfg, method, loader, info)
    summary = trainer.fit(resume=args.resume)
    if info.rank == 0:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        print(format_summary(summary), flush=True)
    torch.distributed.barrier()
    return 0
