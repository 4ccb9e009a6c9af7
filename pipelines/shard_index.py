"""The shards a manifest lists, and where each sample's members lie in them.

A ``ShardSet`` is a manifest resolved to locations (local paths, or URLs when the shard folder is
``s3://...``, ``gs://...``, ``https://...``: ``storage``); ``read_sample_index`` turns the DALI
``.idx`` files into one ``IndexedSample`` per sample (its shard and each member's byte offset and
size), so a member is one positioned or ranged read (``member_reads``), with no tar parsing, no
reader state and no listing per sample. At start-up the shard files are checked in one listing per
folder (HTTP: one HEAD per file) and the ``.idx`` files of a remote folder are read concurrently, so
start-up costs a round trip per few dozen shards, not per shard. The manifest and the ``.idx``
format are ``shard_tools.format``'s; this module only imports them, so the baseline loader reads
shards without importing DALI.
"""

from __future__ import annotations

import concurrent.futures
import os
from dataclasses import dataclass, field

from shard_tools.format import MANIFEST_NAME, VIDEO_EXTENSIONS, read_dali_index, read_manifest, split_member_name
from storage import Storage, default_storage, is_url, join

# Index files read at once from remote storage (each is one GET; latency, not bandwidth, bounds them).
INDEX_READS_IN_FLIGHT = 32


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


def read_sample_index(paths: list[str], index_paths: list[str], counts: list[int],
                      store: Storage | None = None) -> list[IndexedSample]:
    """Every sample of the shards, in manifest order, from the DALI ``.idx`` files (remote ones read
    concurrently through ``store``).

    An index whose sample count disagrees with the manifest, or a sample without a video or a json
    member, is an error naming the index file.
    """
    store = store or default_storage()
    remote = [p for p in index_paths if is_url(p)]
    fetched = {}
    if remote:
        with concurrent.futures.ThreadPoolExecutor(min(INDEX_READS_IN_FLIGHT, len(remote))) as pool:
            fetched = dict(zip(remote, pool.map(lambda p: read_dali_index(p, store), remote)))
    samples: list[IndexedSample] = []
    for tar, idx, count in zip(paths, index_paths, counts):
        rows = fetched.pop(idx) if idx in fetched else read_dali_index(idx)
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
    """The shards a manifest lists, as locations under its folder (a local path or a URL)."""

    folder: str
    codec: str
    paths: list[str]
    index_paths: list[str]
    num_samples: list[int]
    label_map: dict[str, int] = field(default_factory=dict)
    store: Storage | None = field(default=None, repr=False, compare=False)   # what reads them

    @property
    def total(self) -> int:
        return sum(self.num_samples)

    def sample_index(self) -> list[IndexedSample]:
        """Every sample of these shards, in manifest order (``read_sample_index``)."""
        return read_sample_index(self.paths, self.index_paths, self.num_samples, self.store)


def read_shard_set(folder: str | os.PathLike, store: Storage | None = None) -> ShardSet:
    """The shards ``folder/manifest.json`` lists (``shard_tools.format.read_manifest``: paths relative to
    the folder, nothing guessed); ``folder`` may be a URL. Errors name the file and what is wrong; a
    bucket or server that cannot be read at all is one ``StorageAccessError`` naming the URL."""
    folder = os.fspath(folder)
    store = store or default_storage()
    manifest = read_manifest(folder, store)
    where = join(folder, MANIFEST_NAME)
    if not manifest.shards:
        raise ValueError(f"{where}: lists no shards")
    files = manifest.shard_locations(folder)
    sizes = store.sizes([p for pair in files for p in pair])
    missing = [p for p, size in sizes.items() if size is None]
    if missing:
        raise FileNotFoundError(f"{where}: lists {missing[0]}, which does not exist"
                                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return ShardSet(folder, manifest.codec, [tar for tar, _ in files], [idx for _, idx in files],
                    [s.num_samples for s in manifest.shards], dict(manifest.label_map), store)
