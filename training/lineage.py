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
"""
from __future__ import annotations

import json
from pathlib import Path

import torch.distributed as dist

from training.metrics import truncate_jsonl

__all__ = ["LineageWriter", "read_lineage"]


class LineageWriter:
    def __init__(self, run_dir: Path, *, rank: int, world_size: int, resume_step: int | None) -> None:
        self.path = Path(run_dir) / "lineage.jsonl"
        self.rank, self.world_size = rank, world_size
        self._file = None
        if rank != 0:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            truncate_jsonl(self.path, resume_step)
        self._file = open(self.path, "a" if resume_step is not None else "w", buffering=1)

    def write(self, step: int, batch: dict, replaced: list[dict]) -> None:
        """Collective: every rank calls it once per micro-batch it draws."""
        repeat = batch.get("repeat")
        mine = {"keys": list(batch.get("key", [])), "data_step": batch.get("data_step"), "replaced": replaced,
                "repeat": [int(r) for r in repeat] if repeat is not None else None}
        gathered = [None] * self.world_size if self.world_size > 1 else [mine]
        if self.world_size > 1:
            dist.all_gather_object(gathered, mine)
        if self._file is None:
            return
        data_step = gathered[0]["data_step"]
        line = {"step": step}
        if data_step is not None:
            line.update(epoch=int(data_step[0]), data_step=int(data_step[1]))
        line["keys"] = [k for g in gathered for k in g["keys"]]
        repeats = [r for g in gathered for r in (g["repeat"] or [])]
        if any(repeats):
            line["repeat"] = repeats
        replaced_all = [{"key": r["key"], "shard": r["shard"], "spare": r["spare"]} for g in gathered
                        for r in g["replaced"]]
        if replaced_all:
            line["replaced"] = replaced_all
        self._file.write(json.dumps(line, separators=(",", ":")) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_lineage(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
