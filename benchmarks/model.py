"""``python bench.py model``: one SVT student step, grouped multi-view runner vs a per-view loop.

The step is the recipe's (``--config``, an SVT recipe YAML, plus ``section.key=value`` overrides as
for ``train.py``): its views (``data``: sizes and frame counts, via ``pipelines.views.recipe_views``),
DINO head and loss settings (``model``, ``objective``) and backbone kwargs; ``--sizes`` picks the
backbone widths to compare.

Modes: ``grouped`` (one backbone pass per equal-shape group, 6 for SVT), ``packed`` (one packed
pass for all views: every matmul covers all tokens, attention per sequence length) and ``loop``
(one pass and one head call per view). One step = the student's forward over the 2 global + 8 local views, the DINO head, the SVT loss
against fixed teacher outputs, and backward (the teacher's forward over the two globals is the same
in both modes, since the globals differ in shape, so it is left out). The two modes run in one
process, interleaved (alternating which goes first), after a warmup, so machine noise hits both
alike; the table reports median views/s per mode and its speedup over the loop.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from common.precision import torch_dtype
from common.process import setup_process
from common.seeding import seed_all
from models import DINOHead, MultiViewRunner, build_backbone
from models.flops import views_flops
from objectives import SVTLoss
from pipelines.views import recipe_views
from training.config import Config, load_config

__all__ = ["main"]

ROOT = Path(__file__).resolve().parents[1]

SIZES = {"tiny": "timesformer_tiny_patch16", "small": "timesformer_small_patch16",
         "base": "timesformer_base_patch16"}


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench.py model", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "svt_vitb16.yaml",
                        help="SVT recipe: views, head, loss and backbone kwargs")
    parser.add_argument("--sizes", default="tiny,small", help=f"comma list of {sorted(SIZES)}")
    parser.add_argument("--batch", type=int, default=1, help="clips per view")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per mode")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per mode")
    parser.add_argument("--depth", type=int, default=None, help="override the number of blocks (quick runs)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: the step runs on the GPU (synchronized around each timed step)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="bfloat16: autocast around the forward, as the trainer's bf16 precision")
    parser.add_argument("--modes", default="grouped,packed,loop",
                        help="grouped: one pass per equal-shape group; packed: one packed pass for all views "
                             "(shared matmuls); loop: one pass per view. Must include loop.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/bench/model.json")
    parser.add_argument("overrides", nargs="*",
                        help="section.key=value recipe overrides, e.g. data.svt.global_size=112 model.out_dim=4096")
    args = parser.parse_args(argv)
    unknown = [s for s in args.sizes.split(",") if s not in SIZES]
    if unknown:
        parser.error(f"--sizes: unknown size(s) {unknown}; choose from {sorted(SIZES)}")
    modes = args.modes.split(",")
    if "loop" not in modes or any(m not in MODES for m in modes) or len(set(modes)) != len(modes):
        parser.error(f"--modes: a comma list of distinct {MODES} including loop, got {args.modes!r}")
    if args.batch < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("--batch and --repeats must be >= 1, --warmup >= 0")
    args.recipe = _recipe(args.config, args.overrides)
    return args


def _recipe(path: Path, overrides: list[str]) -> Config:
    cfg = load_config(path, overrides)
    if cfg.objective.name != "svt" or cfg.data.recipe != "svt":  # Config.data is always a DataConfig
        raise SystemExit(f"{path}: bench.py model times the SVT student step; objective.name and data.recipe "
                         f"must be svt, got {cfg.objective.name!r} and {cfg.data.recipe!r}")
    return cfg


def _view_shapes(cfg: Config) -> tuple[list[tuple[int, int]], int]:
    """(frames, size) of every view, globals first (the loss's order), and the number of globals."""
    views = recipe_views(cfg.data)
    ordered = [v for v in views if v.group.startswith("global")] + [v for v in views if v.group == "local"]
    return [(v.frames, v.size) for v in ordered], sum(v.group.startswith("global") for v in views)


def _views(args: argparse.Namespace) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(args.seed)
    shapes, _ = _view_shapes(args.recipe)
    return [torch.randn(args.batch, 3, t, s, s, generator=gen).to(args.device) for t, s in shapes]


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


MODES = ("grouped", "packed", "loop")


def _step(runner: MultiViewRunner, loss_fn: SVTLoss, views: list[torch.Tensor], teacher: list[torch.Tensor],
          mode: str, args: argparse.Namespace) -> tuple[float, float]:
    """One step; returns (wall seconds, CPU seconds of this process)."""
    runner.zero_grad(set_to_none=True)
    _synchronize(args.device)
    start, start_cpu = time.perf_counter(), time.process_time()
    dtype = torch_dtype(args.dtype)
    with torch.autocast(args.device, dtype=dtype, enabled=dtype != torch.float32):
        if mode == "loop":
            student = [runner.head(runner.backbone.forward_features(v)) for v in views]
        else:
            runner.packed = mode == "packed"
            student = runner(views)
    loss_fn([s.float() for s in student], teacher, teacher_temp=args.recipe.objective.teacher_temp)["loss"].backward()
    _synchronize(args.device)
    return time.perf_counter() - start, time.process_time() - start_cpu


def _bench_size(size: str, args: argparse.Namespace) -> dict:
    seed_all(args.seed)
    cfg = args.recipe
    m, o = cfg.model, cfg.objective
    shapes, num_global = _view_shapes(cfg)
    # The recipe's backbone kwargs; the stored time_embed / pos_embed default to the largest view.
    kwargs = {"num_frames": max(t for t, _ in shapes), "img_size": max(s for _, s in shapes), **m.backbone_kwargs}
    if args.depth is not None:
        kwargs["depth"] = args.depth
    backbone = build_backbone(SIZES[size], **kwargs)
    head = DINOHead(backbone.embed_dim, out_dim=m.out_dim, hidden_dim=m.hidden_dim, bottleneck_dim=m.bottleneck_dim,
                    nlayers=m.head_layers, norm_last_layer=m.norm_last_layer)
    runner = MultiViewRunner(backbone, head, packed=False).to(args.device).train()
    views = _views(args)
    loss_fn = SVTLoss(m.out_dim, num_global=num_global, num_local=len(views) - num_global,
                      student_temp=o.student_temp, center_momentum=o.center_momentum,
                      pair_set=o.pair_set).to(args.device)
    teacher = [torch.randn(args.batch, m.out_dim, device=args.device) for _ in range(num_global)]
    modes = args.modes.split(",")
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    cpu_times: dict[str, list[float]] = {mode: [] for mode in modes}
    for _ in range(args.warmup):
        for mode in modes:
            _step(runner, loss_fn, views, teacher, mode, args)
    for repeat in range(args.repeats):
        # Interleaved, rotating which mode goes first, so load changes on the machine hit all modes.
        order = modes[repeat % len(modes):] + modes[:repeat % len(modes)]
        for mode in order:
            wall, cpu = _step(runner, loss_fn, views, teacher, mode, args)
            times[mode].append(wall)
            cpu_times[mode].append(cpu)
    num_views = args.batch * len(views)
    median = {mode: statistics.median(t) for mode, t in times.items()}
    median_cpu = {mode: statistics.median(t) for mode, t in cpu_times.items()}
    flops = views_flops(backbone, head, [tuple(v.shape[1:]) for v in views]) * args.batch
    return {
        "size": size, "backbone": SIZES[size], "depth": backbone.depth, "embed_dim": backbone.embed_dim,
        "batch": args.batch, "views_per_step": len(views), "step_seconds": times, "step_cpu_seconds": cpu_times,
        "views_per_s": {mode: num_views / median[mode] for mode in modes},
        "speedup_over_loop": {mode: median["loop"] / median[mode] for mode in modes if mode != "loop"},
        # CPU seconds of this process: on a shared machine less sensitive to other jobs than wall time.
        "views_per_cpu_s": {mode: num_views / median_cpu[mode] for mode in modes},
        "cpu_speedup_over_loop": {mode: median_cpu["loop"] / median_cpu[mode] for mode in modes if mode != "loop"},
        "forward_gflops_per_step": flops / 1e9,
        # Backward ~ 2x forward matmul FLOPs, so a step is ~3x the forward count.
        "achieved_gflops_per_s": {mode: 3 * flops / 1e9 / median[mode] for mode in modes},
    }


def gemm_peak_gflops(device: str = "cpu", dtype: str = "float32", dim: int = 384, tokens: int = 3136,
                     repeats: int = 20) -> float:
    """Matmul rate of this machine (at the current thread count on a CPU): an MLP fc1 of a 16x224 ViT-S
    clip, the largest, most efficient matmul of the step; the ceiling for any way of running the views."""
    a = torch.randn(tokens, dim, device=device, dtype=getattr(torch, dtype))
    b = torch.randn(dim, 4 * dim, device=device, dtype=getattr(torch, dtype))
    for _ in range(3):
        a @ b
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _synchronize(device)
    return 2 * tokens * dim * 4 * dim * repeats / (time.perf_counter() - start) / 1e9


def main(argv: list[str] | None = None) -> int:
    args = _parse(list(argv or []))
    setup_process(torch_threads=args.threads)
    results = []
    modes = args.modes.split(",")
    peak = gemm_peak_gflops(args.device, args.dtype)
    print(f"{args.dtype} GEMM peak here ({args.device}, {args.threads} thread(s)): {peak:.0f} GFLOP/s")
    header = (f"{'size':<6} {'depth':>5} {'batch':>5} {'mode':>8} {'views/s':>9} {'s/step':>8} "
              f"{'x loop':>7} {'views/cpu-s':>12} {'x loop(cpu)':>12} {'fwd GFLOP/step':>15} {'GFLOP/s':>8} "
              f"{'of peak':>8}")
    print(header)
    print("-" * len(header))
    for size in args.sizes.split(","):
        row = _bench_size(size, args)
        results.append(row)
        for mode in modes:
            speedup = row["speedup_over_loop"].get(mode, 1.0)
            cpu_speedup = row["cpu_speedup_over_loop"].get(mode, 1.0)
            print(f"{row['size']:<6} {row['depth']:>5} {row['batch']:>5} {mode:>8} {row['views_per_s'][mode]:>9.3f} "
                  f"{statistics.median(row['step_seconds'][mode]):>8.2f} {speedup:>7.2f} "
                  f"{row['views_per_cpu_s'][mode]:>12.3f} {cpu_speedup:>12.2f} "
                  f"{row['forward_gflops_per_step']:>15.1f} {row['achieved_gflops_per_s'][mode]:>8.1f} "
                  f"{row['achieved_gflops_per_s'][mode] / peak:>8.0%}", flush=True)
    shapes, num_global = _view_shapes(args.recipe)
    report = {
        "mode": "model", "argv": list(argv or []), "config": str(args.config), "threads": args.threads,
        "device": args.device, "dtype": args.dtype, "torch": torch.__version__,
        "machine": platform.machine(), "cpu_count": os.cpu_count(),
        "global_size": shapes[0][1], "local_size": shapes[num_global][1] if len(shapes) > num_global else None,
        "global_frames": ",".join(str(t) for t, _ in shapes[:num_global]),
        "local_frames": ",".join(str(t) for t, _ in shapes[num_global:]), "out_dim": args.recipe.model.out_dim,
        "gemm_peak_gflops_per_s": peak, "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0
