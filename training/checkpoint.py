"""Checkpoints: DeepSpeed's files + trainer state + a portable per-parameter state, published atomically.

Layout under ``<run_dir>/checkpoints``::

    step_00000100/                     one complete checkpoint
        <DeepSpeed's files>            engine.save_checkpoint (exact same-layout resume)
        trainer.pt                     step, epoch, teacher, objective buffers, config, layout,
                                       backbone prefix, the data position (the same for every rank)
        trainer_rank00000.pt ...       per rank: RNG states
        portable.pt                    fp32 weights + optimizer state (Adam moments / SGD momentum) per
                                       parameter name, buffers: the one fp32 consolidation
    latest                             text file naming the newest complete checkpoint

A checkpoint is written under ``tmp-step_...``, renamed when every rank has finished, and only then
named by ``latest`` (``common.atomic_io``: whole or not at all): a run killed while saving leaves a
``tmp-*`` folder that nothing reads. DeepSpeed's own files refuse a different ZeRO stage or world
size, so resuming into another layout (a cluster job that comes back on fewer nodes) goes through
``portable.pt``, built with ``safe_get_full_fp32_param`` / ``safe_get_full_optimizer_state``
(docs/design.md section 8).
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from common.atomic_io import atomic_write_text, atomic_writer
from training.engine import _inner_optimizer, _optimizer_state_keys

__all__ = ["CheckpointManager", "find_latest", "rng_state", "set_rng_state", "portable_state",
           "load_portable_state", "consolidated_weights", "export_weights", "optimizer_state_keys"]

ADAM_KEYS = ("exp_avg", "exp_avg_sq")
SGD_KEYS = ("momentum_buffer",)
TRAINER_FILE = "trainer.pt"
PORTABLE_FILE = "portable.pt"
LATEST_FILE = "latest"
# What trainer.pt (training.Trainer._trainer_state) and portable.pt (portable_state) hold: a file that
# lacks one is not this trainer's checkpoint and is refused naming the file and the key, never filled
# with a default.
TRAINER_KEYS = ("step", "epoch", "nonfinite_skipped", "teacher", "objective", "config", "world_size", "zero_stage",
                "precision", "backbone_prefix", "data_position")
PORTABLE_KEYS = ("params", "moments", "frozen_params", "buffers", "adam_step", "adam_steps_by_group")


def _checked(state: dict, keys: tuple[str, ...], path: Path) -> dict:
    """``state`` if it holds every one of ``keys``; else a ValueError naming ``path`` and the first missing key."""
    missing = [k for k in keys if k not in state] if isinstance(state, dict) else list(keys)
    if missing:
        raise ValueError(f"{path}: no {missing[0]!r}; not a checkpoint file written by this trainer "
                         f"(it holds {', '.join(keys)})")
    return state


def read_state(ckpt_dir: Path, name: str) -> dict:
    """``trainer.pt`` or ``portable.pt`` of a checkpoint folder, checked against what the trainer writes."""
    path = Path(ckpt_dir) / name
    keys = {TRAINER_FILE: TRAINER_KEYS, PORTABLE_FILE: PORTABLE_KEYS}[name]
    return _checked(torch.load(path, map_location="cpu", weights_only=False), keys, path)


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def find_latest(ckpt_root: Path) -> Path | None:
    """The newest complete checkpoint folder, or None. Falls back to scanning if ``latest`` is gone."""
    ckpt_root = Path(ckpt_root)
    pointer = ckpt_root / LATEST_FILE
    if pointer.is_file():
        candidate = ckpt_root / pointer.read_text().strip()
        if (candidate / TRAINER_FILE).is_file():
            return candidate
    complete = sorted(p for p in ckpt_root.glob("step_*") if (p / TRAINER_FILE).is_file())
    return complete[-1] if complete else None


def _is_zero_param(param: nn.Parameter) -> bool:
    # `_hp_mapping` is None on ranks that own no fragment of the parameter, but the get/set calls are
    # collectives every rank must join, so test for the attribute, not its value.
    return hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")


def _adam_step_count(engine) -> int:
    for state in _inner_optimizer(engine).state.values():
        if "step" in state:
            return int(state["step"])
    return 0


def _adam_steps_by_group(engine) -> list[int | None]:
    """Adam's step count of every param group (None: no state yet).

    Groups can differ: DINO's last layer starts counting only when its freeze ends
    (``training.engine.LastLayerFreezer``), so one count for all would shift its bias corrections.
    """
    inner = _inner_optimizer(engine)
    steps: list[int | None] = []
    for group in range(len(inner.param_groups)):
        found = None
        for key in _optimizer_state_keys(engine, [group]):
            if "step" in inner.state.get(key, {}):
                found = int(inner.state[key]["step"])
                break
        steps.append(found)
    return steps


def optimizer_state_keys(engine) -> tuple[str, ...]:
    """The per-parameter optimizer state tensors a portable state carries: AdamW's two moments, or
    SGD's momentum buffer (none without momentum)."""
    inner = _inner_optimizer(engine)
    if isinstance(inner, torch.optim.SGD):
        return SGD_KEYS if any(group.get("momentum", 0) for group in inner.param_groups) else ()
    return ADAM_KEYS


