"""The training loop: DeepSpeed engine for the student, EMA teacher beside it, schedules, checkpoints.

One optimizer step = ``trainer.grad_accum_steps`` micro-batches on every rank. Schedules are
indexed by the optimizer step (DINO's ``cosine_scheduler``), written into the engine's param
groups before the step's first micro-batch; the teacher is updated after every real optimizer step.

A step is, in order: ``_begin_step`` (this step's lr / weight decay / last-layer freeze),
per micro-batch ``_next_batch`` (data fetch + lineage), ``_forward_loss`` (teacher and student
forward, loss, one all-reduce of the loss terms and the non-finite flag, kept on the device) and
``engine.backward``; then at the accumulation boundary ``_finish_step`` (clipping, the step's one
read of device values, the non-finite decision, ``engine.step``), ``_update_teacher`` and
``_step_record`` (metrics).

No micro-batch waits for the device: the host reads device values once per optimizer step, at the
boundary (loss terms, non-finite flags and gradient norm in one tensor), and the per-step
collectives are few and independent of the parameter count (``training.partitions``). A
non-finite loss on any rank therefore discards the whole optimizer step it belongs to (no update,
objective buffers restored, the step redone on the next micro-batches), decided before
``engine.step``. ``sync_counter`` (``training.sync_counter``) counts what each phase issues.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from common.precision import torch_dtype
from common.seeding import seed_all
from objectives.schedules import cosine_schedule, epoch_lr
from pipelines.protocol import Loader
from training.checkpoint import CheckpointManager, find_latest, rng_state, set_rng_state
from training.config import Config, config_to_dict
from training.engine import DistInfo, _inner_optimizer, build_engine, configure_matmul_precision, set_hyperparameters
from training.lineage import LineageWriter
from training.methods import SSLMethod
from training.metrics import MetricsWriter, read_metrics, summarize, truncate_jsonl
from training.partitions import LocalPartitions, clip_gradients_per_parameter
from training.sync_counter import SyncCounter
from training.teacher import EMATeacher, teacher_autocast

__all__ = ["Trainer", "Schedules", "NonFiniteLossError"]


class NonFiniteLossError(RuntimeError):
    """Raised with ``trainer.on_nonfinite_loss: stop`` when a loss is NaN or inf."""


@dataclass
class Schedules:
    """Per-optimizer-step values, each an array of length ``total_steps``."""

    lr: np.ndarray
    weight_decay: np.ndarray
    momentum: np.ndarray
    teacher_temp: np.ndarray
    freeze_last_layer_steps: int

    @classmethod
    def build(cls, cfg: Config, total_steps: int, steps_per_epoch: float, global_batch: int) -> "Schedules":
        o, opt = cfg.objective, cfg.optim
        lr = opt.lr * (global_batch / opt.lr_reference_batch if opt.lr_reference_batch > 0 else 1.0)
        warmup = min(int(round(opt.warmup_epochs * steps_per_epoch)), total_steps)
        temp_warmup = min(int(round(o.warmup_teacher_temp_epochs * steps_per_epoch)), total_steps)
        if opt.schedule == "cosine":
            lr_values = cosine_schedule(lr, opt.min_lr, total_steps, warmup_steps=warmup)
        else:  # set once per epoch: the value of the epoch each step falls in
            epochs = np.floor(np.arange(total_steps) / steps_per_epoch).astype(int)
            lr_values = np.array([epoch_lr(opt.schedule, lr, int(e), cfg.trainer.epochs, opt.milestones, opt.gamma)
                                  for e in epochs], dtype=np.float64)
        return cls(
            lr=lr_values,
            weight_decay=cosine_schedule(opt.weight_decay, opt.weight_decay_end, total_steps),
            momentum=cosine_schedule(o.momentum_teacher, o.momentum_teacher_final, total_steps),
            teacher_temp=cosine_schedule(o.teacher_temp, o.teacher_temp, total_steps, warmup_steps=temp_warmup,
                                         warmup_start=o.warmup_teacher_temp),
            freeze_last_layer_steps=int(round(opt.freeze_last_layer_epochs * steps_per_epoch)),
        )


def _object_group():
    """The process group for pickled objects: the default one when it is gloo, else a gloo group
    (collective: every rank creates it). NCCL would stage each pickle through device memory and block
    the compute stream behind it."""
    if not dist.is_initialized() or dist.get_world_size() == 1 or dist.get_backend() == "gloo":
        return None
    return dist.new_group(backend="gloo")


@contextlib.contextmanager
def _optimizer_update_skipped(engine):
    """``engine.step()`` inside the block releases the step's gradients and keeps DeepSpeed's counters
    going but applies no update: the client optimizer's ``step`` does nothing (Adam's moments and
    step count untouched), so the fp32 masters and the module weights copied from them stay as they
    were, at every ZeRO stage."""
    inner = _inner_optimizer(engine)
    inner.step = lambda *args, **kwargs: None
    try:
        yield
    finally:
        del inner.step


class _EpochIterator:
    """Endless micro-batch stream over epochs; knows the epoch of the next batch."""

    def __init__(self, loader, epoch: int, fresh_epoch: bool) -> None:
        self.loader = loader
        self.epoch = epoch
        if fresh_epoch and hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        self._it = iter(loader)

    def __next__(self) -> dict:
        try:
            return next(self._it)
        except StopIteration:
            self.epoch += 1
            if hasattr(self.loader, "set_epoch"):
                self.loader.set_epoch(self.epoch)
            self._it = iter(self.loader)
            return next(self._it)


@dataclass
class _StepTotals:
    """What the micro-batches of one optimizer step add up for its metrics record.

    ``reduced`` sums the rank-averaged loss terms of the micro-batches on the device, ``flags`` holds
    each micro-batch's non-finite flag (the fraction of ranks with a non-finite loss); both are read
    by the host once, at the boundary (``_finish_step``), which fills ``term_sums`` and ``grad_norm``.
    """

    micro_done: int = 0
    data_wait: float = 0.0
    names: list[str] = field(default_factory=list)
    reduced: torch.Tensor | None = None
    flags: list[torch.Tensor] = field(default_factory=list)
    keys: list[list[str]] = field(default_factory=list)  # every micro-batch's keys (the non-finite message)
    term_sums: dict[str, float] = field(default_factory=dict)
    grad_norm: float = float("nan")  # measured by the trainer (stage 0 / per-parameter clipping)
    counts: tuple[float, float, float] = (0.0, 0.0, 0.0)  # views, tokens, FLOPs per sample


class Trainer:
    """Runs a recipe: ``Trainer(cfg, method, loader, dist_info).fit(resume=...)``.

    Args:
        cfg: the validated recipe.
        method: the SSL method (student, teacher, objective, loss).
        loader: a ``pipelines.protocol.Loader``: per-step dicts of views, ``__len__``, ``set_epoch``,
            ``state_dict``/``load_state_dict``/``merge_states`` and ``stats``. Its position is global:
            the same on every rank and valid for any rank layout (pipelines/order.py).
        dist_info: from ``engine.init_distributed``.
    """

    def __init__(self, cfg: Config, method: SSLMethod, loader: Loader, dist_info: DistInfo,
                 sync_counter: SyncCounter | None = None) -> None:
        self.cfg = cfg
        self.method = method
        self.loader = loader
        self.dist = dist_info
        t = cfg.trainer
        self.run_dir = Path(t.output_dir)
        self.global_batch = t.batch_size_per_gpu * t.grad_accum_steps * dist_info.world_size
        micro_per_epoch = len(loader)
        if micro_per_epoch < 1:
            raise ValueError(f"{t.output_dir}: the data loader yields no batches (check data.shards and batch size)")
        if dist_info.world_size > 1:
            lengths = torch.tensor([micro_per_epoch, -micro_per_epoch], dtype=torch.float64, device=dist_info.device)
            dist.all_reduce(lengths, op=dist.ReduceOp.MAX)
            if lengths[0] != -lengths[1]:
                raise ValueError(f"ranks have different numbers of batches per epoch ({int(-lengths[1])} to "
                                 f"{int(lengths[0])}); set data.drop_last=true so every rank takes the same steps")
        self.steps_per_epoch = micro_per_epoch / t.grad_accum_steps
        self.total_steps = t.max_steps if t.max_steps > 0 else max(1, int(math.ceil(t.epochs * self.steps_per_epoch)))
        if t.max_steps > 0 and t.epochs > 0:
            self.total_steps = min(t.max_steps, max(1, int(math.ceil(t.epochs * self.steps_per_epoch))))
        self.schedules = Schedules.build(cfg, self.total_steps, self.steps_per_epoch, self.global_batch)
        configure_matmul_precision(dist_info.device, t.tf32)
        method.to(dist_info.device)
        self.engine, self.group_infos, self.freezer = build_engine(method.student, cfg, dist_info.world_size,
                                                                   teacher=method.teacher)
        self.bf16 = t.precision == "bf16"
        if self.bf16:
            # DeepSpeed casts parameters to bf16 but leaves floating buffers (BatchNorm running stats
            # in the MoCo / BYOL / SimSiam heads) in fp32, which batch_norm rejects
            for buffer in self.engine.module.buffers():
                if buffer.is_floating_point():
                    buffer.data = buffer.data.to(torch_dtype(t.precision))
        self.teacher = (EMATeacher(method.teacher, self.engine, zero_stage=t.zero_stage, bf16=self.bf16)
                        if method.teacher is not None else None)
        self.partitions = (LocalPartitions(self.engine, [p for p in self.engine.module.parameters() if p.requires_grad])
                           if self._per_param_clip() else None)
        # pickled objects (data positions, lineage keys) travel between hosts on gloo, never on NCCL
        self.object_group = _object_group()
        self.sync_counter = sync_counter
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", rank=dist_info.rank,
                                             world_size=dist_info.world_size, keep=t.keep_checkpoints)
        self.step = 0
        self.epoch = 0  # of the next batch; _data keeps it once fit() runs
        self.nonfinite_skipped = 0
        self._fresh_epoch = True
        self._data: _EpochIterator | None = None

    # ------------------------------------------------------------------ state
    def _current_epoch(self) -> int:
        return self._data.epoch if self._data is not None else self.epoch

    def _trainer_state(self) -> dict:
        return {
            "step": self.step,
            "epoch": self._current_epoch(),
            "nonfinite_skipped": self.nonfinite_skipped,
            "teacher": self.teacher.state_dict() if self.teacher is not None else None,
            "objective": self.method.objective.state_dict(),
            "config": config_to_dict(self.cfg),
            "world_size": self.dist.world_size,
            "zero_stage": self.cfg.trainer.zero_stage,
            "precision": self.cfg.trainer.precision,
            "backbone_prefix": self.method.backbone_prefix,
            "data_position": self._data_position(),
        }

    def _data_position(self) -> dict:
        """The loader's position, one value for the whole run (collective): every rank's state
        gathered and merged, so samples found bad on any rank are part of it."""
        state = self.loader.state_dict()
        if self.dist.world_size > 1:
            states = [None] * self.dist.world_size
            dist.all_gather_object(states, state, group=self.object_group)
        else:
            states = [state]
        merge = getattr(self.loader, "merge_states", None)
        return merge(states) if merge is not None else states[0]

    def save(self) -> Path:
        """A complete checkpoint of the current step (collective); works before, during and after ``fit``."""
        rank_state = {"rng": rng_state(), "epoch": self._current_epoch()}
        return self.checkpoints.save(self.engine, self.step, self._trainer_state(), rank_state)

    def restore(self, ckpt_dir: Path) -> None:
        trainer_state, rank_state = self.checkpoints.load(self.engine, ckpt_dir, zero_stage=self.cfg.trainer.zero_stage,
                                                          precision=self.cfg.trainer.precision)
        self.step = trainer_state["step"]
        self.epoch = trainer_state["epoch"]
        self.nonfinite_skipped = trainer_state["nonfinite_skipped"]
        if self.teacher is not None:
            self.teacher.load_state_dict(trainer_state["teacher"])
        self.method.objective.load_state_dict(trainer_state["objective"], strict=True)
        # one portable data position for every rank layout: (epoch, data step, bad samples)
        self.loader.load_state_dict(trainer_state["data_position"])
        self._fresh_epoch = False
        if rank_state is not None:
            set_rng_state(rank_state["rng"])
            return
        self._reseed()
        if self.dist.rank == 0:
            print(f"[train] {ckpt_dir}: rank layout changed ({trainer_state['world_size']} ranks, ZeRO "
                  f"{trainer_state['zero_stage']}, {trainer_state['precision']} -> {self.dist.world_size} "
                  f"ranks, ZeRO {self.cfg.trainer.zero_stage}, {self.cfg.trainer.precision}); restored from "
                  f"the portable state; the data position carries over", flush=True)

    def _reseed(self) -> None:
        # one independent stream per (rank, step): drop path etc. differ across ranks and steps, and a
        # resumed run redraws exactly what the uninterrupted one drew (SeedSequence: no collisions, unlike
        # seed + 1000 * rank + step, where rank 0 at step 1000 is rank 1 at step 0)
        seed_all(self.cfg.trainer.seed, self.dist.rank, self.step)

    # ------------------------------------------------------------------ loop
    def _all_reduce_mean(self, values: torch.Tensor) -> torch.Tensor:
        values = values.detach().float()
        if self.dist.world_size > 1:
            dist.all_reduce(values)
        return values / self.dist.world_size

    def _phase(self, name: str):
        return self.sync_counter.phase(name) if self.sync_counter is not None else contextlib.nullcontext()

    def fit(self, resume: str | None = None) -> dict:
        """Trains to ``total_steps``; ``resume`` is None, "auto" or a checkpoint folder.

        Checkpoints every ``trainer.ckpt_every_steps`` steps and at the end; 0 writes none (throughput
        runs that only want the per-step metrics).
        """
        t = self.cfg.trainer
        ckpt = None
        if resume == "auto":
            ckpt = find_latest(self.run_dir / "checkpoints")
        elif resume:
            ckpt = Path(resume)
            if not (ckpt / "trainer.pt").is_file():
                raise FileNotFoundError(f"{ckpt}: not a complete checkpoint (trainer.pt missing)")
        if ckpt is not None:
            self.restore(ckpt)
        else:
            self._reseed()
        self._data = _EpochIterator(self.loader, self.epoch, self._fresh_epoch)
        writer = MetricsWriter(self.run_dir, enabled=self.dist.rank == 0, total_steps=self.total_steps,
                               start_step=self.step, tensorboard=t.tensorboard, progress_bar=t.progress_bar,
                               append=ckpt is not None)
        self._lineage = LineageWriter(self.run_dir, rank=self.dist.rank, world_size=self.dist.world_size,
                                      resume_step=self.step if ckpt is not None else None, group=self.object_group)
        self._optimizer_log = None
        if t.optimizer_log and self.dist.rank == 0:
            log_path = self.run_dir / t.optimizer_log
            if ckpt is not None:
                truncate_jsonl(log_path, self.step)  # the resumed run logs the later steps again
            self._optimizer_log = open(log_path, "a" if ckpt is not None else "w", buffering=1)
        if ckpt is not None:
            writer.message(f"[train] resumed from {ckpt} at step {self.step}")
        failed = True
        try:
            while self.step < self.total_steps:
                record = self._train_step(writer)
                if record is None:
                    continue  # a non-finite loss discarded the step: it is redone on the next micro-batches
                checkpoint = bool(t.ckpt_every_steps) and (self.step % t.ckpt_every_steps == 0
                                                           or self.step == self.total_steps)
                if self.step % t.log_every_steps == 0 or self.step == self.total_steps:
                    writer.log(record)
                    self._lineage.flush()  # collective (gloo): every rank's keys since the last flush
                if checkpoint:
                    self._lineage.flush()  # lineage.jsonl covers every step the checkpoint holds
                    path = self.save()
                    writer.message(f"[train] checkpoint {path}")
            failed = False
        finally:
            writer.close()
            # a failure on one rank would leave the others waiting in the flush's collective: the
            # unwritten lines are past the last checkpoint, which a resume truncates to anyway
            self._lineage.close(flush=not failed)
            if self._optimizer_log is not None:
                self._optimizer_log.close()
            self.epoch = self._data.epoch
        summary = summarize(read_metrics(writer.jsonl_path)) if self.dist.rank == 0 else {}
        summary.update(checkpoint=str(find_latest(self.run_dir / "checkpoints")), tensorboard=str(writer.tb_dir),
                       metrics=str(writer.jsonl_path))
        return summary

    def _train_step(self, writer: MetricsWriter) -> dict | None:
        """One optimizer step (grad_accum micro-batches); returns its metrics record, or None when a
        non-finite loss discarded it (``self.step`` unchanged)."""
        s = self.step
        self._begin_step(s)
        totals = _StepTotals()
        step_start = time.perf_counter()
        # the loss may update objective buffers (SVT's center) from a bad batch: keep a copy (on the
        # device) to restore if the step is discarded
        objective_before = {k: v.clone() for k, v in self.method.objective.state_dict().items()}
        while True:
            batch = self._next_batch(s, totals)
            with self._phase("micro"):
                loss = self._forward_loss(batch, s, totals)
                self.engine.backward(loss)
                boundary = self.engine.is_gradient_accumulation_boundary()  # read before step()
                totals.micro_done += 1
                if not boundary:
                    self.engine.step()  # a micro-step: DeepSpeed counts it, the optimizer waits for the boundary
            if totals.micro_done == 1:
                totals.counts = self.method.throughput_counts(batch)
            if boundary:
                break
            if totals.micro_done >= self.cfg.trainer.grad_accum_steps:
                raise RuntimeError("engine and trainer disagree on the gradient-accumulation boundary")
        with self._phase("step"):
            applied = self._finish_step(s, totals, writer, objective_before)
            if applied:
                self._update_teacher(s)
                self.step += 1
                record = self._step_record(s, totals, time.perf_counter() - step_start)
        if self.sync_counter is not None:
            self.sync_counter.step_done()
        return record if applied else None

    def _frozen(self, s: int) -> bool:
        return s < self.schedules.freeze_last_layer_steps

    def _begin_step(self, s: int) -> None:
        """This step's lr and weight decay into the param groups; the last layer frozen or released."""
        set_hyperparameters(self.engine, self.group_infos, lr=float(self.schedules.lr[s]),
                            weight_decay=float(self.schedules.weight_decay[s]), freeze_last_layer=self._frozen(s),
                            freezer=self.freezer,
                            release_last_layer=s > 0 and s == self.schedules.freeze_last_layer_steps)

    def _next_batch(self, s: int, totals: _StepTotals) -> dict:
        """The next micro-batch; its wait counts as data wait, its keys go to the lineage (kept on
        this rank until the next flush: no collective here)."""
        wait_start = time.perf_counter()
        stats = getattr(self.loader, "stats", None)
        seen = len(stats.get("replacements", [])) if isinstance(stats, dict) else 0
        paused = self.sync_counter.paused() if self.sync_counter is not None else contextlib.nullcontext()
        with paused:  # the loader's own work is not the step's (it runs on its threads on a GPU node)
            batch = next(self._data)
        totals.data_wait += time.perf_counter() - wait_start
        replaced = stats.get("replacements", [])[seen:] if isinstance(stats, dict) else []
        self._lineage.write(s + 1, batch, replaced)
        totals.keys.append(list(batch.get("key", [])))
        return batch

    def _teacher_forward(self, teacher_views: list) -> list:
        """The teacher's outputs, under the student's autocast (bf16 matmuls, fp32 EMA weights)."""
        with torch.no_grad(), teacher_autocast(self.dist.device, self.bf16):
            return self.method.teacher(teacher_views)

    def _forward_loss(self, batch: dict, s: int, totals: _StepTotals) -> torch.Tensor:
        """Teacher and student forward and the loss; its rank-averaged terms and non-finite flag are
        added to ``totals`` on the device (one all-reduce, no host sync)."""
        student_views, teacher_views = self.method.split_views(batch, self.dist.device, self.bf16)
        # without a teacher the second list goes to the loss as it is (a classifier's labels)
        teacher_out = self._teacher_forward(teacher_views) if self.method.teacher is not None else teacher_views
        student_out = self.engine(student_views)
        video_ids = batch.get("video_id")
        if video_ids is not None:
            video_ids = torch.as_tensor(video_ids, dtype=torch.long).to(self.dist.device)
        loss, terms = self.method.loss(student_out, teacher_out, teacher_temp=float(self.schedules.teacher_temp[s]),
                                       video_ids=video_ids)
        # one all-reduce carries the loss terms and the non-finite flag of every rank
        packed = torch.stack([loss.detach().float(), *[v.detach().float() for v in terms.values()]])
        nonfinite = (~torch.isfinite(loss.detach())).any().float().reshape(1)
        reduced = self._all_reduce_mean(torch.cat([torch.nan_to_num(packed, nan=0.0, posinf=0.0, neginf=0.0),
                                                   nonfinite]))
        if totals.reduced is None:
            totals.names = ["loss", *terms]
            totals.reduced = reduced[:-1].clone()
        else:
            totals.reduced += reduced[:-1]
        totals.flags.append(reduced[-1:])
        return loss

    def _finish_step(self, s: int, totals: _StepTotals, writer: MetricsWriter, objective_before: dict) -> bool:
        """At the boundary: clipping, the step's one host read, then ``engine.step`` -- or, when a
        micro-batch's loss was non-finite on any rank, the step discarded (or the run stopped)."""
        norms = None
        if self._per_param_clip():
            # DINO's utils.clip_gradients on the reduced gradients; the logged norm is the global
            # norm before clipping, as DeepSpeed reports it in global mode
            norms = clip_gradients_per_parameter(self.partitions, self.cfg.optim.clip_grad).norm().reshape(1)
        elif self.cfg.trainer.zero_stage == 0:
            # DeepSpeed reports no global norm without ZeRO; gradients are all-reduced by now
            grads = [p.grad.detach().float().norm() for p in self.engine.module.parameters() if p.grad is not None]
            norms = (torch.stack(grads).norm() if grads else torch.zeros((), device=self.dist.device)).reshape(1)
        parts = [totals.reduced, *totals.flags] + ([norms.to(totals.reduced.device)] if norms is not None else [])
        values = torch.cat(parts).tolist()  # the step's one host sync
        n = len(totals.names)
        totals.term_sums = dict(zip(totals.names, values[:n]))
        flags = values[n:n + len(totals.flags)]
        if norms is not None:
            totals.grad_norm = values[-1]
        if not any(flags):
            self._log_optimizer(totals)
            self.engine.step()
            return True
        self.nonfinite_skipped += 1
        micro = next(i for i, f in enumerate(flags) if f)
        t = self.cfg.trainer
        message = (f"[train] non-finite loss at step {s} (micro-batch {micro}, epoch {self._data.epoch}, "
                   f"keys {totals.keys[micro][:4]}...)")
        writer.message(message + ("; stopping" if t.on_nonfinite_loss == "stop" else "; step discarded"))
        writer.log({"step": s, "event": "nonfinite_loss", "nonfinite_skipped": self.nonfinite_skipped})
        if t.on_nonfinite_loss == "stop":
            raise NonFiniteLossError(message)
        with _optimizer_update_skipped(self.engine):
            self.engine.step()  # DeepSpeed's boundary bookkeeping (gradients released), no update
        self.method.objective.load_state_dict(objective_before)
        return False

    def _log_optimizer(self, totals: _StepTotals) -> None:
        """``trainer.optimizer_log``: what the optimizer is about to apply, one line per step (rank 0)."""
        if self._optimizer_log is None:
            return
        groups = self.engine.optimizer.param_groups
        keys = [k for k in ("lr", "momentum", "weight_decay") if k in groups[0]]
        record = {"step": self.step + 1, "epoch": self._data.epoch, "batch": self.global_batch,
                  "loss": totals.term_sums.get("loss", float("nan")) / totals.micro_done,
                  "optimizer": type(_inner_optimizer(self.engine)).__name__,
                  "param_groups": [{k: g[k] for k in keys} | {"params": sum(p.numel() for p in g["params"])}
                                   for g in groups]}
        self._optimizer_log.write(json.dumps(record) + "\n")

    def _per_param_clip(self) -> bool:
        return self.cfg.optim.clip_mode == "per_param" and self.cfg.optim.clip_grad > 0

    def _update_teacher(self, s: int) -> None:
        if self.teacher is not None:
            self.teacher.update(float(self.schedules.momentum[s]))

    def _step_record(self, s: int, totals: _StepTotals, step_time: float) -> dict:
        """The metrics record of the step that just ended (``self.step`` is already its 1-based number)."""
        t = self.cfg.trainer
        own_norm = t.zero_stage == 0 or self._per_param_clip()
        grad_norm = totals.grad_norm if own_norm else self.engine.get_global_grad_norm()
        views_per_sample, tokens_per_sample, flops_per_sample = totals.counts
        videos_per_s = self.global_batch / step_time
        record = {
            "step": self.step,
            "epoch": self._data.epoch,
            **{name: total / t.grad_accum_steps for name, total in totals.term_sums.items()},
            "lr": float(self.schedules.lr[s]),
            "wd": float(self.schedules.weight_decay[s]),
            "momentum": float(self.schedules.momentum[s]),
            "teacher_temp": float(self.schedules.teacher_temp[s]),
            "last_layer_frozen": self._frozen(s),
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "data_wait_ms": 1000.0 * totals.data_wait,
            "step_ms": 1000.0 * step_time,
            "videos_per_s": videos_per_s,
            "views_per_s": videos_per_s * views_per_sample,
            "tokens_per_s": videos_per_s * tokens_per_sample,
            "nonfinite_skipped": self.nonfinite_skipped,
        }
        if flops_per_sample and t.peak_tflops > 0:
            record["mfu"] = videos_per_s * flops_per_sample / (t.peak_tflops * 1e12 * self.dist.world_size)
        stats = getattr(self.loader, "stats", None)
        if isinstance(stats, dict):
            record["decode_failures"] = int(stats.get("decode_failures", 0))
            record["data_replacements"] = len(stats.get("replacements", []))
        return record
