"""The two-class evaluation set: synthetic ``moving_left`` against ``index`` videos, sharded.

Classes: ``moving_left`` (a bar sweeping over a gradient) against ``index`` (uniformly coloured
frames). Not moving_left against moving_right: those differ only in the direction of motion, which a
randomly initialised TimeSformer cannot see (its ``temporal_fc`` starts at zero). Within a class the
videos differ in length, so train and validation clips are not copies of each other. The evaluation
tests and ``bench.py repeats`` (kNN of its runs) use it.
"""
from __future__ import annotations

import json
from pathlib import Path

from footage.synthetic import write_synthetic_video

__all__ = ["TWO_CLASSES", "make_two_class_shards"]

TWO_CLASSES = ("moving_left", "index")


def make_two_class_shards(root: Path, train_per_class: int = 8, val_per_class: int = 4,
                          classes: tuple[str, str] = TWO_CLASSES) -> dict[str, Path]:
    """Train and val shards of two classes under ``root`` (64x48 VP9, 24-32 frames, one label map),
    written by ``python -m shard_tools shard`` in this process; returns ``{"train": DIR, "val": DIR}``.
    ``classes`` are ``footage.synthetic`` patterns (``("moving_left", "moving_right")``: direction only)."""
    from shard_tools.__main__ import main as shard_main

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    label_map = root / "labels.json"
    label_map.write_text(json.dumps({name: i for i, name in enumerate(classes)}))
    shards = {}
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for pattern in classes:
            for i in range(per_class):
                num_frames = 24 + (3 * i + (split == "val")) % 9
                write_synthetic_video(root / "videos" / split / pattern / f"{split}{i}.webm", num_frames=num_frames,
                                      width=64, height=48, fps=25.0, codec="vp9", pattern=pattern, seed=i)
        shards[split] = root / "shards" / split
        rc = shard_main(["shard", "--source", "folder", "--videos", str(root / "videos" / split), "--split", split,
                         "--label-map", str(label_map), "--out", str(shards[split]), "--name", "syn",
                         "--short-side", "48", "--min-frames", "8", "--workers", "0", "--no-progress"])
        if rc != 0:
            raise RuntimeError(f"{root}: sharding the {split} split failed (exit {rc})")
    return shards
