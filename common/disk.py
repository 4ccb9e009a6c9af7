"""What the file system says about a write that failed: full or read-only."""
from __future__ import annotations

import os
import pathlib

__all__ = ["disk_problem"]


def disk_problem(paths: list) -> str | None:
    """Why writing under one of ``paths`` failed, if its file system says so (full or read-only), else None.

    torch.save reports a full disk as a RuntimeError from its C++ writer (``unexpected pos ...``), with
    no errno; the file system's own state after the failed write is what tells a full disk apart.
    """
    for path in paths:
        existing = pathlib.Path(path).absolute()
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        try:
            st = os.statvfs(existing)
        except OSError:
            continue
        if st.f_flag & os.ST_RDONLY:
            return f"{path}: read-only file system"
        free_blocks = st.f_bfree if os.geteuid() == 0 else st.f_bavail  # root may write into reserved blocks
        if free_blocks < 64:  # a write failed and left fewer than 64 blocks: the disk filled up
            return f"{path}: no space left on device"
    return None
