"""Throughput benchmarks: one entry point, one mode per stage.

    python bench.py data  [--recipe svt|lstcl] [--shards DIR] ...   DALI graph vs baseline loader vs decode-only
    python bench.py model [...]                                     grouped multi-view runner vs per-view loop
    python bench.py e2e   [...]                                     training steps, DALI vs baseline loader
    python bench.py shard [--scale] [...]                           sharding job: videos/s, MB/s; driver cost per input

Each mode warms up, then times, prints a table and writes JSON (``--out``, default
``runs/bench/<mode>.json``). ``python bench.py MODE --help`` lists the mode's options. The modes live
in the ``benchmarks`` package (one module each) and use only the public APIs of the other packages.
"""

from __future__ import annotations

import importlib
import sys

MODES = {
    "data": "benchmarks.data",
    "model": "benchmarks.model",
    "e2e": "benchmarks.e2e",
    "shard": "benchmarks.shard",
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in MODES:
        print(__doc__.strip())
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    mode, rest = argv[0], argv[1:]
    if mode != "shard":  # the shard benchmark needs no DeepSpeed
        from common.process import setup_process

        setup_process()
    module = importlib.import_module(MODES[mode])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
