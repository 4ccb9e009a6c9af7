"""``python bench.py e2e``: training throughput of a recipe, DALI loader vs the baseline loader.

One process, one model definition: for each loader the recipe's method is built under the same seed,
wrapped in a fresh DeepSpeed engine and trained for ``--warmup + --steps`` optimizer steps; the
timed steps give steps/s, videos/s and the share of step time spent waiting for data. Every step also
counts its collectives and host syncs (``training.sync_counter``: micro-batch path and boundary, by
origin); the table shows the timed steps' mean, the JSON every step and the origins. Defaults use
the demo recipe on the demo shards (built first if missing), so it runs on a CPU box:

    python bench.py e2e                                   # configs/demo_cpu.yaml, runs/demo/shards
    python bench.py e2e --config configs/svt_vitb16.yaml --shards /data/k400 trainer.batch_size_per_gpu=16
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from footage import make_demo_footage

__all__ = ["main", "build_parser"]

ROOT = Path(__file__).resolve().parents[1]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python bench.py e2e", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "demo_cpu.yaml")
    p.add_argument("--shards", type=Path, default=None,
                   help="shard folder (default: data.shards of the config; the demo shards are built if missing)")
    p.add_argument("--steps", type=int, default=8, help="timed optimizer steps per loader")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (pipeline start, allocator)")
    p.add_argument("--loaders", nargs="+", choices=("dali", "baseline"), default=["dali", "baseline"])
    p.add_argument("--out", type=Path, default=Path("runs/bench/e2e.json"))
    p.add_argument("overrides", nargs="*", help="section.key=value recipe overrides")
    return p


def _ensure_demo_shards(shards: Path) -> None:
    if (shards / "manifest.json").is_file():
        return
    footage = shards.parent / "footage"
    make_demo_footage(footage)
    subprocess.run([sys.executable, "-m", "shard_tools", "shard", "--source", "folder", "--videos", str(footage),
                    "--out", str(shards), "--name", "demo", "--shard-size", "16", "--short-side", "128",
                    "--no-progress"], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from common.seeding import seed_all
    from pipelines import build_loader
    from training.config import load_config
    from training.engine import init_distributed
    from training.methods import build_method
    from training.metrics import read_metrics
    from training.sync_counter import SyncCounter
    from training.trainer import Trainer

    overrides = list(args.overrides)
    if args.shards is not None:
        overrides.append(f"data.shards={args.shards}")
    with tempfile.TemporaryDirectory(prefix="bench_e2e_") as tmp:
        cfg = load_config(args.config, overrides + [f"trainer.max_steps={args.warmup + args.steps}",
                                                    "trainer.progress_bar=false", "trainer.tensorboard=false",
                                                    "trainer.log_every_steps=1", "trainer.ckpt_every_steps=0",
                                                    f"trainer.output_dir={tmp}"])
        if args.shards is None and "demo" in str(cfg.data.shards):
            _ensure_demo_shards(Path(cfg.data.shards))
        t = cfg.trainer
        info = init_distributed(t.dist_backend, timeout_s=t.dist_timeout_s, torch_threads=t.torch_threads)
        rows = []
        for loader_name in args.loaders:
            seed_all(t.seed)  # each loader's run starts from the same weights
            cfg.trainer.output_dir = str(Path(tmp) / loader_name)
            cfg.trainer.loader = loader_name
            loader = build_loader(cfg.data, batch_size=t.batch_size_per_gpu, shard_id=info.rank,
                                  num_shards=info.world_size, seed=t.seed, loader=loader_name)
            counter = SyncCounter()
            trainer = Trainer(cfg, build_method(cfg, list(loader.view_names)), loader, info, sync_counter=counter)
            trainer.fit()
            if info.rank == 0:
                timed = read_metrics(Path(cfg.trainer.output_dir) / "metrics.jsonl")[args.warmup:]
                step_ms = np.array([r["step_ms"] for r in timed])
                wait_ms = np.array([r["data_wait_ms"] for r in timed])
                syncs = counter.per_step()
                rows.append({
                    "loader": loader_name,
                    "steps": len(timed),
                    "steps_per_s": 1000.0 / step_ms.mean(),
                    "videos_per_s": trainer.global_batch * 1000.0 / step_ms.mean(),
                    "step_ms_median": float(np.median(step_ms)),
                    "data_wait_share": float(wait_ms.sum() / step_ms.sum()),
                    "mfu": float(np.mean([r.get("mfu", float("nan")) for r in timed])),
                    **{f"{phase}_{kind}s_per_step": _timed_mean(syncs, phase, kind, args.warmup)
                       for phase in ("micro", "step") for kind in ("collective", "host_sync")},
                    "syncs": syncs,
                })
            del trainer, loader
    if info.rank == 0:
        result = {"config": str(args.config), "recipe": cfg.objective.name, "backbone": cfg.model.backbone,
                  "global_batch": t.batch_size_per_gpu * t.grad_accum_steps * info.world_size,
                  "world_size": info.world_size, "zero_stage": t.zero_stage, "precision": t.precision,
                  "device": str(info.device), "rows": rows}
        print(f"\ne2e training throughput: {args.config.name} ({cfg.model.backbone}, {cfg.objective.name}), "
              f"global batch {result['global_batch']}, {info.world_size} rank(s), ZeRO {t.zero_stage}, {t.precision}")
        print(f"{'loader':>9} {'steps/s':>8} {'videos/s':>9} {'step ms (median)':>17} {'data wait':>10} {'MFU':>7} "
              f"{'collectives/step':>17} {'host syncs/step':>16}")
        for row in rows:
            collectives = f"{row['micro_collectives_per_step']:.0f} + {row['step_collectives_per_step']:.0f}"
            host_syncs = f"{row['micro_host_syncs_per_step']:.0f} + {row['step_host_syncs_per_step']:.0f}"
            print(f"{row['loader']:>9} {row['steps_per_s']:>8.3f} {row['videos_per_s']:>9.2f} "
                  f"{row['step_ms_median']:>17.1f} {100 * row['data_wait_share']:>9.1f}% {row['mfu']:>7.3f} "
                  f"{collectives:>17} {host_syncs:>16}")
        print("collectives and host syncs per optimizer step: micro-batch path + boundary, timed steps "
              "(origins: the JSON's rows[].syncs)")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    torch.distributed.destroy_process_group()
    return 0


def _timed_mean(syncs: dict, phase: str, kind: str, warmup: int) -> float:
    """Mean count per timed step (the warm-up steps hold one-off work: ZeRO-3's trace recording)."""
    steps = syncs.get(phase, {}).get(kind, {}).get("steps", [])[warmup:]
    return float(np.mean(steps)) if steps else 0.0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
