"""Shard planning and writing: webdataset tars, DALI ``.idx`` files, manifest and quarantine.

Everything written here goes to a temporary name first and is renamed when complete, so a reader
(or a resumed job) never sees half a file. Tar members get a fixed mtime/owner so the same samples
give byte-identical shards on every run.
"""

from __future__ import annotations

import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# ustar header (512) + data padded to 512 per member: used to estimate a shard's size in bytes.
TAR_BLOCK = 512
DALI_INDEX_VERSION = "v1.2"


@dataclass(frozen=True)
class PlannedShard:
    index: int
    keys: tuple[str, ...]


def shard_file_name(name: str, split: str, index: int) -> str:
    return f"{name}-{split}-{index:06d}.tar"


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


def write_dali_index(tar_path: Path, idx_path: Path, *, sync: bool = True) -> None:
    """Write the index DALI's ``fn.readers.webdataset`` reads, in ``wds2idx``'s v1.2 format.

    One line per sample: ``ext offset size name`` for each component, offsets of the member data.
    Same output as DALI's ``wds2idx`` (tests compare them), without spawning ``tar`` twice.
    """
    samples: list[list[tuple[str, int, int, str]]] = []
    last_base = None
    with tarfile.open(tar_path, "r:") as archive:
        for member in archive:
            if not member.isreg():
                continue
            name = member.name
            dot = name.find(".", name.rfind("/") + 1)
            base, ext = name[:dot], name[dot + 1:]
            if not base or base.endswith("/"):
                continue
            component = (ext, member.offset_data, member.size, name)
            if base != last_base:
                samples.append([component])
                last_base = base
            else:
                samples[-1].append(component)
    if not samples:
        raise ValueError(f"{tar_path}: empty shard, nothing to index")
    lines = [f"{DALI_INDEX_VERSION} {len(samples)}"]
    lines += [" ".join(" ".join(map(str, c)) for c in sample) for sample in samples]
    atomic_write_bytes(idx_path, ("\n".join(lines) + "\n").encode(), sync=sync)


def atomic_write_bytes(path: Path, data: bytes, *, sync: bool = True) -> None:
    """Write to ``path.tmp``, fsync (unless ``sync=False``: scratch files), rename: readers see the
    old file or the whole new one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        if sync:
            os.fsync(f.fileno())
    os.replace(tmp, path)


def write_shard(tar_path: Path, idx_path: Path, samples) -> int:
    """Write one shard (iterable of webdataset sample dicts) and its index; return tar bytes.

    The tar is built under ``.tmp`` and renamed only when complete; the index is written first, so
    "the tar exists" implies "its index exists" for every reader.
    """
    tar_path, idx_path = Path(tar_path), Path(idx_path)
    import webdataset as wds  # imports torch (~3 s): only pay for it when a shard is written

    tmp = tar_path.with_name(tar_path.name + ".tmp")
    with open(tmp, "wb") as stream:
        # mtime=0 and a fixed owner: identical samples give identical tar bytes.
        with wds.TarWriter(stream, mtime=0, user="shard_tools", group="shard_tools") as sink:
            for sample in samples:
                sink.write(sample)
        stream.flush()
        os.fsync(stream.fileno())
    write_dali_index(tmp, idx_path)
    os.replace(tmp, tar_path)
    return tar_path.stat().st_size


def shard_keys(tar_path: Path) -> list[str]:
    """Sample keys of a shard in order (reads only the tar headers)."""
    keys: list[str] = []
    with tarfile.open(tar_path, "r:") as archive:
        for member in archive:
            if member.isreg():
                key = member.name[:member.name.find(".", member.name.rfind("/") + 1)]
                if not keys or keys[-1] != key:
                    keys.append(key)
    return keys


def write_jsonl(path: Path, records: list[dict]) -> None:
    atomic_write_bytes(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode())


def read_jsonl(path: Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_manifest(path: Path, manifest: dict) -> None:
    atomic_write_bytes(path, (json.dumps(manifest, indent=1, sort_keys=False) + "\n").encode())


def load_manifest(folder: Path) -> dict:
    path = Path(folder) / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no manifest; is {folder} a shard_tools output folder "
                                "(and did the job finish)?")
    return json.loads(path.read_text())
