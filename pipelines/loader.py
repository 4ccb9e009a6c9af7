"""DALI-backed loader: dict of view tensors per step, one global sample order, elastic exact resume.

Data flow per step: this module takes the rank's slice of the data step from the global order
(``order.GlobalOrder``: a seeded permutation per epoch, independent of the world size), reads each
sample's json and video with one positioned or ranged read (``member_reads``, offsets from the DALI
``.idx``; a local folder or a URL, ``storage``), draws its plan (``views.plan_sample``) and feeds the
views pipeline through its external source; the views pipeline decodes each video once and emits
every view. Reads and plans of the next ``data.read_ahead_steps`` steps run on the read-ahead's
threads (``read_ahead``) while the current step decodes; they reach the pipeline in the same order.

Position (``position.Position``, shared with the baseline loader): ``(epoch, data step)`` plus the
keys found bad so far -- the same value on every rank, so a run saved on W ranks resumes on any W'
that divides the global batch, at the next data step, with the same samples. Plans depend only on
(seed, epoch, key).

Bad samples keep batch sizes fixed: each is replaced by the first readable spare of its position
(``GlobalOrder.spare_candidates``), logged with key, shard and step, counted, and its key kept in
``bad_keys`` (part of the position), so a resume makes the same replacement without decoding it.
A sample is bad when a member cannot be read (after the storage's retries), when the decoder raises
on it, or when its decode delivers fewer real frames than
its plan needs (damaged mid-stream or truncated: the decoder pads instead of failing, see graph.py's
``frames_check``). When the views pipeline raises, every batch fed but not yet delivered is checked
sample by sample with a one-sample decode pipeline, bad samples are replaced in those batches, the
pipeline is rebuilt and they are fed again. A padded sample is found after its batch ran; its spare
goes through a one-sample views pipeline and is put in its place. Only data errors make a sample bad:
a device error (CUDA, out of memory, NVDEC) stops the iteration with ``DecoderDeviceError`` before the
position records anything (decode_errors.py).

Repeated sampling (``data.repeats: R``): a rank's batch of B view-sets holds B / R videos (the order
counts videos); the views pipeline runs on those videos, decodes each once and returns R view-sets
of it, which become rows ``i*R .. i*R + R-1`` of every view tensor (video-major), with the video's
``key``, ``label`` and ``video_id`` on each row and ``repeat`` = 0 .. R-1. A bad video is replaced by a
spare with all R view-sets.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import nvidia.dali.types as types
import torch
from nvidia.dali.plugin.pytorch import feed_ndarray
from common.precision import torch_dtype
from storage import join

from .config import DataConfig
from .decode_errors import DecoderDeviceError, decode_error_kind
from .graph import decode_only_pipeline, views_pipeline
from .member_reads import Found, MemberReader, UnusableSample, first_readable
from .position import PositionedLoader
from .read_ahead import rank_read_ahead
from .shard_index import IndexedSample, ShardSet
from .views import SamplePlan, plan_sample, recipe_views


# DALI has no bfloat16: a bf16 recipe's graph emits float16 (half the bytes of float32, and its 10-bit
# mantissa holds every bf16 value of a normalized pixel), converted once to torch_dtype(cfg.dtype).
DALI_OUTPUT_DTYPE = {"float32": types.FLOAT, "float16": types.FLOAT16, "bfloat16": types.FLOAT16}


def resolve_device(device: str) -> str:
    """``auto`` -> ``mixed`` (NVDEC) when a GPU is visible, else ``cpu``."""
    if device == "auto":
        return "mixed" if torch.cuda.is_available() else "cpu"
    return device


def check_codec(shards: ShardSet, device: str) -> None:
    if shards.codec == "h264" and device == "cpu":
        raise ValueError(
            f"{join(shards.folder, 'manifest.json')}: shards are H.264, which DALI's CPU video decoder "
            f"cannot read (support was dropped in DALI 2.1); use a GPU (data.device='mixed' or 'auto') "
            f"or reshard with `python -m shard_tools ... --codec vp9`")
    if shards.codec not in ("vp9", "h264"):
        raise ValueError(f"{join(shards.folder, 'manifest.json')}: unknown codec {shards.codec!r} (vp9 | h264)")


# NVDEC decodes VP9 frames of at least 128x128 (NVIDIA's Video Codec SDK documentation; not verified
# here): a smaller sample on `mixed` would fail the whole graph, so it is replaced before decoding.
NVDEC_VP9_MIN_SIDE = 128


def decoder_min_side(device: str, codec: str) -> int:
    """The smallest frame side the graph's video decoder reads (0: no limit): NVDEC's for VP9 on
    ``mixed``; DALI's CPU decoder has none."""
    return NVDEC_VP9_MIN_SIDE if device == "mixed" and codec == "vp9" else 0


