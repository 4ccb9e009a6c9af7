"""Strict construction of typed dataclass configs from nested plain data (YAML, JSON, CLI).

One rule shared by every area's config (data, model, objective, trainer, evaluation protocols):
unknown keys and values of the wrong type are errors whose message names the dotted field
(``data.svt.global_frame: unknown key``), so a typo never silently falls back to a default.

Also the one-line form of bad-input errors that ``train.py``, ``evaluate.py`` and ``python -m
shard_tools`` print before exiting with status 2 (``error_line``, ``disk_problem``).
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import types
import typing
from typing import Any, TypeVar

__all__ = ["ConfigError", "dataclass_from_dict", "error_line", "disk_problem", "USER_ERRORS"]

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
        text = str(exc)
        section = prefix.rsplit(".", 1)[-1]
        if text.startswith(section + "."):  # "svt.global_size must ..." under "data.svt" -> "data.svt.global_size ..."
            raise ConfigError(prefix + text[len(section):]) from exc
        raise ConfigError(f"{prefix}: {text}") from exc


# What a command line reports as one line and exit status 2 (bad config, bad input file, a folder that
# cannot be written): the messages name the field or file. Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError)


def error_line(exc: BaseException, where: object = None) -> str:
    """One line for a bad-input error: ``<file or field>: <reason>``.

    Args:
        exc: the error (its message already names the field or file, or it is an OSError with a
            ``filename``).
        where: the file or folder to name when an OSError has none (a full disk reported by a
            buffered write names no file).
    """
    if isinstance(exc, OSError) and exc.strerror:
        name = exc.filename if exc.filename is not None else where
        text = f"{name}: {exc.strerror}" if name is not None else exc.strerror
        if exc.filename2 is not None:
            text += f" -> {exc.filename2}"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


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
