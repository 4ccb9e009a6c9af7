"""One global sample order per epoch, sliced per rank, and the index that reads a sample by offset.

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
seeded draw over the epoch's samples outside the position's own data step. Because badness is a property of the bytes, every rank layout and
every resume picks the same spare, with no communication between ranks.

Block shuffle (``block_shards > 0``, for storage where random reads are slow): the shard order is
permuted, then samples are permuted within each window of ``block_shards`` consecutive shards of
that order. Reads then stay within a few shards at a time; the trade-off is that a step's samples
come from those few shards, so batches are less mixed than with the full permutation.

Reading: each DALI ``.idx`` line lists a sample's members with their byte offsets and sizes, so a
member is one positioned read (``os.pread``) from its tar, no tar parsing and no reader state. The
manifest and the ``.idx`` format are ``shard_tools.format``'s; this module only imports them, so the
baseline loader reads shards without importing DALI.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from shard_tools.format import MANIFEST_NAME, VIDEO_EXTENSIONS, read_dali_index, read_manifest, split_member_name

if TYPE_CHECKING:
    from .config import DataConfig

# The DALI loader's logger: both loaders log replacements under one name.
log = logging.getLogger("pipelines.loader")
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


@dataclass(frozen=True)
class Member:
    offset: int
    size: int


@dataclass(frozen=True)
class IndexedSample:
    """Where one sample's members lie: its shard and each member's (offset, size)."""

    key: str
    shard: str
    video_ext: str
    video: Member
    meta: Member


def read_sample_index(paths: list[str], index_paths: list[str], counts: list[int]) -> list[IndexedSample]:
    """Every sample of the shards, in manifest order, from the DALI ``.idx`` files.

    An index whose sample count disagrees with the manifest, or a sample without a video or a json
    member, is an error naming the index file.
    """
    samples: list[IndexedSample] = []
    for tar, idx, count in zip(paths, index_paths, counts):
        rows = read_dali_index(idx)
        if len(rows) != count:
            raise ValueError(f"{idx}: indexes {len(rows)} samples, the manifest says {count}")
        for row in rows:
            members = {m.ext: Member(m.offset, m.size) for m in row}
            key, _ = split_member_name(row[0].name)
            video_ext = next((e for e in VIDEO_EXTENSIONS if e in members), None)
            if video_ext is None or "json" not in members:
                raise ValueError(f"{idx}: sample {key} lacks a video (webm/mp4) or json member")
            samples.append(IndexedSample(key, tar, video_ext, members[video_ext], members["json"]))
    return samples


class MemberReader:
    """Positioned reads of tar members; one open file per shard, kept for the reader's life."""

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}

    def read(self, shard: str, member: Member) -> bytes:
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(shard, os.O_RDONLY)
        data = os.pread(fd, member.size, member.offset)
        if len(data) != member.size:
            raise ValueError(f"{shard}: member at offset {member.offset} is cut short "
                             f"({len(data)} of {member.size} bytes); the tar does not match its .idx")
        return data

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self) -> None:
        self.close()

    def __getstate__(self):  # a DataLoader worker opens its own files
        return {"_fds": {}}


# ----------------------------------------------------------------- the shard set (a manifest, resolved)
@dataclass
class ShardSet:
    """The shards a manifest lists, as paths under its folder."""

    folder: Path
    codec: str
    paths: list[str]
    index_paths: list[str]
    num_samples: list[int]
    label_map: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.num_samples)