@dataclass
class _Sample:
    """One sample read and planned: what the views graph needs, and where it came from."""

    position: int
    sample_id: int      # the video's index in the manifest: its id in the batch (``video_id``)
    key: str
    shard: str
    label: int
    encoded: np.ndarray
    plan: SamplePlan


@dataclass
class _Batch:
    """One rank batch of a data step on its way through the views pipeline."""

    step: int
    samples: list[_Sample]

    @property
    def keys(self) -> list[str]:
        return [s.key for s in self.samples]

    def decode_inputs(self, guard: bool = False) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """The decoder's external-source inputs: encoded videos and the frames each must give
        (``guard``: the last frame once more, graph.py's ``frames_guard``)."""
        frames = [s.plan.frames for s in self.samples]
        if guard:
            frames = [np.append(f, f[-1]).astype(f.dtype) for f in frames]
        return [s.encoded for s in self.samples], frames

    def view_inputs(self, slots: list[str], views: list) -> list[list[np.ndarray]]:
        """The views' external-source inputs, per view-set (repeat index): frame positions per slot,
        then parameters per view."""
        inputs = []
        for r in range(len(self.samples[0].plan.view_sets)):
            sets = [s.plan.view_sets[r] for s in self.samples]
            inputs += [[v.positions[slot] for v in sets] for slot in slots]
            inputs += [[v.params[view.name] for v in sets] for view in views]
        return inputs

    def rows(self, repeats: int) -> dict[str, Any]:
        """Per row of the output batch (each video's ``repeats`` view-sets next to each other): its
        video's label, key and id, and its repeat index."""
        return {"label": torch.tensor([s.label for s in self.samples], dtype=torch.long).repeat_interleave(repeats),
                "key": [s.key for s in self.samples for _ in range(repeats)],
                "video_id": torch.tensor([s.sample_id for s in self.samples],
                                         dtype=torch.long).repeat_interleave(repeats),
                "repeat": torch.arange(repeats).repeat(len(self.samples))}


