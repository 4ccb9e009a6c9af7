"""Reading one sample's members: positioned reads of its tar members and its json metadata, checked.

Every byte the loaders take from a shard goes through ``MemberReader``: one ``os.pread`` per member
at the offset the ``.idx`` gives (``shard_index``), so a read needs no tar parsing and no reader
state, and another storage only has to provide ``read(shard, member)``.
"""

from __future__ import annotations

import json
import os
from typing import Any

from .shard_index import IndexedSample, Member


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

    def read_meta(self, sample: IndexedSample) -> dict[str, Any]:
        """The sample's json member, parsed and checked (``parse_sample_meta``)."""
        return parse_sample_meta(self.read(sample.shard, sample.meta), sample.shard)

    def read_video(self, sample: IndexedSample) -> bytes:
        return self.read(sample.shard, sample.video)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self) -> None:
        self.close()

    def __getstate__(self):  # a DataLoader worker opens its own files
        return {"_fds": {}}


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