def portable_state(engine) -> dict:
    """Full fp32 parameters and optimizer state (Adam moments / SGD momentum) by parameter name
    (collective: call on every rank)."""
    # local imports of deepspeed here and below: importing it reads DS_ACCELERATOR, set by init_distributed
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    module = engine.module
    inner = _inner_optimizer(engine)
    keys = optimizer_state_keys(engine)
    has_state = len(inner.state) > 0 and bool(keys)
    if has_state:
        _link_optimizer_state(engine)
    params, moments = {}, {}
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        if _is_zero_param(param):
            params[name] = safe_get_full_fp32_param(param).detach().cpu().clone()
            if has_state:
                moments[name] = {k: safe_get_full_optimizer_state(param, k).detach().cpu().clone() for k in keys}
        else:  # stage 0: the module parameter is the fp32 master and the optimizer keys on it
            params[name] = param.detach().float().cpu().clone()
            if has_state and param in inner.state:
                moments[name] = {k: inner.state[param][k].detach().cpu().clone() for k in keys}
    import deepspeed

    frozen_params = [(n, p) for n, p in module.named_parameters() if not p.requires_grad]
    # ZeRO-3 partitions frozen parameters too (DINO's weight-normed last layer keeps weight_g fixed):
    # gather them (collective), or the file holds this rank's empty partition
    with deepspeed.zero.GatheredParameters([p for _, p in frozen_params if hasattr(p, "ds_id")]):
        frozen = {n: p.detach().float().cpu().clone() for n, p in frozen_params}
    buffers = {n: b.detach().cpu().clone() for n, b in module.named_buffers()}
    return {"params": params, "moments": moments, "frozen_params": frozen, "buffers": buffers,
            "adam_step": _adam_step_count(engine), "adam_steps_by_group": _adam_steps_by_group(engine)}


def _ensure_optimizer_state(engine, keys: tuple[str, ...], step: int, steps_by_group: list[int | None]) -> None:
    """Creates the optimizer state (lazily made at the first step) so the saved values can be written
    into it; Adam's step counts too."""
    inner = _inner_optimizer(engine)
    # The tensors the client optimizer keys its state on: DeepSpeed swaps its flat fp32 partitions
    # into the param groups only around step(), so ask the wrapper for them.
    for p in _optimizer_state_keys(engine, list(range(len(inner.param_groups)))):
        state = inner.state[p]
        for key in keys:
            if key not in state:
                state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if keys == ADAM_KEYS:  # torch keeps `step` as a float tensor per parameter (non-capturable, non-fused)
            state["step"] = torch.tensor(float(step))
    if keys == ADAM_KEYS:
        for group, group_step in enumerate(steps_by_group):
            for key in _optimizer_state_keys(engine, [group]):
                inner.state[key]["step"] = torch.tensor(float(group_step if group_step is not None else step))
    _link_optimizer_state(engine)


def _link_optimizer_state(engine) -> None:
    """Re-links every parameter's fragment to the Adam state (ZeRO 1/2 and the bf16 optimizer).

    DeepSpeed 0.19.8 links them once, right after the *first param group's* first step, when the
    other groups' lazily created state does not exist yet; with several param groups (ours: decay /
    no decay / last layer) ``safe_get_full_optimizer_state`` then fails for the other groups.
    """
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None and hasattr(engine.optimizer, "_hp_optimizer_states_linked"):
        engine.optimizer._hp_optimizer_states_linked = False
        link()


