"""The retry policy of every remote request: exponential backoff with full jitter, bounded twice.

A request that fails transiently (``errors.is_transient``: 5xx, throttling, reset or refused
connections, timeouts, a response shorter than asked) is tried again after a random pause drawn
uniformly from ``[0, min(max_delay_s, base_delay_s * 2**retry)]`` ("full jitter", AWS Architecture
Blog, "Exponential Backoff And Jitter", 2015: it spreads the retries of many clients that failed
together, which a fixed exponential pause would synchronise). Two bounds end the retries: the number
of attempts and the total time since the first one, so a dead endpoint costs at most ``deadline_s``
per request, never a hung run. Permanent errors (missing object, denied, no credentials) are not
retried. The defaults are our choice: about ten seconds of retries rides out a server restart or a
throttling burst, and the deadline stops a request long before a training step would notice it as a
hang.
"""
from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from .counters import StorageCounters
from .errors import is_transient, retries_exhausted

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How long one storage request may keep trying (``data.retry`` in the training config).

    Args:
        attempts: tries per request, the first included (1 = no retries).
        base_delay_s: the backoff's first ceiling; it doubles per retry.
        max_delay_s: the backoff's largest ceiling.
        deadline_s: no retry starts later than this after the first attempt.
        timeout_s: connect and read timeout of one attempt (a stalled server is a transient error).
    """

    attempts: int = 8
    base_delay_s: float = 0.1
    max_delay_s: float = 4.0
    deadline_s: float = 60.0
    timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"retry.attempts must be >= 1, got {self.attempts}")
        if not 0 <= self.base_delay_s <= self.max_delay_s:
            raise ValueError(f"retry delays need 0 <= base_delay_s <= max_delay_s, got {self.base_delay_s}, "
                             f"{self.max_delay_s}")
        if self.deadline_s <= 0 or self.timeout_s <= 0:
            raise ValueError(f"retry.deadline_s and retry.timeout_s must be > 0, got {self.deadline_s}, "
                             f"{self.timeout_s}")

    def delay(self, retry: int, rng: random.Random) -> float:
        """The pause before retry number ``retry`` (0-based): full jitter under the doubling ceiling."""
        return rng.uniform(0.0, min(self.max_delay_s, self.base_delay_s * 2.0 ** retry))


# Jitter needs no reproducibility (it only spreads clients in time); one stream per process.
_jitter = random.Random()


def with_retries(request: Callable[[], T], policy: RetryPolicy, what: str,
                 counters: StorageCounters | None = None) -> T:
    """``request()``, tried again on transient errors within ``policy``'s bounds.

    Args:
        request: one attempt; raises on failure.
        policy: attempts, backoff and deadline.
        what: the URL (and range) the request is about; errors name it.
        counters: request / retry / failure counts go here.

    Raises:
        the permanent error of the first attempt that hits one, or ``errors.StorageReadError`` naming
        ``what``, the attempts and the last transient error once the bounds are spent.
    """
    start = time.monotonic()
    for attempt in range(policy.attempts):
        if counters is not None:
            counters.add(requests=1)
        try:
            return request()
        except Exception as err:
            if not is_transient(err):
                raise
            pause = policy.delay(attempt, _jitter)
            elapsed = time.monotonic() - start
            if attempt + 1 == policy.attempts or elapsed + pause > policy.deadline_s:
                if counters is not None:
                    counters.add(failures=1)
                raise retries_exhausted(what, attempt + 1, elapsed, err) from err
            if counters is not None:
                counters.add(retries=1)
            time.sleep(pause)
    raise AssertionError("unreachable: the loop returns or raises")