class DALILoader(PositionedLoader):
    """Iterable of ``{view_name: (B, C, T, H, W), "label": (B,), "key": [str], "video_id": (B,),
    "repeat": (B,), "data_step": (epoch, step)}``.

    Args:
        cfg: data configuration.
        batch_size: view-sets per step per rank (``batch_size / cfg.repeats`` videos); the global
            batch is ``batch_size * num_shards``.
        shard_id, num_shards: this rank and the world size; rank r takes slice r of every data step.
        seed: base seed for the order, frame plans and augmentation.
    """

    def __init__(self, cfg: DataConfig, *, batch_size: int, shard_id: int = 0, num_shards: int = 1,
                 seed: int = 0):
        self._open(cfg, batch_size=batch_size, shard_id=shard_id, num_shards=num_shards, seed=seed)
        self.stats["pipeline_rebuilds"] = 0
        self.device = resolve_device(cfg.device)
        check_codec(self.shards, self.device)
        self.min_side = decoder_min_side(self.device, self.shards.codec)
        # NVDEC can leave a frame's output slot unwritten: the mixed graph checks a guard copy of the
        # last frame (graph.py); settable so the CPU graph can run the same check in tests
        self.frames_guard = self.device == "mixed"
        # fault-injection point for tests: called with the keys of every batch handed to a DALI
        # pipeline and where ("batch", "spare", "alone"), inside the pipeline's external source, so
        # an exception raised here comes out of pipe.run() as a decoder failure would
        self.feed_hook: Callable[[list[str], str], None] | None = None
        self.index: list[IndexedSample] = self.shards.sample_index()
        self.repeats = cfg.repeats
        self.videos_per_batch = batch_size // cfg.repeats
        self.reader = MemberReader(self.store)
        self.read_ahead_stats: dict[str, Any] = {}
        self.views = recipe_views(cfg)
        self.view_names = [v.name for v in self.views]
        self.slots = list(dict.fromkeys(v.slot for v in self.views))

    # ----------------------------------------------------------------- samples
    def _read(self, sample_id: int, position: int, epoch: int) -> _Sample:
        """One sample read and planned (on a read-ahead thread); ``UnusableSample`` if it cannot be."""
        entry = self.index[sample_id]
        record, video = self.reader.read_sample(entry)
        if record["key"] != entry.key:
            raise ValueError(f"{entry.shard}: member {entry.key}.json names key {record['key']!r}")
        if min(int(record["width"]), int(record["height"])) < self.min_side:
            raise UnusableSample(f"{record['width']}x{record['height']} is below the decoder's minimum side "
                                 f"{self.min_side} (NVDEC, VP9); shard with --min-side {self.min_side}")
        plan = plan_sample(self.cfg, self.views, seed=self.position.seed, epoch=epoch, key=entry.key,
                           num_frames=int(record["num_frames"]), fps=float(record.get("fps", 30.0)),
                           width=int(record["width"]), height=int(record["height"]))
        encoded = np.frombuffer(video, dtype=np.uint8)
        return _Sample(position, sample_id, entry.key, entry.shard, int(record.get("label", -1)), encoded, plan)

    def _fetch(self, epoch: int, position: int) -> Found[_Sample]:
        """The first usable sample of ``position`` (its own, then its spares), read and planned.
        Thread-safe: it only reads the position's bad keys; ``_take`` records what it found."""
        return first_readable(self.position.order.candidates(epoch, position), self.index,
                              lambda key: key in self.position.bad_keys,
                              lambda sample_id: self._read(sample_id, position, epoch), self.cfg.shards)

    def _take(self, epoch: int, step: int, position: int, found: Found[_Sample]) -> _Sample:
        """Record what ``_fetch`` found (bad candidates, a replacement) in delivery order, so counts and
        logs are those of reading one sample at a time; a sample found bad by the decoder after it was
        read ahead is read again (its spare)."""
        for key, shard, reason in found.bad:
            if key not in self.position.bad_keys:
                self.position.record_bad(key, shard, reason)
        if found.value.key in self.position.bad_keys:
            return self._sample_at(epoch, step, position)
        own = self.position.order.sample_at(epoch, position)
        if found.sample_id != own:
            first = self.index[own]
            self.position.record_replacement(epoch, step, position, first.key, first.shard, found.value.key)
        return found.value

    def _sample_at(self, epoch: int, step: int, position: int) -> _Sample:
        """The sample at ``position``, or its first spare not known to be bad, read now (the
        replacement is logged and counted)."""
        return self._take(epoch, step, position, self._fetch(epoch, position))

    def planned_batches(self, epoch: int = 0) -> Iterator[_Batch]:
        """This rank's batches of ``epoch``, read and planned but not decoded: what the views graph is
        fed. Each has ``keys``, ``decode_inputs()`` (encoded videos, frames to decode) and
        ``view_inputs(slots, views)`` (frame positions per slot, parameters per view). For tools that
        run parts of the graph on the loader's own inputs (``bench.py data``); known bad samples are
        replaced by spares as in iteration.
        """
        feeder = _Feeder(self, epoch, 0)
        try:
            while feeder.next_step < feeder.steps:
                yield feeder._read()
        finally:
            feeder.close()

    # ----------------------------------------------------------------- pipelines
    def _device_id(self) -> int | None:
        return torch.cuda.current_device() if self.device == "mixed" else None

    def _build_views(self, source, batch_size: int | None = None, prefetch: int | None = None):
        pipe = views_pipeline(
            source, self.views, self.slots, self.device, self.cfg.augment, tuple(self.cfg.mean),
            tuple(self.cfg.std), DALI_OUTPUT_DTYPE[self.cfg.dtype], self.repeats, self.frames_guard,
            batch_size=batch_size or self.videos_per_batch,
            num_threads=self.cfg.num_threads, device_id=self._device_id(), seed=self.position.seed,
            prefetch_queue_depth=prefetch or self.cfg.prefetch, exec_dynamic=True)
        pipe.build()
        return pipe

    # ----------------------------------------------------------------- iteration
    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch, start = self.position.start()
        feeder = _Feeder(self, epoch, start)
        pipe = self._build_views(feeder) if start < len(self) else None
        try:
            while pipe is not None:
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
                out = self._to_torch(outputs[:-1], batch)
                self._repair(out, outputs[-1], batch, epoch)
                self.position.delivered(batch.step)
                yield out
        finally:
            feeder.close()
        self.position.finish(epoch)

    def _repair(self, out: dict[str, Any], check, batch: _Batch, epoch: int) -> None:
        """Replace the videos whose decode lacked planned frames (``frames_check`` 0) by spares, all
        their view-sets."""
        missing = np.flatnonzero(self._frames_check(check) == 0)
        if not missing.size:
            return
        for name in self.view_names:
            out[name] = out[name].clone()   # DALI's output memory: write into a copy
        r = self.repeats
        for i in missing:
            bad = batch.samples[i]
            self.position.record_bad(bad.key, bad.shard, f"the decoder delivered fewer real frames than the plan "
                                                 f"needs (frame {int(bad.plan.frames[-1])})")
            spare, views = self._decode_spare(epoch, batch.step, bad.position)
            batch.samples[i] = spare
            for name in self.view_names:
                out[name][i * r:(i + 1) * r] = views[name]
        out.update(batch.rows(r))

    def _decode_spare(self, epoch: int, step: int, position: int) -> tuple[_Sample, dict[str, torch.Tensor]]:
        """The first spare of ``position`` that decodes with all its frames, and its views."""
        while True:
            sample = self._sample_at(epoch, step, position)
            one = _Batch(step, [sample])
            pipe = self._build_views(_OneShot(one, self), batch_size=1, prefetch=1)
            try:
                outputs = pipe.run()
            except RuntimeError as err:
                if decode_error_kind(err) != "data":
                    raise self._stop(err, "decoding a spare") from err
                self.position.record_bad(sample.key, sample.shard, "the video decoder cannot read it")
                continue
            finally:
                del pipe
            if self._frames_check(outputs[-1]).min() == 0:
                self.position.record_bad(sample.key, sample.shard, "the decoder delivered fewer real frames than the "
                                                           "plan needs")
                continue
            return sample, self._to_torch(outputs[:-1], one)

    def _stop(self, err: BaseException, why: str) -> DecoderDeviceError:
        return DecoderDeviceError.from_error(err, shards=str(self.cfg.shards), device=self.device, why=why)

    def _frames_check(self, check) -> np.ndarray:
        """The graph's ``frames_check`` output per sample (0: the decoder ran out of real frames)."""
        return np.array((check.as_cpu() if self.device != "cpu" else check).as_tensor()).reshape(-1)

    def _to_torch(self, outputs, batch: _Batch) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for view, tensor_list in zip(self.views, outputs):
            # (videos, C, T, H, W), or (videos, R, C, T, H, W) with repeats: every sample of a view
            # has one shape
            dense = tensor_list.as_tensor()
            if self.device == "cpu":
                # Zero-copy: DALI's dynamic executor (the default, checked in _build_views) gives every
                # iteration fresh output memory that lives as long as a reference to it, so no
                # later run() overwrites it. Copying here cost ~100 ms per SVT batch.
                tensor = torch.from_dlpack(dense)
            else:
                tensor = torch.empty(dense.shape(), dtype=_dali_torch_dtype(self.cfg.dtype),
                                     device=torch.device("cuda", self._device_id()))
                feed_ndarray(dense, tensor, cuda_stream=torch.cuda.current_stream())
            if self.repeats > 1:
                tensor = tensor.flatten(0, 1)   # rows video-major; a view of the same memory
            out[view.name] = tensor.to(torch_dtype(self.cfg.dtype))
        out.update(batch.rows(self.repeats))
        out["data_step"] = (self.position.epoch, batch.step)
        return out


