"""The shards a manifest lists, and where each sample's members lie in them.

A ``ShardSet`` is a manifest resolved to paths; ``read_sample_index`` turns the DALI ``.idx`` files
into one ``IndexedSample`` per sample (its shard and each member's byte offset and size), so a member
is one positioned read (``member_reads``), with no tar parsing and no reader state. The manifest and
the ``.idx`` format are ``shard_tools.format``'s; this module only imports them, so the baseline
loader reads shards without importing DALI.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from shard_tools.format import MANIFEST_NAME, VIDEO_EXTENSIONS, read_dali_index, read_manifest, split_member_name


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

    def sample_index(self) -> list[IndexedSample]:
        """Every sample of these shards, in manifest order (``read_sample_index``)."""
        return read_sample_index(self.paths, self.index_paths, self.num_samples)


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
