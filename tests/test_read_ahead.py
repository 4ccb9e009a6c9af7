"""The read-ahead: reads of upcoming keys run on its own threads, within the steps-ahead and byte
bounds, and come back strictly in order (errors at their own turn); the loaders deliver the same
batches with and without it."""
from __future__ import annotations

import random
import threading
import time

import pytest
import torch

from pipelines import build_loader
from pipelines.config import DataConfig
from pipelines.read_ahead import ReadAhead
from object_store_fixtures import small_shards  # noqa: F401 (fixture)


class Recorder:
    """A fetch that sleeps a random while and records what ran at once (real threads)."""

    def __init__(self, costs: list[int], seed: int = 0):
        self.costs = costs
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.active: set[int] = set()
        self.peak_bytes = 0
        self.peak_keys = 0
        self.started: list[int] = []
        self.threads: set[int] = set()

    def __call__(self, key: int) -> tuple[int, int]:
        with self.lock:
            self.active.add(key)
            self.started.append(key)
            self.threads.add(threading.get_ident())
            self.peak_keys = max(self.peak_keys, len(self.active))
            self.peak_bytes = max(self.peak_bytes, sum(self.costs[k] for k in self.active))
            pause = self.rng.uniform(0, 0.01)
        time.sleep(pause)
        with self.lock:
            self.active.discard(key)
        return key, key * key


def test_results_come_in_key_order_within_both_bounds():
    costs = [random.Random(1).randint(1, 100) for _ in range(200)]
    fetch = Recorder(costs)
    ahead = ReadAhead(fetch, range(200), cost=costs.__getitem__, max_ahead=8, max_bytes=300, threads=4)
    assert list(ahead) == [(k, k * k) for k in range(200)]
    assert fetch.peak_keys <= 4                   # threads bound what runs at once
    assert fetch.peak_bytes <= 300                # the byte budget bounds what is held
    assert ahead.stats["peak_bytes"] <= 300 and ahead.stats["delivered"] == 200
    assert len(fetch.threads) > 1 and threading.get_ident() not in fetch.threads


def test_it_reads_ahead_of_the_consumer():
    fetch = Recorder([10] * 20)
    ahead = ReadAhead(fetch, range(20), cost=lambda k: 10, max_ahead=5, max_bytes=10_000, threads=5)
    assert next(ahead) == (0, 0)
    deadline = time.monotonic() + 5
    while len(fetch.started) < 6 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(fetch.started) == list(range(6))     # keys 1..5 started while the consumer did nothing
    ahead.close()


def test_a_key_larger_than_the_budget_still_passes_alone():
    costs = [10, 1000, 10, 10]
    fetch = Recorder(costs)
    assert [k for k, _ in ReadAhead(fetch, range(4), cost=costs.__getitem__, max_ahead=4, max_bytes=100,
                                    threads=2)] == [0, 1, 2, 3]
    assert fetch.peak_bytes <= 1000          # the big one was read alone


def test_an_error_is_raised_at_its_own_turn():
    def fetch(key: int) -> int:
        if key == 5:
            raise ValueError("member 5 unreadable")
        return key

    ahead = ReadAhead(fetch, range(10), cost=lambda k: 1, max_ahead=4, max_bytes=100, threads=3)
    assert [next(ahead) for _ in range(5)] == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="member 5 unreadable"):
        next(ahead)
    assert next(ahead) == 6
    ahead.close()


def test_zero_steps_ahead_reads_on_the_callers_thread():
    fetch = Recorder([1] * 5)
    assert [k for k, _ in ReadAhead(fetch, range(5), cost=lambda k: 1, max_ahead=0, max_bytes=1, threads=1)] == \
        list(range(5))
    assert fetch.threads == {threading.get_ident()}


@pytest.mark.parametrize("kind", ["dali", pytest.param("baseline", marks=pytest.mark.slow)])
def test_loaders_deliver_the_same_batches_with_and_without_read_ahead(small_shards, kind):
    def batches(**ahead):
        cfg = DataConfig.from_dict({"shards": str(small_shards), "recipe": "lstcl", "num_threads": 1,
                                    "lstcl": {"size": 32, "short_frames": 4, "long_frames": 4, "long_stride": 4},
                                    **ahead})
        loader = build_loader(cfg, batch_size=2, seed=5, loader=kind)
        return list(loader), loader

    plain, _ = batches(read_ahead_steps=0)
    ahead, loader = batches(read_ahead_steps=3, read_ahead_bytes=30_000, read_threads=4)
    assert [b["key"] for b in ahead] == [b["key"] for b in plain]
    for a, b in zip(ahead, plain):
        for name in ("short", "long", "label"):
            assert torch.equal(a[name], b[name])
    if kind == "dali":
        assert loader.read_ahead_stats["delivered"] == 8
        assert loader.read_ahead_stats["peak_bytes"] <= 30_000
