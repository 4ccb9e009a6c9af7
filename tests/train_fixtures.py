"""A tiny stand-in SSL problem for the trainer's DeepSpeed tests, and a worker torchrun can launch.

The model is small enough that 2-rank ZeRO runs take well under a second per step, but has every
kind of parameter the real ones have (weight matrices, biases, norm weights, a DINO-style
``last_layer``) so param groups, freezing and partitioning are all exercised. The data is
synthetic and world-size invariant: global batch ``i`` is the same samples whatever the number of
ranks, so a 2-rank run and a 1-rank run with twice the micro-batch see identical global batches.

Worker usage (what the tests launch)::

    torchrun --standalone --nproc_per_node 2 tests/train_fixtures.py SPEC.json
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

ROOT = Path(__file__).resolve().parents[1]

GLOBAL_SHAPE = (3, 4, 8, 8)  # (C, T, H, W)
LOCAL_SHAPE = (3, 2, 4, 4)
VIEW_NAMES = ["global_0", "global_1", "local_0", "local_1"]
OUT_DIM = 16


class TinyBackbone(nn.Module):
    """Per-pixel linear embedding + LayerNorm + MLP, mean-pooled: ``(B, C, T, H, W) -> (B, D)``."""

    def __init__(self, in_chans: int = 3, embed_dim: int = 12) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.patch_size = 1
        self.embed = nn.Linear(in_chans, embed_dim)
        self.norm = nn.LayerNorm(embed_dim)
        self.mlp = nn.Linear(embed_dim, embed_dim)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        tokens = rearrange(x, "b c t h w -> b (t h w) c")
        tokens = self.norm(self.embed(tokens))
        return (tokens + F.gelu(self.mlp(tokens))).mean(dim=1)


class TinyHead(nn.Module):
    """DINO-like head: MLP -> L2-normalised bottleneck -> ``last_layer``."""

    def __init__(self, in_dim: int = 12, out_dim: int = OUT_DIM, bottleneck: int = 6) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, 10), nn.GELU(), nn.Linear(10, bottleneck))
        self.last_layer = nn.Linear(bottleneck, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


class TinyDINOLoss(nn.Module):
    """DINO cross-entropy with a center buffer all-reduced across ranks (as SVT's)."""

    def __init__(self, out_dim: int = OUT_DIM, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_out: list[torch.Tensor], teacher_out: list[torch.Tensor], teacher_temp: float
                ) -> dict[str, torch.Tensor]:
        teacher_probs = [F.softmax((t.float() - self.center) / teacher_temp, dim=-1) for t in teacher_out]
        total, pairs = 0.0, 0
        for ti, tp in enumerate(teacher_probs):
            for si, s in enumerate(student_out):
                if si == ti:
                    continue
                total = total + torch.sum(-tp * F.log_softmax(s.float() / self.student_temp, dim=-1), dim=-1).mean()
                pairs += 1
        self.update_center(torch.cat(teacher_out))
        entropy = torch.stack([-(p * torch.log(p.clamp_min(1e-12))).sum(-1).mean() for p in teacher_probs]).mean()
        return {"loss": total / pairs, "teacher_entropy": entropy.detach()}

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor) -> None:
        batch_center = teacher_logits.float().sum(dim=0, keepdim=True)
        count = torch.tensor([float(teacher_logits.shape[0])])
        if dist.is_initialized():
            dist.all_reduce(batch_center)
            dist.all_reduce(count)
        self.center.mul_(self.center_momentum).add_(batch_center / count, alpha=1 - self.center_momentum)


def subprocess_env() -> dict:
    """Environment for a train.py / evaluate.py / torchrun child: CPU DeepSpeed, no inherited rank variables."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def build_tiny_method(seed: int = 0):
    from models.multiview import MultiViewRunner
    from training.methods import SVTMethod

    torch.manual_seed(seed)
    student = MultiViewRunner(TinyBackbone(), TinyHead())
    teacher = MultiViewRunner(TinyBackbone(), TinyHead())
    teacher.load_state_dict(student.state_dict())
    return SVTMethod(student, teacher, TinyDINOLoss(), VIEW_NAMES, VIEW_NAMES[:2])


def make_sample_views(index: int, seed: int, nan: bool = False) -> dict[str, torch.Tensor]:
    """Views of one synthetic sample, a pure function of (index, seed)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
    base = torch.randn(GLOBAL_SHAPE, generator=gen)
    views = {}
    for name in VIEW_NAMES:
        shape = GLOBAL_SHAPE if name.startswith("global") else LOCAL_SHAPE
        noise = 0.3 * torch.randn(shape, generator=gen)
        views[name] = F.interpolate(base[None], size=shape[1:], mode="trilinear")[0] + noise
    if nan:
        views["global_0"][0, 0, 0, 0] = float("nan")
    return views


