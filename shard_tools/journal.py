"""The sharding job's resume state: an append-only record journal plus payload segment files.

``OUT/.work/journal.jsonl`` holds one line per finished input (sample record or quarantine entry,
and where its encoded bytes are); the encoded bytes are appended to ``OUT/.work/payloads-NNNNNN.bin``
segments. No file is created per input, and durability is batched: both files are written with one
``write`` per record (so ``kill -9`` of the driver loses nothing that was written), and ``fsync``-ed
every ``sync_every`` records or ``sync_seconds`` seconds, whichever comes first (so a machine crash
loses at most the records of the last unsynced batch). Lost records are simply redone: the encoders
are deterministic, so a redone input gives the same bytes.

Every journal line names its payload by (segment, offset, length, crc32): a line whose payload did
not reach the disk (the kernel may write the journal's pages before the segment's) fails the crc
check on resume and is redone. A torn last line is cut off before anything is appended.

A segment is deleted once every payload in it is inside a written shard, so with sample-count
shards ``.work`` holds about the payloads of shards not yet written plus one open segment.
"""

from __future__ import annotations

import json
import os
import re
import time
import zlib
from pathlib import Path

JOURNAL_NAME = "journal.jsonl"
_SEGMENT = re.compile(r"^payloads-(\d{6})\.bin$")


def _segment_name(number: int) -> str:
    return f"payloads-{number:06d}.bin"


