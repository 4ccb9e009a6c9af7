"""Elastic exact data position through ``train.py``: real shards (one damaged member),
real DALI, real DeepSpeed on gloo. A 2-rank run checkpoints mid-epoch (at ZeRO-2 a second 2-rank
run is SIGKILLed right after that checkpoint); resumes from that checkpoint on 1 and on 3 ranks
(global batch 6) train every later step on exactly the uninterrupted run's
samples (lineage.jsonl) with its losses, at ZeRO-2 and ZeRO-3 (fp32). A two-node torchrun launch
(two agents, c10d rendezvous on this machine, one rank each) matches the one-agent 2-rank run."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline_fixtures import FixtureVideo, index_videos, write_shards
from test_pipelines import damaged
from train_fixtures import subprocess_env

from training.lineage import read_lineage
from training.metrics import read_metrics

pytestmark = pytest.mark.slow  # multi-process runs (make test-fast skips them)

ROOT = Path(__file__).resolve().parents[1]
GLOBAL_BATCH = 6
STEPS, CKPT = 5, 2
TINY = ["model.backbone=timesformer_tiny_patch16", "model.backbone_kwargs={depth: 1, img_size: 32, num_frames: 4}",
        "model.drop_path_rate=0.0", "data.svt.global_frames=[4, 2]", "data.svt.global_size=32",
        "data.svt.local_frames=[2, 2]", "data.svt.local_size=16", "model.out_dim=64", "model.hidden_dim=32",
        "model.bottleneck_dim=16", "data.num_threads=1", "data.device=cpu", "trainer.log_every_steps=1",
        "trainer.progress_bar=false", "trainer.tensorboard=false", "trainer.torch_threads=1",
        "trainer.dist_timeout_s=300", "optim.lr_reference_batch=0", "optim.warmup_epochs=0",
        f"trainer.max_steps={STEPS}", f"trainer.ckpt_every_steps={CKPT}", "trainer.keep_checkpoints=10",
        "trainer.peak_tflops=0", "trainer.zero3_param_persistence_threshold=0",
        "trainer.zero3_model_persistence_threshold=0"]


@pytest.fixture(scope="module")
def elastic_shards(tmp_path_factory) -> Path:
    """13 samples (12 good, one truncated member whose json promises 20 frames) in shards of 4."""
    root = tmp_path_factory.mktemp("elastic")
    videos = index_videos(root / "media", [16 + i for i in range(12)])
    source = index_videos(root / "media", [20], prefix="cut")[0]
    videos.insert(5, FixtureVideo("cut", source.path, raw=damaged(source.path.read_bytes(), "truncated")))
    return write_shards(root / "shards", videos, per_shard=4)


def _launch(args: list[str], nproc: int, **popen) -> list[str]:
    if nproc == 1:
        return [sys.executable, str(ROOT / "train.py"), *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            str(ROOT / "train.py"), *args]


def _train(shards: Path, out: Path, world: int, stage: int, resume: str | None = None, batch: int = GLOBAL_BATCH,
           extra: tuple[str, ...] = ()) -> None:
    args = ["--config", str(ROOT / "configs" / "demo_cpu.yaml"), f"data.shards={shards}",
            f"trainer.output_dir={out}", f"trainer.zero_stage={stage}",
            f"trainer.batch_size_per_gpu={batch // world}", *TINY, *extra]
    if resume:
        args += ["--resume", resume]
    result = subprocess.run(_launch(args, world), cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                            timeout=600)
    if result.returncode != 0:
        pytest.fail(f"train.py ({world} ranks) failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")


def _train_killed(shards: Path, out: Path, world: int, stage: int, after: int) -> bool:
    """Train like ``_train`` and SIGKILL every process (ranks by pid: torchrun gives them their own
    sessions) once the step-``after`` checkpoint is complete; False if the run had already ended."""
    import psutil

    args = ["--config", str(ROOT / "configs" / "demo_cpu.yaml"), f"data.shards={shards}",
            f"trainer.output_dir={out}", f"trainer.zero_stage={stage}",
            f"trainer.batch_size_per_gpu={GLOBAL_BATCH // world}", *TINY]
    agent = subprocess.Popen(_launch(args, world), cwd=ROOT, env=subprocess_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    latest = out / "checkpoints" / "latest"
    deadline = time.monotonic() + 600
    try:
        while agent.poll() is None and time.monotonic() < deadline:
            if latest.is_file() and latest.read_text().strip() >= f"step_{after:08d}":
                for proc in [*psutil.Process(agent.pid).children(recursive=True), psutil.Process(agent.pid)]:
                    try:
                        proc.kill()
                    except psutil.NoSuchProcess:
                        pass
                agent.wait(timeout=60)
                return True
            time.sleep(0.05)
        assert agent.returncode == 0, "the run to be killed failed on its own"
        return False
    finally:
        if agent.poll() is None:
            agent.kill()


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r}


def _assert_continues(reference: Path, resumed: Path, after: int) -> None:
    ref_lines = [line for line in read_lineage(reference / "lineage.jsonl") if line["step"] > after]
    got = read_lineage(resumed / "lineage.jsonl")
    assert got == ref_lines                      # the same samples, spares included, in every later step
    ref, new = _losses(reference), _losses(resumed)
    assert sorted(new) == list(range(after + 1, STEPS + 1))
    for step in new:
        assert new[step] == pytest.approx(ref[step], rel=1e-4, abs=1e-5), step


@pytest.mark.parametrize("stage", [2, 3])
def test_resume_on_one_and_three_ranks_continues_the_data_exactly(elastic_shards, tmp_path, stage):
    reference = tmp_path / "two_ranks"
    _train(elastic_shards, reference, world=2, stage=stage)
    lineage = read_lineage(reference / "lineage.jsonl")
    assert [line["step"] for line in lineage] == list(range(1, STEPS + 1))
    assert all(len(line["keys"]) == GLOBAL_BATCH for line in lineage)         # fixed batch sizes
    # 13 samples in steps of 6: epoch 0 is data steps 0, 1, 2 (the last wraps to its start)
    assert [(line["epoch"], line["data_step"]) for line in lineage] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    assert all("cut" not in line["keys"] for line in lineage)
    replaced = [r for line in lineage for r in line.get("replaced", [])]
    assert replaced and {r["key"] for r in replaced} == {"cut"}
    epoch0 = {k for line in lineage[:2] for k in line["keys"]}
    assert len(epoch0) == 12                                                # 12 distinct samples
    checkpoint = reference / "checkpoints" / f"step_{CKPT:08d}"
    if stage == 2:
        # a run killed (SIGKILL) right after its mid-epoch checkpoint: resumes continue from that
        killed = tmp_path / "killed"
        _train_killed(elastic_shards, killed, world=2, stage=stage, after=CKPT)
        checkpoint = killed / "checkpoints" / f"step_{CKPT:08d}"
        assert (checkpoint / "trainer.pt").is_file()
    for world in (1, 3):
        resumed = tmp_path / f"resume_{world}"
        _train(elastic_shards, resumed, world=world, stage=stage, resume=str(checkpoint))
        _assert_continues(reference, resumed, after=CKPT)


# LSTCL MoCo v3 on the same tiny backbone, 2 view-sets per video (the same-video mask on)
MOCO_REPEATS = ["objective.name=mocov3", "data.recipe=lstcl", "data.lstcl.short_frames=4",
                "data.lstcl.long_frames=4", "data.lstcl.size=32", "model.proj_dim=16", "model.proj_hidden_dim=32",
                "model.pred_hidden_dim=32", "optim.clip_mode=global", "optim.freeze_last_layer_epochs=0",
                "data.repeats=2"]


def test_repeats_resume_on_one_rank_continues_the_view_sets_and_losses_exactly(elastic_shards, tmp_path):
    """data.repeats=2, global batch 8 view-sets (4 videos): 2 ranks -> 1 rank from a mid-epoch
    checkpoint trains the same view-sets (key + repeat index in the lineage) with the same MoCo v3
    losses; the damaged video is replaced by a spare with both its view-sets."""
    def train(out: Path, world: int, resume: str | None = None) -> None:
        _train(elastic_shards, out, world=world, stage=2, resume=resume, batch=8,
               extra=MOCO_REPEATS)

    reference = tmp_path / "two_ranks"
    train(reference, world=2)
    lineage = read_lineage(reference / "lineage.jsonl")
    assert all(len(line["keys"]) == 8 and line["repeat"] == [0, 1] * 4 for line in lineage)
    assert all(keys[0::2] == keys[1::2] for keys in (line["keys"] for line in lineage))   # a video's 2 view-sets
    # 13 videos, 4 per step: epoch 0 is data steps 0-3, the last wrapping to its start
    assert [(line["epoch"], line["data_step"]) for line in lineage] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0)]
    replaced = [r for line in lineage for r in line.get("replaced", [])]
    assert [r["key"] for r in replaced] == ["cut"] and all("cut" not in line["keys"] for line in lineage)
    assert len({k for line in lineage[:3] for k in line["keys"]}) == 12
    resumed = tmp_path / "resume_1"
    train(resumed, world=1, resume=str(reference / "checkpoints" / f"step_{CKPT:08d}"))
    _assert_continues(reference, resumed, after=CKPT)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_node_launch_matches_one_node_and_resumes_on_one(elastic_shards, tmp_path):
    """Two torchrun agents (--nnodes 2, c10d rendezvous on 127.0.0.1), one rank each."""
    one_node = tmp_path / "one_node"
    _train(elastic_shards, one_node, world=2, stage=2)
    two_nodes = tmp_path / "two_nodes"
    port = _free_port()
    args = ["--config", str(ROOT / "configs" / "demo_cpu.yaml"), f"data.shards={elastic_shards}",
            f"trainer.output_dir={two_nodes}", "trainer.zero_stage=2", f"trainer.batch_size_per_gpu={GLOBAL_BATCH // 2}",
            *TINY]
    agents = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
         "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
         "--rdzv_id", "elastic-test", str(ROOT / "train.py"), *args],
        cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True) for node in (0, 1)]
    try:
        outputs = [agent.communicate(timeout=600)[0] for agent in agents]
    finally:
        for agent in agents:
            if agent.poll() is None:
                os.killpg(agent.pid, signal.SIGKILL)
    for agent, output in zip(agents, outputs):
        assert agent.returncode == 0, output[-4000:]
    assert read_lineage(two_nodes / "lineage.jsonl") == read_lineage(one_node / "lineage.jsonl")
    ref, got = _losses(one_node), _losses(two_nodes)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in got:
        assert got[step] == pytest.approx(ref[step], rel=1e-4, abs=1e-5), step
    # the two-node run's mid-epoch checkpoint resumes on one node (one rank)
    resumed = tmp_path / "resume_one_node"
    _train(elastic_shards, resumed, world=1, stage=2, resume=str(two_nodes / "checkpoints" / f"step_{CKPT:08d}"))
    _assert_continues(one_node, resumed, after=CKPT)
