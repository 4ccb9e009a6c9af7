"""``python bench.py repeats``: what repeated sampling (``data.repeats``) does to training, on the CPU demo.

Runs the demo recipe (``configs/demo_cpu.yaml``: SVT, tiny TimeSformer, 32 demo videos) and an LSTCL
MoCo v3 variant of it on the same footage, each for the same number of optimizer steps at the same
batch of view-sets, so every run trains on the same number of view-sets and decodes 1/R as many
videos:

- SVT at R = 1 and R = 2 (batch 4 view-sets);
- LSTCL MoCo v3 at R = 1, 2 and 4 (batch 8 view-sets), R > 1 with the same-video mask on and off.

Step schedules are held equal across R (warm-up, last-layer freeze and the epoch count are given in
epochs, and an epoch at R has R times the steps, so they are divided by R): only the data differs.
Each run's teacher backbone is then evaluated by kNN (k = 5, frozen slow+fast features) on the
synthetic two-class set of the evaluation tests (``moving_left`` vs ``index``, 64x48 VP9; 16 train and
16 val videos per class), and on the same set with ``moving_left`` vs ``moving_right`` (the direction of
motion only, which a randomly initialised TimeSformer cannot see), beside a randomly initialised
backbone. Reported per run: the loss (mean of
the first and last 10 steps), SVT's teacher entropy, MoCo v3's accuracy, kNN top-1, the training's wall
time and its data-wait share. Writes ``--out``/results.json, results.md (the table) and loss.png.

Every run is a real ``train.py`` / ``evaluate.py`` subprocess; nothing else is simulated. Small by
design (minutes on 2 shared cores): a direction, not a verdict, on training quality.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from footage import make_demo_footage
from footage.two_class import make_two_class_shards

REPO_ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

# LSTCL MoCo v3 on the demo's backbone and footage: our small settings (the paper's clips are T=8 at
# 224; here T=8 at 64 to fit the tiny TimeSformer of the demo).
LSTCL = ["objective.name=mocov3", "data.recipe=lstcl", "data.lstcl.short_frames=8", "data.lstcl.long_frames=8",
         "data.lstcl.size=64", "model.proj_dim=64", "model.proj_hidden_dim=256", "model.pred_hidden_dim=256",
         "objective.momentum_teacher=0.99", "optim.clip_mode=global"]
# The kNN set's views for the demo backbone (img_size 64, 8 frames): one centre crop per clip.
# The evaluation tests' classes, and direction only (chance for a fresh TimeSformer).
KNN_SETS = {"two_class": ("moving_left", "index"), "direction": ("moving_left", "moving_right")}
KNN_VIEWS = ["--slow-frames", "8", "--slow-size", "64", "--fast-frames", "8", "--fast-size", "64", "--crops", "1",
             "--batch-size", "4", "--num-threads", "1"]


@dataclass
class Run:
    name: str
    method: str          # svt | mocov3
    repeats: int
    batch: int
    mask: bool = True
    overrides: list[str] = field(default_factory=list)


def study_runs(svt_steps: int, lstcl_steps: int, seed: int = 0) -> list[Run]:
    suffix = f"_s{seed}" if seed else ""

    def steps(n: int) -> list[str]:   # one checkpoint, at the end: the kNN evaluates it
        return [f"trainer.max_steps={n}", f"trainer.ckpt_every_steps={n}", f"trainer.seed={seed}"]

    runs = [Run(f"svt_R{r}{suffix}", "svt", r, 4, overrides=steps(svt_steps)) for r in (1, 2)]
    for r, mask in ((1, True), (2, True), (2, False), (4, True), (4, False)):
        runs.append(Run(f"mocov3_R{r}" + ("" if r == 1 else ("_mask" if mask else "_nomask")) + suffix, "mocov3", r,
                        8, mask, [*LSTCL, *steps(lstcl_steps)]))
    return runs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python bench.py repeats", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/study_repeats"))
    p.add_argument("--svt-steps", type=int, default=240, help="the demo's 240 steps")
    p.add_argument("--lstcl-steps", type=int, default=240)
    p.add_argument("--only", nargs="+", metavar="RUN", help="run only these (e.g. svt_R1 mocov3_R4_mask)")
    p.add_argument("--seed", type=int, default=0,
                   help="trainer.seed of the runs; another seed's runs are named RUN_sN beside seed 0's")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    pretrain = demo_shards(out / "demo")
    knn_sets = {name: two_class_shards(out / f"knn_{name}", classes) for name, classes in KNN_SETS.items()}
    results = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
    if "random" not in results:
        results["random"] = {f"knn_{name}": knn(out / "random" / name, "random", shards)
                             for name, shards in knn_sets.items()}
    for run in study_runs(args.svt_steps, args.lstcl_steps, args.seed):
        if args.only and run.name not in args.only:
            continue
        print(f"== {run.name}", flush=True)
        results[run.name] = train_and_evaluate(run, out / run.name, pretrain, knn_sets)
        (out / "results.json").write_text(json.dumps(results, indent=1))
    table = markdown_table(results)
    (out / "results.md").write_text(table + "\n")
    print(table)
    plot_curves(out, [r for seed in (0, args.seed) for r in study_runs(args.svt_steps, args.lstcl_steps, seed)
                      if r.name in results], out / "loss.png")
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'loss.png'}")
    return 0


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


def _run(cmd: list[str], log: Path) -> None:
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=_env(), stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed (exit {proc.returncode}); see {log}")


def demo_shards(folder: Path) -> Path:
    """The demo's footage and shards (the commands of scripts/demo.sh)."""
    shards = folder / "shards"
    if not (shards / "manifest.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        make_demo_footage(folder / "footage")
        _run([PY, "-m", "shard_tools", "shard", "--source", "folder", "--videos", str(folder / "footage"),
              "--out", str(shards), "--name", "demo", "--shard-size", "16", "--short-side", "128", "--workers", "1",
              "--no-progress"], folder / "shard.log")
    return shards


def two_class_shards(folder: Path, classes: tuple[str, str]) -> dict[str, Path]:
    """A synthetic two-class set (``footage.two_class``), built once."""
    shards = {split: folder / "shards" / split for split in ("train", "val")}
    if not all((s / "manifest.json").exists() for s in shards.values()):
        # 16 validation videos per class: kNN top-1 in steps of ~3 % (the tests' 4 give steps of 12.5 %)
        shards = make_two_class_shards(folder, train_per_class=16, val_per_class=16, classes=classes)
    return shards


def train_and_evaluate(run: Run, folder: Path, shards: Path, knn_sets: dict[str, dict[str, Path]]) -> dict:
    r = run.repeats
    overrides = [f"data.shards={shards}", f"trainer.output_dir={folder}", f"data.repeats={r}",
                 f"trainer.batch_size_per_gpu={run.batch}", f"objective.mask_same_video={str(run.mask).lower()}",
                 "trainer.progress_bar=false", "trainer.tensorboard=false",
                 # the demo's schedules in steps, whatever R (an epoch at R has R times the steps)
                 f"trainer.epochs={100 / r}", f"optim.warmup_epochs={2 / r}",
                 f"optim.freeze_last_layer_epochs={(1 if run.method == 'svt' else 0) / r}", *run.overrides]
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    _run([PY, "train.py", "--config", "configs/demo_cpu.yaml", *overrides], folder / "train.log")
    wall = time.perf_counter() - start
    summary = json.loads((folder / "summary.json").read_text())
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    steps = [rec for rec in records if "loss" in rec]
    result = {"method": run.method, "repeats": r, "mask": run.mask, "batch": run.batch, "steps": len(steps),
              "view_sets": len(steps) * run.batch, "videos_decoded": len(steps) * run.batch // r,
              "loss_first": summary["loss_first"], "loss_last": summary["loss_last"],
              "loss_curve": [rec["loss"] for rec in steps], "train_wall_s": wall,
              "step_s": sum(rec["step_ms"] for rec in steps) / 1000, "data_wait_share": summary["data_wait_share"]}
    if run.method == "svt":
        result.update(teacher_entropy_first=summary["teacher_entropy_first"],
                      teacher_entropy_last=summary["teacher_entropy_last"],
                      entropy_curve=[rec["teacher_entropy"] for rec in steps])
    else:
        result["accuracy_last"] = sum(rec["accuracy"] for rec in steps[-10:]) / len(steps[-10:])
    for name, knn_shards in knn_sets.items():
        result[f"knn_{name}"] = knn(folder / f"knn_{name}", str(folder / "checkpoints"), knn_shards)
    return result


def knn(folder: Path, checkpoint: str, shards: dict[str, Path]) -> float:
    """kNN top-1 (k = 5, slow+fast feature) of ``checkpoint``'s teacher backbone on a two-class set."""
    folder.mkdir(parents=True, exist_ok=True)
    model = (["--model", "timesformer_tiny_patch16", "--model-kwargs", '{"depth": 2, "img_size": 64, "num_frames": 8}']
             if checkpoint == "random" else [])
    for split in ("train", "val"):
        _run([PY, "evaluate.py", "extract", "--checkpoint", checkpoint, *model, "--shards", str(shards[split]),
              "--out", str(folder / f"knn_{split}.pt"), *KNN_VIEWS], folder / f"extract_{split}.log")
    results = folder / "knn.json"
    results.unlink(missing_ok=True)
    _run([PY, "evaluate.py", "knn", "--train", str(folder / "knn_train.pt"), "--val", str(folder / "knn_val.pt"),
          "--k", "5", "--feature", "slowfast", "--control-repeats", "0", "--results", str(results)],
         folder / "knn.log")
    (record,) = json.loads(results.read_text())
    return record["metrics"]["top1"]


def markdown_table(results: dict) -> str:
    lines = ["| run | R | mask | view-sets | videos decoded | loss first -> last | teacher entropy first -> last "
             "| MoCo acc (last 10) | kNN two-class | kNN direction | train wall s | data wait |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        if name == "random":
            continue
        entropy = (f"{r['teacher_entropy_first']:.2f} -> {r['teacher_entropy_last']:.2f}"
                   if "teacher_entropy_last" in r else "-")
        accuracy = f"{r['accuracy_last']:.2f}" if "accuracy_last" in r else "-"
        mask = "-" if r["method"] == "svt" or r["repeats"] == 1 else ("on" if r["mask"] else "off")
        lines.append(f"| {name} | {r['repeats']} | {mask} | {r['view_sets']} | {r['videos_decoded']} "
                     f"| {r['loss_first']:.3f} -> {r['loss_last']:.3f} | {entropy} | {accuracy} "
                     f"| {r['knn_two_class']:.1f} | {r['knn_direction']:.1f} | {r['train_wall_s']:.0f} "
                     f"| {100 * r['data_wait_share']:.0f} % |")
    if "random" in results:
        rand = results["random"]
        lines.append(f"| random init (no training) | | | | | | | | {rand['knn_two_class']:.1f} "
                     f"| {rand['knn_direction']:.1f} | | |")
    return "\n".join(lines)


def plot_curves(out: Path, runs: list[Run], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    results = json.loads((out / "results.json").read_text())
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))

    def smooth(values: list[float], k: int = 10) -> np.ndarray:
        v = np.asarray(values, dtype=float)
        return np.convolve(v, np.ones(k) / k, mode="valid") if len(v) >= k else v

    for run in runs:
        r = results[run.name]
        if run.method == "svt":
            axes[0].plot(smooth(r["loss_curve"]), label=run.name)
            axes[1].plot(smooth(r["entropy_curve"]), label=run.name)
        else:
            axes[2].plot(smooth(r["loss_curve"]), label=run.name)
    for ax, title in zip(axes, ("SVT loss", "SVT teacher entropy (nats)", "LSTCL MoCo v3 loss")):
        ax.set_title(f"{title}, 10-step mean", fontsize=10)
        ax.set_xlabel("step (same view-sets per step at every R)")
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
