"""Typed training configuration: one dataclass per area, loaded from YAML, unknown keys rejected.

A recipe file has the sections ``data`` (``pipelines.DataConfig``), ``model``, ``objective``,
``optim`` and ``trainer``. ``load_config(path, overrides)`` reads it, applies ``section.key=value``
overrides from the command line (values parsed as YAML, so ``trainer.zero_stage=3`` is an int and
``optim.betas=[0.9,0.95]`` a list) and validates everything before any process group or model is
built, so a bad recipe fails at start with a message that names the field (nanoGPT ``GPTConfig``
style, not DINO's untyped ``args``).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from common.precision import precision_name
from common.typed_config import ConfigError, apply_overrides, dataclass_from_dict, load_yaml_sections
from pipelines.config import DataConfig

__all__ = [
    "ConfigError",
    "ModelConfig",
    "ObjectiveConfig",
    "OptimConfig",
    "TrainerConfig",
    "Config",
    "load_config",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
]


@dataclass
class ModelConfig:
    """Backbone and heads. Head sizes are read by the objective that needs them."""

    backbone: str = "timesformer_base_patch16"
    # passed to models.build_backbone, and saved with the run so evaluation rebuilds the same model:
    # for TimeSformers num_frames (stored time_embed length), img_size, space_interp, time_interp, depth...
    backbone_kwargs: dict = field(default_factory=dict)
    drop_path_rate: float = 0.1  # student only; the EMA teacher is built with 0 (DINO)
    # Initial student weights (the teacher starts as its copy): "none" (from scratch), a checkpoint file
    # (timm / DINO ViT, official TimeSformer, SVT release or an SVT run's export) or a timm pretrained tag
    # (vit_base_patch16_224.dino, from timm's Hugging Face cache). TimeSformer backbones only.
    pretrained: str = "none"
    # Temporal weights when `pretrained` is an image ViT: "fresh" (random, SVT paper Sec. 4) or "copy"
    # (from the spatial attention, as the official TimeSformer / SVT code's load_pretrained does).
    temporal_init: str = "fresh"
    # DINO head (SVT)
    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    head_layers: int = 3
    norm_last_layer: bool = True
    # projector / predictor (MoCo v3, BYOL, SimSiam)
    proj_dim: int = 256
    proj_hidden_dim: int = 4096
    pred_hidden_dim: int = 4096

    def __post_init__(self) -> None:
        if self.temporal_init not in ("fresh", "copy"):
            raise ConfigError(f"model.temporal_init: must be 'fresh' or 'copy', got {self.temporal_init!r}")
        if not self.pretrained:
            raise ConfigError("model.pretrained: empty; name a checkpoint file, a timm tag, or none")
        if self.pretrained != "none" and not self.backbone.startswith("timesformer"):
            raise ConfigError(f"model.pretrained: loading weights is supported for TimeSformer backbones, "
                              f"not {self.backbone!r}; use none")
        # checked here, not where the layers are built: a zero or negative width otherwise fails deep
        # inside torch (negative dimension) or DeepSpeed (an empty parameter group)
        for name in ("out_dim", "hidden_dim", "bottleneck_dim", "head_layers", "proj_dim", "proj_hidden_dim",
                     "pred_hidden_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name}: must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"model.drop_path_rate: must be in [0, 1), got {self.drop_path_rate}")


@dataclass
class ObjectiveConfig:
    """Loss and the teacher schedules that belong to it."""

    name: str = "svt"  # svt | mocov3 | byol | simsiam
    # SVT (DINO-style): temperatures and centering
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: float = 0.0
    center_momentum: float = 0.9
    pair_set: str = "paper"  # SVT view pairs (objectives.PAIR_SETS): paper | local_to_global | ...
    # MoCo v3 InfoNCE temperature
    temperature: float = 0.2
    # MoCo v3 with data.repeats > 1: the other view-sets of a query's video are not negatives (their
    # logits are masked). Our choice (issue 19): they show the same video; false is the ablation.
    mask_same_video: bool = True
    # EMA teacher / momentum encoder: cosine from momentum_teacher to momentum_teacher_final
    momentum_teacher: float = 0.996
    momentum_teacher_final: float = 1.0


@dataclass
class OptimConfig:
    """AdamW with per-step lr / weight-decay schedules (DINO ``cosine_scheduler``)."""

    lr: float = 5e-4  # at a global batch of lr_reference_batch; scaled linearly with the real batch
    lr_reference_batch: int = 256  # 0 turns the linear scaling off
    min_lr: float = 1e-6
    warmup_epochs: float = 10.0
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    clip_grad: float = 3.0  # max gradient norm; 0 disables
    clip_mode: str = "global"  # global (one norm over all parameters) | per_param (DINO utils.clip_gradients)
    model_no_weight_decay: bool = False  # also no wd for the model's no_weight_decay() names (Video Swin)
    freeze_last_layer_epochs: float = 1.0  # DINO: the head's last layer is frozen at first
    # the fine-tuning protocols (evaluation/finetune.py: SVT Sec. 4.1, LSTCL Sec. 4) train with SGD and
    # an lr set once per epoch; pretraining keeps AdamW and DINO's per-step cosine
    optimizer: str = "adamw"  # adamw | sgd
    momentum: float = 0.9  # sgd only
    schedule: str = "cosine"  # cosine (per step: warmup, then to min_lr) | multistep | cosine_epochs (per epoch)
    milestones: list = field(default_factory=list)  # multistep: epochs at which the lr is multiplied by gamma
    gamma: float = 0.1  # multistep


@dataclass
class TrainerConfig:
    """DeepSpeed engine, run length, checkpoints, logging."""

    epochs: float = 20.0
    max_steps: int = 0  # > 0 caps the run at this many optimizer steps
    batch_size_per_gpu: int = 8  # micro-batch per rank
    grad_accum_steps: int = 1
    zero_stage: int = 2  # 0 (plain data parallel), 1, 2, 3
    precision: str = "fp32"  # fp32 | bf16 (also float32 | bfloat16; bf16 needs zero_stage >= 1)
    zero3_param_persistence_threshold: int = 100_000  # 0 partitions every parameter (tests)
    zero3_model_persistence_threshold: int = 9_223_372_036_854_775_807
    deepspeed: dict = field(default_factory=dict)  # extra DeepSpeed JSON keys merged last
    seed: int = 0
    output_dir: str = "runs/default"
    ckpt_every_steps: int = 500        # and at the end; 0: no checkpoints (throughput runs)
    keep_checkpoints: int = 2
    log_every_steps: int = 1
    on_nonfinite_loss: str = "skip"  # skip | stop
    optimizer_log: str = ""  # a file name under output_dir: per optimizer step, the param groups as applied
    loader: str = "dali"  # dali | baseline
    dist_backend: str = "auto"  # auto (nccl on GPU, gloo on CPU) | gloo | nccl
    dist_timeout_s: int = 900
    torch_threads: int = 0  # 0 leaves torch's default
    # TF32 tensor cores for fp32 matmuls on CUDA (training.engine.configure_matmul_precision: the official
    # SVT code's PyTorch 1.7-1.11 had them on by default); no effect on CPU
    tf32: bool = True
    peak_tflops: float = 0.0  # per device, for the MFU estimate; 0 omits MFU
    tensorboard: bool = True
    progress_bar: bool = True


@dataclass
class Config:
    """A whole recipe. ``data`` is checked against the objective only when the recipe has a data section
    (runs fed by tests and the fine-tuning engine have none); ``train.py`` needs its ``shards``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    data: DataConfig = field(default_factory=DataConfig)


_SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "objective": ObjectiveConfig,
    "optim": OptimConfig,
    "trainer": TrainerConfig,
}

OBJECTIVES = ("svt", "mocov3", "byol", "simsiam")


def config_from_dict(raw: dict) -> Config:
    """Builds and validates a ``Config`` from nested plain data (as read from YAML)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping with sections {sorted(_SECTIONS) + ['data']}, got {raw!r}")
    for key in raw:
        if key not in _SECTIONS and key != "data":
            raise ConfigError(f"{key}: unknown section (valid: data, {', '.join(_SECTIONS)})")
    sections = {name: dataclass_from_dict(cls, raw.get(name) or {}, name) for name, cls in _SECTIONS.items()}
    has_data = raw.get("data") is not None
    data = DataConfig.from_dict(raw["data"]) if has_data else DataConfig()
    cfg = Config(data=data, **sections)
    validate(cfg, check_data=has_data)
    return cfg


def validate(cfg: Config, check_data: bool = True) -> None:
    """Cross-field checks that a dataclass alone cannot express (``check_data``: the data section too).

    Normalizes ``trainer.precision`` to its short name (``bfloat16`` -> ``bf16``), which DeepSpeed's
    config and the checkpoint use."""
    t, o, opt = cfg.trainer, cfg.objective, cfg.optim
    if t.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"trainer.zero_stage: must be 0, 1, 2 or 3, got {t.zero_stage}")
    t.precision = precision_name(t.precision, "trainer.precision", allowed=("fp32", "bf16"))
    if t.precision == "bf16" and t.zero_stage == 0:
        # DeepSpeed's bf16 path without ZeRO (FP16_UnfusedOptimizer) takes a dummy step, so Adam's
        # step count and weight decay drift (docs/design.md section 8).
        raise ConfigError("trainer.precision: bf16 needs trainer.zero_stage >= 1 (stage 0 bf16 is wrong in DeepSpeed)")
    for name in ("batch_size_per_gpu", "grad_accum_steps", "log_every_steps", "keep_checkpoints"):
        if getattr(t, name) < 1:
            raise ConfigError(f"trainer.{name}: must be >= 1, got {getattr(t, name)}")
    if t.ckpt_every_steps < 0:
        raise ConfigError(f"trainer.ckpt_every_steps: must be >= 1, or 0 for no checkpoints, got {t.ckpt_every_steps}")
    if t.epochs <= 0 and t.max_steps <= 0:
        raise ConfigError(f"trainer.epochs: must be > 0 unless trainer.max_steps is set, got {t.epochs}")
    if t.on_nonfinite_loss not in ("skip", "stop"):
        raise ConfigError(f"trainer.on_nonfinite_loss: must be 'skip' or 'stop', got {t.on_nonfinite_loss!r}")
    if t.loader not in ("dali", "baseline"):
        raise ConfigError(f"trainer.loader: must be 'dali' or 'baseline', got {t.loader!r}")
    if t.dist_backend not in ("auto", "gloo", "nccl"):
        raise ConfigError(f"trainer.dist_backend: must be auto, gloo or nccl, got {t.dist_backend!r}")
    if t.batch_size_per_gpu % cfg.data.repeats:
        raise ConfigError(f"data.repeats: {cfg.data.repeats} view-sets per video must divide "
                          f"trainer.batch_size_per_gpu={t.batch_size_per_gpu} (a rank's batch holds whole videos)")
    if check_data:
        if not cfg.data.shards.strip():
            raise ConfigError("data.shards: empty; set it to a shard folder written by `python -m shard_tools shard`")
        wanted = "svt" if o.name == "svt" else "lstcl"
        if cfg.data.recipe != wanted:
            raise ConfigError(f"data.recipe: objective.name={o.name!r} needs data.recipe={wanted!r}, "
                              f"got {cfg.data.recipe!r}")
    if o.name not in OBJECTIVES:
        raise ConfigError(f"objective.name: must be one of {OBJECTIVES}, got {o.name!r}")
    for name in ("student_temp", "teacher_temp", "warmup_teacher_temp", "temperature"):
        if not getattr(o, name) > 0:
            raise ConfigError(f"objective.{name}: must be > 0, got {getattr(o, name)}")
    for name in ("momentum_teacher", "momentum_teacher_final", "center_momentum"):
        if not 0.0 <= getattr(o, name) <= 1.0:
            raise ConfigError(f"objective.{name}: must be in [0, 1], got {getattr(o, name)}")
    if not (opt.lr > 0 and math.isfinite(opt.lr)):
        raise ConfigError(f"optim.lr: must be a positive number, got {opt.lr}")
    if len(opt.betas) != 2 or not all(0.0 <= b < 1.0 for b in opt.betas):
        raise ConfigError(f"optim.betas: must be two numbers in [0, 1), got {opt.betas}")
    if opt.clip_grad < 0:
        raise ConfigError(f"optim.clip_grad: must be >= 0 (0 disables), got {opt.clip_grad}")
    if opt.clip_mode not in ("global", "per_param"):
        raise ConfigError(f"optim.clip_mode: must be 'global' or 'per_param', got {opt.clip_mode!r}")
    if opt.warmup_epochs < 0 or opt.freeze_last_layer_epochs < 0:
        raise ConfigError("optim.warmup_epochs / optim.freeze_last_layer_epochs: must be >= 0")
    if opt.optimizer not in ("adamw", "sgd"):
        raise ConfigError(f"optim.optimizer: must be 'adamw' or 'sgd', got {opt.optimizer!r}")
    if not 0.0 <= opt.momentum < 1.0:
        raise ConfigError(f"optim.momentum: must be in [0, 1), got {opt.momentum}")
    if opt.schedule not in ("cosine", "multistep", "cosine_epochs"):
        raise ConfigError(f"optim.schedule: must be cosine, multistep or cosine_epochs, got {opt.schedule!r}")
    if list(opt.milestones) != sorted(opt.milestones) or not 0.0 < opt.gamma <= 1.0:
        raise ConfigError(f"optim.milestones / optim.gamma: need increasing epochs and 0 < gamma <= 1, got "
                          f"{opt.milestones}, {opt.gamma}")
    if opt.schedule != "cosine" and t.epochs <= 0:
        raise ConfigError(f"optim.schedule: {opt.schedule} is set per epoch and needs trainer.epochs > 0")


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Reads a YAML recipe, applies ``section.key=value`` overrides and validates the result."""
    path = Path(path)
    raw = load_yaml_sections(path, overrides)
    try:
        return config_from_dict(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def config_to_dict(cfg: Config) -> dict:
    """Plain nested data (for checkpoints and the run's config.yaml)."""
    return {name: dataclasses.asdict(getattr(cfg, name)) for name in (*_SECTIONS, "data")}
