"""DALI-backed loader: dict of view tensors per step, exact resume, rank sharding, corrupt-sample skip.

Data flow per step: the reader pipeline (checkpointable) yields a batch of encoded videos + json;
this module draws each sample's plan (``views.plan_sample``) and feeds the views pipeline through its
external source; the views pipeline decodes each video once and emits every view.

Position: ``(epoch, step, reader checkpoint after the last delivered batch)``. Each epoch builds a
fresh reader with a seed from (seed, epoch, rank) and shard ``(shard_id + epoch) % num_shards``
(ranks rotate through the data as DALI's own readers do), so an epoch's order depends only on those.
Plans depend only on (seed, epoch, key), so a restored loader makes the same next batches.

Damaged samples: a member whose decode delivers fewer real frames than its plan needs (bytes
damaged mid-stream, or truncated: the decoder pads instead of failing, see graph.py) is dropped from
its batch after the run, logged with key and shard, counted in ``stats["decode_failures"]`` and
remembered in ``bad_keys``. When the views pipeline raises (a video the decoder cannot read), every batch that
was fed but not yet delivered is checked sample by sample with a one-sample decode pipeline; samples
that fail are logged with key and shard, counted in ``stats`` and dropped from their batch (the
batch comes out smaller), the views pipeline is rebuilt and the batches are fed again.
"""

from __future__ import annotations

import collections
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import nvidia.dali.types as types
import torch
from nvidia.dali.plugin.pytorch import feed_ndarray

from .config import DataConfig
from .graph import decode_only_pipeline, reader_pipeline, views_pipeline
from .views import SamplePlan, plan_sample, recipe_views

log = logging.getLogger(__name__)

DALI_OUTPUT_DTYPE = {"float32": types.FLOAT, "float16": types.FLOAT16, "bfloat16": types.FLOAT16}
TORCH_DTYPE = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class ShardSet:
    """The shards a manifest lists, resolved to absolute paths."""

    folder: Path
    codec: str
    paths: list[str]
    index_paths: list[str]
    num_samples: list[int]
    label_map: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.num_samples)


