"""The sharding job: listing -> per-video work (pool or Ray) -> shard plan -> shards -> manifest.

Resume design (kill -9 at any moment, rerun with the same arguments, same final bytes):
1. The job's fingerprint (tool version, settings, seed, shard size, every input) is stored in
   ``OUT/.work/job.json``; a rerun with different arguments or inputs refuses to mix results.
2. Each finished video is one line of the append-only ``OUT/.work/journal.jsonl`` (sample record or
   quarantine entry) pointing at its encoded bytes in a payload segment (``shard_tools.journal``):
   no file per input, fsync per batch of records. A rerun only processes inputs without a valid
   line; a crash loses at most the last unsynced batch, which is simply redone.
3. Shard plans come from the sorted keys and the seed -- never from the order workers finish -- so
   every run plans the same shards. With ``--shard-size N`` (samples) a shard is a fixed group of N
   inputs, written as soon as the last of them is done (a counter per shard, no scan over plans;
   quarantined ones leave it a little smaller), and its payload segments then leave ``.work``.
   With a size in bytes the plan needs every encoded size, so shards are written after all videos.
   Encoders are deterministic (one thread, bitexact muxing), so a video encoded twice gives the
   same bytes.
4. Each shard is written under ``.tmp`` and renamed; a rerun keeps a shard whose tar and index exist
   and whose keys match the plan, and rewrites any other.
5. ``quarantine.jsonl`` and then ``manifest.json`` are written last; the manifest marks a finished job.
   ``OUT/.work`` (a few files) is deleted afterwards unless ``keep_work``.
6. With an output URL (``upload_to``) the same job runs in a local work folder and every finished
   shard is uploaded, confirmed, journaled and deleted locally before its payloads are released;
   the manifest is uploaded last (:mod:`shard_tools.publish`, which also says how a rerun knows what
   is uploaded). Inputs listed from a URL are fetched by the worker that processes them, and the
   driver keeps the fetched bytes in flight under ``fetch_bytes`` (:mod:`shard_tools.fetch`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from common.atomic_io import atomic_write_json, write_jsonl
from shard_tools import __version__
from shard_tools.encode import EncodeSettings, preflight, process_video, quarantine_entry
from shard_tools.executors import map_unordered
from shard_tools.format import (QUARANTINE_NAME, Manifest, QuarantineSummary, ShardEntry, ShardSize, Totals,
                                index_file_name, shard_file_name, write_manifest)
from shard_tools.journal import WorkJournal
from shard_tools.publish import BucketOutput, FolderOutput
from shard_tools.sources import SourceListing, VideoInput, is_url
from shard_tools.writer import PlannedShard, estimate_sample_bytes, plan_shards, sample_members, shard_keys, write_shard


@dataclass(frozen=True)
class ShardJob:
    """Where and how to write shards.

    Args:
        out_dir: output folder (shards, .idx, manifest.json, quarantine.jsonl, .work/ while running);
            with ``upload_to``, the local work folder the shards are built in.
        upload_to: an output URL (``s3://bucket/prefix``): finished shards, then quarantine.jsonl
            and manifest.json, are uploaded there (:mod:`shard_tools.publish`).
        name: shard name prefix: ``{name}-{split}-{index:06d}.tar``.
        settings: encode settings.
        seed: shuffles samples across shards.
        shard_max_samples / shard_max_bytes: a shard closes at whichever limit is hit first.
        executor / workers / ray_address: see :func:`shard_tools.executors.map_unordered`.
        keep_work: keep ``OUT/.work`` (encoded videos and records) after success.
        progress: show the tqdm bar.
        source: how the inputs were listed (kind + arguments), recorded so ``verify`` can re-list.
        sync_every / sync_seconds / segment_bytes: journal durability batches and payload segment
            size (:class:`shard_tools.journal.WorkJournal`).
        process: the per-input function (default :func:`shard_tools.encode.process_video`); the
            scale benchmark swaps in a near-free stand-in. Not part of the fingerprint.
        fetch_bytes: URL inputs: the inputs in flight are fetched to local disk, and their sizes
            sum to at most this (one larger input runs alone).
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
    sync_every: int = 256
    sync_seconds: float = 1.0
    segment_bytes: int = 64 << 20
    process: Callable | None = None
    upload_to: str | None = None
    fetch_bytes: int = 4 << 30

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


# Under the job's .work: where pool workers put fetched copies of URL inputs (deleted per input).
FETCH_FOLDER = "fetch"


def _log(message: str) -> None:
    print(f"[shard_tools] {message}", file=sys.stderr, flush=True)


def _remove_temporaries(folder: Path) -> None:
    if folder.exists():
        for tmp in folder.glob("*.tmp"):
            tmp.unlink()


def run_shard_job(listing: SourceListing, job: ShardJob) -> Manifest:
    """Run (or resume, or confirm) a sharding job; return the manifest."""
    preflight(job.settings)
    out_dir = Path(job.out_dir)
    work_dir = out_dir / ".work"
    fingerprint = job_fingerprint(listing, job)
    output = BucketOutput(job.upload_to, out_dir) if job.upload_to else FolderOutput(out_dir)

    manifest = output.finished(fingerprint, resumable=work_dir.exists())
    if manifest is not None:
        _log(f"{output.describe()}: already complete ({manifest.totals})")
        if job.upload_to and work_dir.exists() and not job.keep_work:
            output.cleanup(work_dir)  # a kill after the manifest's upload left the work folder
        return manifest
    out_dir.mkdir(parents=True, exist_ok=True)

    job_file = work_dir / "job.json"
    if job_file.exists():
        if json.loads(job_file.read_text()).get("job_fingerprint") != fingerprint:
            raise ValueError(f"{out_dir}/.work belongs to an unfinished job with other arguments or "
                             "inputs; rerun that job or write to a new folder")
    else:
        work_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(job_file, {"job_fingerprint": fingerprint})
    _remove_temporaries(out_dir)
    _remove_temporaries(work_dir)
    shutil.rmtree(work_dir / FETCH_FOLDER, ignore_errors=True)  # copies a killed run's workers left

    journal = WorkJournal(work_dir, sync_every=job.sync_every, sync_seconds=job.sync_seconds,
                          segment_bytes=job.segment_bytes, keep=job.keep_work)
    writer = _ShardWriter(listing, job, journal, output)
    try:
        if job.shard_max_bytes:
            # Sizes are known only once every video is encoded: encode all, then plan and write.
            writer.encode(listing.inputs)
            sizes = {k: estimate_sample_bytes(k, job.settings.extension, r["payload"][2], r["record"])
                     for k, r in writer.records.items() if r["ok"]}
            plan = plan_shards(sizes, seed=job.seed, max_samples=job.shard_max_samples,
                               max_bytes=job.shard_max_bytes)
            writer.set_plan(plan)
            writer.encode(listing.inputs)  # only inputs whose encoded bytes were lost in a crash
        else:
            # A shard is a fixed group of inputs (seeded shuffle of the sorted keys): each is written as
            # soon as its inputs are done, and its encoded videos leave .work with their segment.
            plan = plan_shards({v.key: 0 for v in listing.inputs}, seed=job.seed,
                               max_samples=job.shard_max_samples, max_bytes=None)
            writer.set_plan(plan)
            by_key = {v.key: v for v in listing.inputs}
            writer.encode([by_key[k] for shard in plan for k in shard.keys])
    finally:
        journal.close()
    manifest = writer.finish(fingerprint)
    output.publish_final()
    if not job.keep_work:
        output.cleanup(work_dir)
    return manifest


class _ShardWriter:
    """Finished inputs (journal) and the shards built from them.

    Shard readiness is incremental: each planned shard counts its inputs without a record, every
    completion decrements one counter, and the shard is written when its counter reaches zero.
    Records of written samples leave memory (the manifest entry keeps what the manifest needs).
    """

    def __init__(self, listing: SourceListing, job: ShardJob, journal: WorkJournal,
                 output: FolderOutput | BucketOutput):
        self.listing, self.job, self.journal, self.output = listing, job, journal, output
        self.out_dir = Path(job.out_dir)
        self.extension = job.settings.extension
        self.records: dict[str, dict] = journal.load()
        journal.open(self.records)
        self.plan: list[PlannedShard] = []
        self.shard_index: dict[str, int] = {}
        self.remaining: dict[int, int] = {}
        self.entries: dict[int, ShardEntry | None] = {}

    def set_plan(self, plan: list[PlannedShard]) -> None:
        """Take the plan; write the shards whose inputs were all done before a kill (or are done now).

        A done input whose encoded bytes did not survive (a crash before their fsync) and whose shard
        is not on disk loses its record here and is processed again by the next :meth:`encode`.
        """
        self.plan = plan
        assert all(shard.index == i for i, shard in enumerate(plan))
        self.shard_index = {k: shard.index for shard in plan for k in shard.keys}
        for shard in plan:
            self.remaining[shard.index] = sum(k not in self.records for k in shard.keys)
            if self.remaining[shard.index] == 0:
                self._write_ready(shard, validate=True)
        self.journal.delete_unneeded_segments()

    def encode(self, items: list[VideoInput]) -> None:
        """Process every input without a record, in the given order (shard order)."""
        todo = [item for item in items if not self._done(item.key)]
        if not todo:
            return
        quarantined = len(self.listing.rejected) + sum(not r["ok"] for r in self.records.values())
        done = len(self.listing.inputs) - len(todo)
        if done:
            _log(f"resuming: {done} of {len(self.listing.inputs)} videos already done")
        bar = tqdm(total=len(self.listing.inputs), initial=done, unit="video", dynamic_ncols=True,
                   disable=not self.job.progress, desc="shard")
        bar.set_postfix(quarantined=quarantined)
        process = self.job.process or process_video
        if is_url(todo[0].path):
            # Workers fetch URL inputs to local disk: bound the bytes in flight. Pool workers share
            # this machine's work folder; a Ray node uses its own temp folder.
            fetch_dir = None if self.job.executor == "ray" else str(self.journal.work_dir / FETCH_FOLDER)
            tasks = ((item, self.job.settings, fetch_dir) for item in todo)
            sizes = self.listing.sizes
            window = {"cost": lambda task: sizes.get(task[0].path, 0), "max_cost": self.job.fetch_bytes}
        else:
            tasks, window = ((item, self.job.settings) for item in todo), {}
        for outcome in map_unordered(process, tasks, executor=self.job.executor, workers=self.job.workers,
                                     ray_address=self.job.ray_address, **window):
            entry = self.journal.append(outcome.key, outcome.ok, outcome.record,
                                        outcome.payload if outcome.ok else None)
            self.records[outcome.key] = entry
            index = self.shard_index.get(outcome.key)
            if index is not None:
                self.remaining[index] -= 1
                if self.remaining[index] == 0:
                    self._write_ready(self.plan[index], validate=False)
            bar.update(1)
            if not outcome.ok:  # a postfix refresh per input would cost more than the bookkeeping
                quarantined += 1
                bar.set_postfix(quarantined=quarantined, refresh=False)
        bar.close()

    def _done(self, key: str) -> bool:
        return key in self.records or self.shard_index.get(key, -1) in self.entries

    def _payloads(self, keys: list[str]):
        for k in keys:
            data = self.journal.read_payload(self.records[k])
            if data is None:
                raise RuntimeError(f"the encoded bytes of {k} in {self.journal.work_dir} are damaged")
            yield k, data

    def _write_ready(self, shard: PlannedShard, *, validate: bool) -> None:
        """Write (or confirm) a shard whose inputs all have records.

        validate: check every payload before writing (records read back from a journal); a payload
        that is gone or damaged drops its record, so the input is processed again.
        """
        keys = [k for k in shard.keys if self.records[k]["ok"]]
        if not keys:  # every input of this group was quarantined: no shard file
            self.entries[shard.index] = None
            return
        samples = {k: self.records[k]["record"] for k in keys}
        tar_name = shard_file_name(self.job.name, self.listing.split, shard.index)
        tar_path, idx_path = self.out_dir / tar_name, self.out_dir / index_file_name(tar_name)
        size = self.output.published_bytes(tar_name, keys)
        if size is None:
            complete = tar_path.exists() and idx_path.exists() and shard_keys(tar_path) == keys
            if not complete:
                if validate:
                    lost = [k for k in keys if self.journal.read_payload(self.records[k]) is None]
                    if lost:
                        for k in lost:
                            del self.records[k]
                        self.remaining[shard.index] = len(lost)
                        return
                members = (sample_members(k, self.extension, data, samples[k])
                           for k, data in self._payloads(keys))
                write_shard(tar_path, idx_path, members)
            size = self.output.publish_shard(tar_path, idx_path, keys)
        self.journal.release(self.records[k] for k in keys)
        for k in keys:  # the manifest entry below keeps what the manifest needs
            del self.records[k]
        self.entries[shard.index] = ShardEntry(
            path=tar_name, idx_path=idx_path.name, num_samples=len(keys), bytes=size,
            keys=keys, sources=[samples[k]["source"] for k in keys],
            num_frames=sum(samples[k]["num_frames"] for k in keys))

    def finish(self, fingerprint: str) -> Manifest:
        """Write quarantine.jsonl and manifest.json (the invariant is checked before publishing)."""
        listing, job = self.listing, self.job
        unwritten = [s.index for s in self.plan if s.index not in self.entries]
        if unwritten:
            raise AssertionError(f"shards {unwritten[:5]} were never written")
        shard_entries = [self.entries[s.index] for s in self.plan if self.entries[s.index] is not None]
        num_samples = sum(e.num_samples for e in shard_entries)
        quarantine = [quarantine_entry(r.input_id, r.key, r.source, r.stage, r.reason, r.detail)
                      for r in listing.rejected]
        quarantine += [r["record"] for r in self.records.values() if not r["ok"]]
        quarantine.sort(key=lambda q: q["input_id"])
        if num_samples + len(quarantine) != listing.num_inputs:
            raise AssertionError(f"{num_samples} samples + {len(quarantine)} quarantined != "
                                 f"{listing.num_inputs} inputs")
        write_jsonl(self.out_dir / QUARANTINE_NAME, quarantine)
        manifest = Manifest(
            tool_version=__version__,
            name=job.name, dataset=listing.dataset, split=listing.split,
            codec=job.settings.codec, container=job.settings.container, extension=self.extension,
            encode=job.settings.to_dict(),
            seed=job.seed,
            shard_size=ShardSize(max_samples=job.shard_max_samples, max_bytes=job.shard_max_bytes),
            label_map=dict(listing.label_map),
            shards=shard_entries,
            totals=Totals(inputs=listing.num_inputs, samples=num_samples, quarantined=len(quarantine),
                          shards=len(shard_entries), frames=sum(e.num_frames for e in shard_entries),
                          bytes=sum(e.bytes for e in shard_entries)),
            quarantine=QuarantineSummary(
                path=QUARANTINE_NAME, by_reason=dict(sorted(Counter(q["reason"] for q in quarantine).items()))),
            source=dict(job.source),
            job_fingerprint=fingerprint,
        )
        write_manifest(self.out_dir, manifest)
        return manifest
