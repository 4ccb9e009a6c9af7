"""DeepSpeed set-up: process group, param groups, the engine, per-step hyper-parameters.

Facts this file relies on (docs/design.md section 8, verified with DeepSpeed 0.19.8 on CPU/gloo):
- the shared-memory comm op must be disabled before ``init_distributed`` or every start JIT-compiles it
  (``common.process.setup_process``);
- a client ``torch.optim.AdamW`` needs no compiler; per-step lr / weight decay are written into every
  group of ``engine.optimizer.param_groups`` (no DeepSpeed ``scheduler`` block);
- ``p.grad = None`` does not freeze a parameter at stages 1-3: a gradient hook zeroes it and its
  group's lr is 0; Adam then still counts steps and decays the moments of the frozen group, so the
  last layer's optimizer state is reset when the freeze ends (``LastLayerFreezer.release``), which
  leaves it as DINO's ``p.grad = None`` does (torch AdamW skips the parameter: no state at all);
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

from common.process import setup_process
from models.heads import convert_sync_batchnorm
from training.config import Config

__all__ = ["DistInfo", "init_distributed", "ParamGroupInfo", "build_param_groups", "param_groups_weight_decay",
           "model_no_weight_decay", "deepspeed_config", "build_engine", "set_hyperparameters", "LastLayerFreezer",
           "configure_matmul_precision"]


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
    setup_process(torch_threads)
    import deepspeed  # after setup_process set DS_ACCELERATOR

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


def model_no_weight_decay(module: nn.Module) -> set[str]:
    """Full parameter names that a model's own ``no_weight_decay()`` / ``no_weight_decay_keywords()`` exclude.

    Every submodule is asked (the backbone sits under ``backbone.`` in a student), its names are
    prefixed with the submodule's path; keywords (Swin / Video Swin ``relative_position_bias_table``)
    match any parameter name of that submodule that contains them.
    """
    names: set[str] = set()
    for prefix, sub in module.named_modules():
        prefix = f"{prefix}." if prefix else ""
        if hasattr(sub, "no_weight_decay"):
            names.update(prefix + n for n in sub.no_weight_decay())
        if hasattr(sub, "no_weight_decay_keywords"):
            keywords = tuple(sub.no_weight_decay_keywords())
            names.update(prefix + n for n, _ in sub.named_parameters() if any(k in n for k in keywords))
    return names


def param_groups_weight_decay(module: nn.Module, no_weight_decay_list: set[str] | tuple = ()
                              ) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(decay, no_decay) trainable parameters with timm's ``param_groups_weight_decay`` rule.

    A parameter gets no weight decay when ``param.ndim <= 1`` (norm weights, biases) or its name ends
    in ``.bias`` or is in ``no_weight_decay_list``. With an empty list this is DINO's
    ``utils.get_params_groups`` (biases and 1-D parameters), which SVT trains with.
    """
    no_decay_names = set(no_weight_decay_list)
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith(".bias") or name in no_decay_names:
            no_decay.append(param)
        else:
            decay.append(param)
    return decay, no_decay


