"""Counts of what the storage layer did: requests, bytes, retries, failures (for benchmarks and logs)."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field, fields


@dataclass
class StorageCounters:
    """Thread-safe running totals; ``snapshot()`` is a plain dict.

    ``requests`` counts every attempt (a retried read is two), ``bytes`` the payload bytes received,
    ``retries`` the attempts after a transient error, ``failures`` the requests that ran out of
    retries, ``cache_hits`` / ``cache_bytes`` the reads served by the node-local disk cache.
    """

    requests: int = 0
    bytes: int = 0
    retries: int = 0
    failures: int = 0
    cache_hits: int = 0
    cache_bytes: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}

    def __getstate__(self):  # a lock does not pickle; a copy counts on its own
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
