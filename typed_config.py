"""Strict construction of typed dataclass configs from nested plain data (YAML, JSON, CLI).

One rule shared by every area's config (data, model, objective, trainer, evaluation protocols):
unknown keys and values of the wrong type are errors whose message names the dotted field
(``data.svt.global_frame: unknown key``), so a typo never silently falls back to a default.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

__all__ = ["ConfigError", "dataclass_from_dict"]

ConfigT = TypeVar("ConfigT")


class ConfigError(ValueError):
    """A config value is invalid; the message names the field (``section.key``)."""


def _check_type(value: Any, annotation: Any, name: str) -> Any:
    """Coerces ints to floats and lists to tuples where declared; rejects everything else that does not fit."""
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(annotation):
            if option is type(None) and value is None:
                return None
            try:
                return _check_type(value, option, name)
            except ConfigError:
                continue
        raise ConfigError(f"{name}: expected {annotation}, got {value!r}")
    if origin is typing.Literal:
        if value not in typing.get_args(annotation):
            raise ConfigError(f"{name}: expected one of {typing.get_args(annotation)}, got {value!r}")
        return value
    base = origin or annotation
    if base is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        return float(value)
    if base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        return value
    if base is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true/false, got {value!r}")
        return value
    if base is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return value
    if base in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        return base(value)
    if base is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return value
    if dataclasses.is_dataclass(base):
        return dataclass_from_dict(base, value, name)
    return value


def dataclass_from_dict(cls: type[ConfigT], values: Any, prefix: str) -> ConfigT:
    """Build dataclass ``cls`` from ``values``, recursing into nested dataclass fields.

    Args:
        cls: the dataclass.
        values: a mapping of its field names to plain values (an instance of ``cls`` passes through).
        prefix: the dotted name of this section, used in every error message.
    """
    if isinstance(values, cls):
        return values
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix}: expected a mapping of {cls.__name__} fields, got {values!r}")
    fields = {f.name for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"{prefix}.{key}: unknown key (valid keys of {prefix}: {', '.join(sorted(fields))})")
        kwargs[key] = _check_type(value, hints.get(key, Any), f"{prefix}.{key}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:  # a dataclass's own __post_init__ check
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{prefix}: {exc}") from exc
