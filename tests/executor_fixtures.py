"""Task functions for executor tests, in a module of their own: spawn-started pool workers import the
module of the function they run, and this one imports nothing heavy."""

from __future__ import annotations

import time
from pathlib import Path


def overlap_probe(folder: str, i: int) -> int:
    """How many tasks were running at once while this one ran (itself included): each task marks
    ``folder`` while it runs and counts the marks it sees."""
    mark = Path(folder) / f"{i}.running"
    mark.touch()
    seen = 1
    for _ in range(20):
        seen = max(seen, len(list(Path(folder).glob("*.running"))))
        time.sleep(0.02)
    mark.unlink()
    return seen
