"""Data lineage: one compact JSONL line per data step, the sample keys every rank trained on.

``<run_dir>/lineage.jsonl``, written by rank 0 (keys gathered from every rank, in rank order, so a
line is the data step's global batch whatever the world size)::

    {"step": 3, "epoch": 0, "data_step": 5, "keys": ["k1", ...], "replaced": [{"key": ..., "spare": ...}]}

``step`` is the optimizer step the micro-batch belongs to (1-based, as in metrics.jsonl);
``replaced`` appears only when a bad sample was replaced by a spare in that data step. With repeated
sampling (``data.repeats: R > 1``) ``keys`` names the video of every view-set (each video R times,
its view-sets next to each other) and ``repeat`` the view-set's repeat index, so a line is
``keys[i]`` + ``repeat[i]`` for every row of the global batch; with R = 1 there is no ``repeat``. A resumed
run first drops the lines after its checkpoint's step, so every step appears once and the file is
the whole run's data order: comparable line by line with another run's.

Each rank keeps its own micro-batches' records until ``flush`` (the trainer flushes at log steps,
before every checkpoint and at the end): one exchange of pickled records on a gloo group then, none
per micro-batch. Lines not yet flushed when a run dies lie after its last checkpoint, which a resume
truncates to anyway.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch.distributed as dist

from training.metrics import truncate_jsonl

__all__ = ["LineageWriter", "read_lineage"]


class LineageWriter:
    """``write`` per micro-batch (local), ``flush`` (collective on ``group``) writes the lines."""

    def __init__(self, run_dir: Path, *, rank: int, world_size: int, resume_step: int | None,
                 group=None) -> None:
        self.path = Path(run_dir) / "lineage.jsonl"
        self.rank, self.world_size, self.group = rank, world_size, group
        self.pending: list[dict] = []
        self._file = None
        if rank != 0:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            truncate_jsonl(self.path, resume_step)
        self._file = open(self.path, "a" if resume_step is not None else "w", buffering=1)

    def write(self, step: int, batch: dict, replaced: list[dict]) -> None:
        """Records one micro-batch this rank drew (every rank draws the same number of them)."""
        data_step = batch.get("data_step")
        repeat = batch.get("repeat")
        self.pending.append({"step": step, "keys": list(batch.get("key", [])),
                             "data_step": None if data_step is None else [int(v) for v in data_step],
                             "repeat": [int(r) for r in repeat] if repeat is not None else None,
                             "replaced": [{"key": r["key"], "shard": r["shard"], "spare": r["spare"]}
                                          for r in replaced]})

    def flush(self) -> None:
        """Collective: every rank's pending records, merged per micro-batch in rank order, to the file."""
        mine, self.pending = self.pending, []
        gathered = [mine]
        if self.world_size > 1:
            gathered = [None] * self.world_size
            dist.all_gather_object(gathered, mine, group=self.group)
        if self._file is None:
            return
        for records in zip(*gathered):
            first = records[0]
            line = {"step": first["step"]}
            if first["data_step"] is not None:
                line.update(epoch=first["data_step"][0], data_step=first["data_step"][1])
            line["keys"] = [k for r in records for k in r["keys"]]
            repeats = [x for r in records for x in (r["repeat"] or [])]
            if any(repeats):
                line["repeat"] = repeats
            replaced = [x for r in records for x in r["replaced"]]
            if replaced:
                line["replaced"] = replaced
            self._file.write(json.dumps(line, separators=(",", ":")) + "\n")

    def close(self, flush: bool = True) -> None:
        """Flushes (collective, unless ``flush`` is False: after a failure) and closes the file."""
        if flush:
            self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None


def read_lineage(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
