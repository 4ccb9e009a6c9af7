"""Seeds derived from (seed, rank, step, ...) by ``numpy.random.SeedSequence``, and seeding every generator.

``seed + 1000 * rank + step`` makes rank 0 at step 1000 replay rank 1 at step 0; a spawn key per
(rank, step) gives independent streams instead (SeedSequence hashes entropy and spawn key together).
"""
from __future__ import annotations

import random

import numpy as np

__all__ = ["seed_sequence", "derive_seed", "seed_all"]


def seed_sequence(seed: int, *keys: int) -> np.random.SeedSequence:
    """The random stream ``keys`` (e.g. rank, step) of root ``seed``: ``SeedSequence(seed, spawn_key=keys)``."""
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
    ``seed + 1000 * rank + step``.

    No keys: the root seed itself, the same on every rank, as the official DINO / SVT code's
    ``fix_random_seeds(seed)`` seeds torch and numpy, so a recipe's seed starts the models where theirs do.
    """
    import torch  # not at import time: seeds are derived where torch is not installed (the shard driver)

    if keys:
        int_seed = derive_seed(seed, *keys)
        numpy_seed = seed_sequence(seed, *keys).generate_state(4)  # RandomState takes the 128-bit state as uint32 words
    else:
        seed_sequence(seed)  # the same check as with keys: a seed >= 0
        int_seed = numpy_seed = int(seed)
    torch.manual_seed(int_seed)
    np.random.seed(numpy_seed)
    random.seed(int_seed)
