"""Throughput benchmarks: one entry point, one mode per stage.

    python bench.py data  [--recipe svt|lstcl] [--shards DIR] ...   DALI graph vs baseline loader vs decode-only
    python bench.py model [...]                                     grouped multi-view runner vs per-view loop
    python bench.py e2e   [...]                                     training steps, DALI vs baseline loader
    python bench.py shard [--scale] [...]                           sharding job: videos/s, MB/s; driver cost per input

Each mode warms up, then times, prints a table and writes JSON (``--out``, default
``runs/bench/<mode>.json``). ``python bench.py MODE --help`` lists the mode's options. The command line
is ``benchmarks/cli.py``; the modes live in the ``benchmarks`` package (one module each) and use only
the public APIs of the other packages.
"""
import sys

if __name__ == "__main__":
    from common.process import setup_process

    setup_process()  # first: importing DeepSpeed reads DS_ACCELERATOR
    from benchmarks.cli import main

    sys.exit(main(sys.argv[1:]))