def _dali_torch_dtype(dtype: str) -> torch.dtype:
    """The torch dtype of what the graph emits (DALI_OUTPUT_DTYPE)."""
    return torch.float32 if DALI_OUTPUT_DTYPE[dtype] == types.FLOAT else torch.float16


class _OneShot:
    """External source that gives one batch, then ends (spares' one-sample views pipeline)."""

    def __init__(self, batch: _Batch, loader: DALILoader):
        self.batch, self.loader, self.done = batch, loader, False

    def __call__(self):
        if self.done:
            raise StopIteration
        self.done = True
        if self.loader.feed_hook is not None:
            self.loader.feed_hook(self.batch.keys, "spare")
        return (*self.batch.decode_inputs(self.loader.frames_guard),
                *self.batch.view_inputs(self.loader.slots, self.loader.views))


class _Feeder:
    """External-source callback of the views pipeline: the rank's slice of each data step, read and
    planned ahead on the read-ahead's threads (``read_ahead``), delivered in step order.

    Keeps every batch fed but not yet delivered, so that after a pipeline rebuild they are fed again
    in the same order (their bad samples replaced).
    """

    def __init__(self, loader: DALILoader, epoch: int, start_step: int):
        self.loader = loader
        self.epoch = epoch
        self.next_step = start_step
        self.steps = len(loader)
        self.in_flight: collections.deque[_Batch] = collections.deque()
        self.replay: collections.deque[_Batch] = collections.deque()
        ld = loader
        self.ahead = rank_read_ahead(lambda key: ld._fetch(epoch, key[1]), order=ld.position.order, index=ld.index,
                                     epoch=epoch, steps=range(start_step, self.steps), rank=ld.shard_id,
                                     world_size=ld.num_shards, cfg=ld.cfg)
        ld.read_ahead_stats = self.ahead.stats

    def close(self) -> None:
        self.ahead.close()

    def __call__(self):
        batch = self.replay.popleft() if self.replay else self._read()
        self.in_flight.append(batch)
        if self.loader.feed_hook is not None:
            self.loader.feed_hook(batch.keys, "batch")
        return self._feed(batch)

    def _read(self) -> _Batch:
        if self.next_step >= self.steps:
            raise StopIteration
        step = self.next_step
        self.next_step += 1
        ld = self.loader
        positions = ld.position.order.positions(step, ld.shard_id, ld.num_shards)
        return _Batch(step, [ld._take(self.epoch, step, p, next(self.ahead)) for p in positions])

    def _feed(self, batch: _Batch):
        return (*batch.decode_inputs(self.loader.frames_guard), *batch.view_inputs(self.loader.slots, self.loader.views))

    def delivered(self) -> _Batch:
        """The batch whose views the pipeline just returned."""
        return self.in_flight.popleft()

    def recover(self, err: Exception) -> None:
        """After a pipeline error: a device error stops the run (nothing recorded); otherwise find the
        bad samples among undelivered batches (each decoded alone), replace them, re-feed."""
        ld = self.loader
        if decode_error_kind(err) == "device":
            raise ld._stop(err, "not on a sample") from err
        pending = list(self.in_flight)
        self.in_flight.clear()
        found = False
        for batch in pending:
            for i, sample in enumerate(batch.samples):
                bad_keys = ld.position.bad_keys
                if sample.key in bad_keys or not _decodes(sample, ld):
                    if sample.key not in bad_keys:
                        ld.position.record_bad(sample.key, sample.shard, "the video decoder cannot read it")
                        found = True
                    batch.samples[i] = ld._sample_at(self.epoch, batch.step, sample.position)
        if not found:
            raise ld._stop(err, "yet every sample in flight decodes on its own") from err
        ld.stats["pipeline_rebuilds"] += 1
        self.replay.extendleft(reversed(pending))


def _decodes(sample: _Sample, loader: DALILoader) -> bool:
    """Whether one video decodes alone (a fresh one-sample pipeline; errors invalidate pipelines).
    False only for a data error (decode_errors.py); any other failure stops the run."""
    def source():
        if loader.feed_hook is not None:
            loader.feed_hook([sample.key], "alone")
        return [sample.encoded], [sample.plan.frames]
    pipe = decode_only_pipeline(source, loader.device, batch_size=1, num_threads=1, device_id=loader._device_id(),
                                prefetch_queue_depth=1, exec_async=False, exec_pipelined=False)
    try:
        pipe.build()
        pipe.run()
        return True
    except RuntimeError as err:
        if decode_error_kind(err) == "data":
            return False
        raise loader._stop(err, f"decoding {sample.key} alone") from err
    finally:
        del pipe
