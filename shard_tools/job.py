"""The sharding job: listing -> per-video work (pool or Ray) -> shard plan -> shards -> manifest.

Resume design (kill -9 at any moment, rerun with the same arguments, same final bytes):
1. The job's fingerprint (tool version, settings, seed, shard size, every input) is stored in
   ``OUT/.work/job.json``; a rerun with different arguments or inputs refuses to mix results.
2. Each finished video leaves ``OUT/.work/done/{key}.json`` (sample record or quarantine entry),
   written after its encoded bytes ``{key}.{ext}`` and renamed into place, so a record on disk means
   the video is complete. A rerun only processes inputs without a record.
3. Shard plans come from the sorted keys and the seed -- never from the order workers finish -- so
   every run plans the same shards. With ``--shard-size N`` (samples) a shard is a fixed group of N
   inputs, written as soon as all of them are done (quarantined ones leave it a little smaller), and
   its encoded videos then leave ``.work``. With a size in bytes the plan needs every encoded size,
   so shards are written after all videos. Encoders are deterministic (one thread, bitexact
   muxing), so a video encoded twice gives the same bytes.
4. Each shard is written under ``.tmp`` and renamed; a rerun keeps a shard whose tar and index exist
   and whose keys match the plan, and rewrites any other.
5. ``quarantine.jsonl`` and then ``manifest.json`` are written last; the manifest marks a finished job.
   ``OUT/.work`` is deleted afterwards unless ``keep_work``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from shard_tools import __version__
from shard_tools.encode import EncodeSettings, preflight, process_video, quarantine_entry
from shard_tools.executors import map_unordered
from shard_tools.sources import SourceListing, VideoInput
from shard_tools.writer import (PlannedShard, atomic_write_bytes, estimate_sample_bytes, plan_shards,
                                sample_members, shard_file_name, shard_keys, write_jsonl, write_manifest,
                                write_shard)

MANIFEST_NAME = "manifest.json"
QUARANTINE_NAME = "quarantine.jsonl"


@dataclass(frozen=True)
class ShardJob:
    """Where and how to write shards.

    Args:
        out_dir: output folder (shards, .idx, manifest.json, quarantine.jsonl, .work/ while running).
        name: shard name prefix: ``{name}-{split}-{index:06d}.tar``.
        settings: encode settings.
        seed: shuffles samples across shards.
        shard_max_samples / shard_max_bytes: a shard closes at whichever limit is hit first.
        executor / workers / ray_address: see :func:`shard_tools.executors.map_unordered`.
        keep_work: keep ``OUT/.work`` (encoded videos and records) after success.
        progress: show the tqdm bar.
        source: how the inputs were listed (kind + arguments), recorded so ``verify`` can re-list.
    """

    out_dir: Path
    name: str
    settings: EncodeSettings = field(default_factory=EncodeSettings)
    seed: int = 0
    shard_max_samples: int | None = 1000
    shard_max_bytes: int | None = None
    executor: str = "process"
    workers: int | None = None
    ray_address: str | None = None
    keep_work: bool = False
    progress: bool = True
    source: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.name or not all(c.isalnum() or c in "_-" for c in self.name):
            raise ValueError(f"name {self.name!r}: use letters, digits, '_' and '-'")
        if not self.shard_max_samples and not self.shard_max_bytes:
            raise ValueError("a shard size is required (shard_max_samples or shard_max_bytes)")


def job_fingerprint(listing: SourceListing, job: ShardJob) -> str:
    """Everything that determines the output bytes (not paths of OUT, workers or executor)."""
    description = {
        "tool_version": __version__, "settings": job.settings.to_dict(), "seed": job.seed,
        "shard_max_samples": job.shard_max_samples, "shard_max_bytes": job.shard_max_bytes,
        "name": job.name, "dataset": listing.dataset, "split": listing.split,
        "label_map": listing.label_map,
        "inputs": [[v.input_id, v.key, v.path, v.label] for v in listing.inputs],
        "rejected": [[r.input_id, r.reason] for r in listing.rejected],
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()


def _log(message: str) -> None:
    print(f"[shard_tools] {message}", file=sys.stderr, flush=True)


def _remove_temporaries(folder: Path) -> None:
    if folder.exists():
        for tmp in folder.glob("*.tmp"):
            tmp.unlink()


def run_shard_job(listing: SourceListing, job: ShardJob) -> dict:
    """Run (or resume, or confirm) a sharding job; return the manifest."""
    preflight(job.settings)
    out_dir = Path(job.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work_dir, done_dir = out_dir / ".work", out_dir / ".work" / "done"
    fingerprint = job_fingerprint(listing, job)
    manifest_path = out_dir / MANIFEST_NAME

    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("job_fingerprint") != fingerprint:
            raise ValueError(f"{out_dir} already holds a finished job with other arguments or inputs; "
                             "write to a new folder")
        missing = [s["path"] for s in manifest["shards"]
                   if not (out_dir / s["path"]).exists() or not (out_dir / s["idx_path"]).exists()]
        if not missing:
            _log(f"{out_dir}: already complete ({manifest['totals']})")
            return manifest
        if not work_dir.exists():
            raise ValueError(f"{out_dir}: shards {missing[:3]} are gone and .work was deleted; "
                             "rerun into a new folder")
        manifest_path.unlink()

    job_file = work_dir / "job.json"
    if job_file.exists():
        if json.loads(job_file.read_text()).get("job_fingerprint") != fingerprint:
            raise ValueError(f"{out_dir}/.work belongs to an unfinished job with other arguments or "
                             "inputs; rerun that job or write to a new folder")
    else:
        done_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(job_file, json.dumps({"job_fingerprint": fingerprint}).encode())
    done_dir.mkdir(parents=True, exist_ok=True)
    _remove_temporaries(out_dir)
    _remove_temporaries(done_dir)

    writer = _ShardWriter(listing, job, done_dir)
    if job.shard_max_bytes:
        # Sizes are known only once every video is encoded: encode all, then plan and write.
        writer.encode(listing.inputs)
        sizes = {k: estimate_sample_bytes(k, job.settings.extension, r["payload_bytes"], r["record"])
                 for k, r in writer.records.items() if r["ok"]}
        plan = plan_shards(sizes, seed=job.seed, max_samples=job.shard_max_samples,
                           max_bytes=job.shard_max_bytes)
        writer.set_plan(plan)
    else:
        # A shard is a fixed group of inputs (seeded shuffle of the sorted keys): each is written as
        # soon as its inputs are done, and its encoded videos are deleted from .work right away.
        plan = plan_shards({v.key: 0 for v in listing.inputs}, seed=job.seed,
                           max_samples=job.shard_max_samples, max_bytes=None)
        writer.set_plan(plan)
        by_key = {v.key: v for v in listing.inputs}
        writer.encode([by_key[k] for shard in plan for k in shard.keys])
    manifest = writer.finish(fingerprint)
    if not job.keep_work:
        shutil.rmtree(work_dir)
    return manifest


class _ShardWriter:
    """Per-video records in ``.work/done`` and the shards built from them."""

    def __init__(self, listing: SourceListing, job: ShardJob, done_dir: Path):
        self.listing, self.job, self.done_dir = listing, job, done_dir
        self.out_dir = Path(job.out_dir)
        self.extension = job.settings.extension
        self.records: dict[str, dict] = {}
        for item in listing.inputs:
            record_path = done_dir / f"{item.key}.json"
            if record_path.exists():
                self.records[item.key] = json.loads(record_path.read_text())
        self.plan: list[PlannedShard] = []
        self.shard_of: dict[str, PlannedShard] = {}
        self.entries: dict[int, dict | None] = {}

    def payload_path(self, key: str) -> Path:
        return self.done_dir / f"{key}.{self.extension}"

    def set_plan(self, plan: list[PlannedShard]) -> None:
        self.plan = plan
        self.shard_of = {k: shard for shard in plan for k in shard.keys}
        for shard in plan:  # shards whose inputs were all done before a kill
            self._write_if_ready(shard)

    def encode(self, items: list[VideoInput]) -> None:
        """Process every input without a record, in the given order (shard order)."""
        todo = [item for item in items if item.key not in self.records]
        quarantined = len(self.listing.rejected) + sum(not r["ok"] for r in self.records.values())
        if self.records:
            _log(f"resuming: {len(self.records)} of {len(self.listing.inputs)} videos already done")
        bar = tqdm(total=len(self.listing.inputs), initial=len(self.records), unit="video", dynamic_ncols=True,
                   disable=not self.job.progress, desc="shard")
        bar.set_postfix(quarantined=quarantined)
        tasks = ((item, self.job.settings) for item in todo)
        for outcome in map_unordered(process_video, tasks, executor=self.job.executor, workers=self.job.workers,
                                     ray_address=self.job.ray_address):
            if outcome.ok:
                atomic_write_bytes(self.payload_path(outcome.key), outcome.payload)
            else:
                quarantined += 1
            # payload_bytes: byte-size shard plans need it after the payload itself has left .work.
            entry = {"ok": outcome.ok, "record": outcome.record,
                     "payload_bytes": len(outcome.payload) if outcome.ok else 0}
            # The record is renamed into place after the payload: it marks the video complete.
            atomic_write_bytes(self.done_dir / f"{outcome.key}.json", json.dumps(entry, sort_keys=True).encode())
            self.records[outcome.key] = entry
            if outcome.key in self.shard_of:
                self._write_if_ready(self.shard_of[outcome.key])
            bar.update(1)
            bar.set_postfix(quarantined=quarantined)
        bar.close()

    def _write_if_ready(self, shard: PlannedShard) -> None:
        if shard.index in self.entries or not all(k in self.records for k in shard.keys):
            return
        keys = [k for k in shard.keys if self.records[k]["ok"]]
        if not keys:  # every input of this group was quarantined: no shard file
            self.entries[shard.index] = None
            return
        samples = {k: self.records[k]["record"] for k in keys}
        tar_name = shard_file_name(self.job.name, self.listing.split, shard.index)
        tar_path, idx_path = self.out_dir / tar_name, self.out_dir / (tar_name[:-4] + ".idx")
        complete = tar_path.exists() and idx_path.exists() and shard_keys(tar_path) == keys
        if not complete:
            missing = [k for k in keys if not self.payload_path(k).exists()]
            if missing:
                raise ValueError(f"{tar_path}: incomplete, and the encoded videos {missing[:3]} are no longer "
                                 f"in {self.done_dir}; rerun into a new folder")
            members = (sample_members(k, self.extension, self.payload_path(k).read_bytes(), samples[k])
                       for k in keys)
            write_shard(tar_path, idx_path, members)
        if not self.job.keep_work:
            for k in keys:
                self.payload_path(k).unlink(missing_ok=True)
        self.entries[shard.index] = {
            "path": tar_name, "idx_path": idx_path.name, "num_samples": len(keys),
            "bytes": tar_path.stat().st_size, "keys": keys, "sources": [samples[k]["source"] for k in keys],
            "num_frames": sum(samples[k]["num_frames"] for k in keys),
        }

    def finish(self, fingerprint: str) -> dict:
        """Write quarantine.jsonl and manifest.json (the invariant is checked before publishing)."""
        listing, job = self.listing, self.job
        unwritten = [s.index for s in self.plan if s.index not in self.entries]
        if unwritten:
            raise AssertionError(f"shards {unwritten[:5]} were never written")
        shard_entries = [self.entries[s.index] for s in self.plan if self.entries[s.index] is not None]
        num_samples = sum(e["num_samples"] for e in shard_entries)
        quarantine = [quarantine_entry(r.input_id, r.key, r.source, r.stage, r.reason, r.detail)
                      for r in listing.rejected]
        quarantine += [r["record"] for r in self.records.values() if not r["ok"]]
        quarantine.sort(key=lambda q: q["input_id"])
        if num_samples + len(quarantine) != listing.num_inputs:
            raise AssertionError(f"{num_samples} samples + {len(quarantine)} quarantined != "
                                 f"{listing.num_inputs} inputs")
        write_jsonl(self.out_dir / QUARANTINE_NAME, quarantine)
        manifest = {
            "tool_version": __version__,
            "name": job.name, "dataset": listing.dataset, "split": listing.split,
            "codec": job.settings.codec, "container": job.settings.container, "extension": self.extension,
            "encode": job.settings.to_dict(),
            "seed": job.seed,
            "shard_size": {"max_samples": job.shard_max_samples, "max_bytes": job.shard_max_bytes},
            "label_map": listing.label_map,
            "shards": shard_entries,
            "totals": {"inputs": listing.num_inputs, "samples": num_samples, "quarantined": len(quarantine),
                       "shards": len(shard_entries), "frames": sum(e["num_frames"] for e in shard_entries),
                       "bytes": sum(e["bytes"] for e in shard_entries)},
            "quarantine": {"path": QUARANTINE_NAME,
                           "by_reason": dict(sorted(Counter(q["reason"] for q in quarantine).items()))},
            "source": job.source,
            "job_fingerprint": fingerprint,
        }
        write_manifest(self.out_dir / MANIFEST_NAME, manifest)
        return manifest
