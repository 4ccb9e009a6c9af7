"""Typed protocol configs for evaluation: strict construction from dicts (YAML / JSON / CLI).

Each protocol (extraction, kNN, linear probe, fine-tuning) keeps its dataclass next to its code; this
module holds only the one rule they share: unknown keys are an error that names the field, so a
typo in a config file never silently falls back to a default.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, TypeVar

__all__ = ["config_from_dict"]

ConfigT = TypeVar("ConfigT")


def config_from_dict(cls: type[ConfigT], values: dict[str, Any], prefix: str) -> ConfigT:
    """Build dataclass ``cls`` from ``values``; unknown keys raise ``ValueError`` naming ``prefix.key``."""
    if not isinstance(values, dict):
        raise TypeError(f"{prefix} must be a mapping, got {type(values).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(f'{prefix}.{k}' for k in unknown)}; known: {sorted(known)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        if typing.get_origin(hints[name]) is tuple and isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)