class WorkJournal:
    """Append and read back finished inputs of one job (see the module docstring).

    Args:
        work_dir: ``OUT/.work``.
        sync_every / sync_seconds: batched durability (fsync after this many records or seconds).
        segment_bytes: a new payload segment starts once the open one holds this many bytes.
        keep: never delete segments (``--keep-work``).
    """

    def __init__(self, work_dir: Path, *, sync_every: int = 256, sync_seconds: float = 1.0,
                 segment_bytes: int = 64 << 20, keep: bool = False):
        self.work_dir = Path(work_dir)
        self.sync_every, self.sync_seconds, self.segment_bytes, self.keep = (
            max(1, sync_every), sync_seconds, segment_bytes, keep)
        self.path = self.work_dir / JOURNAL_NAME
        self._journal_fd: int | None = None
        self._segment_fd: int | None = None
        self._segment_number = -1
        self._segment_size = 0
        self._unsynced = 0
        self._last_sync = time.monotonic()
        self.outstanding: dict[int, int] = {}  # segment -> payloads not yet inside a written shard
        self.syncs = 0

    # ---- reading -------------------------------------------------------------------------------
    def load(self) -> dict[str, dict]:
        """key -> entry of every complete journal line (later lines win); cuts a torn tail off."""
        return {entry["key"]: entry for entry in read_complete_lines(self.path)}

    def _segment_path(self, number: int) -> Path:
        return self.work_dir / _segment_name(number)

    def read_payload(self, entry: dict) -> bytes | None:
        """The entry's encoded bytes, or None if they are gone or damaged (then the input is redone)."""
        number, offset, length, crc = entry["payload"]
        try:
            with open(self._segment_path(number), "rb") as f:
                f.seek(offset)
                data = f.read(length)
        except FileNotFoundError:
            return None
        if len(data) != length or zlib.crc32(data) != crc:
            return None
        return data

    def existing_segments(self) -> list[int]:
        if not self.work_dir.exists():
            return []
        return sorted(int(m.group(1)) for p in self.work_dir.iterdir() if (m := _SEGMENT.match(p.name)))

    # ---- writing -------------------------------------------------------------------------------
    def open(self, entries: dict[str, dict]) -> None:
        """Start appending: payloads go to a fresh segment (an old one may end in a torn write)."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        existing = self.existing_segments()
        self._segment_number = (existing[-1] + 1) if existing else 0
        self.outstanding = {}
        for entry in entries.values():
            if entry.get("payload"):
                number = entry["payload"][0]
                self.outstanding[number] = self.outstanding.get(number, 0) + 1
        self._journal_fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def append(self, key: str, ok: bool, record: dict, payload: bytes | None) -> dict:
        """Journal one finished input; return its entry."""
        location = None
        if payload is not None:
            if self._segment_fd is None or self._segment_size >= self.segment_bytes:
                self._roll_segment()
            _write_all(self._segment_fd, payload)
            location = [self._segment_number, self._segment_size, len(payload), zlib.crc32(payload)]
            self._segment_size += len(payload)
            self.outstanding[self._segment_number] = self.outstanding.get(self._segment_number, 0) + 1
        entry = {"key": key, "ok": ok, "record": record, "payload": location}
        # The payload is written before the line that points at it; one write per line.
        _write_all(self._journal_fd, (json.dumps(entry, sort_keys=True) + "\n").encode())
        self._unsynced += 1
        if self._unsynced >= self.sync_every or time.monotonic() - self._last_sync >= self.sync_seconds:
            self.sync()
        return entry

    def _roll_segment(self) -> None:
        if self._segment_fd is not None:
            self.sync()
            os.close(self._segment_fd)
            previous = self._segment_number
            self._segment_number += 1
            self._delete_if_consumed(previous)
        self._segment_fd = os.open(self._segment_path(self._segment_number),
                                   os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._segment_size = 0

    def sync(self) -> None:
        """Make every appended record durable: segment first, then the journal that points into it."""
        if self._unsynced == 0:
            self._last_sync = time.monotonic()
            return
        if self._segment_fd is not None:
            os.fsync(self._segment_fd)
        if self._journal_fd is not None:
            os.fsync(self._journal_fd)
        self._unsynced = 0
        self._last_sync = time.monotonic()
        self.syncs += 1

    def release(self, entries) -> None:
        """These payloads are now inside a written shard: delete segments nobody needs any more."""
        touched = set()
        for entry in entries:
            if entry.get("payload"):
                number = entry["payload"][0]
                self.outstanding[number] = self.outstanding.get(number, 0) - 1
                touched.add(number)
        for number in touched:
            self._delete_if_consumed(number)

    def _delete_if_consumed(self, number: int) -> None:
        if self.keep or self.outstanding.get(number, 0) > 0:
            return
        if number == self._segment_number and self._segment_fd is not None:
            return  # still being appended to: deleted when it is rolled over
        self.outstanding.pop(number, None)
        self._segment_path(number).unlink(missing_ok=True)

    def delete_unneeded_segments(self) -> None:
        """After a resume's bookkeeping: drop segments that no pending entry points into."""
        for number in self.existing_segments():
            if number != self._segment_number:
                self._delete_if_consumed(number)

    def close(self) -> None:
        self.sync()
        for fd in (self._segment_fd, self._journal_fd):
            if fd is not None:
                os.close(fd)
        self._segment_fd = self._journal_fd = None


def read_complete_lines(path: Path) -> list[dict]:
    """The records of an append-only JSON-lines journal, in order; a torn tail (a line a crash cut
    short) is cut off the file so that appending goes on from a complete line."""
    if not path.exists():
        return []
    data = path.read_bytes()
    records = []
    good_end = position = 0
    while position < len(data):
        newline = data.find(b"\n", position)
        if newline < 0:
            break  # torn last line: written partly before a crash
        try:
            records.append(json.loads(data[position:newline]))
        except ValueError:
            break  # cannot happen with one write per line, but never trust a tail
        position = good_end = newline + 1
    if good_end < len(data):
        with open(path, "r+b") as f:
            f.truncate(good_end)
            os.fsync(f.fileno())
    return records


def append_synced_line(path: Path, record: dict) -> None:
    """Append one record in one write and fsync it (for rare, precious lines: a confirmed upload)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        _write_all(fd, (json.dumps(record, sort_keys=True) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
