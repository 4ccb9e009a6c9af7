"""Typed protocol configs for evaluation: strict construction from dicts (YAML / JSON / CLI).

Each protocol (extraction, kNN, linear probe, fine-tuning) keeps its dataclass next to its code; the
one rule they share with every other config of the project lives in ``typed_config``. Settings that
belong to the data area are its sections, embedded rather than copied: ``ExtractConfig.data`` is a
``pipelines.DataConfig``, ``FinetuneConfig.eval`` a ``pipelines.config.EvalConfig``. ``evaluate.py``
reads them through ``typed_config.load_yaml_sections`` / ``apply_overrides``, the route of ``train.py``.
"""
from __future__ import annotations

from typing import Any, TypeVar

from common.typed_config import dataclass_from_dict

__all__ = ["config_from_dict"]

ConfigT = TypeVar("ConfigT")


def config_from_dict(cls: type[ConfigT], values: dict[str, Any], prefix: str) -> ConfigT:
    """Build dataclass ``cls`` from ``values``; unknown keys raise ``ConfigError`` naming ``prefix.key``."""
    return dataclass_from_dict(cls, values, prefix)
