"""Baseline loader: webdataset + PyAV decode + torchvision ops in a torch DataLoader.

The comparison point for ``bench.py data`` and a cross-check of the DALI graph: it reads the same
shards, draws the same per-sample plans and view parameters (``views.plan_sample``: same seed, epoch
and key give the same frames, crop boxes, flips and colour factors), decodes each video once with
PyAV (up to the last needed frame) and builds every view with torchvision's functional ops.
It reads the same shards in the same global order (``order.GlobalOrder``, one positioned or ranged
read per sample, local or remote: ``member_reads``) with the DALI loader's spares and its position
(``position.Position``): a resume starts at the saved data step, nothing is replayed. Each
DataLoader worker builds whole data steps, reading the members of its next steps ahead on its own
read-ahead threads (``read_ahead``; the byte budget split over the workers). With
``data.repeats: R`` each video is decoded once and gives R rows (its view-sets), as in the DALI loader.
"""

from __future__ import annotations

import io
import math
from typing import Any, Iterator

import av
import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from einops import rearrange
from common.precision import torch_dtype

from .config import DataConfig
from .member_reads import Found, MemberReader, UnusableSample, first_readable
from .position import PositionedLoader
from .read_ahead import rank_read_ahead
from .views import (BLUR, BRIGHTNESS, CONTRAST, FLIP, HUE_DEG, ROI_X0, ROI_X1, ROI_Y0, ROI_Y1,
                    SATURATION, SIGMA, SOLARIZE, SamplePlan, ViewSpec, plan_sample, recipe_views)


def decode_frames(data: bytes, frames: np.ndarray) -> torch.Tensor:
    """Decode the listed (sorted) frame indices with PyAV. Returns ``(U, C, H, W)`` uint8.

    Raises ``ValueError`` when the stream ends before the last listed frame: plans stay within the
    json's ``num_frames``, so that is a damaged member (the DALI graph's ``frames_check``).
    """
    wanted = set(int(f) for f in frames)
    last = int(frames[-1])
    got: dict[int, np.ndarray] = {}
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        # One decoding thread per DataLoader worker, so the baseline uses ``num_threads`` cores like
        # the DALI graph (FFmpeg's default frame threading would add cores per worker).
        stream.thread_count = 1
        for i, frame in enumerate(container.decode(stream)):
            if i in wanted:
                got[i] = frame.to_ndarray(format="rgb24")
            if i >= last:
                break
    if last not in got:
        raise ValueError(f"the decoder delivered fewer real frames than the plan needs "
                         f"({len(got)} of the planned, up to frame {last})")
    stack = np.stack([got[int(f)] for f in frames])
    return rearrange(torch.from_numpy(stack), "u h w c -> u c h w")


def make_view(frames_tchw: torch.Tensor, params: np.ndarray, view: ViewSpec, mean: torch.Tensor,
              std: torch.Tensor, solarize_threshold: int) -> torch.Tensor:
    """One view from its frames ``(T, C, H, W)`` uint8: the same ops and parameters as the DALI graph."""
    _, _, h, w = frames_tchw.shape
    top, left = int(round(params[ROI_Y0] * h)), int(round(params[ROI_X0] * w))
    height = max(1, int(round(params[ROI_Y1] * h)) - top)
    width = max(1, int(round(params[ROI_X1] * w)) - left)
    x = TF.resized_crop(frames_tchw, top, left, height, width, [view.size, view.size], antialias=True)
    if view.crop == "random":
        x = TF.adjust_brightness(x, float(params[BRIGHTNESS]))
        x = TF.adjust_contrast(x, float(params[CONTRAST]))
        x = TF.adjust_saturation(x, float(params[SATURATION]))
        if params[HUE_DEG] != 0:
            x = TF.adjust_hue(x, float(params[HUE_DEG]) / 360.0)
        if params[BLUR] > 0.5:
            sigma = float(params[SIGMA])
            kernel = 2 * math.ceil(3 * sigma) + 1
            x = TF.gaussian_blur(x, [kernel, kernel], [sigma, sigma])
        if params[SOLARIZE] > 0.5:
            x = TF.solarize(x, solarize_threshold)
        if params[FLIP] > 0.5:
            x = TF.horizontal_flip(x)
    x = (x.float() / 255.0 - mean) / std
    return rearrange(x, "t c h w -> c t h w")


