"""Shard planning and writing: webdataset tars with their DALI ``.idx`` files, quarantine lines.

File names, the manifest and the index format live in :mod:`shard_tools.format`.

Everything written here goes to a temporary name first and is renamed when complete, so a reader
(or a resumed job) never sees half a file. Tar members get a fixed mtime/owner so the same samples
give byte-identical shards on every run.
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.atomic_io import atomic_writer
from shard_tools.format import members_by_sample, write_dali_index

# ustar header (512) + data padded to 512 per member: used to estimate a shard's size in bytes.
TAR_BLOCK = 512


@dataclass(frozen=True)
class PlannedShard:
    index: int
    keys: tuple[str, ...]


def _member_bytes(size: int) -> int:
    return TAR_BLOCK + (size + TAR_BLOCK - 1) // TAR_BLOCK * TAR_BLOCK


def plan_shards(sample_bytes: dict[str, int], *, seed: int, max_samples: int | None,
                max_bytes: int | None) -> list[PlannedShard]:
    """Shuffle the samples with ``seed`` and cut them into shards.

    The order depends only on the seed and the sorted keys (never on which worker finished first),
    so a resumed job plans exactly the same shards. A shard closes when adding the next sample would
    pass ``max_samples`` or ``max_bytes`` (estimated tar size); every shard holds >= 1 sample.

    Args:
        sample_bytes: key -> estimated tar bytes of the sample (all its members).
    """
    if not max_samples and not max_bytes:
        raise ValueError("give a shard size: max_samples or max_bytes")
    keys = sorted(sample_bytes)
    order = np.random.default_rng(seed).permutation(len(keys))
    shards: list[PlannedShard] = []
    current: list[str] = []
    current_bytes = 0
    for i in order:
        key = keys[int(i)]
        size = sample_bytes[key]
        full = (max_samples and len(current) >= max_samples) or \
               (max_bytes and current and current_bytes + size > max_bytes)
        if full:
            shards.append(PlannedShard(len(shards), tuple(current)))
            current, current_bytes = [], 0
        current.append(key)
        current_bytes += size
    if current:
        shards.append(PlannedShard(len(shards), tuple(current)))
    return shards


def sample_members(key: str, extension: str, payload: bytes, record: dict) -> dict:
    """The webdataset sample: video bytes, the json record and the label as text (``.cls``)."""
    return {"__key__": key, extension: payload, "json": encode_json(record),
            "cls": str(record["label"]).encode()}


def encode_json(record: dict) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":")).encode()


def estimate_sample_bytes(key: str, extension: str, payload_size: int, record: dict) -> int:
    return (_member_bytes(payload_size) + _member_bytes(len(encode_json(record)))
            + _member_bytes(len(str(record["label"]))))


def write_shard(tar_path: Path, idx_path: Path, samples) -> int:
    """Write one shard (iterable of webdataset sample dicts) and its index; return tar bytes.

    The tar is built under ``.tmp`` and renamed only when complete; the index is written first, so
    "the tar exists" implies "its index exists" for every reader.
    """
    tar_path, idx_path = Path(tar_path), Path(idx_path)
    import webdataset as wds  # imports torch (~3 s): only pay for it when a shard is written

    with atomic_writer(tar_path) as stream:
        # mtime=0 and a fixed owner: identical samples give identical tar bytes.
        with wds.TarWriter(stream, mtime=0, user="shard_tools", group="shard_tools") as sink:
            for sample in samples:
                sink.write(sample)
        stream.flush()
        write_dali_index(stream.name, idx_path)
    return tar_path.stat().st_size


def shard_keys(tar_path: Path) -> list[str]:
    """Sample keys of a shard in order (reads only the tar headers)."""
    with tarfile.open(tar_path, "r:") as archive:
        return [key for key, _ in members_by_sample(archive)]
