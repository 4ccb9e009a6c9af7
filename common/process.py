"""The one process set-up, done first by every command line (``train.py``, ``evaluate.py``, ``bench.py``)
and by ``training.engine.init_distributed`` before it starts a process group.

Seeds are the recipe's and are set once it is read (``common.seeding.seed_all``).
"""
from __future__ import annotations

import os

__all__ = ["setup_process"]


def setup_process(torch_threads: int = 0) -> None:
    """Environment, threads and DeepSpeed options for this process (calling it again is harmless).

    - ``DS_ACCELERATOR=cpu`` unless a GPU is visible or the variable is set: importing DeepSpeed reads
      it, and on a GPU machine DeepSpeed picks CUDA by itself.
    - ``torch_threads`` > 0 sets torch's CPU threads (one per rank when several ranks share a CPU).
    - DeepSpeed's shared-memory comm op off: otherwise every process group start JIT-compiles it
      (about 60 s on a CPU); gloo carries the collectives.
    """
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if torch_threads > 0:
        torch.set_num_threads(torch_threads)
    import deepspeed.ops  # after DS_ACCELERATOR is set

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