def build_param_groups(module: nn.Module, last_layer_marker: str = "last_layer",
                       no_weight_decay_list: set[str] | tuple = ()) -> tuple[list[dict], list[ParamGroupInfo]]:
    """Splits trainable parameters into (decay | no decay) x (last layer | rest), non-empty groups only.

    Decay follows ``param_groups_weight_decay`` (the one grouping rule); parameters whose name
    contains ``last_layer_marker`` get their own groups so the schedules can freeze them.
    """
    decay, _ = param_groups_weight_decay(module, no_weight_decay_list)
    decay_ids = {id(p) for p in decay}
    buckets: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        key = (id(param) in decay_ids, last_layer_marker in name)
        buckets.setdefault(key, []).append(param)
    groups, infos = [], []
    for (decay_flag, last_layer), params in sorted(buckets.items(), key=lambda kv: (kv[0][1], not kv[0][0])):
        name = ("last_layer_" if last_layer else "") + ("decay" if decay_flag else "no_decay")
        groups.append({"params": params, "weight_decay": 0.0})
        infos.append(ParamGroupInfo(name=name, weight_decay=decay_flag, last_layer=last_layer))
    return groups, infos


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    """The DeepSpeed JSON for a recipe; ``trainer.deepspeed`` entries are merged in last."""
    t = cfg.trainer
    ds: dict = {
        "train_micro_batch_size_per_gpu": t.batch_size_per_gpu,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "train_batch_size": t.batch_size_per_gpu * t.grad_accum_steps * world_size,
        # per-parameter clipping (DINO's) runs in the trainer between backward and step instead
        "gradient_clipping": cfg.optim.clip_grad if cfg.optim.clip_mode == "global" else 0.0,
        "steps_per_print": 10**12,  # our metrics writer logs; keep DeepSpeed's stdout quiet
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer synchronises the device at every micro-batch's forward and
        # backward by default; the metrics writer measures throughput itself
        "timers": {"throughput": {"enabled": False, "synchronized": False}},
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


def _inner_optimizer(engine) -> torch.optim.Optimizer:
    """The client torch optimizer (its params are DeepSpeed's flat fp32 partitions under ZeRO)."""
    optimizer = engine.optimizer
    return getattr(optimizer, "optimizer", optimizer)


class LastLayerFreezer:
    """Freezes DINO's last layer: zero gradients while frozen, then the optimizer state DINO would have.

    DINO sets ``p.grad = None`` for the last layer during ``freeze_last_layer`` epochs, so torch AdamW
    skips it: no moments, no step count. Under DeepSpeed the gradient cannot be removed at ZeRO 1-3
    (the partitions always carry one), so a tensor hook zeroes it and its groups run at lr 0 (the
    weights do not move: lr 0 also cancels AdamW's decoupled weight decay). Adam still counts those
    steps and decays the (zero) moments; left so, the first real update divides by the bias
    corrections of step ``N + 1`` instead of step 1 and is 3.16x DINO's after 7500 frozen steps
    (``sqrt(1 - beta2) / (1 - beta1)``). DINO's freeze always starts at step 0, when the last layer
    has no state, so ``release`` resets the last-layer groups' moments and step count to zero in
    place (the state AdamW creates for a parameter it has never stepped) before the first unfrozen
    step. In place keeps DeepSpeed's links from parameters to their optimizer-state fragments.
    """

    def __init__(self, params: list[nn.Parameter], group_indices: list[int] | None = None) -> None:
        self.frozen = False
        self.group_indices = list(group_indices or [])
        self._handles = [p.register_hook(self._hook) for p in params]

    def _hook(self, grad: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(grad) if self.frozen else grad

    @torch.no_grad()
    def release(self, engine) -> int:
        """Resets the last-layer groups' Adam state to a never-stepped one; returns the states reset."""
        inner = _inner_optimizer(engine)
        reset = 0
        for tensor in _optimizer_state_keys(engine, self.group_indices):
            state = inner.state.get(tensor)
            if not state:
                continue
            for key, value in list(state.items()):
                if key == "step":  # a fresh tensor: a loaded checkpoint may share one step tensor across groups
                    state[key] = torch.zeros_like(value) if torch.is_tensor(value) else 0
                elif torch.is_tensor(value):
                    value.zero_()
            reset += 1
        return reset


def _optimizer_state_keys(engine, group_indices: list[int]) -> list[torch.Tensor]:
    """The tensors the client optimizer keys its state on for the given param groups, at any ZeRO stage."""
    optimizer = engine.optimizer
    wanted = set(group_indices)
    if hasattr(optimizer, "fp32_partitioned_groups_flat"):  # ZeRO-3: sub-groups map to param groups
        return [flat for sub, flat in enumerate(optimizer.fp32_partitioned_groups_flat)
                if optimizer.sub_group_to_group_id[sub] in wanted]
    for attr in ("single_partition_of_fp32_groups", "fp32_groups_flat_partition"):  # ZeRO 1/2, bf16 optimizer
        flat = getattr(optimizer, attr, None)
        if flat is not None:
            return [flat[i] for i in sorted(wanted)]
    # no ZeRO: the module parameters themselves
    return [p for i in sorted(wanted) for p in _inner_optimizer(engine).param_groups[i]["params"]]


def configure_matmul_precision(device: torch.device, tf32: bool) -> None:
    """TF32 for fp32 matmuls on CUDA (``trainer.tf32``): the fp32 work left in a step (the teacher
    outside bf16, fp32 recipes, the loss heads) runs on tensor cores, ~7x the fp32 FLOP/s of an H100.

    The official SVT code (kahnchana/svt, requirements torch>=1.7.1) ran on PyTorch 1.7-1.11, whose
    default was ``torch.backends.cuda.matmul.allow_tf32 = True`` (PyTorch 1.12 turned it off), so
    its fp32 matmuls on Ampere GPUs were TF32. ``torch.set_float32_matmul_precision`` is the one
    setting used here (mixing it with the per-backend ``fp32_precision`` flags makes torch's own
    getter raise). CPU runs keep "highest": the setting also reaches oneDNN's CPU matmuls.
    """
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high" if tf32 else "highest")


def build_engine(student: nn.Module, cfg: Config, world_size: int, teacher: nn.Module | None = None):
    """Wraps the student in a DeepSpeed engine with a client AdamW (or SGD: ``optim.optimizer``); returns
    (engine, group infos, freezer).

    With more than one rank every BatchNorm of the student and the teacher becomes a SyncBatchNorm
    first (MoCo v3 / BYOL / SimSiam train their heads with global-batch statistics); DeepSpeed then
    wraps the converted student.
    """
    import deepspeed  # local: importing it reads DS_ACCELERATOR, which init_distributed sets first

    if world_size > 1:
        convert_sync_batchnorm(student)
        if teacher is not None:
            convert_sync_batchnorm(teacher)
    no_decay = model_no_weight_decay(student) if cfg.optim.model_no_weight_decay else set()
    groups, infos = build_param_groups(student, no_weight_decay_list=no_decay)
    last_layer_groups = [i for i, info in enumerate(infos) if info.last_layer]
    last_layer_params = [p for i in last_layer_groups for p in groups[i]["params"]]
    freezer = LastLayerFreezer(last_layer_params, last_layer_groups)
    if cfg.optim.optimizer == "sgd":  # the fine-tuning protocols; weight decay per group, as set_hyperparameters
        optimizer = torch.optim.SGD(groups, lr=cfg.optim.lr, momentum=cfg.optim.momentum, weight_decay=0.0)
    else:
        optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                                      weight_decay=0.0)
    engine, _, _, _ = deepspeed.initialize(model=student, optimizer=optimizer,
                                           config=deepspeed_config(cfg, world_size))
    return engine, infos, freezer


def set_hyperparameters(engine, infos: list[ParamGroupInfo], *, lr: float, weight_decay: float,
                        freeze_last_layer: bool, freezer: LastLayerFreezer | None = None,
                        release_last_layer: bool = False) -> None:
    """Writes this step's lr and weight decay into every optimizer param group (before ``step()``).

    ``release_last_layer``: this is the first step after the freeze; the last layer's optimizer state
    is reset to what DINO's would be (``LastLayerFreezer.release``).
    """
    groups = engine.optimizer.param_groups
    if len(groups) != len(infos):
        raise RuntimeError(f"engine has {len(groups)} param groups, the trainer built {len(infos)}")
    for group, info in zip(groups, infos):
        group["lr"] = 0.0 if (info.last_layer and freeze_last_layer) else lr
        group["weight_decay"] = weight_decay if info.weight_decay else 0.0
    if freezer is not None:
        freezer.frozen = freeze_last_layer
        if release_last_layer and not freeze_last_layer:
            freezer.release(engine)
