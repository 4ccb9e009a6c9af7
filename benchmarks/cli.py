"""``bench.py``'s command line: one subcommand per benchmark module, each parsing its own options.

``python bench.py MODE --help`` lists a mode's options. A mode's module is imported only when it runs:
the sharding benchmark needs neither DALI nor the model code.
"""
from __future__ import annotations

import argparse

from common.errors import run_cli

__all__ = ["MODES", "build_parser", "main"]

MODES = {
    "data": "DALI views graph vs PyAV baseline loader vs decode-only (data.py)",
    "model": "grouped multi-view runner vs a per-view loop, one SVT student step (model.py)",
    "e2e": "training steps of a recipe, DALI vs baseline loader (e2e.py)",
    "shard": "sharding job: videos/s, MB/s; --scale: driver cost per input at 10k..1M inputs (shard.py)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python bench.py", description="Throughput benchmarks, one mode per "
                                     "stage; each prints a table and writes JSON (--out, default runs/bench/MODE.json)")
    sub = parser.add_subparsers(dest="mode", required=True, metavar="MODE")
    for name, text in MODES.items():
        sub.add_parser(name, help=text, add_help=False)  # the mode's own parser reads the rest, --help included
    return parser


def main(argv: list[str]) -> int:
    args, rest = build_parser().parse_known_args(argv)
    if args.mode == "data":
        from benchmarks.data import main as run
    elif args.mode == "model":
        from benchmarks.model import main as run
    elif args.mode == "e2e":
        from benchmarks.e2e import main as run
    else:
        from benchmarks.shard import main as run
    return run_cli(run, rest)
