"""Reading one sample's members: ranged reads of its tar members and its json metadata, checked.

Every byte the loaders take from a shard goes through ``MemberReader``, which reads through
``storage.Storage``: one ``os.pread`` for a local shard, one ranged GET for a shard in a bucket or
behind HTTP, at the offset the ``.idx`` gives (``shard_index``), so a read needs no tar parsing, no
reader state and no listing. A sample's json and video lie a tar header or two apart (webdataset
writes a sample's members together), so ``read_sample`` fetches both with one ranged read spanning
them when the gap is small: one request per sample, at most ``MERGE_GAP`` bytes more than the members.
A read that fails for good (``storage.StorageReadError``, after the retry policy) makes the sample bad:
the loaders replace it by its spare (``first_readable``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from storage import DiskCache, Storage, StorageReadError, default_storage

from .shard_index import IndexedSample, Member

# Largest gap between a sample's json and video that one spanning read takes along (tar headers are
# 512 bytes per member; the json pads to 512): ~1% of a small 64 KiB video at most.
MERGE_GAP = 4096

T = TypeVar("T")


class UnusableSample(ValueError):
    """A sample known to be unusable before decoding it (unreadable member, below the decoder's
    minimum size); it is replaced by a spare."""


def open_storage(cfg) -> Storage:
    """The loader's storage from its ``DataConfig``: the retry policy, and the node-local disk cache
    when ``data.cache_dir`` is set."""
    cache = DiskCache(cfg.cache_dir, cfg.cache_bytes) if cfg.cache_dir else None
    return Storage(cfg.retry, cache=cache)


class MemberReader:
    """Reads of tar members through a ``Storage`` (local descriptors or remote sessions it keeps)."""

    def __init__(self, store: Storage | None = None) -> None:
        self.store = store or default_storage()

    def read(self, shard: str, member: Member) -> bytes:
        """One member's bytes; ``StorageReadError`` (naming the shard and range) if it cannot be read."""
        return self.store.read_range(shard, member.offset, member.size)

    def read_sample(self, sample: IndexedSample) -> tuple[dict[str, Any], bytes]:
        """The sample's json (parsed and checked, ``parse_sample_meta``) and its video bytes, in one
        ranged read when they lie close together. An unreadable member is an ``UnusableSample``."""
        meta, video = sample.meta, sample.video
        lo, hi = min(meta.offset, video.offset), max(meta.offset + meta.size, video.offset + video.size)
        try:
            if hi - lo - meta.size - video.size <= MERGE_GAP:
                span = self.store.read_range(sample.shard, lo, hi - lo)
                raw_meta = span[meta.offset - lo:meta.offset - lo + meta.size]
                raw_video = span[video.offset - lo:video.offset - lo + video.size]
            else:
                raw_meta, raw_video = self.read(sample.shard, meta), self.read(sample.shard, video)
        except StorageReadError as err:
            raise UnusableSample(f"unreadable: {err}") from err
        return parse_sample_meta(raw_meta, sample.shard), raw_video

    def read_meta(self, sample: IndexedSample) -> dict[str, Any]:
        """The sample's json member, parsed and checked (``parse_sample_meta``)."""
        return parse_sample_meta(self.read(sample.shard, sample.meta), sample.shard)

    def read_video(self, sample: IndexedSample) -> bytes:
        return self.read(sample.shard, sample.video)


def parse_sample_meta(raw: bytes, shard: str) -> dict[str, Any]:
    """A sample's .json, checked for what the frame plan needs; errors name the shard and key."""
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


@dataclass
class Found(Generic[T]):
    """What ``first_readable`` found for one position: the sample read (``value``), its id, and the
    candidates before it that were unusable, as ``(key, shard, reason)``."""

    sample_id: int
    value: T
    bad: list[tuple[str, str, str]] = field(default_factory=list)


def first_readable(candidates: Iterable[int], index: list[IndexedSample], known_bad: Callable[[str], bool],
                   read: Callable[[int], T], where: str) -> Found[T]:
    """The first candidate (a position's sample, then its spares: ``GlobalOrder.candidates``) that is
    not known bad and that ``read`` (given its sample id) reads without ``UnusableSample``.

    Runs on read-ahead threads: it records nothing itself; the caller records ``bad`` in the loader's
    position, in delivery order, so the counts and logs are those of reading one sample at a time.
    """
    bad: list[tuple[str, str, str]] = []
    for candidate in candidates:
        entry = index[candidate]
        if known_bad(entry.key) or any(key == entry.key for key, _, _ in bad):
            continue
        try:
            return Found(candidate, read(candidate), bad)
        except UnusableSample as err:
            bad.append((entry.key, entry.shard, str(err)))
    raise RuntimeError(f"{where}: every sample is bad, no spare left")