def read_shard_set(folder: str | os.PathLike) -> ShardSet:
    """The shards ``folder/manifest.json`` lists (``shard_tools.format.read_manifest``: paths relative to
    the folder, nothing guessed); errors name the file and what is wrong."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if not manifest.shards:
        raise ValueError(f"{folder / MANIFEST_NAME}: lists no shards")
    files = manifest.shard_files(folder)
    return ShardSet(folder, manifest.codec, [str(tar) for tar, _ in files], [str(idx) for _, idx in files],
                    [s.num_samples for s in manifest.shards], dict(manifest.label_map))


def build_order(cfg: DataConfig, shards: ShardSet, global_batch: int, seed: int) -> GlobalOrder:
    """The loaders' global order over ``shards`` (the DALI and the baseline loader share it)."""
    return GlobalOrder(shards.total, global_batch, seed=seed, drop_last=cfg.drop_last, shuffle=cfg.shuffle,
                       shard_sizes=tuple(shards.num_samples), block_shards=cfg.block_shards)


# ----------------------------------------------------------------- position (shared by both loaders)
def position_state(loader) -> dict[str, Any]:
    """A loader's portable position: ``(epoch, data step)``, the order's definition, bad keys."""
    o = loader.order
    return {"epoch": loader.epoch, "step": loader._step, "global_batch": o.global_batch, "seed": loader.seed,
            "num_samples": o.num_samples, "shuffle": o.shuffle, "drop_last": o.drop_last,
            "block_shards": o.block_shards, "bad_keys": dict(sorted(loader.bad_keys.items()))}


def merge_positions(states: list[dict[str, Any]]) -> dict[str, Any]:
    """One position from every rank's (same epoch and step; bad keys found on any rank)."""
    merged = dict(states[0])
    merged["bad_keys"] = dict(sorted({k: v for s in states for k, v in s["bad_keys"].items()}.items()))
    return merged


def load_position(loader, state: dict[str, Any]) -> None:
    """Continue at ``state``'s position; refuses a position from another order or global batch."""
    o = loader.order
    if "global_batch" not in state:
        raise ValueError("the checkpoint's data position predates the global sample order (per-rank "
                         "reader checkpoints); it cannot continue this loader")
    if state["global_batch"] != o.global_batch:
        w = loader.num_shards
        hint = (f"set trainer.batch_size_per_gpu={state['global_batch'] // w}" if state["global_batch"] % w == 0
                else f"the global batch of {state['global_batch']} does not divide over {w} ranks")
        raise ValueError(f"the checkpoint's data position counts global steps of {state['global_batch']} samples; "
                         f"this run's global batch is {loader.batch_size} x {w} ranks = {o.global_batch}: {hint}")
    mine = {"num_samples": o.num_samples, "shuffle": o.shuffle, "drop_last": o.drop_last,
            "block_shards": o.block_shards}
    theirs = {k: state[k] for k in mine}
    if mine != theirs:
        raise ValueError(f"the checkpoint's data order {theirs} differs from this run's {mine} "
                         f"(data.shards, data.shuffle, data.drop_last, data.block_shards)")
    loader.seed = state["seed"]
    loader.order = dataclasses.replace(o, seed=state["seed"])
    loader.epoch, loader._step = state["epoch"], state["step"]
    loader.bad_keys = dict(state.get("bad_keys", {}))
    loader._restored = True


def record_replacement(loader, epoch: int, step: int, position: int, key: str, shard: str, spare: str) -> None:
    """Log and count one replacement; both loaders use it (the same fields everywhere)."""
    record = {"epoch": epoch, "step": step, "position": position, "key": key, "shard": shard, "spare": spare}
    loader.stats["replacements"].append(record)
    log.warning("data step %d (epoch %d): sample %s of %s replaced by spare %s", step, epoch, key, shard, spare)


def _parse_meta(raw: bytes, shard: str) -> dict[str, Any]:
    """The sample's .json, checked for what the frame plan needs; errors name the shard and key."""
    try:
        record = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"{shard}: a sample's .json is not valid JSON ({err})") from err
    if not isinstance(record, dict) or not isinstance(record.get("key"), str):
        raise ValueError(f"{shard}: a sample's .json has no string 'key' (shard contract metadata)")
    for name in ("num_frames", "width", "height"):
        value = record.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{shard}: sample {record['key']}: .json field {name!r} must be a positive "
                             f"integer, got {value!r}")
    return record
