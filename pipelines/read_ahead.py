"""The loaders' read-ahead: the members of the next steps are read (and their plans drawn) on a pool
of threads while the current step decodes, within a memory budget, delivered in the global order.

Both loaders know their future exactly: the global order (``order.GlobalOrder``) lists the positions
of every upcoming data step, and the ``.idx`` gives every member's size before it is read. So the
read-ahead takes the rank's positions in order, starts a read for each as long as (a) at most
``max_ahead`` positions are read or waiting and (b) the bytes they hold until delivered stay within
``max_bytes`` (a sample larger than the whole budget is read alone, so it still passes), and
hands the results back strictly in order: the decoder sees the same samples, in the same order, with
the same plans as without read-ahead (a failed read is re-raised at its own turn). A remote read is
latency bound (``storage``: one ranged GET per sample), so enough reads in flight turn a per-request
latency into throughput; for a local folder the threads overlap the page-cache copies with decoding.

The loaders consume it from the thread that feeds the decoder (DALI's external-source callback, the
baseline's DataLoader worker); only ``fetch`` runs on the pool. ``stats`` counts the time the consumer
waited for a read that was not ready yet (``wait_s``): near zero when the read-ahead hides the latency.
"""
from __future__ import annotations

import collections
import concurrent.futures
import threading
import time
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

K = TypeVar("K")
T = TypeVar("T")


class ReadAhead(Generic[K, T]):
    """``fetch(key)`` for upcoming ``keys`` on its own threads; results in key order.

    Args:
        fetch: reads one key's sample (runs on a pool thread; must be thread-safe).
        keys: the keys in delivery order (the rank's epoch positions from the current step on).
        cost: the bytes a key will hold until delivered, known before reading it (``.idx`` sizes).
        max_ahead: keys read or waiting at most; 0 = no read-ahead (``fetch`` on the caller's thread).
        max_bytes: budget of bytes read or being read but not yet delivered.
        threads: pool threads.
    """

    def __init__(self, fetch: Callable[[K], T], keys: Iterable[K], *, cost: Callable[[K], int], max_ahead: int,
                 max_bytes: int, threads: int):
        if max_ahead < 0 or max_bytes < 1 or threads < 1:
            raise ValueError(f"read-ahead needs max_ahead >= 0, max_bytes >= 1 and threads >= 1, got "
                             f"{max_ahead}, {max_bytes}, {threads}")
        self.fetch, self.cost = fetch, cost
        self.max_ahead, self.max_bytes = max_ahead, max_bytes
        self._keys = iter(keys)
        self._next: tuple[K, int] | None = None          # the next key not yet started, with its cost
        self._pending: collections.deque = collections.deque()   # (cost, future) in key order
        self._held = 0
        self._lock = threading.Lock()
        self._pool = (concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="read-ahead")
                      if max_ahead else None)
        self.stats = {"delivered": 0, "waited": 0, "wait_s": 0.0, "peak_bytes": 0}

    def _peek(self) -> tuple[K, int] | None:
        if self._next is None:
            for key in self._keys:
                self._next = (key, self.cost(key))
                break
        return self._next

    def _top_up(self) -> None:
        while len(self._pending) < self.max_ahead:
            upcoming = self._peek()
            if upcoming is None:
                return
            key, cost = upcoming
            if self._held and self._held + cost > self.max_bytes:
                return
            self._next = None
            self._pending.append((cost, self._pool.submit(self.fetch, key)))
            self._held += cost
            self.stats["peak_bytes"] = max(self.stats["peak_bytes"], self._held)

    def __iter__(self) -> "ReadAhead[K, T]":
        return self

    def __next__(self) -> T:
        with self._lock:
            if self._pool is None:
                upcoming = self._peek()
                if upcoming is None:
                    raise StopIteration
                self._next = None
                self.stats["delivered"] += 1
                return self.fetch(upcoming[0])
            self._top_up()
            if not self._pending:
                raise StopIteration
            cost, future = self._pending.popleft()
            self._top_up()          # keep the pool busy while this one is awaited
        if not future.done():
            start = time.perf_counter()
            concurrent.futures.wait([future])
            self.stats["waited"] += 1
            self.stats["wait_s"] += time.perf_counter() - start
        with self._lock:
            self._held -= cost      # its bytes are the consumer's from here
            self.stats["delivered"] += 1
            if self._pool is not None:
                self._top_up()
        return future.result()

    def close(self) -> None:
        """Stop: reads not started are dropped, running ones finish in the background."""
        with self._lock:
            for _, future in self._pending:
                future.cancel()
            self._pending.clear()
            self._held = 0
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None
                self.max_ahead = 0
            self._keys = iter(())
            self._next = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def rank_read_ahead(fetch: Callable[[tuple[int, int]], T], *, order, index: list, epoch: int, steps: Iterable[int],
                    rank: int, world_size: int, cfg, share: int = 1) -> ReadAhead[tuple[int, int], T]:
    """A loader's read-ahead over its slice of ``steps`` of ``epoch``: keys ``(step, position)`` in
    delivery order (a position is a video; with ``data.repeats`` its view-sets come from one read),
    each costing its own sample's member bytes (a spare read instead costs what it costs; spares are
    rare). ``cfg`` (``DataConfig``) gives the steps ahead, the byte budget (split over ``share``
    consumers, e.g. the baseline's workers) and the threads."""
    keys = ((step, p) for step in steps for p in order.positions(step, rank, world_size))
    videos_per_step = len(order.positions(0, rank, world_size))

    def cost(key: tuple[int, int]) -> int:
        entry = index[order.sample_at(epoch, key[1])]
        return entry.meta.size + entry.video.size

    return ReadAhead(fetch, keys, cost=cost, max_ahead=cfg.read_ahead_steps * videos_per_step,
                     max_bytes=max(1, cfg.read_ahead_bytes // share), threads=cfg.read_threads)