def read_shard_set(folder: str | os.PathLike) -> ShardSet:
    """Read ``manifest.json`` in ``folder``; errors name the file and what is wrong."""
    folder = Path(folder)
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path}: no manifest.json in the shard folder "
                                f"(write shards with `python -m shard_tools`)")
    try:
        manifest = json.loads(manifest_path.read_text())
        codec = manifest["codec"]
        shards = manifest["shards"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{manifest_path}: not a shard manifest ({err!r})") from err
    if not shards:
        raise ValueError(f"{manifest_path}: lists no shards")
    paths, index_paths, counts = [], [], []
    for entry in shards:
        tar = _resolve(folder, entry["path"])
        idx = _resolve(folder, entry.get("idx_path") or str(Path(entry["path"]).with_suffix(".idx")))
        for p in (tar, idx):
            if not p.is_file():
                raise FileNotFoundError(f"{manifest_path}: lists {p}, which does not exist")
        paths.append(str(tar))
        index_paths.append(str(idx))
        counts.append(int(entry["num_samples"]))
    return ShardSet(folder, codec, paths, index_paths, counts, manifest.get("label_map", {}))


def _resolve(folder: Path, path: str) -> Path:
    p = Path(path)
    if p.is_absolute():
        return p
    # Manifests store paths relative to the shard folder; accept folder-prefixed ones too.
    return folder / p if (folder / p).exists() or not p.exists() else p


def resolve_device(device: str) -> str:
    """``auto`` -> ``mixed`` (NVDEC) when a GPU is visible, else ``cpu``."""
    if device == "auto":
        return "mixed" if torch.cuda.is_available() else "cpu"
    return device


def check_codec(shards: ShardSet, device: str) -> None:
    if shards.codec == "h264" and device == "cpu":
        raise ValueError(
            f"{shards.folder / 'manifest.json'}: shards are H.264, which DALI's CPU video decoder "
            f"cannot read (support was dropped in DALI 2.1); use a GPU (data.device='mixed' or 'auto') "
            f"or reshard with `python -m shard_tools ... --codec vp9`")
    if shards.codec not in ("vp9", "h264"):
        raise ValueError(f"{shards.folder / 'manifest.json'}: unknown codec {shards.codec!r} (vp9 | h264)")


def shard_range(total: int, shard_id: int, num_shards: int) -> tuple[int, int]:
    """Sample range DALI's readers give to ``shard_id`` of ``num_shards``."""
    return total * shard_id // num_shards, total * (shard_id + 1) // num_shards


@dataclass
class _Batch:
    """One reader batch on its way through the views pipeline."""

    step: int
    keys: list[str]
    shards: list[str]
    labels: list[int]
    encoded: list[np.ndarray]
    plans: list[SamplePlan]
    reader_checkpoint: str

    def decode_inputs(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """The decoder's external-source inputs: encoded videos and the frames each must give."""
        return self.encoded, [p.frames for p in self.plans]

    def view_inputs(self, slots: list[str], views: list) -> list[list[np.ndarray]]:
        """The views' external-source inputs: frame positions per slot, then parameters per view."""
        positions = [[p.positions[slot] for p in self.plans] for slot in slots]
        return positions + [[p.params[v.name] for p in self.plans] for v in views]

    def drop(self, bad: set[str]) -> "_Batch":
        keep = [i for i, k in enumerate(self.keys) if k not in bad]
        columns = (self.keys, self.shards, self.labels, self.encoded, self.plans)
        return _Batch(self.step, *([column[i] for i in keep] for column in columns), self.reader_checkpoint)


class DALILoader:
    """Iterable of ``{view_name: (B, C, T, H, W), "label": (B,), "key": [str]}`` dicts.

    Args:
        cfg: data configuration.
        batch_size: samples per step per rank.
        shard_id, num_shards: this rank and the world size; ranks read disjoint samples.
        seed: base seed for shuffling, frame plans and augmentation.
    """

    def __init__(self, cfg: DataConfig, *, batch_size: int, shard_id: int = 0, num_shards: int = 1,
                 seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= shard_id < num_shards:
            raise ValueError(f"shard_id must be in [0, {num_shards}), got {shard_id}")
        self.cfg = cfg
        self.batch_size = batch_size
        self.shard_id, self.num_shards, self.seed = shard_id, num_shards, seed
        self.shards = read_shard_set(cfg.shards)
        self.device = resolve_device(cfg.device)
        check_codec(self.shards, self.device)
        if self.shards.total < num_shards:
            raise ValueError(f"{cfg.shards}: {self.shards.total} samples cannot feed {num_shards} ranks")
        self.views = recipe_views(cfg)
        self.view_names = [v.name for v in self.views]
        self.slots = list(dict.fromkeys(v.slot for v in self.views))
        self.epoch = 0
        self._resume: dict[str, Any] | None = None
        self._position: dict[str, Any] = {"epoch": 0, "step": 0, "reader_checkpoint": None}
        self.bad_keys: set[str] = set()
        self.stats: dict[str, Any] = {"decode_failures": 0, "skipped_keys": [], "samples": 0,
                                      "steps": 0, "pipeline_rebuilds": 0}

    # ----------------------------------------------------------------- epoch bookkeeping
    def _epoch_shard(self, epoch: int) -> int:
        return (self.shard_id + epoch) % self.num_shards

    def _shard_size(self, shard: int) -> int:
        lo, hi = shard_range(self.shards.total, shard, self.num_shards)
        return hi - lo

    def steps_in_epoch(self, epoch: int) -> int:
        if self.cfg.drop_last:
            smallest = min(self._shard_size(s) for s in range(self.num_shards))
            return smallest // self.batch_size
        return -(-self._shard_size(self._epoch_shard(epoch)) // self.batch_size)

    def __len__(self) -> int:
        return self.steps_in_epoch(self.epoch)

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` on the next iteration (new shuffle order, new plans, rotated shard)."""
        self.epoch = epoch
        if self._resume is not None and self._resume["epoch"] == epoch:
            return  # a restored position inside this epoch: keep it (trainers call set_epoch each epoch)
        self._resume = None
        self._position = {"epoch": epoch, "step": 0, "reader_checkpoint": None}

    def state_dict(self) -> dict[str, Any]:
        """Picklable position after the last delivered batch."""
        return {"epoch": self._position["epoch"], "step": self._position["step"],
                "reader_checkpoint": self._position["reader_checkpoint"], "seed": self.seed,
                "shard_id": self.shard_id, "num_shards": self.num_shards,
                "bad_keys": sorted(self.bad_keys)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["shard_id"], state["num_shards"]) != (self.shard_id, self.num_shards):
            raise ValueError(f"loader state is for shard {state['shard_id']} of {state['num_shards']}, "
                             f"this loader is shard {self.shard_id} of {self.num_shards}")
        self.seed = state["seed"]
        self.epoch = state["epoch"]
        self.bad_keys = set(state.get("bad_keys", []))
        self._position = {k: state[k] for k in ("epoch", "step", "reader_checkpoint")}
        self._resume = dict(self._position)

    # ----------------------------------------------------------------- pipelines
    def _reader_seed(self, epoch: int) -> int:
        return (self.seed * 1_000_003 + epoch * 7_919 + self.shard_id * 104_729) % (2**31 - 1)

    def _build_reader(self, epoch: int, checkpoint: str | None):
        pipe = reader_pipeline(
            self.shards.paths, self.shards.index_paths, self._epoch_shard(epoch), self.num_shards,
            self.cfg.shuffle, self.cfg.shuffle_buffer, self._reader_seed(epoch),
            batch_size=self.batch_size, num_threads=1, device_id=None, seed=self._reader_seed(epoch),
            prefetch_queue_depth=2, checkpoint=checkpoint)
        pipe.build()
        return pipe

    def _device_id(self) -> int | None:
        return torch.cuda.current_device() if self.device == "mixed" else None

    def _build_views(self, source):
        pipe = views_pipeline(
            source, self.views, self.slots, self.device, self.cfg.augment, tuple(self.cfg.mean),
            tuple(self.cfg.std), DALI_OUTPUT_DTYPE[self.cfg.dtype], batch_size=self.batch_size,
            num_threads=self.cfg.num_threads, device_id=self._device_id(), seed=self.seed,
            prefetch_queue_depth=self.cfg.prefetch, exec_dynamic=True)
        pipe.build()
        return pipe

    # ----------------------------------------------------------------- iteration
    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch = self.epoch
        resume = self._resume if self._resume and self._resume["epoch"] == epoch else None
        self._resume = None
        start_step = resume["step"] if resume else 0
        checkpoint = resume["reader_checkpoint"] if resume else None
        feeder = _Feeder(self, epoch, start_step, checkpoint)
        pipe = self._build_views(feeder)
        while True:
            try:
                outputs = pipe.run()
            except StopIteration:
                break
            except RuntimeError as err:
                feeder.recover(err)
                del pipe
                pipe = self._build_views(feeder)
                continue
            batch = feeder.delivered()
            self._position = {"epoch": epoch, "step": batch.step + 1,
                              "reader_checkpoint": batch.reader_checkpoint}
            views, keep = outputs[:-1], self._check_frames(outputs[-1], batch)
            if not keep:
                continue
            self.stats["samples"] += len(keep)
            self.stats["steps"] += 1
            yield self._to_torch(views, batch, keep)
        # A completed epoch moves the position to the start of the next one.
        self.epoch = epoch + 1
        self._position = {"epoch": epoch + 1, "step": 0, "reader_checkpoint": None}

    def _check_frames(self, check, batch: _Batch) -> list[int]:
        """Indices of the samples whose decode delivered every planned frame; the others (damaged
        mid-stream or truncated members: graph.frames_check is 0) are reported, counted and
        remembered as bad, like samples the decoder rejects outright."""
        if self.device != "cpu":
            check = check.as_cpu()
        distance = np.array(check.as_tensor()).reshape(-1)
        keep = []
        for i, (key, shard, plan) in enumerate(zip(batch.keys, batch.shards, batch.plans)):
            if distance[i] > 0:
                keep.append(i)
                continue
            self._report_bad(key, shard, f"the decoder delivered fewer real frames than the plan needs "
                                         f"(frame {int(plan.frames[-1])})")
        return keep

    def _report_bad(self, key: str, shard: str, reason: str) -> None:
        self.bad_keys.add(key)
        self.stats["decode_failures"] += 1
        self.stats["skipped_keys"].append({"key": key, "shard": shard})
        log.warning("skipping sample %s of %s: %s", key, shard, reason)

    def _to_torch(self, outputs, batch: _Batch, keep: list[int]) -> dict[str, Any]:
        whole = len(keep) == len(batch.keys)
        index = None if whole else torch.tensor(keep, dtype=torch.long)
        out: dict[str, Any] = {}
        for view, tensor_list in zip(self.views, outputs):
            dense = tensor_list.as_tensor()  # (B, C, T, H, W): every sample of a view has one shape
            if self.device == "cpu":
                # Zero-copy: DALI's dynamic executor (the default, checked in _build_views) gives every
                # iteration fresh output memory that lives as long as a reference to it, so no
                # later run() overwrites it. Copying here cost ~100 ms per SVT batch.
                tensor = torch.from_dlpack(dense)
            else:
                tensor = torch.empty(dense.shape(), dtype=_dali_torch_dtype(self.cfg.dtype),
                                     device=torch.device("cuda", self._device_id()))
                feed_ndarray(dense, tensor, cuda_stream=torch.cuda.current_stream())
            tensor = tensor if whole else tensor.index_select(0, index.to(tensor.device))
            out[view.name] = tensor.to(TORCH_DTYPE[self.cfg.dtype])
        out["label"] = torch.tensor([batch.labels[i] for i in keep], dtype=torch.long)
        out["key"] = [batch.keys[i] for i in keep]
        return out


def _dali_torch_dtype(dtype: str) -> torch.dtype:
    return torch.float32 if dtype == "float32" else torch.float16


class _Feeder:
    """External-source callback of the views pipeline: pulls reader batches and plans them.

    Keeps every batch fed but not yet delivered, so that after a pipeline rebuild they are fed again
    in the same order.
    """

    def __init__(self, loader: DALILoader, epoch: int, start_step: int, checkpoint: str | None):
        self.loader = loader
        self.epoch = epoch
        self.next_step = start_step
        self.steps = loader.steps_in_epoch(epoch)
        self.shard_size = loader._shard_size(loader._epoch_shard(epoch))
        self.reader = loader._build_reader(epoch, checkpoint) if start_step < self.steps else None
        self.in_flight: collections.deque[_Batch] = collections.deque()
        self.replay: collections.deque[_Batch] = collections.deque()

    def __call__(self):
        while True:
            batch = self.replay.popleft() if self.replay else self._read()
            self.in_flight.append(batch)
            if batch.keys:
                return self._feed(batch)
            # Every sample of this batch was bad: deliver it as "nothing" without running the graph.
            # (Cannot feed an empty batch; it is popped when the next real batch is delivered.)

    def _read(self) -> _Batch:
        if self.next_step >= self.steps:
            raise StopIteration
        encoded, meta, source_info = self.reader.run()
        checkpoint = self.reader.checkpoint()
        step = self.next_step
        self.next_step += 1
        # The last batch of a shard is padded by repeating its last sample: cut the padding off.
        real = min(self.loader.batch_size, self.shard_size - step * self.loader.batch_size)
        batch = _Batch(step, [], [], [], [], [], checkpoint)
        for i in range(real):
            info = np.array(source_info[i]).tobytes().decode(errors="replace")
            shard = info.split(":")[0]
            record = _parse_meta(np.array(meta[i]).tobytes(), shard)
            key = record["key"]
            if key in self.loader.bad_keys:
                continue
            batch.keys.append(key)
            batch.shards.append(shard)
            batch.labels.append(int(record.get("label", -1)))
            batch.encoded.append(np.array(encoded[i]))
            batch.plans.append(plan_sample(
                self.loader.cfg, self.loader.views, seed=self.loader.seed, epoch=self.epoch, key=key,
                num_frames=int(record["num_frames"]), fps=float(record.get("fps", 30.0)),
                width=int(record["width"]), height=int(record["height"])))
        return batch

    def _feed(self, batch: _Batch):
        return (*batch.decode_inputs(), *batch.view_inputs(self.loader.slots, self.loader.views))

    def delivered(self) -> _Batch:
        """The batch whose views the pipeline just returned (skipping all-bad batches before it)."""
        batch = self.in_flight.popleft()
        while not batch.keys:
            self.loader._position = {"epoch": self.epoch, "step": batch.step + 1,
                                     "reader_checkpoint": batch.reader_checkpoint}
            batch = self.in_flight.popleft()
        return batch

    def recover(self, err: Exception) -> None:
        """After a decoder error: find the bad samples among undelivered batches, drop, re-feed."""
        pending = list(self.in_flight)
        self.in_flight.clear()
        bad: set[str] = set()
        for batch in pending:
            for key, shard, encoded, plan in zip(batch.keys, batch.shards, batch.encoded, batch.plans):
                if not _decodes(encoded, plan.frames, self.loader.device, self.loader._device_id()):
                    bad.add(key)
                    self.loader._report_bad(key, shard, "the video decoder cannot read it")
        if not bad:
            err.add_note("pipelines: every pending sample decodes on its own, so this is not a "
                         "corrupt-sample error; not retrying")
            raise err
        self.loader.stats["pipeline_rebuilds"] += 1
        self.replay.extendleft(reversed([b.drop(bad) for b in pending]))


def _parse_meta(raw: bytes, shard: str) -> dict[str, Any]:
    """The sample's .json, checked for what the frame plan needs; errors name the shard and key."""
    try:
        record = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"{shard}: a sample's .json is not valid JSON ({err})") from err
    if not isinstance(record, dict) or not isinstance(record.get("key"), str):
        raise ValueError(f"{shard}: a sample's .json has no string 'key' (shard contract metadata)")
    for name in ("num_frames", "width", "height"):
        value = record.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{shard}: sample {record['key']}: .json field {name!r} must be a positive "
                             f"integer, got {value!r}")
    return record


def _decodes(encoded: np.ndarray, frames: np.ndarray, device: str, device_id: int | None) -> bool:
    """Whether one video decodes alone (a fresh one-sample pipeline; errors invalidate pipelines)."""
    def source():
        return [encoded], [frames]
    pipe = decode_only_pipeline(source, device, batch_size=1, num_threads=1, device_id=device_id,
                                prefetch_queue_depth=1, exec_async=False, exec_pipelined=False)
    try:
        pipe.build()
        pipe.run()
        return True
    except RuntimeError:
        return False
    finally:
        del pipe
