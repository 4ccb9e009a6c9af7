"""Seeds derived from (seed, rank, step, ...) by ``numpy.random.SeedSequence`` (``derive_seed``), and the
one-line form of bad-input errors that ``train.py``, ``evaluate.py`` and ``python -m shard_tools`` print
before exiting with status 2 (``error_line``).

The strict config loader is ``common.typed_config``; precision names ``common.precision``; disk checks
``common.disk``.
"""
from __future__ import annotations

import numpy as np

__all__ = ["seed_sequence", "derive_seed", "seed_all", "error_line", "USER_ERRORS"]


def seed_sequence(seed: int, *keys: int) -> np.random.SeedSequence:
    """The random stream ``keys`` (e.g. rank, step) of root ``seed``: ``SeedSequence(seed, spawn_key=keys)``.

    Distinct key tuples give independent streams (SeedSequence hashes entropy and spawn key together),
    unlike ``seed + 1000 * rank + step``, where rank 0 at step 1000 is rank 1 at step 0.
    """
    if seed < 0 or any(k < 0 for k in keys):
        raise ValueError(f"seed and keys must be >= 0, got seed {seed}, keys {keys}")
    return np.random.SeedSequence(int(seed), spawn_key=tuple(int(k) for k in keys))


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit integer seed (``torch.manual_seed``, ``random.seed``, ``torch.Generator``) for the stream
    ``keys`` of root ``seed``, from ``seed_sequence(seed, *keys)``.

    Not for ``np.random.seed``: 32 bits collide by the birthday bound on large (rank, step) grids;
    ``seed_all`` gives numpy the SeedSequence's 128-bit state instead.
    """
    low, high = (int(w) for w in seed_sequence(seed, *keys).generate_state(2, np.uint32))
    return ((high << 32) | low) & ((1 << 63) - 1)


def seed_all(seed: int, *keys: int) -> None:
    """Seeds torch, numpy's global generator and ``random`` with the stream ``keys`` (e.g. rank, step) of
    ``seed``: per-rank, per-step randomness (drop path, dropout) without the collisions of
    ``seed + 1000 * rank + step``."""
    import random

    import torch

    int_seed = derive_seed(seed, *keys)
    torch.manual_seed(int_seed)
    np.random.seed(seed_sequence(seed, *keys).generate_state(4))  # RandomState takes the 128-bit state as uint32 words
    random.seed(int_seed)


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
