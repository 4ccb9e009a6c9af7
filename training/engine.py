"""DeepSpeed set-up: process group, param groups, the engine, per-step hyper-parameters.

Facts this file relies on (DESIGN.md section 8, verified with DeepSpeed 0.19.8 on CPU/gloo):
- the shared-memory comm op must be disabled before ``init_distributed`` or every start JIT-compiles it;
- a client ``torch.optim.AdamW`` needs no compiler; per-step lr / weight decay are written into every
  group of ``engine.optimizer.param_groups`` (no DeepSpeed ``scheduler`` block);
- ``p.grad = None`` does not freeze a parameter at stages 1-3: a gradient hook zeroes it and its
  group's lr is 0;
- ZeRO-3 replaces ``torch.nn.functional.linear`` process-wide (the teacher too) unless
  ``memory_efficient_linear`` is false.
"""
from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.nn as nn

from training.config import Config

__all__ = ["DistInfo", "init_distributed", "ParamGroupInfo", "build_param_groups", "deepspeed_config",
           "build_engine", "set_hyperparameters", "LastLayerFreezer"]


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(backend: str = "auto", timeout_s: int = 900, torch_threads: int = 0) -> DistInfo:
    """Initialises DeepSpeed's process group for ``python train.py`` as well as torchrun / deepspeed."""
    # `deepspeed --num_gpus N` passes --local_rank; torchrun sets LOCAL_RANK. A bare `python train.py`
    # sets neither, and DeepSpeed then needs the rendezvous variables spelled out.
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if torch_threads > 0:
        torch.set_num_threads(torch_threads)
    import deepspeed  # after DS_ACCELERATOR is set
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    rank = torch.distributed.get_rank()
    world_size = torch.distributed.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return DistInfo(rank, world_size, local_rank, device)


@dataclass(frozen=True)
class ParamGroupInfo:
    """What the schedules do to one optimizer param group (same order as the groups)."""

    name: str
    weight_decay: bool  # False for biases and norm parameters
    last_layer: bool  # frozen (lr 0) during optim.freeze_last_layer_epochs


def build_param_groups(module: nn.Module, last_layer_marker: str = "last_layer"
                       ) -> tuple[list[dict], list[ParamGroupInfo]]:
    """Splits trainable parameters into (decay | no decay) x (last layer | rest), non-empty groups only.

    No weight decay on biases and on every 1-D parameter (norm weights), as in DINO's
    ``get_params_groups``. Parameters whose name contains ``last_layer_marker`` get their own groups
    so the schedules can freeze them.
    """
    buckets: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        decay = not (name.endswith(".bias") or param.ndim <= 1)
        key = (decay, last_layer_marker in name)
        buckets.setdefault(key, []).append(param)
    groups, infos = [], []
    for (decay, last_layer), params in sorted(buckets.items(), key=lambda kv: (kv[0][1], not kv[0][0])):
        name = ("last_layer_" if last_layer else "") + ("decay" if decay else "no_decay")
        groups.append({"params": params, "weight_decay": 0.0})
        infos.append(ParamGroupInfo(name=name, weight_decay=decay, last_layer=last_layer))
    return groups, infos


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    """The DeepSpeed JSON for a recipe; ``trainer.deepspeed`` entries are merged in last."""
    t = cfg.trainer
    ds: dict = {
        "train_micro_batch_size_per_gpu": t.batch_size_per_gpu,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "train_batch_size": t.batch_size_per_gpu * t.grad_accum_steps * world_size,
        "gradient_clipping": cfg.optim.clip_grad,
        "steps_per_print": 10**12,  # our metrics writer logs; keep DeepSpeed's stdout quiet
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,  # torch AdamW as a client optimizer
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": t.precision == "bf16"},
    }
    if t.zero_stage == 3:
        ds["zero_optimization"].update(
            stage3_param_persistence_threshold=t.zero3_param_persistence_threshold,
            stage3_model_persistence_threshold=t.zero3_model_persistence_threshold,
            # the EMA teacher runs outside the engine and must keep the real F.linear
            memory_efficient_linear=False,
        )
    return _merge(ds, t.deepspeed)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


class LastLayerFreezer:
    """Zeroes the last layer's gradients while frozen (a tensor hook works at every ZeRO stage)."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.frozen = False
        self._handles = [p.register_hook(self._hook) for p in params]

    def _hook(self, grad: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(grad) if self.frozen else grad


def build_engine(student: nn.Module, cfg: Config, world_size: int):
    """Wraps the student in a DeepSpeed engine with a client AdamW; returns (engine, group infos, freezer)."""
    import deepspeed

    groups, infos = build_param_groups(student)
    last_layer_params = [p for g, i in zip(groups, infos) if i.last_layer for p in g["params"]]
    freezer = LastLayerFreezer(last_layer_params)
    optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                                  weight_decay=0.0)
    engine, _, _, _ = deepspeed.initialize(model=student, optimizer=optimizer,
                                           config=deepspeed_config(cfg, world_size))
    return engine, infos, freezer


def set_hyperparameters(engine, infos: list[ParamGroupInfo], *, lr: float, weight_decay: float,
                        freeze_last_layer: bool, freezer: LastLayerFreezer | None = None) -> None:
    """Writes this step's lr and weight decay into every optimizer param group (before ``step()``)."""
    groups = engine.optimizer.param_groups
    if len(groups) != len(infos):
        raise RuntimeError(f"engine has {len(groups)} param groups, the trainer built {len(infos)}")
    for group, info in zip(groups, infos):
        group["lr"] = 0.0 if (info.last_layer and freeze_last_layer) else lr
        group["weight_decay"] = weight_decay if info.weight_decay else 0.0
    if freezer is not None:
        freezer.frozen = freeze_last_layer
