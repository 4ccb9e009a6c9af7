"""Backbone weights for evaluation from a pretraining run, consolidated to one fp32 state dict.

Three sources, named on the command line:

* a file written by ``train.py --export`` (``training.checkpoint.export_weights``): ``student``,
  ``teacher``, ``backbone_prefix`` and ``config`` in one torch file;
* a checkpoint folder of a run (``<run>/checkpoints/step_N``, or ``<run>/checkpoints`` to take the
  newest complete one): ``training.checkpoint.consolidated_weights``, the one consolidation path (the
  student's full fp32 parameters from ``portable.pt``, at any ZeRO stage and world size; the teacher
  from the trainer state, where it lives outside the engine, never partitioned);
* ``random``: a freshly initialised backbone (``--model``), the chance-level reference row.

The backbone is taken out of the student / teacher state dict by the prefix the checkpoint records
(``backbone_prefix``: ``backbone.`` for every method of the trainer, fine-tuning included) and loaded
strictly: a key that does not fit is an error, never silently skipped.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

import models
from pipelines.config import IMAGENET_MEAN, IMAGENET_STD
from training.checkpoint import TRAINER_FILE, consolidated_weights, find_latest

__all__ = ["LoadedBackbone", "load_backbone", "read_checkpoint_weights"]

BACKBONES = ("teacher", "student")


@dataclass
class LoadedBackbone:
    """A backbone in eval mode plus where it came from (for the results table)."""

    model: nn.Module
    model_name: str
    model_kwargs: dict[str, Any]
    source: str           # checkpoint path or "random"
    which: str            # teacher | student | random
    step: int | None = None
    data_config: dict[str, Any] = field(default_factory=dict)  # the run's data section (mean / std)

    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The pretraining run's mean / std (features depend on them), else ImageNet's."""
        return (tuple(self.data_config.get("mean", IMAGENET_MEAN)), tuple(self.data_config.get("std", IMAGENET_STD)))


def _torch_load(path: Path, *, trusted_objects: bool) -> Any:
    try:
        # Trainer files hold config dicts and RNG states (numpy objects): not loadable weights-only.
        return torch.load(path, map_location="cpu", weights_only=not trusted_objects)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: checkpoint file does not exist") from None
    except Exception as error:  # not a torch file, truncated, ...: name the file and the reason
        raise ValueError(f"{path}: cannot read checkpoint ({type(error).__name__}: {error})") from error


def _resolve_checkpoint_folder(path: Path) -> Path:
    """``step_N`` folder itself, or the newest complete one under a ``checkpoints`` root."""
    if (path / TRAINER_FILE).is_file():
        return path
    latest = find_latest(path)
    if latest is None:
        raise ValueError(f"{path}: neither a checkpoint folder (no {TRAINER_FILE}) nor a checkpoints root "
                         f"holding a complete step_* folder")
    return latest


def _read_folder(folder: Path) -> dict:
    try:
        return consolidated_weights(folder)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{folder}: incomplete checkpoint ({error.filename} missing)") from None
    except ValueError:  # a file without a key the trainer writes: the message names the file and the key
        raise
    except Exception as error:
        raise ValueError(f"{folder}: cannot read checkpoint ({type(error).__name__}: {error})") from error


def read_checkpoint_weights(path: str | os.PathLike, which: str
                            ) -> tuple[dict[str, torch.Tensor], str, dict, int | None]:
    """(module state dict of ``which``, its backbone prefix, run config dict, step) from an export file
    or a checkpoint folder."""
    if which not in BACKBONES:
        raise ValueError(f"backbone must be one of {BACKBONES}, got {which!r}")
    path = Path(path)
    if path.is_dir():
        payload = _read_folder(_resolve_checkpoint_folder(path))
    elif path.is_file():
        payload = _torch_load(path, trusted_objects=False)
        if not isinstance(payload, dict) or "student" not in payload:
            raise ValueError(f"{path}: not a train.py export (expected keys student / teacher / config)")
        if "backbone_prefix" not in payload:
            raise ValueError(f"{path}: the export records no backbone_prefix, which train.py --export writes; "
                             f"export the checkpoint again")
    else:
        raise FileNotFoundError(f"{path}: checkpoint does not exist")
    state = payload.get(which)
    if state is None:
        raise ValueError(f"{path}: the run has no {which} (e.g. SimSiam keeps no EMA teacher); use --backbone student")
    return state, payload["backbone_prefix"], payload.get("config") or {}, payload.get("step")


def _backbone_state(state: dict[str, torch.Tensor], prefix: str, source: str) -> dict[str, torch.Tensor]:
    """The backbone's entries of a student / teacher state dict, ``prefix`` (the checkpoint's) removed."""
    backbone = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not backbone:
        raise ValueError(f"{source}: no '{prefix}*' keys (the checkpoint's backbone_prefix) among {sorted(state)[:5]}")
    return backbone


def _build(models, name: str, kwargs: dict[str, Any], source: str) -> nn.Module:
    try:
        return models.build_backbone(name, **kwargs)
    except TypeError as error:  # a misspelt backbone kwarg
        raise ValueError(f"{source}: cannot build {name} with {kwargs}: {error}") from error


def load_backbone(checkpoint: str, *, which: str = "teacher", model_name: str | None = None,
                  model_kwargs: dict[str, Any] | None = None, seed: int = 0) -> LoadedBackbone:
    """Build the pretraining run's backbone and load its weights (strictly), in eval mode.

    Args:
        checkpoint: export file, checkpoint folder / checkpoints root, or ``random``.
        which: ``teacher`` (DINO / SVT evaluate the teacher) or ``student``.
        model_name, model_kwargs: override the run config's ``model.backbone`` / ``backbone_kwargs``
            (required for ``random``).
        seed: initialisation seed for ``random``.
    """
    if checkpoint == "random":
        if model_name is None:
            raise ValueError("--checkpoint random needs --model (a models.build_backbone name)")
        kwargs = dict(model_kwargs or {})
        torch.manual_seed(seed)
        model = _build(models, model_name, kwargs, "random")
        return LoadedBackbone(model.eval(), model_name, kwargs, "random", "random")

    state, prefix, config, step = read_checkpoint_weights(checkpoint, which)
    model_config = config.get("model", {}) if isinstance(config, dict) else {}
    name = model_name or model_config.get("backbone")
    if not name:
        raise ValueError(f"{checkpoint}: the run config names no model.backbone; pass --model")
    kwargs = {**model_config.get("backbone_kwargs", {}), **(model_kwargs or {})}
    model = _build(models, name, kwargs, checkpoint)
    backbone_state = _backbone_state(state, prefix, checkpoint)
    try:
        model.load_state_dict(backbone_state, strict=True)
    except RuntimeError as error:
        raise ValueError(f"{checkpoint}: {which} weights do not fit {name} {kwargs}: {error}") from error
    data_config = config.get("data") or {} if isinstance(config, dict) else {}
    return LoadedBackbone(model.eval(), name, kwargs, str(checkpoint), which, step,
                          data_config if isinstance(data_config, dict) else {})