class SyntheticLoader:
    """World-size-invariant loader (pipelines contract: views dict, state_dict, set_epoch, stats).

    Args:
        num_samples: samples per epoch; len() = num_samples // (batch_size * world_size).
        delay_s: sleep per batch (lets a test kill a run mid-epoch).
        nan_batches: global batch indices (epoch 0) whose first sample holds a NaN.
    """

    def __init__(self, num_samples: int, batch_size: int, rank: int, world_size: int, seed: int = 0,
                 delay_s: float = 0.0, nan_batches: tuple[int, ...] = ()) -> None:
        self.num_samples, self.batch_size, self.rank, self.world_size = num_samples, batch_size, rank, world_size
        self.seed, self.delay_s, self.nan_batches = seed, delay_s, set(nan_batches)
        self.epoch, self.next_batch = 0, 0
        self.view_names = list(VIEW_NAMES)
        self.stats = {"decode_failures": 0, "skipped_keys": []}

    def __len__(self) -> int:
        return self.num_samples // (self.batch_size * self.world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.next_batch = epoch, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "next_batch": self.next_batch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.next_batch = state["epoch"], state["next_batch"]

    def global_batch(self, epoch: int, index: int) -> dict:
        order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + 7919 * epoch))
        size = self.batch_size * self.world_size
        ids = order[index * size:(index + 1) * size].tolist()
        samples = [make_sample_views(i, self.seed, nan=(epoch == 0 and index in self.nan_batches and n == 0))
                   for n, i in enumerate(ids)]
        batch = {name: torch.stack([s[name] for s in samples]) for name in VIEW_NAMES}
        batch["key"] = [f"sample{i}" for i in ids]
        batch["label"] = torch.zeros(len(ids), dtype=torch.long)
        return batch

    def __iter__(self):
        while self.next_batch < len(self):
            full = self.global_batch(self.epoch, self.next_batch)
            lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
            self.next_batch += 1
            if self.delay_s:
                time.sleep(self.delay_s)
            yield {k: v[lo:hi] for k, v in full.items()}


def tiny_config(**overrides):
    """A Config for the stand-in problem; ``overrides`` are ``section.key`` -> value."""
    from training.config import apply_overrides, config_from_dict

    raw = {
        "model": {"backbone": "tiny_stand_in"},
        "objective": {"name": "svt", "teacher_temp": 0.07, "warmup_teacher_temp": 0.04,
                      "warmup_teacher_temp_epochs": 1, "momentum_teacher": 0.9},
        "optim": {"lr": 0.05, "lr_reference_batch": 0, "min_lr": 1e-3, "warmup_epochs": 0.5, "weight_decay": 0.04,
                  "weight_decay_end": 0.4, "clip_grad": 0.5, "clip_mode": "per_param",
                  "freeze_last_layer_epochs": 0.7},
        "trainer": {"epochs": 2, "batch_size_per_gpu": 2, "grad_accum_steps": 2, "zero_stage": 2,
                    "zero3_param_persistence_threshold": 0, "zero3_model_persistence_threshold": 0,
                    "ckpt_every_steps": 1000, "tensorboard": False, "progress_bar": False, "torch_threads": 1,
                    "dist_timeout_s": 120},
    }
    apply_overrides(raw, [f"{k}={json.dumps(v)}" for k, v in overrides.items()])
    return config_from_dict(raw)


NUM_SAMPLES = 24  # 2 ranks x micro 2 -> 6 micro-batches per epoch -> 3 steps per epoch at accumulation 2


