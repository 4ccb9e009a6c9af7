"""Baseline loader: webdataset + PyAV decode + torchvision ops in a torch DataLoader.

The comparison point for ``bench.py data`` and a cross-check of the DALI graph: it reads the same
shards, draws the same per-sample plans and view parameters (``views.plan_sample``: same seed, epoch
and key give the same frames, crop boxes, flips and colour factors), decodes each video once with
PyAV (up to the last needed frame) and builds every view with torchvision's functional ops.
Sample order differs from the DALI reader's (a webdataset shuffle buffer), and resuming replays the
epoch up to the saved step; it is a baseline, not the production path.
"""

from __future__ import annotations

import io
import json
import logging
import math
import random
from typing import Any, Iterator

import av
import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
import webdataset as wds
from einops import rearrange

from .config import DataConfig
from .loader import read_shard_set, shard_range
from .views import (BLUR, BRIGHTNESS, CONTRAST, FLIP, HUE_DEG, ROI_X0, ROI_X1, ROI_Y0, ROI_Y1,
                    SATURATION, SIGMA, SOLARIZE, SamplePlan, ViewSpec, plan_sample, recipe_views)

log = logging.getLogger(__name__)
VIDEO_KEYS = ("webm", "mp4")
TORCH_DTYPE = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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
    def __init__(self, loader: "BaselineLoader", epoch: int):
        self.loader = loader
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        ld = self.loader
        worker = torch.utils.data.get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        lo, hi = shard_range(ld.shards.total, (ld.shard_id + self.epoch) % ld.num_shards, ld.num_shards)
        samples = wds.DataPipeline(wds.SimpleShardList(ld.shards.paths), wds.tarfile_to_samples())
        mean = torch.tensor(ld.cfg.mean).view(1, 3, 1, 1)
        std = torch.tensor(ld.cfg.std).view(1, 3, 1, 1)
        ordered = (s for i, s in enumerate(samples) if lo <= i < hi)
        if ld.cfg.shuffle:
            # Same order in every worker (seed without the worker id); workers then take whole batches
            # in turn, so the DataLoader's round-robin yields full batches in one global order.
            ordered = _shuffled(ordered, ld.cfg.shuffle_buffer, random.Random(ld.seed * 1000 + self.epoch))
        mine = (s for j, s in enumerate(ordered) if (j // ld.batch_size) % num_workers == worker_id)
        for sample in mine:
            try:
                yield self._views(sample, mean, std)
            except (av.error.FFmpegError, ValueError) as err:
                # Same policy as the DALI loader: skip and report. The record travels in the batch
                # (see _collate) so the parent process counts it: workers are other processes.
                yield {"failed": {"key": sample.get("__key__"), "shard": sample.get("__url__"),
                                  "reason": str(err)}}

    def _views(self, sample: dict[str, Any], mean: torch.Tensor, std: torch.Tensor) -> dict[str, Any]:
        ld = self.loader
        meta = json.loads(sample["json"])
        data = next(sample[k] for k in VIDEO_KEYS if k in sample)
        plan: SamplePlan = plan_sample(ld.cfg, ld.views, seed=ld.seed, epoch=self.epoch, key=meta["key"],
                                       num_frames=int(meta["num_frames"]), fps=float(meta.get("fps", 30)),
                                       width=int(meta["width"]), height=int(meta["height"]))
        decoded = decode_frames(data, plan.frames)
        out: dict[str, Any] = {}
        for view in ld.views:
            frames = decoded[torch.from_numpy(plan.positions[view.slot]).long()]
            out[view.name] = make_view(frames, plan.params[view.name], view, mean, std,
                                       ld.cfg.augment.solarize_threshold).to(TORCH_DTYPE[ld.cfg.dtype])
        out["label"] = int(meta.get("label", -1))
        out["key"] = meta["key"]
        return out


def _shuffled(items, buffer_size: int, rng: random.Random):
    buffer = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= buffer_size:
            yield buffer.pop(rng.randrange(len(buffer)))
    rng.shuffle(buffer)
    yield from buffer


def _collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Default collation of the good samples; the failed ones' records go to ``batch["failed"]``."""
    good = [s for s in samples if "failed" not in s]
    batch = torch.utils.data.default_collate(good) if good else {"key": []}
    batch["failed"] = [s["failed"] for s in samples if "failed" in s]
    return batch


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


class BaselineLoader:
    """Same interface as ``DALILoader``; ``cfg.num_threads`` DataLoader worker processes."""

    def __init__(self, cfg: DataConfig, *, batch_size: int, shard_id: int = 0, num_shards: int = 1,
                 seed: int = 0):
        self.cfg, self.batch_size = cfg, batch_size
        self.shard_id, self.num_shards, self.seed = shard_id, num_shards, seed
        self.shards = read_shard_set(cfg.shards)
        self.views = recipe_views(cfg)
        self.view_names = [v.name for v in self.views]
        self.epoch = 0
        self._skip = 0
        self._step = 0
        self.stats: dict[str, Any] = {"decode_failures": 0, "skipped_keys": [], "samples": 0, "steps": 0}

    def __len__(self) -> int:
        lo, hi = shard_range(self.shards.total, (self.shard_id + self.epoch) % self.num_shards, self.num_shards)
        return (hi - lo) // self.batch_size if self.cfg.drop_last else -(-(hi - lo) // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self._skip, self._step = epoch, 0, 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step": self._step, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self._skip, self._step, self.seed = state["epoch"], state["step"], state["step"], state["seed"]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        loader = torch.utils.data.DataLoader(
            _BaselineDataset(self, self.epoch), batch_size=self.batch_size,
            num_workers=self.cfg.num_threads, worker_init_fn=_worker_init, drop_last=self.cfg.drop_last,
            collate_fn=_collate,
            # forkserver: workers must not inherit a parent's running threads (a DALI pipeline's,
            # torch's): fork() with them alive deadlocked a worker in the tests.
            multiprocessing_context="forkserver" if self.cfg.num_threads > 0 else None)
        for step, batch in enumerate(loader):
            if step < self._skip:
                continue
            self._step = step + 1
            for failed in batch.pop("failed"):
                self.stats["decode_failures"] += 1
                self.stats["skipped_keys"].append({"key": failed["key"], "shard": failed["shard"]})
                log.warning("baseline: skipping sample %s of %s: %s", failed["key"], failed["shard"],
                            failed["reason"])
            if not batch["key"]:
                continue
            self.stats["samples"] += len(batch["key"])
            self.stats["steps"] += 1
            yield batch
        self._skip, self._step = 0, 0
        self.epoch += 1
