"""A node-local disk cache of remote ranged reads: least recently used first out, bounded in bytes.

For multi-epoch runs on a bucket: each epoch's global order sends a sample to some rank of some node,
so a cache that every rank and loader worker of a node shares (one folder) serves the fraction of the
data set the node already holds. Entries are files named by a hash of (URL, offset, length), written to
a temporary name and renamed, so a reader sees a whole entry or none; a hit refreshes the entry's
mtime, which orders the eviction.

Bound: each process counts the bytes it adds and, after every ``max_bytes / 8`` of them, lists the
folder and deletes the least recently used entries until the total is under 90% of ``max_bytes``. The
folder can therefore exceed the bound by at most an eighth of it per process writing between two
sweeps; the cost of a sweep (one listing) is spread over that eighth, so the per-read cost stays flat.
Entries deleted by another process while being read are misses, never errors.
"""
from __future__ import annotations

import hashlib
import os
import threading

from common.atomic_io import atomic_write_bytes


class DiskCache:
    """Member bytes by (location, offset, length) in ``folder``, at most about ``max_bytes`` of them."""

    def __init__(self, folder: str | os.PathLike, max_bytes: int):
        if max_bytes < 1:
            raise ValueError(f"the disk cache {folder} needs a size bound >= 1 byte, got {max_bytes}")
        self.folder = os.fspath(folder)
        self.max_bytes = max_bytes
        os.makedirs(self.folder, exist_ok=True)
        self._lock = threading.Lock()
        self._added = 0
        self.sweep()

    def _path(self, location: str, offset: int, length: int) -> str:
        digest = hashlib.sha256(f"{location}\n{offset}\n{length}".encode()).hexdigest()[:40]
        return os.path.join(self.folder, digest)

    def get(self, location: str, offset: int, length: int) -> bytes | None:
        path = self._path(location, offset, length)
        try:
            with open(path, "rb") as f:
                data = f.read()
            os.utime(path)
        except OSError:
            return None
        return data if len(data) == length else None

    def put(self, location: str, offset: int, length: int, data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        path = self._path(location, offset, length)
        try:  # no fsync: a cache entry lost to a crash is only a miss
            atomic_write_bytes(path, data, sync=False)
        except OSError:   # a full or vanished cache disk costs the cache, not the read
            return
        with self._lock:
            self._added += len(data)
            due = self._added >= self.max_bytes // 8
            if due:
                self._added = 0
        if due:
            self.sweep()

    def sweep(self) -> None:
        """Delete least recently used entries until the folder holds under 90% of the bound."""
        entries = []
        with os.scandir(self.folder) as it:
            for e in it:
                try:
                    st = e.stat()
                except OSError:
                    continue
                entries.append((st.st_mtime, st.st_size, e.path))
        total = sum(size for _, size, _ in entries)
        if total <= self.max_bytes:
            return
        for _, size, path in sorted(entries):
            if total <= 0.9 * self.max_bytes:
                break
            try:
                os.unlink(path)
            except OSError:
                pass
            total -= size

    def __getstate__(self):
        return {"folder": self.folder, "max_bytes": self.max_bytes}

    def __setstate__(self, state) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._added = 0
