"""The papers' clip-level evaluation protocols: the table of their settings and the typed config a run
starts from (``evaluation/finetune.py`` runs one).

* ``svt-finetune`` (SVT Sec. 4.1 "Fine-tuning"): the SSL head replaced by a linear layer, the whole
  network trained on slow-fast clips for 15 epochs with SGD (lr 5e-3, /10 at epochs 11 and 14,
  momentum 0.9, weight decay 1e-4, batch 32), tested with slow-fast inference (Sec. 3.4: two clips,
  (8, 224) and (64, 96), 3 spatial crops each).
* ``svt-linear`` (SVT Sec. 4.1 "Linear"): the same clips, the backbone frozen, only the linear layer
  trained: SGD lr 8e-3, cosine decay, momentum 0.9, batch 32, 20 epochs; same slow-fast test.
* ``lstcl-finetune`` (LSTCL Sec. 4): one 8-frame clip at stride 8 from a random start, 200 epochs;
  test: 5 clips of stride 8 placed uniformly over the video, centre crop, predictions averaged.

Every result records the protocol it used and any setting changed from it (``FinetuneConfig.changes``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from common.precision import precision_name
from common.typed_config import dataclass_from_dict
from objectives.schedules import epoch_lr
from pipelines.config import EvalConfig

__all__ = ["PROTOCOLS", "FINETUNE_PROTOCOLS", "PROBE_PROTOCOLS", "OPTIM_SCHEDULES", "FinetuneConfig",
           "protocol_config", "resolve_protocol", "describe"]

# The papers' protocols. Each entry names every setting that defines the protocol; run mechanics
# (threads, loader, ZeRO stage, precision, checkpoint period, seed) are not part of it.
PROTOCOLS: dict[str, dict[str, Any]] = {
    "svt-finetune": dict(
        epochs=15, lr=5e-3, schedule="multistep", milestones=(11, 14), gamma=0.1,  # SVT Sec. 4.1 (TimeSformer's)
        momentum=0.9, weight_decay=1e-4, batch_size=32,                             # SVT Sec. 4.1
        freeze_backbone=False, head_init_std=0.02,   # linear layer init as TimeSformer's / timm's head
        inputs="slowfast",                            # SVT Sec. 4.1: "two clips ... during fine-tuning"
        # Our choice: the SVT global view's temporal span and crop scale (the paper names no fine-tuning
        # augmentation; the official SVT code releases no fine-tuning script).
        train_span=0.9, train_scale=(0.4, 1.0), train_stride=0,
        eval=dict(slow_frames=8, slow_size=224, fast_frames=64, fast_size=96,   # SVT Sec. 3.4 / Fig. 3
                  clips=1, crops=3, stride=0)),  # SVT Sec. 4.1: 2 clips x 3 crops = 6 views
    "svt-linear": dict(
        # SVT Sec. 4.1 "Linear": SGD lr 8e-3 (used as stated, at batch 32; the official eval_linear.py scales
        # its lr by batch / 256 and its script passes 1e-3 at batch 16), cosine decay to 0 per epoch as
        # the official eval_linear.py (CosineAnnealingLR over the epochs), momentum 0.9, batch 32, 20 epochs.
        epochs=20, lr=8e-3, schedule="cosine", milestones=(), gamma=1.0,
        momentum=0.9, weight_decay=0.0, batch_size=32,  # weight decay 0: official eval_linear.py
        freeze_backbone=True, head_init_std=0.01,       # N(0, 0.01): official LinearClassifier (DINO's)
        inputs="slowfast",
        train_span=0.9, train_scale=(0.4, 1.0), train_stride=0,  # as svt-finetune (our choice)
        eval=dict(slow_frames=8, slow_size=224, fast_frames=64, fast_size=96, clips=1, crops=3, stride=0)),
    "lstcl-finetune": dict(
        # LSTCL Sec. 4: fine-tuning for 200 epochs with one T=8 clip at stride 8 from a random start.
        # The paper names no optimizer for it: TimeSformer's fine-tuning SGD (lr 5e-3, momentum 0.9,
        # weight decay 1e-4, /10 at 11/15 and 14/15 of the run, here scaled to 200 epochs) and SVT's
        # batch 32 are our choice.
        epochs=200, lr=5e-3, schedule="multistep", milestones=(147, 187), gamma=0.1,
        momentum=0.9, weight_decay=1e-4, batch_size=32,
        freeze_backbone=False, head_init_std=0.02,
        inputs="single",
        train_span=1.0, train_scale=(0.4, 1.0), train_stride=8,
        # LSTCL Sec. 4: "we sample uniformly 5 clip with center cropping"; stride 8 (Sec. 4.1, Fig. 4).
        eval=dict(slow_frames=8, slow_size=224, fast_frames=64, fast_size=96, clips=5, crops=1, stride=8)),
}
FINETUNE_PROTOCOLS = ("svt-finetune", "lstcl-finetune")
PROBE_PROTOCOLS = ("svt-linear",)


# protocol schedule name -> the trainer's optim.schedule (both set once per epoch)
OPTIM_SCHEDULES = {"multistep": "multistep", "cosine": "cosine_epochs"}


@dataclass
class FinetuneConfig:
    """Args (defaults: the ``svt-finetune`` protocol; ``PROTOCOLS`` gives each protocol's values):
        protocol: the named protocol these settings start from (recorded with every result).
        epochs, lr, schedule, milestones, gamma: ``multistep`` (lr * gamma ** milestones passed) or
            ``cosine`` (lr * (1 + cos(pi * epoch / epochs)) / 2), set once per epoch.
        momentum, weight_decay: SGD (no decay on biases and norms).
        batch_size: videos per optimizer step over all ranks.
        freeze_backbone: train only the linear layer (linear probe; backbone in eval mode, no gradients).
        head_init_std: std of the linear layer's (truncated) normal init.
        inputs: ``slowfast`` (classifier on CLS(slow) + CLS(fast)) or ``single`` (slow clip only).
        train_span, train_scale: training clips spread over a random ``train_span`` of the video, random
            resized crops of ``train_scale`` of the frame area, flipped with p 0.5.
        train_stride: > 0: the training clip takes a frame every ``train_stride`` from a random start.
        eval: the clips and the test views, the eval recipe's ``pipelines.config.EvalConfig``:
            ``slow_frames`` x ``slow_size`` and ``fast_frames`` x ``fast_size`` (the training clips have
            the same shapes), ``clips`` x ``crops`` test views per video (``stride`` 0: each clip spread
            over its 1/clips of the video; > 0: strided clips placed uniformly).
        zero_stage, precision: DeepSpeed ZeRO stage (0-3) and fp32 | bf16 (bf16 needs stage >= 1).
        num_threads, loader: DALI threads; dali | baseline loader.
        max_steps: stop after this many optimizer steps in total (0 = run every epoch); for smoke runs.
        ckpt_every_epochs: checkpoint period in epochs (the last epoch is always saved).
        torch_threads: torch CPU threads per rank (0 = torch's default).
        seed: seeds the head init and the loader.
    """

    protocol: str = "svt-finetune"
    epochs: int = 15
    lr: float = 5e-3
    schedule: str = "multistep"
    milestones: tuple[int, ...] = (11, 14)
    gamma: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 32
    freeze_backbone: bool = False
    head_init_std: float = 0.02
    inputs: str = "slowfast"
    train_span: float = 0.9
    train_scale: tuple[float, float] = (0.4, 1.0)
    train_stride: int = 0
    eval: EvalConfig = field(default_factory=EvalConfig)
    zero_stage: int = 0
    precision: str = "fp32"
    num_threads: int = 2
    loader: str = "dali"
    max_steps: int = 0
    ckpt_every_epochs: int = 1
    torch_threads: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"finetune.protocol must be one of {sorted(PROTOCOLS)}, got {self.protocol!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.ckpt_every_epochs < 1 or self.max_steps < 0:
            raise ValueError("finetune.epochs, batch_size, ckpt_every_epochs must be >= 1 and max_steps >= 0")
        if self.lr <= 0 or not 0 < self.gamma <= 1 or not 0 <= self.momentum < 1 or self.weight_decay < 0:
            raise ValueError(f"finetune: need lr > 0, 0 < gamma <= 1, 0 <= momentum < 1, weight_decay >= 0 "
                             f"(got {self.lr}, {self.gamma}, {self.momentum}, {self.weight_decay})")
        if self.schedule not in OPTIM_SCHEDULES:
            raise ValueError(f"finetune.schedule must be multistep or cosine, got {self.schedule!r}")
        if list(self.milestones) != sorted(self.milestones):
            raise ValueError(f"finetune.milestones must be increasing epochs, got {self.milestones}")
        if self.inputs not in ("slowfast", "single"):
            raise ValueError(f"finetune.inputs must be slowfast or single, got {self.inputs!r}")
        if self.inputs == "slowfast" and self.train_stride:
            raise ValueError("finetune.train_stride applies to single-clip inputs; slow-fast clips are spread "
                             "over train_span")
        if not 0 < self.train_span <= 1 or self.train_stride < 0 or self.head_init_std <= 0:
            raise ValueError(f"finetune: need 0 < train_span <= 1, train_stride >= 0, head_init_std > 0 "
                             f"(got {self.train_span}, {self.train_stride}, {self.head_init_std})")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"finetune.zero_stage must be 0-3, got {self.zero_stage}")
        self.precision = precision_name(self.precision, "finetune.precision", allowed=("fp32", "bf16"))
        if self.precision == "bf16" and self.zero_stage == 0:
            raise ValueError("finetune: bf16 needs zero_stage >= 1 (DeepSpeed's stage-0 bf16 optimizer "
                             "takes a dummy step; docs/design.md section 8)")

    def lr_at(self, epoch: int) -> float:
        """lr of ``epoch`` (0-based): multi-step decay, or cosine from ``lr`` to 0 over ``epochs`` (per epoch,
        as the official SVT / DINO eval_linear.py's ``CosineAnnealingLR(optimizer, epochs, eta_min=0)``)."""
        return epoch_lr(OPTIM_SCHEDULES[self.schedule], self.lr, epoch, self.epochs, self.milestones, self.gamma)

    def changes(self) -> dict[str, Any]:
        """Settings that differ from the named protocol, by dotted name (``eval.slow_frames``); a
        truncated run (``max_steps``) is one."""
        reference = _flat(asdict(protocol_config(self.protocol)))
        changed = {name: value for name, value in _flat(asdict(self)).items()
                   if name in _flat(PROTOCOLS[self.protocol]) and _plain(value) != _plain(reference[name])}
        if self.max_steps:
            changed["max_steps"] = self.max_steps
        return changed


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, (tuple, list)) else value


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"eval": {"clips": 5}}`` -> ``{"eval.clips": 5}``."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def protocol_config(name: str) -> FinetuneConfig:
    """The settings of protocol ``name`` (``PROTOCOLS``), run mechanics at their defaults."""
    return dataclass_from_dict(FinetuneConfig, {**PROTOCOLS[name], "protocol": name}, "protocol")


def resolve_protocol(values: dict[str, Any], default: str, allowed: tuple[str, ...] | None = None,
                     section: str = "finetune") -> FinetuneConfig:
    """The named protocol's settings (``values["protocol"]``, else ``default``) overlaid with ``values``
    (a nested ``eval`` mapping overlays the protocol's ``eval`` key by key); a bad key is an error naming
    ``section.key``."""
    name = values.get("protocol", default)
    allowed = allowed or tuple(PROTOCOLS)
    if name not in allowed:
        raise ValueError(f"protocol {name!r} is not one of {', '.join(allowed)}")
    return dataclass_from_dict(FinetuneConfig, {**values, "protocol": name}, section, base=protocol_config(name))


def describe(cfg: FinetuneConfig) -> str:
    """The variant column of the results table: what the classifier saw and how it was tested."""
    e = cfg.eval
    inputs = (f"slow-fast ({e.slow_frames}x{e.slow_size} + {e.fast_frames}x{e.fast_size})"
              if cfg.inputs == "slowfast" else f"{e.slow_frames}x{e.slow_size} clip")
    stride = f" stride {e.stride}" if e.stride else ""
    crops = "centre crop" if e.crops == 1 else f"{e.crops} crops"
    return f"{'frozen backbone, ' if cfg.freeze_backbone else ''}{inputs}; test {e.clips} clip(s){stride} x {crops}"
