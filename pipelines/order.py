"""One global sample order per epoch, sliced into data steps and ranks, and its spares.

Order: epoch ``e`` is a seeded permutation of every sample the manifest lists, a function
of ``(seed, e)`` only -- not of the world size, the rank or the shard boundaries. Data step ``s``
holds the samples at positions ``[s*G, (s+1)*G)`` of that sequence (``G``: global batch = per-rank
batch x ranks); rank ``r`` of ``W`` takes the contiguous slice ``[r*G/W, (r+1)*G/W)`` of it. The
position of a loader is therefore ``(epoch, data step)``: the same value on every rank, valid for any
world size that divides ``G``. A partial last step follows torch's ``DistributedSampler``: dropped
with ``drop_last`` (those positions become the epoch's spares), else filled by wrapping to the start
of the epoch's sequence, so batch sizes never change.

Spares: a sample that fails to decode is replaced by the first readable candidate of a sequence
that depends only on ``(seed, epoch, position)``: the epoch's dropped tail, starting at
``position mod len(tail)`` (distinct failures take distinct spares while the tail lasts), then a
seeded draw over the epoch's samples outside the position's own data step. Because badness is a
property of the bytes, every rank layout and every resume picks the same spare, with no
communication between ranks.

Block shuffle (``block_shards > 0``, for storage where random reads are slow): the shard order is
permuted, then samples are permuted within each window of ``block_shards`` consecutive shards of
that order. Reads then stay within a few shards at a time; the trade-off is that a step's samples
come from those few shards, so batches are less mixed than with the full permutation.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import numpy as np

from .shard_index import ShardSet

if TYPE_CHECKING:
    from .config import DataConfig

# Seeds of the different random streams, so the order never shares a stream with the spares.
_ORDER_STREAM, _SPARE_STREAM = 0x0D0E, 0x05BA


@dataclass(frozen=True)
class GlobalOrder:
    """The epoch's sample order and its slicing into data steps and ranks.

    Args:
        num_samples: samples in the manifest (N).
        global_batch: samples per data step over all ranks (G).
        seed: order seed.
        drop_last: drop the partial last step (its samples become spares) instead of wrapping.
        shuffle: False keeps manifest order (every epoch the same).
        shard_sizes: samples per shard in manifest order (block shuffle only).
        block_shards: 0 = full permutation; k > 0 = block shuffle over windows of k shards.
    """

    num_samples: int
    global_batch: int
    seed: int = 0
    drop_last: bool = False
    shuffle: bool = True
    shard_sizes: tuple[int, ...] = ()
    block_shards: int = 0

    def __post_init__(self) -> None:
        if self.global_batch < 1 or self.num_samples < 1:
            raise ValueError(f"global batch {self.global_batch} and sample count {self.num_samples} must be >= 1")
        if self.drop_last and self.num_samples < self.global_batch:
            raise ValueError(f"{self.num_samples} samples cannot fill one global batch of {self.global_batch} "
                             f"with drop_last")
        if self.block_shards and sum(self.shard_sizes) != self.num_samples:
            raise ValueError("block shuffle needs shard_sizes that add up to num_samples")

    @property
    def steps(self) -> int:
        """Data steps per epoch."""
        n, g = self.num_samples, self.global_batch
        return n // g if self.drop_last else -(-n // g)

    def rank_batch(self, world_size: int) -> int:
        """Samples per rank and step; ``G`` must divide over the ranks."""
        if self.global_batch % world_size:
            raise ValueError(f"the global batch of {self.global_batch} samples does not divide over {world_size} "
                             f"ranks; use a world size that divides it (or another per-rank batch size)")
        return self.global_batch // world_size

    def permutation(self, epoch: int) -> np.ndarray:
        return _permutation(self, epoch)

    def positions(self, step: int, rank: int = 0, world_size: int = 1) -> range:
        """Epoch positions of rank ``rank``'s slice of data step ``step``."""
        if not 0 <= step < self.steps:
            raise IndexError(f"data step {step} outside the epoch's {self.steps} steps")
        b = self.rank_batch(world_size)
        lo = step * self.global_batch + rank * b
        return range(lo, lo + b)

    def sample_at(self, epoch: int, position: int) -> int:
        """Sample id at an epoch position (positions past the end wrap to the start)."""
        return int(self.permutation(epoch)[position % self.num_samples])

    def candidates(self, epoch: int, position: int) -> Iterator[int]:
        """The sample at ``position``, then its spares in order. Lazy: a readable sample costs no
        spare computation (``spare_candidates`` draws a permutation of every sample)."""
        yield self.sample_at(epoch, position)
        yield from self.spare_candidates(epoch, position)

    def spare_candidates(self, epoch: int, position: int) -> Iterator[int]:
        """Sample ids to try, in order, in place of the sample at ``position``: never one of its own
        data step's samples (a duplicate inside a batch would, e.g., be its own negative in MoCo)."""
        perm = self.permutation(epoch)
        n, g = self.num_samples, self.global_batch
        first = position // g * g
        step_samples = {int(perm[p % n]) for p in range(first, first + g)}
        tail_start = self.steps * g if self.drop_last else n
        tail = perm[tail_start:]
        for k in range(len(tail)):
            yield int(tail[(position + k) % len(tail)])   # never in a step of this epoch
        rng = np.random.default_rng([self.seed, epoch, position, _SPARE_STREAM])
        order = [int(x) for x in rng.permutation(n)]
        yield from (x for x in order if x not in step_samples)
        # a data set no larger than a step: the step's other samples are all that is left
        own = int(perm[position % n])
        yield from (x for x in order if x in step_samples and x != own)


@functools.lru_cache(maxsize=4)
def _permutation(order: GlobalOrder, epoch: int) -> np.ndarray:
    n = order.num_samples
    if not order.shuffle:
        return np.arange(n)
    rng = np.random.default_rng([order.seed, epoch, _ORDER_STREAM])
    if not order.block_shards:
        return rng.permutation(n)
    starts = np.concatenate([[0], np.cumsum(order.shard_sizes)[:-1]]).astype(np.int64)
    shard_order = rng.permutation(len(order.shard_sizes))
    parts = []
    for w in range(0, len(shard_order), order.block_shards):
        window = shard_order[w:w + order.block_shards]
        ids = np.concatenate([np.arange(starts[s], starts[s] + order.shard_sizes[s]) for s in window])
        parts.append(rng.permutation(ids))
    return np.concatenate(parts)


def build_order(cfg: DataConfig, shards: ShardSet, batch_size: int, num_shards: int, seed: int) -> GlobalOrder:
    """The loaders' global order over ``shards`` (the DALI and the baseline loader share it).

    ``batch_size`` counts view-sets per rank. The order counts videos: with ``cfg.repeats`` = R view-sets
    per video, a data step holds ``batch_size / R`` videos per rank (R must divide it), so an epoch
    still visits every video once, each with its R view-sets.
    """
    if batch_size % cfg.repeats:
        raise ValueError(f"data.repeats: {cfg.repeats} view-sets per video must divide the per-rank batch "
                         f"of {batch_size} (a rank's batch holds whole videos)")
    return GlobalOrder(shards.total, batch_size // cfg.repeats * num_shards, seed=seed, drop_last=cfg.drop_last,
                       shuffle=cfg.shuffle, shard_sizes=tuple(shards.num_samples), block_shards=cfg.block_shards)
