"""Strict construction of typed dataclasses from nested plain data (YAML, JSON, CLI).

One rule shared by every config of the project (data, model, objective, trainer, evaluation protocols)
and by the shard manifest: unknown keys, missing required keys and values of the wrong type are errors
whose message names the dotted field (``data.svt.global_frame: unknown key``, ``shards[1].num_frames:
missing``), so a typo never silently falls back to a default.

``load_yaml_sections`` is the one config route of ``train.py`` and ``evaluate.py``: a YAML file, then
trailing ``section.key=value`` overrides (values parsed as YAML), then the dataclasses.

Standard library only at import: ``shard_tools`` reads its manifest with this module on Ray workers,
which receive the ``shard_tools`` and ``common`` packages and nothing else; PyYAML is imported only
where a YAML text is parsed.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["ConfigError", "dataclass_from_dict", "apply_overrides", "set_dotted", "load_yaml_sections"]

ConfigT = TypeVar("ConfigT")


class ConfigError(ValueError):
    """A config value is invalid; the message names the field (``section.key``)."""


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _show(value: Any) -> str:
    """``repr(value)`` cut to one readable length: a manifest's list of a million keys is not an error message."""
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _check_type(value: Any, annotation: Any, name: str) -> Any:
    """``value`` as ``annotation`` declares it: ints become floats and lists tuples where declared, the
    items of lists, tuples and mappings are checked in turn; everything else that does not fit is an error."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for option in args:
            if option is type(None) and value is None:
                return None
            try:
                return _check_type(value, option, name)
            except ConfigError:
                continue
        raise ConfigError(f"{name}: expected {annotation}, got {_show(value)}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{name}: expected one of {args}, got {_show(value)}")
        return value
    base = origin or annotation
    if base is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: expected a number, got {_show(value)}")
        return float(value)
    if base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: expected an integer, got {_show(value)}")
        return value
    if base is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true/false, got {_show(value)}")
        return value
    if base is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {_show(value)}")
        return value
    if base in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {_show(value)}")
        if base is tuple and args and args[-1] is not Ellipsis:  # tuple[float, float]: that many items
            if len(value) != len(args):
                raise ConfigError(f"{name}: expected {len(args)} values, got {_show(value)}")
            return tuple(_check_type(v, a, f"{name}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        return base(_check_type(v, item, f"{name}[{i}]") for i, v in enumerate(value))
    if base is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {_show(value)}")
        item = args[1] if len(args) == 2 else Any
        return {k: _check_type(v, item, _join(name, str(k))) for k, v in value.items()}
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

    Args:
        cls: the dataclass.
        values: a mapping of its field names to plain values (an instance of ``cls`` passes through).
        prefix: the dotted name of this section, used in every error message ("" for a top level
            whose keys are named alone).
        base: an instance of ``cls`` whose values stand for the keys ``values`` leaves out.
    """
    if isinstance(values, cls):
        return values
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or cls.__name__}: expected a mapping of {cls.__name__} fields, got {_show(values)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"{_join(prefix, key)}: unknown key "
                              f"(valid keys{' of ' + prefix if prefix else ''}: {', '.join(sorted(fields))})")
        nested = _nested_default(cls, base, key) if isinstance(value, dict) else None
        if nested is not None:
            kwargs[key] = dataclass_from_dict(type(nested), value, _join(prefix, key), nested)
        else:
            kwargs[key] = _check_type(value, hints.get(key, Any), _join(prefix, key))
    if base is not None:
        kwargs = {**{f.name: getattr(base, f.name) for f in fields.values() if f.init}, **kwargs}
    for name, f in fields.items():
        if (f.init and name not in kwargs and f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING):
            raise ConfigError(f"{_join(prefix, name)}: missing")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:  # a dataclass's own __post_init__ check
        if isinstance(exc, ConfigError):
            raise
        text = str(exc)
        section = prefix.rsplit(".", 1)[-1]
        if section and text.startswith(section + "."):  # "svt.global_size must ..." under "data.svt"
            raise ConfigError(prefix + text[len(section):]) from exc
        raise ConfigError(f"{prefix or cls.__name__}: {text}") from exc


def _parse_yaml(text: str, what: str) -> Any:
    """YAML ``text``; a syntax error is a ``ConfigError`` starting with ``what``."""
    import yaml  # here, not at import: the manifest reader on Ray workers has the standard library only

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} ({exc})") from exc


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.key=value")
    dotted, value_text = text.split("=", 1)
    keys = dotted.strip().split(".")
    if len(keys) < 2 or not all(keys):
        raise ConfigError(f"override {text!r}: expected section.key=value (e.g. trainer.zero_stage=3)")
    value = _parse_yaml(value_text, f"override {dotted}: cannot parse value {value_text!r}") if value_text.strip() else ""
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
            text = path.read_text()
        except FileNotFoundError as exc:
            raise ConfigError(f"{path}: config file not found") from exc
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read config ({exc.strerror})") from exc
        raw = _parse_yaml(text, f"{path}: not valid YAML") or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    return apply_overrides(raw, list(overrides or []))
