"""``python bench.py shard``: sharding throughput (``--scale``: the driver's cost per input at 10k..1M inputs).

The same benchmark as ``python -m shard_tools bench`` (same options, same JSON): its code stays in
``shard_tools`` (``shard_tools/bench.py``, ``shard_tools/bench_scale.py``) because ``shard_tools`` is
the one package a Ray cluster ships on its own, without torch or DALI, and its ``bench`` subcommand
must work there; a shim in ``shard_tools`` that imported this package would make the shard tools
depend on the layer above them. This module only dispatches to it.
"""

from __future__ import annotations

import sys

from shard_tools.__main__ import main as shard_tools_main

__all__ = ["main"]


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip().splitlines()[0] + "\nOptions (as `python -m shard_tools bench`):\n")
    return int(shard_tools_main(["bench", *argv]) or 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