class _BaselineDataset(torch.utils.data.IterableDataset):
    """Yields one collated rank batch per data step from ``start``; worker k of n builds the steps
    ``start + k, start + k + n, ...`` so the DataLoader's round-robin delivers them in order."""

    def __init__(self, loader: "BaselineLoader", epoch: int, start: int):
        self.loader = loader
        self.epoch = epoch
        self.start = start

    def __iter__(self) -> Iterator[dict[str, Any]]:
        ld = self.loader
        worker = torch.utils.data.get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        self.reader = MemberReader(ld.store)   # in a worker: the store's copy, with its own sessions
        self.in_worker = worker is not None
        self.reported = ld.store.counters.snapshot()   # what the copy held when the worker started
        self.bad = dict(ld.position.bad_keys)
        self.mean = torch.tensor(ld.cfg.mean).view(1, 3, 1, 1)
        self.std = torch.tensor(ld.cfg.std).view(1, 3, 1, 1)
        steps = range(self.start + worker_id, len(ld), num_workers)
        self.ahead = rank_read_ahead(lambda key: self._fetch(key[1]), order=ld.position.order, index=ld.index,
                                     epoch=self.epoch, steps=steps, rank=ld.shard_id, world_size=ld.num_shards,
                                     cfg=ld.cfg, share=num_workers)
        try:
            for step in steps:
                yield self._step(step)
        finally:
            self.ahead.close()

    def _fetch(self, position: int) -> Found[tuple[dict[str, Any], bytes, SamplePlan]]:
        """The first usable sample of ``position``, read and planned (on a read-ahead thread)."""
        ld = self.loader
        return first_readable(ld.position.order.candidates(self.epoch, position), ld.index,
                              lambda key: key in self.bad, self._read, ld.cfg.shards)

    def _read(self, sample_id: int) -> tuple[dict[str, Any], bytes, SamplePlan]:
        ld = self.loader
        entry = ld.index[sample_id]
        try:
            meta, video = self.reader.read_sample(entry)
        except ValueError as err:   # an unreadable member or a bad json: this loader replaces both
            raise UnusableSample(str(err)) from err
        plan = plan_sample(ld.cfg, ld.views, seed=ld.position.seed, epoch=self.epoch, key=meta["key"],
                           num_frames=int(meta["num_frames"]), fps=float(meta.get("fps", 30)),
                           width=int(meta["width"]), height=int(meta["height"]))
        return meta, video, plan

    def _step(self, step: int) -> dict[str, Any]:
        ld = self.loader
        order = ld.position.order
        samples, failed, replaced = [], [], []
        for position in order.positions(step, ld.shard_id, ld.num_shards):
            own = order.sample_at(self.epoch, position)
            found = next(self.ahead)
            while True:
                # Same policy as the DALI loader: report and take the position's next spare. The
                # records travel in the batch so the parent process counts them (workers are other
                # processes), in delivery order.
                for key, shard, reason in found.bad:
                    if key not in self.bad:
                        self.bad[key] = shard
                        failed.append({"key": key, "shard": shard, "reason": reason})
                entry = ld.index[found.sample_id]
                if entry.key in self.bad:      # found bad by a decode after it was read ahead
                    found = self._fetch(position)
                    continue
                try:
                    samples += self._view_sets(found.sample_id, *found.value)
                    break
                except (av.error.FFmpegError, ValueError) as err:
                    self.bad[entry.key] = entry.shard
                    failed.append({"key": entry.key, "shard": entry.shard, "reason": str(err)})
                    found = self._fetch(position)
            if found.sample_id != own:
                replaced.append({"position": position, "key": ld.index[own].key, "shard": ld.index[own].shard,
                                 "spare": entry.key})
        batch = torch.utils.data.default_collate(samples)
        batch.update(failed=failed, replaced=replaced, data_step=(self.epoch, step), io=self._io_counts())
        return batch

    def _io_counts(self) -> dict[str, int]:
        """A worker's storage counts since its last batch (the parent adds them to its own)."""
        if not self.in_worker:
            return {}
        now = self.reader.store.counters.snapshot()
        delta = {k: v - self.reported.get(k, 0) for k, v in now.items()}
        self.reported = now
        return delta

    def _view_sets(self, sample_id: int, meta: dict[str, Any], video: bytes, plan: SamplePlan) -> list[dict[str, Any]]:
        """The video decoded once (the union of its view-sets' frames), and each of its
        ``data.repeats`` view-sets as one row."""
        ld = self.loader
        decoded = decode_frames(video, plan.frames)
        rows = []
        for repeat, view_set in enumerate(plan.view_sets):
            out: dict[str, Any] = {}
            for view in ld.views:
                frames = decoded[torch.from_numpy(view_set.positions[view.slot]).long()]
                out[view.name] = make_view(frames, view_set.params[view.name], view, self.mean, self.std,
                                           ld.cfg.augment.solarize_threshold).to(torch_dtype(ld.cfg.dtype))
            out.update(label=int(meta.get("label", -1)), key=meta["key"], video_id=sample_id, repeat=repeat)
            rows.append(out)
        return rows


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


class BaselineLoader(PositionedLoader):
    """Same interface, order and position as ``DALILoader``; ``cfg.num_threads`` DataLoader workers."""

    def __init__(self, cfg: DataConfig, *, batch_size: int, shard_id: int = 0, num_shards: int = 1,
                 seed: int = 0):
        self._open(cfg, batch_size=batch_size, shard_id=shard_id, num_shards=num_shards, seed=seed)
        self.index = self.shards.sample_index()
        self.views = recipe_views(cfg)
        self.view_names = [v.name for v in self.views]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch, start = self.position.start()
        loader = torch.utils.data.DataLoader(
            _BaselineDataset(self, epoch, start), batch_size=None,
            num_workers=self.cfg.num_threads, worker_init_fn=_worker_init,
            # forkserver: workers must not inherit a parent's running threads (a DALI pipeline's,
            # torch's): fork() with them alive deadlocked a worker in the tests.
            multiprocessing_context="forkserver" if self.cfg.num_threads > 0 else None)
        for batch in loader:
            step = batch["data_step"][1]
            for failed in batch.pop("failed"):
                self.position.record_bad(failed["key"], failed["shard"], failed["reason"])
            for r in batch.pop("replaced"):
                self.position.record_replacement(epoch, step, r["position"], r["key"], r["shard"], r["spare"])
            self.store.counters.add(**batch.pop("io"))
            self.position.delivered(step)
            yield batch
        self.position.finish(epoch)