def _set_zero3_full(engine, param, value: torch.Tensor, key: str | None = None) -> None:
    """ZeRO-3 ``safe_set_full_fp32_param`` / ``safe_set_full_optimizer_state`` for any world size.

    DeepSpeed 0.19.8's ``set_full_hp_param`` narrows the flat value at ``partition numel x rank``,
    but partitions are padded: a parameter whose size does not divide by the world size (32 values
    on 3 ranks: partitions of 11) fails on the last rank ("start (22) + length (11) exceeds
    dimension size (32)"). Same copy here, from the value padded to ``partition x world``.
    """
    optimizer = engine.optimizer
    partition, group = optimizer._get_fp32_opt_state_partition(param, release_swap_buffers=False,
                                                               optim_state_key=key)
    n = partition.numel()
    flat = value.detach().flatten().to(partition.device, partition.dtype)
    world = dist.get_world_size(group=getattr(param, "ds_process_group", None))
    padded = torch.zeros(n * world, dtype=flat.dtype, device=flat.device)
    padded[:flat.numel()] = flat
    rank = optimizer._get_param_partition_rank(param)
    partition.data.copy_(padded[n * rank:n * (rank + 1)])
    if optimizer._swappable_optimizer_subgroup(group):
        optimizer._optimizer_states_and_gradient_swap_out(group)


@torch.no_grad()
def load_portable_state(engine, state: dict) -> None:
    """Writes a portable state into an engine of any ZeRO stage / world size (call on every rank)."""
    # local: importing deepspeed reads DS_ACCELERATOR, set by init_distributed first
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    module = engine.module
    inner = _inner_optimizer(engine)
    names = {n for n, p in module.named_parameters() if p.requires_grad}
    if names != set(state["params"]):
        missing, extra = sorted(names - set(state["params"])), sorted(set(state["params"]) - names)
        raise ValueError(f"portable checkpoint does not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
    # the saved state names its own keys: AdamW's moments or SGD's momentum buffer
    keys = tuple(next(iter(state["moments"].values()))) if state["moments"] else ()
    if keys:
        _ensure_optimizer_state(engine, keys, state["adam_step"], state["adam_steps_by_group"])
    import deepspeed

    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        value = state["params"][name]
        if hasattr(param, "ds_id"):
            _set_zero3_full(engine, param, value)
            for key in keys:
                _set_zero3_full(engine, param, state["moments"][name][key], key)
        elif _is_zero_param(param):
            safe_set_full_fp32_param(param, value.to(param.device))
            for key in keys:
                safe_set_full_optimizer_state(param, state["moments"][name][key].to(param.device), key)
        else:
            param.copy_(value.to(param.dtype))
            for key in keys:
                inner.state[param][key].copy_(state["moments"][name][key])
    # The low-precision / partitioned module copies must be refreshed from the fp32 masters.
    params = list(module.parameters())
    if any(hasattr(p, "ds_id") for p in params):
        # ZeRO-3: write the gathered full values; the modifier rank's copy is re-partitioned on exit
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            if dist.get_rank() == 0:
                for name, param in module.named_parameters():
                    source = state["params"].get(name, state["frozen_params"].get(name))
                    param.copy_(source.to(param.dtype))
    else:
        for name, param in module.named_parameters():
            source = state["params"].get(name, state["frozen_params"].get(name))
            param.copy_(source.to(param.dtype))
    for name, buffer in module.named_buffers():
        if name in state["buffers"]:
            buffer.copy_(state["buffers"][name])


class CheckpointManager:
    """Saves and restores complete checkpoints of one run (every rank calls every method)."""

    def __init__(self, ckpt_root: Path, *, rank: int, world_size: int, keep: int = 2) -> None:
        self.root = Path(ckpt_root)
        self.rank = rank
        self.world_size = world_size
        self.keep = keep

    def save(self, engine, step: int, trainer_state: dict, rank_state: dict) -> Path:
        tag = f"step_{step:08d}"
        tmp_tag = f"tmp-{tag}"
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(self.root / tmp_tag, ignore_errors=True)
        dist.barrier()
        engine.save_checkpoint(str(self.root), tag=tmp_tag, save_latest=False)
        tmp_dir = self.root / tmp_tag
        portable = _checked(portable_state(engine), PORTABLE_KEYS, tmp_dir / PORTABLE_FILE)
        _checked(trainer_state, TRAINER_KEYS, tmp_dir / TRAINER_FILE)
        torch.save(rank_state, tmp_dir / f"trainer_rank{self.rank:05d}.pt")
        if self.rank == 0:
            torch.save(portable, tmp_dir / PORTABLE_FILE)
            torch.save(trainer_state, tmp_dir / TRAINER_FILE)
        dist.barrier()  # every rank's files are on disk
        final = self.root / tag
        if self.rank == 0:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp_dir, final)
            atomic_write_text(self.root / LATEST_FILE, tag)
            self._prune(keep_tag=tag)
        dist.barrier()
        return final

    def _prune(self, keep_tag: str) -> None:
        complete = sorted(p for p in self.root.glob("step_*") if p.name != keep_tag)
        for old in complete[: max(len(complete) - (self.keep - 1), 0)]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, engine, ckpt_dir: Path, *, zero_stage: int, precision: str) -> tuple[dict, dict | None]:
        """Restores the engine; returns (trainer state, this rank's state or None if the layout changed)."""
        ckpt_dir = Path(ckpt_dir)
        trainer_state = read_state(ckpt_dir, TRAINER_FILE)
        same_layout = (trainer_state["world_size"] == self.world_size and trainer_state["zero_stage"] == zero_stage
                       and trainer_state["precision"] == precision)
        if same_layout:
            load_path, _ = engine.load_checkpoint(str(ckpt_dir.parent), tag=ckpt_dir.name,
                                                  load_optimizer_states=True, load_lr_scheduler_states=False)
            if load_path is None:
                raise RuntimeError(f"{ckpt_dir}: DeepSpeed could not load its checkpoint files")
            rank_state = torch.load(ckpt_dir / f"trainer_rank{self.rank:05d}.pt", map_location="cpu",
                                    weights_only=False)
        else:
            load_portable_state(engine, read_state(ckpt_dir, PORTABLE_FILE))
            rank_state = None
        return trainer_state, rank_state


