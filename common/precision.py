"""The one precision vocabulary: ``fp32`` / ``float32``, ``bf16`` / ``bfloat16``, ``fp16`` / ``float16``.

The short names are the trainer's and DeepSpeed's (``"bf16": {"enabled": ...}``), the long ones
numpy's / DALI's / torch's (``types.FLOAT16``, ``torch.bfloat16``); every config accepts both and
normalizes to the one its consumer uses.
"""
from __future__ import annotations

from common.typed_config import ConfigError

__all__ = ["PRECISIONS", "precision_name", "torch_dtype"]

# (short name, long name)
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
    import torch  # not at import time: configs that only check names (pipelines.config) need no torch

    return getattr(torch, precision_name(value, long=True))
