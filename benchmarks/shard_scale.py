"""``python bench.py shard --scale``: the sharding driver's cost per input at 10k ... 1M inputs.

Each size runs a whole sharding job (fingerprint, shard plan, journal, shard tars + DALI indexes,
quarantine, manifest, cleanup) in a fresh process, with a near-free stand-in for the encoder: every
tenth input is "missing" (a quarantine entry), the others get a 64-byte payload. What is left is the
driver's bookkeeping, which must cost the same per input at any scale. Reported per size: wall
seconds per input, driver CPU seconds per input, peak driver RSS; JSON + a PNG of cost per input
against input count.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import resource
import shutil
import time
from pathlib import Path

from shard_tools.encode import EncodeSettings, VideoOutcome, quarantine_entry
from shard_tools.sources import SourceListing, VideoInput

DEFAULT_SIZES = (10_000, 100_000, 1_000_000)


def standin_process_video(item: VideoInput, settings: EncodeSettings) -> VideoOutcome:
    """The encoder's place in the job at ~zero cost: deterministic 64-byte payloads, 10% quarantined."""
    digest = hashlib.sha256(item.key.encode()).digest()
    if digest[0] % 10 == 0:
        entry = quarantine_entry(item.input_id, item.key, item.path, "probe", "missing", f"{item.path}: no such file")
        return VideoOutcome(item.key, item.input_id, False, entry, None)
    record = {"key": item.key, "label": item.label, "label_name": item.label_name, "dataset": item.dataset,
              "split": item.split, "source": item.path, "input_id": item.input_id, "num_frames": 16,
              "fps": 25.0, "width": 64, "height": 64, "duration": 0.64, "codec": settings.codec,
              "copied": False}
    return VideoOutcome(item.key, item.input_id, True, record, digest * 2)


def synthetic_listing(num_inputs: int) -> SourceListing:
    """Kinetics-like rows (11-char id + times), 700 labels, paths that need not exist."""
    labels = [f"class_{i:03d}" for i in range(700)]
    inputs = []
    for i in range(num_inputs):
        key = f"yt{i:09d}_{i % 300:06d}_{i % 300 + 10:06d}"
        label = i % len(labels)
        inputs.append(VideoInput(input_id=f"train.csv:{i + 2}", key=key, path=f"/data/k700/train/{key}.mp4",
                                 label=label, label_name=labels[label], dataset="kinetics", split="train"))
    return SourceListing("kinetics", "train", inputs, [], {name: i for i, name in enumerate(labels)})


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_one(num_inputs: int, work_dir: Path, shard_size: int, workers: int) -> dict:
    """One size, in this process (call it in a fresh process so peak RSS is this size's)."""
    from shard_tools.job import ShardJob, run_shard_job

    import webdataset  # noqa: F401 -- its torch import (~3 s) is not the driver's per-input cost

    listing = synthetic_listing(num_inputs)
    out = Path(work_dir) / f"n{num_inputs}"
    shutil.rmtree(out, ignore_errors=True)
    job = ShardJob(out_dir=out, name="scale", settings=EncodeSettings(), shard_max_samples=shard_size,
                   workers=workers, progress=False, process=standin_process_video)
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    manifest = run_shard_job(listing, job)
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
    shutil.rmtree(out, ignore_errors=True)
    return {"inputs": num_inputs, "samples": manifest.totals.samples,
            "quarantined": manifest.totals.quarantined, "shards": manifest.totals.shards,
            "wall_s": round(wall, 3), "driver_cpu_s": round(cpu, 3),
            "wall_ms_per_input": round(1000 * wall / num_inputs, 4),
            "driver_cpu_ms_per_input": round(1000 * cpu / num_inputs, 4),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            # Wall time on a shared machine follows its load; driver CPU per input does not.
            "load_average_1min": round(os.getloadavg()[0], 2)}


def _child(queue, *args) -> None:
    queue.put(run_one(*args))


def run_scale_bench(sizes, work_dir: Path, out: Path, *, shard_size: int = 1000, workers: int = 0) -> dict:
    context = multiprocessing.get_context("spawn")
    rows = []
    print(f"{'inputs':>9} {'wall s':>8} {'ms/input':>9} {'CPU ms/input':>13} {'peak RSS MB':>12} {'shards':>7} "
          f"{'load':>5}")
    for size in sizes:
        queue = context.Queue()
        process = context.Process(target=_child, args=(queue, size, work_dir, shard_size, workers))
        process.start()
        row = queue.get()
        process.join()
        rows.append(row)
        print(f"{row['inputs']:>9} {row['wall_s']:>8.1f} {row['wall_ms_per_input']:>9.4f} "
              f"{row['driver_cpu_ms_per_input']:>13.4f} {row['peak_rss_mb']:>12.1f} {row['shards']:>7} "
              f"{row['load_average_1min']:>5.1f}", flush=True)
    per_input = [r["wall_ms_per_input"] for r in rows]
    cpu_per_input = [r["driver_cpu_ms_per_input"] for r in rows]
    result = {"benchmark": "shard_tools scale", "shard_size": shard_size, "workers": workers,
              "stand_in": "64-byte payloads, 10% quarantined", "rows": rows,
              "max_over_min_ms_per_input": round(max(per_input) / min(per_input), 3),
              "max_over_min_cpu_ms_per_input": round(max(cpu_per_input) / min(cpu_per_input), 3)}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    _plot(rows, out.with_suffix(".png"))
    print(f"cost per input, largest / smallest: wall {result['max_over_min_ms_per_input']}x, driver CPU "
          f"{result['max_over_min_cpu_ms_per_input']}x; wrote {out} and {out.with_suffix('.png')}")
    return result


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    counts = [r["inputs"] for r in rows]
    ax.plot(counts, [r["wall_ms_per_input"] for r in rows], "o-", label="wall ms / input")
    ax.plot(counts, [r["driver_cpu_ms_per_input"] for r in rows], "s--", label="driver CPU ms / input")
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle=":", label="goal: 1 ms")
    ax.set_xscale("log")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("inputs")
    ax.set_ylabel("ms per input")
    ax.set_title("shard_tools driver cost per input (stand-in encoder)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
