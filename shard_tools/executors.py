"""Run the per-video function on a local process pool or on Ray -- the same function either way.

Both executors yield results as they complete (unordered) and keep a bounded number of tasks in
flight, so encoded payloads never pile up in memory; with a cost per task (the bytes an input
fetched from a URL occupies on a worker's disk) the tasks in flight are also bounded in summed cost.
The caller makes the result order irrelevant (shard plans are computed from sorted keys, not from
completion order).
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

EXECUTORS = ("process", "ray")


def default_workers() -> int:
    """All cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def map_unordered(fn: Callable, tasks: Iterable[tuple], *, executor: str = "process", workers: int | None = None,
                  ray_address: str | None = None, max_in_flight: int | None = None,
                  cost: Callable[[tuple], int] | None = None, max_cost: int | None = None) -> Iterator[Any]:
    """Yield ``fn(*task)`` for every task, in completion order.

    Args:
        executor: ``process`` (local pool; ``workers=0`` runs in this process, for debugging) or
            ``ray`` (``ray_address`` of a running cluster, or a local Ray with ``workers`` CPUs).
        max_in_flight: tasks submitted but not yet returned (default 2 x workers).
        cost / max_cost: the summed ``cost(task)`` of the tasks in flight stays <= ``max_cost``
            (a task costlier than ``max_cost`` on its own runs alone).
    """
    if executor not in EXECUTORS:
        raise ValueError(f"executor {executor!r}: choose from {EXECUTORS}")
    workers = default_workers() if workers is None else workers
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    if executor == "ray":
        yield from _ray_map(fn, tasks, workers=workers or 1, ray_address=ray_address,
                            max_in_flight=max_in_flight, cost=cost, max_cost=max_cost)
    elif workers == 0:
        for task in tasks:
            yield fn(*task)
    else:
        yield from _pool_map(fn, _Window(tasks, max_in_flight or 2 * workers, cost, max_cost),
                             workers=workers)


class _Window:
    """The tasks to submit next: at most ``max_tasks`` in flight and, with a ``cost``, at most
    ``max_cost`` summed over them (the costliest task is still admitted when nothing else runs)."""

    def __init__(self, tasks: Iterable[tuple], max_tasks: int, cost: Callable[[tuple], int] | None,
                 max_cost: int | None):
        self.tasks, self.max_tasks = iter(tasks), max(1, max_tasks)
        self.cost, self.max_cost = cost, max_cost
        self.in_flight: dict[Any, int] = {}  # handle -> cost
        self.in_flight_cost = 0
        self._next: tuple | None = None
        self.exhausted = False

    def take(self) -> tuple | None:
        """The next task if it fits the window now (then it counts as in flight once ``started``)."""
        if self.exhausted or len(self.in_flight) >= self.max_tasks:
            return None
        if self._next is None:
            try:
                self._next = next(self.tasks)
            except StopIteration:
                self.exhausted = True
                return None
        if self.cost is not None and self.max_cost is not None and self.in_flight:
            if self.in_flight_cost + self.cost(self._next) > self.max_cost:
                return None
        return self._next

    def started(self, handle: Any) -> None:
        self.in_flight[handle] = self.cost(self._next) if self.cost is not None else 0
        self.in_flight_cost += self.in_flight[handle]
        self._next = None

    def finished(self, handle: Any) -> None:
        self.in_flight_cost -= self.in_flight.pop(handle)


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def exit_with_parent(parent_pid: int, poll_seconds: float = 1.0) -> None:
    """Pool worker initializer: the worker dies when the driver dies, ``kill -9`` included.

    Without it a killed driver leaves its workers (and through their pipe, the resource tracker)
    running for good. Linux: ``prctl(PR_SET_PDEATHSIG, SIGKILL)``, which the kernel delivers when
    the thread that started the worker ends -- the pool is created and used by one thread of the
    driver (the caller of :func:`map_unordered`), so that thread outlives the pool. Elsewhere, and
    as a second line, a daemon thread polls ``getppid()``.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the watchdog below does the job
    if os.getppid() != parent_pid:  # the driver died before prctl took effect
        os._exit(1)

    def watchdog() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_seconds)
        os._exit(1)

    threading.Thread(target=watchdog, name="exit-with-parent", daemon=True).start()


def _pool_map(fn, window: _Window, *, workers: int):
    # spawn: workers start clean (no inherited threads from tqdm / Ray / DALI in the parent).
    context = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=exit_with_parent,
                                initargs=(os.getpid(),)) as pool:
        pending: set[cf.Future] = set()
        while True:
            while (task := window.take()) is not None:
                future = pool.submit(fn, *task)
                window.started(future)
                pending.add(future)
            if not pending:
                break
            done, pending = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
            for future in done:
                window.finished(future)
                yield future.result()


def _ray_map(fn, tasks, *, workers: int, ray_address: str | None, max_in_flight: int | None,
             cost: Callable[[tuple], int] | None, max_cost: int | None):
    import ray  # imported only when asked for: Ray's import alone takes seconds

    import common
    import shard_tools
    import storage

    started_here = not ray.is_initialized()
    if started_here:
        # Ship these packages to the workers (a cluster's nodes need not have the checkout): shard_tools,
        # the standard-library helpers it builds on (strict manifest loader, atomic writes) and the
        # storage layer that fetches URL inputs.
        runtime_env = {"py_modules": [shard_tools, common, storage]}
        if ray_address:
            ray.init(address=ray_address, runtime_env=runtime_env, log_to_driver=False)
        else:
            ray.init(num_cpus=workers, include_dashboard=False, runtime_env=runtime_env,
                     log_to_driver=False)
    try:
        remote_fn = ray.remote(num_cpus=1)(fn)
        window = _Window(tasks, max_in_flight or 2 * max(1, int(ray.cluster_resources().get("CPU", workers))),
                         cost, max_cost)
        pending = []
        while True:
            while (task := window.take()) is not None:
                ref = remote_fn.remote(*task)
                window.started(ref)
                pending.append(ref)
            if not pending:
                break
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                window.finished(ref)
                yield ray.get(ref)
    finally:
        if started_here:
            ray.shutdown()