def consolidated_weights(ckpt_dir: Path) -> dict:
    """The fp32 weights of a checkpoint folder, without DeepSpeed or a process group (any ZeRO stage,
    any world size): the one consolidation path, read from ``portable.pt`` and ``trainer.pt``.

    Returns ``student`` (every parameter, frozen ones included, and the buffers), ``teacher`` (the EMA
    teacher's state dict, None without one), ``backbone_prefix`` (of the backbone's keys in both),
    ``config`` and ``step``.
    """
    ckpt_dir = Path(ckpt_dir)
    trainer_state, portable = read_state(ckpt_dir, TRAINER_FILE), read_state(ckpt_dir, PORTABLE_FILE)
    return {"student": {**portable["params"], **portable["frozen_params"], **portable["buffers"]},
            "teacher": trainer_state["teacher"], "backbone_prefix": trainer_state["backbone_prefix"],
            "config": trainer_state["config"], "step": trainer_state["step"]}


def export_weights(ckpt_dir: Path, out_path: Path) -> Path:
    """Consolidated fp32 weights of a checkpoint (``consolidated_weights``) in one file.

    The file holds ``student``, ``teacher``, ``backbone_prefix``, ``config``, ``step`` and ``backbone``
    (the teacher's backbone if there is one, as DINO/SVT evaluate the teacher, else the student's) with
    the prefix stripped. ``models.build_backbone(config['model']['backbone'])`` loads ``backbone`` strictly.
    """
    payload = consolidated_weights(ckpt_dir)
    source = payload["teacher"] if payload["teacher"] is not None else payload["student"]
    prefix = payload["backbone_prefix"]
    payload["backbone"] = {k[len(prefix):]: v for k, v in source.items() if k.startswith(prefix)}
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_writer(out_path) as f:
        torch.save(payload, f)
    return out_path
