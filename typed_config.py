"""Strict construction of typed dataclass configs from nested plain data (YAML, JSON, CLI).

One rule shared by every area's config (data, model, objective, trainer, evaluation protocols):
unknown keys and values of the wrong type are errors whose message names the dotted field
(``data.svt.global_frame: unknown key``), so a typo never silently falls back to a default.

``load_yaml_sections`` is the one config route of ``train.py`` and ``evaluate.py``: a YAML file, then
trailing ``section.key=value`` overrides (values parsed as YAML), then the dataclasses.

Also the small vocabularies every area shares: precision names (``fp32`` / ``float32``, ``bf16`` /
``bfloat16``, ``fp16`` / ``float16``) mapped to one torch dtype by ``torch_dtype``, and the file
system's reason for a failed write (``disk_problem``).

This module imports neither torch nor the project's packages at import time: ``shard_tools`` reads its
settings with it on the driver, and ``pipelines`` / ``training`` / ``evaluation`` build on it.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

__all__ = ["ConfigError", "dataclass_from_dict", "apply_overrides", "set_dotted", "load_yaml_sections", "PRECISIONS",
           "precision_name", "torch_dtype", "disk_problem"]

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


def _nested_default(cls: type, base: Any, name: str) -> Any:
    """The default instance of dataclass field ``name`` (from ``base`` if given, else the field's default)."""
    if base is not None:
        value = getattr(base, name)
        return value if dataclasses.is_dataclass(value) else None
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default_factory is not dataclasses.MISSING:
                value = f.default_factory()
            else:
                value = f.default
            return value if dataclasses.is_dataclass(value) and not isinstance(value, type) else None
    return None


def dataclass_from_dict(cls: type[ConfigT], values: Any, prefix: str, base: Any = None) -> ConfigT:
    """Build dataclass ``cls`` from ``values``, recursing into nested dataclass fields.

    A nested section given as a mapping starts from that field's default instance, not from its
    class's defaults: a protocol that embeds ``data: DataConfig = field(default_factory=lambda:
    DataConfig(recipe="eval"))`` keeps ``recipe: eval`` when the YAML sets only ``data.shards``.

    A key listed in ``cls.MOVED_KEYS`` (old name -> new dotted name under ``prefix``) is an error that
    names where the setting lives now.

    Args:
        cls: the dataclass.
        values: a mapping of its field names to plain values (an instance of ``cls`` passes through).
        prefix: the dotted name of this section, used in every error message.
        base: an instance of ``cls`` whose values stand for the keys ``values`` leaves out.
    """
    if isinstance(values, cls):
        return values
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix}: expected a mapping of {cls.__name__} fields, got {values!r}")
    fields = {f.name for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    moved = getattr(cls, "MOVED_KEYS", {})
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            if key in moved:
                raise ConfigError(f"{prefix}.{key}: moved to {prefix}.{moved[key]}")
            raise ConfigError(f"{prefix}.{key}: unknown key (valid keys of {prefix}: {', '.join(sorted(fields))})")
        nested = _nested_default(cls, base, key) if isinstance(value, dict) else None
        if nested is not None:
            kwargs[key] = dataclass_from_dict(type(nested), value, f"{prefix}.{key}", nested)
        else:
            kwargs[key] = _check_type(value, hints.get(key, Any), f"{prefix}.{key}")
    if base is not None:
        kwargs = {**{f.name: getattr(base, f.name) for f in dataclasses.fields(cls) if f.init}, **kwargs}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:  # a dataclass's own __post_init__ check
        if isinstance(exc, ConfigError):
            raise
        text = str(exc)
        section = prefix.rsplit(".", 1)[-1]
        if text.startswith(section + "."):  # "svt.global_size must ..." under "data.svt" -> "data.svt.global_size ..."
            raise ConfigError(prefix + text[len(section):]) from exc
        raise ConfigError(f"{prefix}: {text}") from exc


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.key=value")
    dotted, value_text = text.split("=", 1)
    keys = dotted.strip().split(".")
    if len(keys) < 2 or not all(keys):
        raise ConfigError(f"override {text!r}: expected section.key=value (e.g. trainer.zero_stage=3)")
    try:
        value = yaml.safe_load(value_text) if value_text.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {dotted}: cannot parse value {value_text!r} ({exc})") from exc
    return keys, value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Sets ``section.key[.sub]=value`` entries in a nested dict (creating sections as needed).

    Values are parsed as YAML: ``trainer.zero_stage=3`` is an int, ``optim.betas=[0.9,0.95]`` a list.
    """
    for text in overrides:
        keys, value = _parse_override(text)
        set_dotted(raw, keys, value, f"override {text!r}")
    return raw


def set_dotted(raw: dict, keys: list[str], value: Any, what: str) -> None:
    """``raw[k0][k1]...[kn] = value``, creating sections as needed; ``what`` names the setting in errors."""
    node = raw
    for key in keys[:-1]:
        child = node.get(key)
        if child is None:  # absent, or an empty YAML section ("extract:")
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{what}: {key} is not a section")
        node = child
    node[keys[-1]] = value


def load_yaml_sections(path: str | Path | None, overrides: list[str] | None = None) -> dict:
    """The nested plain data of YAML file ``path`` (none: empty) with ``section.key=value`` overrides applied.

    Raises ``ConfigError`` naming the file for a missing file, bad YAML or a top level that is not a
    mapping, and naming the override for a malformed one.
    """
    raw: Any = {}
    if path is not None:
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError as exc:
            raise ConfigError(f"{path}: config file not found") from exc
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read config ({exc.strerror})") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    return apply_overrides(raw, list(overrides or []))


# One precision vocabulary: (short name, long name). The short names are the trainer's and DeepSpeed's
# ("bf16": {"enabled": ...}), the long ones numpy's / DALI's / torch's (types.FLOAT16, torch.bfloat16).
PRECISIONS = (("fp32", "float32"), ("bf16", "bfloat16"), ("fp16", "float16"))
_PRECISION_PAIRS = {name: pair for pair in PRECISIONS for name in pair}


def precision_name(value: str, field: str = "precision", *, allowed: tuple[str, ...] = ("fp32", "bf16", "fp16"),
                   long: bool = False) -> str:
    """``value`` (any spelling of ``PRECISIONS``) as its short name (``bf16``), or long (``bfloat16``).

    Args:
        value: ``fp32`` | ``float32`` | ``bf16`` | ``bfloat16`` | ``fp16`` | ``float16``.
        field: the dotted config field, named in the error.
        allowed: the short names this field accepts (the trainer takes no fp16).
        long: return ``float32`` / ``bfloat16`` / ``float16`` instead.
    """
    pair = _PRECISION_PAIRS.get(value) if isinstance(value, str) else None
    if pair is None or pair[0] not in allowed:
        names = ", ".join(f"{short} / {name}" for short, name in PRECISIONS if short in allowed)
        raise ConfigError(f"{field}: must be one of {names}, got {value!r}")
    return pair[1] if long else pair[0]


def torch_dtype(value: str):
    """The ``torch.dtype`` of a precision name (``bf16`` and ``bfloat16`` both give ``torch.bfloat16``)."""
    import torch  # not at import time: shard_tools reads its settings here without torch

    return getattr(torch, precision_name(value, long=True))


def disk_problem(paths: list) -> str | None:
    """Why writing under one of ``paths`` failed, if its file system says so (full or read-only), else None.

    torch.save reports a full disk as a RuntimeError from its C++ writer (``unexpected pos ...``), with
    no errno; the file system's own state after the failed write is what tells a full disk apart.
    """
    for path in paths:
        existing = pathlib.Path(path).absolute()
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        try:
            st = os.statvfs(existing)
        except OSError:
            continue
        if st.f_flag & os.ST_RDONLY:
            return f"{path}: read-only file system"
        free_blocks = st.f_bfree if os.geteuid() == 0 else st.f_bavail  # root may write into reserved blocks
        if free_blocks < 64:  # a write failed and left fewer than 64 blocks: the disk filled up
            return f"{path}: no space left on device"
    return None
