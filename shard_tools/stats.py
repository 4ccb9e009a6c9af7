"""``python -m shard_tools stats OUT``: totals, per-label counts and text histograms.

Reads the manifest and the small ``.json`` member of every sample (video bytes are skipped). A shard
folder at a URL (``storage``) is read through its ``.idx`` files: one ranged read per json member,
many in flight, never a whole shard.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
from collections import Counter
from pathlib import Path

from shard_tools.format import read_dali_index, read_manifest
from shard_tools.verify import read_quarantine, read_shard_samples
from storage import default_storage, is_url, join

DURATION_EDGES = (0, 1, 2, 4, 6, 8, 10, 15, 20, 30, 60)
BAR_WIDTH = 40


# json members read at once from remote storage (each a small ranged GET: latency bound).
REMOTE_READS_IN_FLIGHT = 32


def collect_records(out: str | os.PathLike) -> tuple[dict, list[dict], list[dict]]:
    """(manifest, sample json records, quarantine entries) of a shard folder, local or at a URL."""
    manifest = read_manifest(out).to_dict()  # checked against the format, then read as plain data
    if is_url(out):
        records = _remote_records(os.fspath(out), manifest)
    else:
        records = [json.loads(sample["members"]["json"]) for shard in manifest["shards"]
                   for sample in read_shard_samples(Path(out) / shard["path"])]
    return manifest, records, read_quarantine(out, manifest["quarantine"]["path"])


def _remote_records(url: str, manifest: dict) -> list[dict]:
    """Every sample's json of a remote shard folder, in manifest order, by ranged reads at the ``.idx``
    offsets of the json members."""
    store = default_storage()
    members = []
    for shard in manifest["shards"]:
        tar = join(url, shard["path"])
        for sample in read_dali_index(join(url, shard["idx_path"]), store):
            members += [(tar, m.offset, m.size) for m in sample if m.ext == "json"]
    with concurrent.futures.ThreadPoolExecutor(REMOTE_READS_IN_FLIGHT) as pool:
        return [json.loads(raw) for raw in pool.map(lambda m: store.read_range(*m), members)]


def _bars(title: str, counts: list[tuple[str, int]]) -> list[str]:
    lines = [title]
    if not counts:
        return lines + ["  (none)"]
    peak = max(n for _, n in counts) or 1
    width = max(len(label) for label, _ in counts)
    for label, n in counts:
        lines.append(f"  {label:>{width}} | {'#' * max(1 if n else 0, round(BAR_WIDTH * n / peak)):<{BAR_WIDTH}} {n}")
    return lines


def duration_histogram(durations: list[float]) -> list[tuple[str, int]]:
    edges = list(DURATION_EDGES) + [float("inf")]
    bins = Counter()
    for d in durations:
        for lo, hi in zip(edges[:-1], edges[1:]):
            if lo <= d < hi:
                bins[(lo, hi)] += 1
                break
    return [(f"{lo}-{hi}s" if hi != float("inf") else f">={lo}s", bins[(lo, hi)])
            for lo, hi in zip(edges[:-1], edges[1:]) if bins[(lo, hi)]]


def format_stats(out: str | os.PathLike, *, top_labels: int = 50) -> str:
    manifest, records, quarantine = collect_records(out)
    totals = manifest["totals"]
    frames = sum(r["num_frames"] for r in records)
    seconds = sum(r["duration"] for r in records)
    lines = [f"{out}: {manifest['dataset']} / {manifest['split']}, codec {manifest['codec']} "
             f"({manifest['container']}), seed {manifest['seed']}",
             f"inputs {totals['inputs']}  samples {totals['samples']}  quarantined {totals['quarantined']}  "
             f"shards {len(manifest['shards'])}  bytes {totals['bytes'] / 1e6:.1f} MB",
             f"frames {frames}  hours {seconds / 3600:.3f}  mean {seconds / max(1, len(records)):.2f} s/video  "
             f"{8 * totals['bytes'] / max(seconds, 1e-9) / 1e3:.0f} kbit/s", ""]
    label_counts = Counter(r["label_name"] or "(unlabelled)" for r in records)
    ordered = sorted(label_counts.items(), key=lambda kv: (-kv[1], kv[0]))
    lines += _bars(f"per label ({len(label_counts)} of {len(manifest['label_map'])} classes present"
                   + (f", top {top_labels}" if len(ordered) > top_labels else "") + ")", ordered[:top_labels])
    lines += [""] + _bars("duration", duration_histogram([r["duration"] for r in records]))
    fps = Counter(f"{r['fps']:.2f}" for r in records)
    lines += [""] + _bars("fps", sorted(fps.items(), key=lambda kv: float(kv[0])))
    resolution = Counter(f"{r['width']}x{r['height']}" for r in records)
    lines += [""] + _bars("resolution (top 15)", sorted(resolution.items(), key=lambda kv: (-kv[1], kv[0]))[:15])
    reasons = Counter(f"{q['stage']}: {q['reason']}" for q in quarantine)
    lines += [""] + _bars("quarantine", sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])))
    return "\n".join(lines)
