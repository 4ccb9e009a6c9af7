"""Seeds derived per (rank, step): independent streams, no collisions, every generator seeded."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from common.seeding import derive_seed, seed_all, seed_sequence


def test_derived_seeds_never_collide_over_a_rank_step_grid():
    # the naive seed + 1000 * rank + step: rank 0 at step 1000 replays rank 1 at step 0
    assert 0 + 1000 * 0 + 1000 == 0 + 1000 * 1 + 0
    grid = [(rank, step) for rank in range(64) for step in range(1024)]
    seeds = {derive_seed(0, rank, step) for rank, step in grid}
    assert len(seeds) == len(grid)
    assert derive_seed(0, 0, 1000) != derive_seed(0, 1, 0)
    assert not seeds & {derive_seed(1, rank, step) for rank, step in grid[:4096]}  # other roots, other streams
    assert all(0 <= s < 2**63 for s in seeds)
    # deterministic, and numpy's own SeedSequence with that spawn key
    state = np.random.SeedSequence(7, spawn_key=(3, 5)).generate_state(2, np.uint32)
    assert derive_seed(7, 3, 5) == derive_seed(7, 3, 5) == ((int(state[1]) << 32) | int(state[0])) & (2**63 - 1)
    assert seed_sequence(7, 3, 5).spawn_key == (3, 5)
    with pytest.raises(ValueError, match=">= 0"):
        derive_seed(0, -1)


def test_seed_all_gives_each_rank_and_step_its_own_streams():
    draws = {}
    for rank, step in ((0, 1000), (1, 0), (0, 0)):
        seed_all(0, rank, step)
        draws[rank, step] = (torch.rand(1).item(), float(np.random.rand()), random.random())
    assert len({d for d in draws.values()}) == 3 and len({x for d in draws.values() for x in d}) == 9
    seed_all(0, 1, 0)
    assert (torch.rand(1).item(), float(np.random.rand()), random.random()) == draws[1, 0]


def test_seed_all_without_keys_is_the_official_codes_fix_random_seeds():
    seed_all(31)
    ours = (torch.rand(1).item(), float(np.random.rand()), random.random())
    torch.manual_seed(31)  # DINO / SVT utils.fix_random_seeds(31), plus random
    np.random.seed(31)
    random.seed(31)
    assert ours == (torch.rand(1).item(), float(np.random.rand()), random.random())
    with pytest.raises(ValueError, match=">= 0"):
        seed_all(-1)
