"""Views of a recipe and their per-sample random parameters, shared by the DALI graph and the baseline.

A view is a temporal slot of the frame plan (which frames) plus a spatial treatment (crop, size,
colour). All random choices for one sample -- frames and every view's crop box, flip, colour jitter,
grayscale, blur and solarize -- are drawn here from the sample's own generator
(``frame_plans.sample_rng``), packed into one small float vector per view, and handed to the graph as
per-sample arguments. The graph itself holds no random state, which makes it exactly resumable from
the reader's position alone, and lets the baseline loader apply the very same parameters. With repeated sampling (``data.repeats: R``) a
sample's plan holds R view-sets, each drawn from its own generator (``sample_rng(..., repeat)``), over
one union of frames that the decoder reads once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .config import AugmentConfig, DataConfig
from .frame_plans import (eval_frame_plan, lstcl_frame_plan, sample_rng, strided_eval_frame_plan,
                          svt_frame_plan, union_and_positions)

# Layout of the per-view parameter vector (float32), read by graph.augment_view and baseline.
ROI_Y0, ROI_X0, ROI_Y1, ROI_X1, FLIP, BRIGHTNESS, CONTRAST, SATURATION, HUE_DEG, BLUR, SIGMA, SOLARIZE = range(12)
NUM_PARAMS = 12


@dataclass(frozen=True)
class ViewSpec:
    """One output view: its name, the plan slot it takes frames from, output size and treatment.

    ``crop`` is ``"random"`` (random resized crop with ``scale``/``ratio``), ``"full"`` (whole frame,
    used when augmentation is off) or ``"eval_J"`` (J-th of the evaluation's spatial crops).
    """

    name: str
    slot: str
    frames: int
    size: int
    group: str
    crop: str = "random"
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)


def recipe_views(cfg: DataConfig) -> list[ViewSpec]:
    """The views a recipe emits, in the order the loader returns them."""
    crop = "random" if cfg.augment.enabled else "full"
    if cfg.recipe == "svt":
        s = cfg.svt
        views = [ViewSpec(f"global_{i}", f"global_{i}", t, s.global_size, f"global_{i}", crop,
                          s.global_scale, s.ratio) for i, t in enumerate(s.global_frames)]
        views += [ViewSpec(f"local_{i}", f"local_{i}", t, s.local_size, "local", crop, s.local_scale,
                           s.ratio) for i, t in enumerate(s.local_frames)]
        return views
    if cfg.recipe == "lstcl":
        s = cfg.lstcl
        return [ViewSpec("short", "short", s.short_frames, s.size, "short", crop, s.scale, s.ratio),
                ViewSpec("long", "long", s.long_frames, s.size, "long", crop, s.scale, s.ratio)]
    e = cfg.eval
    views = []
    for k in range(e.clips):
        for j in range(e.crops):
            crop_j = f"eval_{j if e.crops == 3 else 1}"
            views.append(ViewSpec(f"slow_{k}_{j}", f"slow_{k}", e.slow_frames, e.slow_size, "eval", crop_j))
            views.append(ViewSpec(f"fast_{k}_{j}", f"fast_{k}", e.fast_frames, e.fast_size, "eval", crop_j))
    return views


def frame_plan(cfg: DataConfig, num_frames: int, fps: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    if cfg.recipe == "svt":
        return svt_frame_plan(num_frames, fps, rng, cfg.svt)
    if cfg.recipe == "lstcl":
        return lstcl_frame_plan(num_frames, fps, rng, cfg.lstcl)
    if cfg.eval.stride:
        return strided_eval_frame_plan(num_frames, fps, rng, cfg.eval)
    return eval_frame_plan(num_frames, fps, rng, cfg.eval)


@dataclass
class ViewSet:
    """One view-set of a sample (every view of the recipe once): where its slots lie in the decoded
    union, and each view's parameters."""

    positions: dict[str, np.ndarray]   # slot -> (T,) int32 positions into ``SamplePlan.frames``
    params: dict[str, np.ndarray]      # view name -> (NUM_PARAMS,) float32


@dataclass
class SamplePlan:
    """Everything random about one sample visit: the frames to decode once, and its view-sets
    (``data.repeats`` of them, repeat index = list index)."""

    key: str
    frames: np.ndarray                 # (U,) int32, sorted unique source frame indices to decode
    view_sets: list[ViewSet]

    def view_frames(self, view: ViewSpec, repeat: int = 0) -> np.ndarray:
        """Source frame indices of a view of view-set ``repeat``, in order."""
        return self.frames[self.view_sets[repeat].positions[view.slot]]


def plan_sample(cfg: DataConfig, views: list[ViewSpec], *, seed: int, epoch: int, key: str,
                num_frames: int, fps: float, width: int, height: int) -> SamplePlan:
    """Draw a sample's ``cfg.repeats`` view-sets: view-set r's frame plan and view parameters come
    from its own generator ``sample_rng(seed, epoch, key, r)``; their frames share one union."""
    plans, params = [], []
    for repeat in range(cfg.repeats):
        rng = sample_rng(seed, epoch, key, repeat)
        plans.append(frame_plan(cfg, num_frames, fps, rng))
        params.append({v.name: view_params(rng, v, cfg.augment, width, height) for v in views})
    frames, positions = union_and_positions(plans)
    return SamplePlan(key, frames, [ViewSet(pos, par) for pos, par in zip(positions, params)])


def view_params(rng: np.random.Generator, view: ViewSpec, aug: AugmentConfig, width: int,
                height: int) -> np.ndarray:
    """Crop box (relative y0, x0, y1, x1), flip, colour, blur and solarize for one view of one sample."""
    p = np.zeros(NUM_PARAMS, np.float32)
    p[[BRIGHTNESS, CONTRAST, SATURATION]] = 1.0
    if view.crop == "random":
        p[[ROI_Y0, ROI_X0, ROI_Y1, ROI_X1]] = random_resized_crop_box(rng, width, height, view.scale, view.ratio)
    elif view.crop.startswith("eval_"):
        p[[ROI_Y0, ROI_X0, ROI_Y1, ROI_X1]] = eval_crop_box(int(view.crop[5:]), width, height)
    else:
        p[[ROI_Y1, ROI_X1]] = 1.0
    if view.crop != "random":
        return p
    # Fixed draw order: every draw happens whatever the outcome, so one setting never shifts another.
    flip, jitter, gray, blur, solarize = rng.random(5)
    factors = rng.uniform([-aug.brightness, -aug.contrast, -aug.saturation, -aug.hue],
                          [aug.brightness, aug.contrast, aug.saturation, aug.hue])
    sigma = rng.uniform(*aug.blur_sigma)
    p[FLIP] = float(flip < aug.flip_p)
    if jitter < aug.jitter_p:
        p[[BRIGHTNESS, CONTRAST, SATURATION]] = 1.0 + factors[:3]
        p[HUE_DEG] = 360.0 * factors[3]
    if gray < aug.grayscale_p:
        # Grayscale after jitter == saturation 0 (one colour matrix does both).
        p[SATURATION] = 0.0
    if blur < aug.blur_probability(view.group):
        p[BLUR], p[SIGMA] = 1.0, sigma
    if solarize < aug.solarize_probability(view.group):
        p[SOLARIZE] = 1.0
    return p


def random_resized_crop_box(rng: np.random.Generator, width: int, height: int,
                            scale: tuple[float, float], ratio: tuple[float, float]) -> np.ndarray:
    """torchvision's RandomResizedCrop.get_params, as a relative (y0, x0, y1, x1) box."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            y0 = int(rng.integers(0, height - h + 1))
            x0 = int(rng.integers(0, width - w + 1))
            return np.array([y0 / height, x0 / width, (y0 + h) / height, (x0 + w) / width], np.float32)
    # Fallback: central crop with the aspect ratio clamped into range (as torchvision does).
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    y0, x0 = (height - h) // 2, (width - w) // 2
    return np.array([y0 / height, x0 / width, (y0 + h) / height, (x0 + w) / width], np.float32)


def eval_crop_box(j: int, width: int, height: int) -> np.ndarray:
    """Square crop of the short side at the start (0), centre (1) or end (2) of the long side."""
    side = min(width, height)
    offset = {0: 0.0, 1: 0.5, 2: 1.0}[j]
    if width >= height:
        x0 = offset * (width - side) / width
        return np.array([0.0, x0, 1.0, x0 + side / width], np.float32)
    y0 = offset * (height - side) / height
    return np.array([y0, 0.0, y0 + side / height, 1.0], np.float32)
