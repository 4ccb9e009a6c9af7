"""SSL methods: which module is the student (in the engine), which the EMA teacher, and the loss.

``SSLMethod`` is what the trainer needs; ``build_method(cfg, view_names)`` makes the recipes'
methods from models/ and objectives/:
- SVT: student = MultiViewRunner(backbone, DINOHead) on all views; teacher (same structure, EMA)
  on the global views; ``objectives.SVTLoss`` (centering + sharpening, center in a buffer).
- MoCo v3 / BYOL: query encoder = ContrastiveEncoder(backbone, projector, predictor) on both clips;
  momentum key encoder = backbone + projector (EMA); symmetric loss.
- SimSiam: one encoder, no teacher; the stop-gradient branch is the student's own projection.
- Fine-tuning (evaluation/finetune.py): ``ClassifierMethod``, a ``models.VideoClassifier`` with cross-entropy.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

import models
from models.classifier import VideoClassifier
from models.flops import forward_flops
from models.multiview import ContrastiveEncoder, MultiViewRunner
from objectives import BYOLLoss, MoCoV3Loss, SimSiamLoss, SVTLoss
from training.config import Config

__all__ = ["SSLMethod", "SVTMethod", "TwoViewMethod", "ClassifierMethod", "build_method"]


class SSLMethod:
    """The trainer's view of a method.

    Attributes:
        student: module wrapped by the DeepSpeed engine; called with a list of view tensors.
        teacher: EMA module (parameter names a subset of the student's) or None.
        objective: loss module; its buffers (e.g. SVT's center) are checkpointed.
        student_views / teacher_views: view names fed to each. Without a teacher, the second value
            ``split_views`` returns goes to ``loss`` as ``teacher_out`` (a classifier's labels).
        backbone_prefix: prefix of the backbone's parameters in student/teacher state dicts.
    """

    student: nn.Module
    teacher: nn.Module | None
    objective: nn.Module
    student_views: list[str]
    teacher_views: list[str]
    backbone_prefix: str = "backbone."
    _counts: tuple[float, float, float] | None = None

    def to(self, device: torch.device) -> "SSLMethod":
        self.student.to(device)
        if self.teacher is not None:
            self.teacher.to(device)
        self.objective.to(device)
        return self

    def split_views(self, batch: dict, device: torch.device, bf16: bool) -> tuple[list, list]:
        dtype = torch.bfloat16 if bf16 else torch.float32
        tensors = {name: batch[name].to(device=device, dtype=dtype, non_blocking=True)
                   for name in dict.fromkeys(self.student_views + self.teacher_views)}
        return [tensors[n] for n in self.student_views], [tensors[n] for n in self.teacher_views]

    def loss(self, student_out, teacher_out, *, teacher_temp: float, video_ids: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``video_ids``: the video of each row (``data.repeats > 1`` puts several view-sets of one
        video in a batch); only an objective with negatives (MoCo v3) uses it."""
        raise NotImplementedError

    def _flops_module(self) -> nn.Module:
        """The module whose forward FLOPs ``models.flops`` counts (backbone + head, as a runner)."""
        raise NotImplementedError

    def throughput_counts(self, batch: dict) -> tuple[float, float, float]:
        """(views, backbone tokens, training FLOPs) per sample, for the throughput metrics; computed once."""
        if self._counts is None:
            shapes = [tuple(batch[n].shape[1:]) for n in self.student_views]
            teacher_shapes = [tuple(batch[n].shape[1:]) for n in self.teacher_views]
            self._counts = _throughput_counts(self._flops_module(), self.student.backbone, shapes, teacher_shapes)
        return self._counts


# objectives return {"loss": ..., <monitors>}; metric names in the JSONL / TensorBoard
_TERM_NAMES = {"kl": "student_teacher_kl"}


def _split_terms(out: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    terms = {_TERM_NAMES.get(k, k): v.detach() for k, v in out.items() if k != "loss"}
    return out["loss"], terms


def _tokens(backbone: nn.Module, shapes: list[tuple[int, ...]]) -> float:
    """Backbone tokens per sample over views of ``shapes`` (C, T, H, W)."""
    patch = getattr(backbone, "patch_size", 16)
    patch = patch[-1] if isinstance(patch, (tuple, list)) else patch
    tubelet = getattr(backbone, "tubelet_size", 1)
    tubelet = tubelet[0] if isinstance(tubelet, (tuple, list)) else tubelet
    return float(sum(math.ceil(t / tubelet) * (h // patch) * (w // patch) for _, t, h, w in shapes))


def _throughput_counts(runner: nn.Module, backbone: nn.Module, shapes: list[tuple[int, ...]],
                       teacher_shapes: list[tuple[int, ...]]) -> tuple[float, float, float]:
    """(views, tokens, training FLOPs) per sample: 3x forward for the student (fwd + bwd), 1x for the teacher.

    ``runner`` should be an unpartitioned module (the teacher where there is one: ZeRO-3 empties the
    student's parameter tensors, and the head FLOPs are read from their sizes).
    """
    tokens = _tokens(backbone, shapes)
    try:
        cache: dict[tuple[int, ...], int] = {}
        flops = 0.0
        for shape, factor in [(s, 3.0) for s in shapes] + [(s, 1.0) for s in teacher_shapes]:
            if shape not in cache:
                cache[shape] = forward_flops(runner, shape)
            flops += factor * cache[shape]
    except ValueError:  # a model that does not run on the meta device: MFU is not reported
        flops = 0.0
    return float(len(shapes)), float(tokens), flops


class SVTMethod(SSLMethod):
    """SVT: student on all views, teacher on the global views, SVT (DINO) loss with collapse monitors."""

    def __init__(self, student: nn.Module, teacher: nn.Module, objective: nn.Module, view_names: list[str],
                 global_views: list[str]) -> None:
        self.student, self.teacher, self.objective = student, teacher, objective
        self.student_views = list(view_names)
        self.teacher_views = list(global_views)
        self.backbone_prefix = "backbone."

    def loss(self, student_out, teacher_out, *, teacher_temp: float, video_ids: torch.Tensor | None = None):
        # SVTLoss reports the collapse monitors itself: teacher entropy and KL(teacher || student);
        # no negatives, so repeated view-sets of a video need no mask (video_ids unused)
        return _split_terms(self.objective(student_out, teacher_out, teacher_temp=teacher_temp))

    def _flops_module(self) -> nn.Module:
        return self.teacher


class TwoViewMethod(SSLMethod):
    """LSTCL with MoCo v3 / BYOL (momentum teacher) or SimSiam (no teacher), symmetric over two clips."""

    def __init__(self, kind: str, student: ContrastiveEncoder, teacher: ContrastiveEncoder | None,
                 objective: nn.Module, view_names: list[str], mask_same_video: bool = False) -> None:
        if len(view_names) != 2:
            raise ValueError(f"TwoViewMethod: expected two clips (short, long), got views {view_names}")
        self.kind = kind
        # MoCo v3 with repeated sampling: a query's other view-sets are masked out of its negatives
        self.mask_same_video = mask_same_video and kind == "mocov3"
        self.student, self.teacher, self.objective = student, teacher, objective
        self.student_views = list(view_names)
        self.teacher_views = list(view_names) if teacher is not None else []
        self.backbone_prefix = "backbone."

    def loss(self, student_out, teacher_out, *, teacher_temp: float, video_ids: torch.Tensor | None = None):
        (p1, p2), (z1, z2) = student_out
        if self.kind == "simsiam":  # BYOL and SimSiam have no negatives: no mask
            return _split_terms(self.objective(p1, p2, z1.detach(), z2.detach()))
        _, (k1, k2) = teacher_out
        if self.mask_same_video:
            if video_ids is None:
                raise ValueError("MoCo v3 with data.repeats > 1 needs the batch's video ids (the loader's "
                                 "'video_id') to keep a video's other view-sets out of the negatives")
            return _split_terms(self.objective(p1, p2, k1.float(), k2.float(), video_ids=video_ids))
        return _split_terms(self.objective(p1, p2, k1.float(), k2.float()))

    def _flops_module(self) -> nn.Module:
        source = self.teacher or self.student  # backbone + projector, as a runner for models.flops
        return MultiViewRunner(source.backbone, source.head)


class ClassifierMethod(SSLMethod):
    """Supervised fine-tuning as a trainer method: cross-entropy of a ``VideoClassifier`` on one clip
    or a slow-fast pair. No teacher: ``split_views`` hands the labels to the loss in the teacher's place.

    Args:
        classifier: the student (in the engine).
        view_names: the loader views it sees, slow clip first.
    """

    def __init__(self, classifier: VideoClassifier, view_names: list[str]) -> None:
        self.student, self.teacher = classifier, None
        self.objective = nn.CrossEntropyLoss()
        self.student_views, self.teacher_views = list(view_names), []
        self.backbone_prefix = "backbone."

    def split_views(self, batch: dict, device: torch.device, bf16: bool) -> tuple[list, torch.Tensor]:
        views, _ = super().split_views(batch, device, bf16)
        return views, torch.as_tensor(batch["label"]).view(-1).long().to(device)

    def loss(self, student_out, teacher_out, *, teacher_temp: float, video_ids: torch.Tensor | None = None):
        return self.objective(student_out.float(), teacher_out), {}

    def throughput_counts(self, batch: dict) -> tuple[float, float, float]:
        """Views and tokens per sample; no FLOPs (a frozen backbone runs no backward: MFU is not reported)."""
        if self._counts is None:
            shapes = [tuple(batch[n].shape[1:]) for n in self.student_views]
            self._counts = (float(len(shapes)), _tokens(self.student.backbone, shapes), 0.0)
        return self._counts


def _teacher_from_student(teacher: nn.Module, student: nn.Module) -> nn.Module:
    """Copies the student's weights into the teacher (names the teacher lacks, e.g. a predictor, skipped)."""
    wanted = teacher.state_dict().keys()
    teacher.load_state_dict({k: v for k, v in student.state_dict().items() if k in wanted}, strict=True)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def build_method(cfg: Config, view_names: list[str]) -> SSLMethod:
    """The recipe's method from models/ and objectives/ (call under the same seed on every rank).

    The teacher is built with drop path 0 (DINO) and starts as a copy of the student.
    """
    m, o = cfg.model, cfg.objective

    def backbone(drop_path_rate: float, pretrained: str = "none") -> nn.Module:
        init = {} if pretrained == "none" else {"pretrained": pretrained, "temporal_init": m.temporal_init}
        return models.build_backbone(m.backbone, drop_path_rate=drop_path_rate, **m.backbone_kwargs, **init)

    student_backbone = backbone(m.drop_path_rate, m.pretrained)  # the teacher copies it
    embed_dim = student_backbone.embed_dim
    if o.name == "svt":
        global_views = [v for v in view_names if v.startswith("global")]
        local_views = [v for v in view_names if v.startswith("local")]
        if not global_views or len(global_views) + len(local_views) != len(view_names):
            raise ValueError(f"objective.name=svt needs global_*/local_* views from data.recipe=svt, got {view_names}")

        def head() -> nn.Module:
            return models.DINOHead(embed_dim, out_dim=m.out_dim, hidden_dim=m.hidden_dim,
                                   bottleneck_dim=m.bottleneck_dim, nlayers=m.head_layers,
                                   norm_last_layer=m.norm_last_layer)

        student = models.MultiViewRunner(student_backbone, head())
        teacher = _teacher_from_student(models.MultiViewRunner(backbone(0.0), head()), student)
        objective = SVTLoss(m.out_dim, num_global=len(global_views), num_local=len(local_views),
                            student_temp=o.student_temp, center_momentum=o.center_momentum, pair_set=o.pair_set)
        ordered = global_views + local_views
        return SVTMethod(student, teacher, objective, ordered,
                         ordered if objective.teacher_needs_locals else global_views)

    if len(view_names) != 2:
        raise ValueError(f"objective.name={o.name} needs two clips from data.recipe=lstcl, got views {view_names}")
    if o.name == "mocov3":
        def projector() -> nn.Module:
            return models.MoCoProjector(embed_dim, mlp_dim=m.proj_hidden_dim, out_dim=m.proj_dim)

        predictor = models.MoCoPredictor(m.proj_dim, mlp_dim=m.pred_hidden_dim)
        objective: nn.Module = MoCoV3Loss(temperature=o.temperature)
    elif o.name == "byol":
        def projector() -> nn.Module:
            return models.BYOLProjector(embed_dim, hidden_dim=m.proj_hidden_dim, out_dim=m.proj_dim)

        predictor = models.BYOLPredictor(m.proj_dim, hidden_dim=m.pred_hidden_dim)
        objective = BYOLLoss()
    else:  # simsiam
        def projector() -> nn.Module:
            return models.SimSiamProjector(embed_dim, dim=m.proj_dim)

        predictor = models.SimSiamPredictor(dim=m.proj_dim, pred_dim=m.pred_hidden_dim)
        objective = SimSiamLoss()
    student = ContrastiveEncoder(student_backbone, projector(), predictor)
    teacher = None
    if o.name != "simsiam":
        teacher = _teacher_from_student(ContrastiveEncoder(backbone(0.0), projector()), student)
    return TwoViewMethod(o.name, student, teacher, objective, view_names,
                         mask_same_video=o.mask_same_video and cfg.data.repeats > 1)
