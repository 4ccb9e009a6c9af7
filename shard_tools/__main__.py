"""``python -m shard_tools [shard|verify|stats] ...`` (``shard`` is the default subcommand).

The sharding job's benchmark is ``python bench.py shard`` (``benchmarks/shard.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path

from common.errors import run_cli, writing_to
from shard_tools.encode import CODEC_TABLE, EncodeSettings
from shard_tools.executors import EXECUTORS, default_workers
from shard_tools.sources import (DATASET_KINDS, as_location, is_url, load_label_map, location_name, read_folder,
                                 read_kinetics_csv, read_ssv2)

SUBCOMMANDS = ("shard", "verify", "stats")
_SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_bytes(text: str, flag: str) -> int:
    """``4GiB`` / ``500MB`` / a plain number of bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else ""
    if not match or (unit and unit not in _SIZE_UNITS) or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"{flag} {text!r}: give a size in bytes (4GiB, 500MB)")
    return int(float(match.group(1)) * _SIZE_UNITS.get(unit, 1))


def parse_shard_size(text: str) -> tuple[int | None, int | None]:
    """``1000`` -> (1000 samples, None); ``256MB`` / ``1GiB`` -> (None, bytes)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"--shard-size {text!r}: give a sample count (1000) or a size (256MB)")
    number, unit = match.groups()
    if not unit or unit.lower() == "samples":
        if not float(number).is_integer() or int(float(number)) < 1:
            raise argparse.ArgumentTypeError(f"--shard-size {text!r}: sample count must be a positive integer")
        return int(float(number)), None
    if unit.upper() not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"--shard-size {text!r}: unit must be one of {sorted(_SIZE_UNITS)}")
    return None, int(float(number) * _SIZE_UNITS[unit.upper()])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m shard_tools",
        description="Re-encode video datasets into shuffled WebDataset tar shards for DALI "
                    "(plus .idx, manifest.json, quarantine.jsonl). Subcommands: shard (default), "
                    "verify, stats. See docs/shards.md.")
    sub = parser.add_subparsers(dest="command")

    shard = sub.add_parser("shard", help="list, re-encode, test-decode and shard videos",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                           description="Example: python -m shard_tools shard --source kinetics "
                                       "--annotations k400/train.csv --videos k400/train --out shards/k400")
    src = shard.add_argument_group("inputs")
    src.add_argument("--source", choices=("auto",) + DATASET_KINDS, default="auto",
                     help="input layout; auto: .csv annotations -> kinetics, .json -> ssv2, "
                          "none -> folder of class subfolders")
    src.add_argument("--annotations", type=as_location,
                     help="Kinetics CSV (label,youtube_id,time_start,time_end,split[,is_cc]) or SSv2 "
                          "train.json/validation.json/test.json (a path or a URL)")
    src.add_argument("--labels", type=as_location, help="SSv2 labels.json (name -> id; a path or a URL)")
    src.add_argument("--videos", type=as_location, required=True,
                     help="video folder or URL prefix (s3://bucket/k400/train; Kinetics: flat "
                          "{id}_{start:06d}_{end:06d}.mp4 or class folders)")
    src.add_argument("--split", help="split name (Kinetics: rows of this split; default from the data)")
    src.add_argument("--label-map", type=as_location,
                     help="fixed class map (JSON name->id or one name per line) so splits agree")
    src.add_argument("--fetch-bytes", type=lambda text: parse_bytes(text, "--fetch-bytes"), default="4GiB",
                     help="URL --videos: local disk the inputs being processed may take at once "
                          "(each is fetched whole, then deleted)")
    out = shard.add_argument_group("output")
    out.add_argument("--out", type=as_location, required=True,
                     help="output folder, or a URL (s3://bucket/prefix): shards are built in --work-dir "
                          "and uploaded, the manifest last")
    out.add_argument("--work-dir", type=Path,
                     help="URL --out: the local folder shards are built in and the resume journals live in "
                          "(default ~/.cache/shard_tools/work/<the URL>)")
    out.add_argument("--name", help="shard name prefix (default: the dataset kind)")
    out.add_argument("--shard-size", type=parse_shard_size, default="1000",
                     help="samples per shard (1000) or bytes per shard (256MB, 1GiB)")
    out.add_argument("--seed", type=int, default=0, help="shuffles samples across shards")
    out.add_argument("--keep-work", action="store_true", help="keep OUT/.work (per-video outputs) after success")
    enc = shard.add_argument_group("encoding")
    enc.add_argument("--codec", choices=sorted(CODEC_TABLE), default="vp9",
                     help="vp9 (WebM, DALI CPU+GPU decodable) or h264 (mp4, DALI GPU decoder only)")
    enc.add_argument("--short-side", type=int, default=256, help="scale the short side down to this")
    enc.add_argument("--max-fps", type=float, default=30.0, help="frame-rate cap")
    enc.add_argument("--keyframe-interval", type=int, default=16, help="a keyframe every N frames")
    enc.add_argument("--crf", type=int, default=None, help="quality (lower = better); default VP9 32, H.264 23")
    enc.add_argument("--vp9-cpu-used", type=int, default=8, help="libvpx speed 0..8")
    enc.add_argument("--vp9-deadline", choices=("realtime", "good", "best"), default="realtime")
    enc.add_argument("--h264-preset", default="veryfast", help="x264 preset")
    enc.add_argument("--min-frames", type=int, default=16, help="quarantine videos with fewer frames")
    enc.add_argument("--min-side", type=int, default=None,
                     help="quarantine videos whose output width or height is smaller (never scaled up); "
                          "default 32, or --short-side if that is smaller; 128 for VP9 shards decoded by NVDEC")
    enc.add_argument("--max-gap", type=float, default=5.0,
                     help="seconds one source frame may be held; longer timestamp gaps are quarantined")
    enc.add_argument("--copy", action="store_true",
                     help="keep the original bytes of videos that already meet every target")
    run = shard.add_argument_group("execution")
    run.add_argument("--executor", choices=EXECUTORS, default="process")
    run.add_argument("--workers", type=int, default=default_workers(),
                     help="parallel videos (0: in this process)")
    run.add_argument("--ray-address", help="Ray cluster address (default: start a local Ray)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")

    verify = sub.add_parser("verify", help="re-read every shard and check the invariants")
    verify.add_argument("out", help="a shard folder (holding manifest.json): a path or a URL (s3://, gs://, https://)")
    verify.add_argument("--decoder", choices=("auto", "stream", "pyav", "dali", "none"), default="auto",
                        help="frame-count check: auto/stream/pyav = PyAV frame by frame (bounded memory); "
                             "dali = the training reader (CPU for vp9, GPU for h264; whole videos in memory)")
    verify.add_argument("--threads", type=int, default=2, help="DALI threads per worker")
    verify.add_argument("--workers", type=int, default=0, help="shards checked in parallel (0: in this process)")
    verify.add_argument("--executor", choices=EXECUTORS, default="process")
    verify.add_argument("--ray-address", help="Ray cluster address (--executor ray)")

    stats = sub.add_parser("stats", help="totals, per-label counts, duration/fps/resolution histograms")
    stats.add_argument("out", help="a shard folder (holding manifest.json): a path or a URL (s3://, gs://, https://)")

    return parser


def _listing_from_args(args):
    kind = args.source
    if kind == "auto":
        suffix = Path(location_name(args.annotations)).suffix if args.annotations is not None else None
        if args.annotations is None:
            kind = "folder"
        elif suffix == ".csv":
            kind = "kinetics"
        elif suffix == ".json":
            kind = "ssv2"
        else:
            raise ValueError(f"--annotations {args.annotations}: cannot tell the format; pass --source")
    label_map = load_label_map(args.label_map) if args.label_map else None
    if kind == "kinetics":
        if args.annotations is None:
            raise ValueError("--source kinetics needs --annotations CSV")
        listing = read_kinetics_csv(args.annotations, args.videos, split=args.split, label_map=label_map)
    elif kind == "ssv2":
        if args.annotations is None or args.labels is None:
            raise ValueError("--source ssv2 needs --annotations (train.json ...) and --labels (labels.json)")
        listing = read_ssv2(args.annotations, args.labels, args.videos, split=args.split)
    else:
        listing = read_folder(args.videos, labelled=(kind == "folder"), split=args.split or "train",
                              label_map=label_map)
    source = {"kind": kind, "annotations": str(args.annotations) if args.annotations else None,
              "labels": str(args.labels) if args.labels else None, "videos": str(args.videos),
              "split": listing.split, "label_map": str(args.label_map) if args.label_map else None}
    if listing.skipped:
        # Files that are not inputs are listed in the manifest and named here, never silently dropped.
        source["skipped_files"] = listing.skipped
        if "count" in listing.skipped:
            print(f"[shard_tools] {args.videos}: {listing.skipped['count']} file(s) are not inputs "
                  f"(extension not a listed video suffix: {listing.skipped['by_extension']}; "
                  f"see manifest.json source.skipped_files)", file=sys.stderr)
        if "unreadable_folders" in listing.skipped:
            folders = listing.skipped["unreadable_folders"]
            print(f"[shard_tools] {args.videos}: {len(folders)} folder(s) cannot be read, their files are not "
                  f"inputs: {folders[:5]} (see manifest.json source.skipped_files)", file=sys.stderr)
    return listing, source


def cmd_shard(args) -> int:
    from shard_tools.job import ShardJob, run_shard_job
    from shard_tools.publish import default_work_folder, uploaded_objects

    if is_url(args.out):
        uploaded_objects(args.out)  # a missing bucket or credentials: say so before listing any input
    listing, source = _listing_from_args(args)
    settings = EncodeSettings(codec=args.codec, short_side=args.short_side, max_fps=args.max_fps,
                              keyframe_interval=args.keyframe_interval, crf=args.crf,
                              vp9_cpu_used=args.vp9_cpu_used, vp9_deadline=args.vp9_deadline,
                              h264_preset=args.h264_preset, min_frames=args.min_frames,
                              min_side=args.min_side,
                              max_gap=args.max_gap, copy=args.copy)
    max_samples, max_bytes = args.shard_size
    if is_url(args.out):
        work_dir = args.work_dir or default_work_folder(args.out)
        print(f"[shard_tools] building shards in {work_dir}, uploading them to {args.out}", file=sys.stderr)
    elif args.work_dir is not None:
        raise ValueError(f"--work-dir {args.work_dir}: only for a URL --out (a local --out is built in place)")
    else:
        work_dir = args.out
    if work_dir.exists() and not work_dir.is_dir():
        raise ValueError(f"{'--work-dir' if is_url(args.out) else '--out'} {work_dir}: exists and is not a folder")
    job = ShardJob(out_dir=work_dir, name=args.name or listing.dataset, settings=settings, seed=args.seed,
                   shard_max_samples=max_samples, shard_max_bytes=max_bytes, executor=args.executor,
                   workers=args.workers, ray_address=args.ray_address, keep_work=args.keep_work,
                   progress=not args.no_progress, source=source,
                   upload_to=args.out if is_url(args.out) else None, fetch_bytes=args.fetch_bytes)
    # a full disk reported on close names no file: the error names the output (or work) folder
    kept = f"{work_dir}/.work" if is_url(args.out) else "OUT/.work"
    with writing_to(work_dir, hint=f"finished videos are kept in {kept}: free space and rerun the same "
                                   "command to resume"):
        manifest = run_shard_job(listing, job)
    unexpected = manifest.quarantine.by_reason.get("unexpected error", 0)
    if unexpected:
        # Per-input failures never end the job; many "unexpected error"s point at the environment.
        print(f"[shard_tools] warning: {unexpected} input(s) quarantined as 'unexpected error' (see "
              f"{args.out}/{manifest.quarantine.path}); if the cause is the environment, fix it and "
              "rerun into a new folder", file=sys.stderr)
    print(json.dumps({"out": str(args.out), "codec": manifest.codec, "totals": dataclasses.asdict(manifest.totals),
                      "quarantine": manifest.quarantine.by_reason}, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Exit status 0 on success (``verify``: 1 when a check fails); 2 with one ``error: <file>: <reason>``
    line for bad input or arguments, or an output folder that cannot be written (read-only, full disk)."""
    return run_cli(_dispatch, sys.argv[1:] if argv is None else argv)


def _dispatch(argv: list[str]) -> int:
    argv = list(argv)
    if argv and argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help"):
        argv.insert(0, "shard")
    args = build_parser().parse_args(argv)
    if args.command is None:
        build_parser().print_help()
        return 2
    if args.command == "shard":
        if isinstance(args.shard_size, str):
            args.shard_size = parse_shard_size(args.shard_size)
        return cmd_shard(args)
    if args.command == "verify":
        from shard_tools.verify import verify_shards

        report = verify_shards(args.out, decoder=args.decoder, threads=args.threads, workers=args.workers,
                               executor=args.executor, ray_address=args.ray_address)
        print(json.dumps(report, indent=1))
        return 0 if report["ok"] else 1
    from shard_tools.stats import format_stats

    print(format_stats(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