def full_grad_clip_reference(engine, clip: float) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-parameter clipping through DeepSpeed's full-tensor API, one collective per parameter: the
    pre-clip full-gradient norms and the full gradients DINO's clip_gradients makes of them (the
    arithmetic of ``utils.clip_gradients`` with the coefficient formed from ``float(norm)``).
    Reads only: call on every rank, before ``training.partitions.clip_gradients_per_parameter``."""
    from deepspeed.utils import safe_get_full_grad

    norms, clipped = [], []
    for param in engine.module.parameters():
        if not param.requires_grad:
            continue
        grad = safe_get_full_grad(param).float().clone()
        norm = grad.norm(2)
        coef = clip / (float(norm) + 1e-6)
        norms.append(norm)
        clipped.append(grad * coef if coef < 1 else grad)
    return norms, clipped


def full_master_ema_reference(teacher: nn.Module, engine, momentum: float) -> dict[str, torch.Tensor]:
    """The EMA teacher update through DeepSpeed's full-tensor API (``safe_get_full_fp32_param`` per
    parameter, or every ZeRO-3 parameter gathered): the teacher weights it gives, on a copy."""
    import copy

    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    teacher = copy.deepcopy(teacher)
    student = dict(engine.module.named_parameters())
    pairs = [(t, student[n]) for n, t in teacher.named_parameters() if student[n].requires_grad]
    with torch.no_grad():
        for t, s in pairs:
            full = safe_get_full_fp32_param(s)
            if full is None:  # no ZeRO: the parameter is the fp32 master
                with deepspeed.zero.GatheredParameters([s]):
                    full = s.detach().clone()
            t.mul_(momentum).add_(full.to(t.dtype).view_as(t), alpha=1.0 - momentum)
    return {n: v.clone() for n, v in teacher.state_dict().items()}


def check_partitions(trainer, info) -> dict:
    """One real optimizer step of ``trainer``'s engine with clipping and EMA from the local partitions
    (training.partitions), each compared with the full-tensor reference on the same state, and the
    collectives / host syncs they issue (training.sync_counter)."""
    from training.partitions import clip_gradients_per_parameter
    from training.sync_counter import SyncCounter

    method, engine, clip = trainer.method, trainer.engine, trainer.cfg.optim.clip_grad
    batch = next(iter(trainer.loader))
    student_views, teacher_views = method.split_views(batch, info.device, trainer.bf16)
    teacher_out = trainer._teacher_forward(teacher_views)
    loss, _ = method.loss(engine(student_views), teacher_out, teacher_temp=0.07)
    engine.backward(loss)
    assert engine.is_gradient_accumulation_boundary()
    ref_norms, ref_clipped = full_grad_clip_reference(engine, clip)
    counter = SyncCounter()
    with counter.phase("clip"):
        norms = clip_gradients_per_parameter(trainer.partitions, clip)
    clipped = full_grad_clip_reference(engine, float("inf"))[1]  # the gradients as they are now
    engine.step()
    momentum = 0.9
    ref_teacher = full_master_ema_reference(method.teacher, engine, momentum)
    with counter.phase("ema"):
        trainer.teacher.update(momentum)
    teacher = {n: v.clone() for n, v in method.teacher.state_dict().items()}
    return {"norms": norms.cpu(), "ref_norms": torch.stack(ref_norms).cpu(),
            "clipped": [g.cpu() for g in clipped], "ref_clipped": [g.cpu() for g in ref_clipped],
            "teacher": teacher, "ref_teacher": ref_teacher,
            "teacher_out_dtypes": [str(t.dtype) for t in teacher_out],
            "teacher_param_dtypes": sorted({str(p.dtype) for p in method.teacher.parameters()}),
            "counts": {phase: {kind: counter.by_origin(phase, kind) for kind in ("collective", "host_sync")}
                       for phase in ("clip", "ema")}}


def run_worker(spec: dict) -> None:
    """Runs each scenario of ``spec["runs"]`` in this process (one engine after another)."""
    from training.engine import init_distributed
    from training.sync_counter import SyncCounter
    from training.trainer import NonFiniteLossError, Trainer

    info = init_distributed("gloo", timeout_s=120, torch_threads=1)
    for run in spec["runs"]:
        cfg = tiny_config(**run["overrides"])
        method = build_tiny_method(seed=cfg.trainer.seed)
        loader = SyntheticLoader(NUM_SAMPLES, cfg.trainer.batch_size_per_gpu, info.rank, info.world_size,
                                 seed=cfg.trainer.seed, delay_s=run.get("delay_s", 0.0),
                                 nan_batches=tuple(run.get("nan_batches", ())))
        counter = SyncCounter() if run.get("count_syncs") else None
        trainer = Trainer(cfg, method, loader, info, sync_counter=counter)
        if run.get("check_partitions"):
            result = check_partitions(trainer, info)
            if info.rank == 0:
                out = Path(cfg.trainer.output_dir)
                out.mkdir(parents=True, exist_ok=True)
                torch.save(result, out / "partitions.pt")
            dist.barrier()
            del trainer
            continue
        status = "ok"
        resume = run.get("resume")
        if run.get("save_first"):
            # a checkpoint before any step; the run then continues from it as a resume would
            resume = str(trainer.save())
        try:
            summary = trainer.fit(resume=resume)
        except NonFiniteLossError as exc:
            status, summary = f"stopped: {exc}", {}
        # final weights, gathered on every rank (collective), written by rank 0
        from training.checkpoint import portable_state

        state = portable_state(trainer.engine)
        if info.rank == 0:
            out = Path(cfg.trainer.output_dir)
            torch.save({"student": state["params"], "teacher": trainer.teacher.state_dict(),
                        "center": method.objective.center.clone(), "status": status, "summary": summary,
                        "total_steps": trainer.total_steps,
                        "syncs": counter.per_step() if counter is not None else None,
                        "matmul_precision": torch.get_float32_matmul_precision()}, out / "final.pt")
        dist.barrier()
        del trainer


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    run_worker(json.loads(Path(sys.argv[1]).read_text()))
