"""DALI graphs: the decode-once views graph, fed by the loader through ``fn.external_source``.

The loader reads samples itself (the global order, one positioned read per tar member: see
order.py and loader.py) and hands each batch of encoded videos plus every random parameter to this
graph. The graph holds no random state (every random parameter arrives per sample from
``views.plan_sample``), so it can be rebuilt at any time -- after a decoder error (which invalidates
the pipeline object), or on resume -- without changing results. ``fn.decoders.video`` has no
checkpointing in DALI 2.4, which this split also sidesteps: the position lives in the loader.

Views graph, per batch:
  encoded video --fn.decoders.video(frames=union of all views' frames, pad_mode="constant")--> FHWC
  --per slot: fn.sequence_rearrange(new_order=positions)-->  (a gather; never a strided slice)
  --per view: resize(roi=crop box) -> color_twist -> [gaussian_blur] -> [solarize]
  -> crop_mirror_normalize(mirror, mean, std, layout CFHW)--> (C, T, H, W) per sample.
Every op applies one parameter set to all frames of a sample, so augmentation is temporally
consistent; parameters differ across views and samples because they are drawn per view and sample.
The CPU and GPU variants differ only in the decoder's device string ("cpu" | "mixed").

Repeated sampling (``data.repeats: R > 1``): the batch holds videos, the decoder reads each one's
union of all R view-sets' frames once, and the gather + view steps run once per view-set (each with
its own positions and parameters). Each view's R results are stacked per video (``fn.stack``, a new
outer axis ``R``), so a view output is ``(videos, R, C, T, H, W)``: reshaped without a copy to
``(videos x R, C, T, H, W)``, each video's view-sets next to each other.

Missing frames: a member whose bytes are damaged mid-stream or truncated still decodes -- the demuxer
stops at the damage and the decoder pads every later requested frame (verified on DALI 2.4 CPU: a
VP9 WebM with its middle third overwritten gives 16 real frames of 60 and no error). The plan's
frames never exceed the json's ``num_frames``, so a padded frame means a damaged sample. Padding is
therefore a sentinel colour (``MISSING_FILL``) instead of a copy of the last frame, and the graph
emits one extra output per sample, ``frames_check``: the largest channel distance of the last
requested frame (the highest index: the union is sorted, padding only ever follows real frames)
from the sentinel. 0 means the decoder ran out of real frames. Costs one frame's reduction.

On ``mixed`` that check alone would read uninitialised memory: DALI 2.4's NVDEC path
(``FramesDecoderGpu::ReadNextFrameWithIndex``) returns without writing the output slot when the
decoder delivers no picture for a frame its index lists (a partial last packet, a damaged one), and
every later requested frame is then skipped too; the slot keeps whatever the memory pool held,
often an earlier batch's real frames. The sentinel is written only for frames past the index. So
the mixed graph requests the last frame twice (``frames_guard``: the union, then its last index
again, decoded anew after a seek back to its keyframe) and the check also demands the two copies be
identical: a decoded frame is reproducible, stale memory in two different slots is not. Costs up to
one keyframe interval of extra decoding per video on NVDEC; the CPU graph writes every slot and
needs no guard (tests force it on the CPU to run the same logic).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import nvidia.dali.fn as fn
import nvidia.dali.math as dmath
import nvidia.dali.types as types
from nvidia.dali import pipeline_def

from .config import AugmentConfig
from .views import (BLUR, BRIGHTNESS, CONTRAST, FLIP, HUE_DEG, ROI_X0, ROI_X1, ROI_Y0, ROI_Y1,
                    SATURATION, SIGMA, SOLARIZE, ViewSpec)



# Magenta: a whole frame of exactly (255, 0, 255) does not come out of real footage's YUV decode.
MISSING_FILL = (255, 0, 255)


def decode_union(encoded, frames, device: str):
    """Decode each video once: exactly the union of its views' frames (``MISSING_FILL`` past the end)."""
    return fn.decoders.video(encoded, device=device, frames=frames, pad_mode="constant",
                             fill_value=list(MISSING_FILL))


def frames_check(video, guarded: bool = False):
    """Per sample: distance of the last decoded frame from ``MISSING_FILL``; 0 = frames were missing.

    ``guarded``: the last requested frame comes twice (its guard copy last); the distance counts only
    when both copies are identical, else 0 (a slot the decoder never wrote).
    """
    sentinel = types.Constant(np.array(MISSING_FILL, dtype=np.int16))
    if not guarded:
        return fn.reductions.max(dmath.abs(fn.cast(video[-1], dtype=types.INT16) - sentinel))
    last = fn.cast(video[-2], dtype=types.INT16)
    guard = fn.cast(video[-1], dtype=types.INT16)
    distance = fn.reductions.max(dmath.abs(last - sentinel))
    identical = fn.reductions.max(dmath.abs(last - guard)) == 0
    return distance * fn.cast(identical, dtype=types.INT16)


def solarize(video, threshold: int):
    """Invert pixels at or above ``threshold`` (DINO / MoCo v3 solarization)."""
    wide = fn.cast(video, dtype=types.INT16)
    inverted = wide + (wide >= threshold) * (255 - 2 * wide)
    return fn.cast(inverted, dtype=types.UINT8)


def gather(video, positions):
    """One slot's frames out of the decoded union: a gather (``positions`` index the union)."""
    return fn.sequence_rearrange(video, new_order=positions)


# The steps of one view, in order; each maps (FHWC uint8 video, the view's per-sample ``params`` from
# ``views.view_params``, view, augment config, mean, std, output dtype) to the next video. Every step
# after ``resize`` keeps FHWC uint8 except ``normalize`` (CFHW ``dtype``). Exported so that a tool can
# build the graph cut after any step (``bench.py data --op-costs`` costs them one by one).
def resize_step(video, params, view: ViewSpec, aug: AugmentConfig, mean, std, dtype):
    """Crop box (``params``' roi) resized to ``view.size`` squared."""
    return fn.resize(video, size=[view.size, view.size], roi_relative=True,
                     roi_start=params[ROI_Y0:ROI_X0 + 1], roi_end=params[ROI_Y1:ROI_X1 + 1])


def color_step(video, params, view: ViewSpec, aug: AugmentConfig, mean, std, dtype):
    """Colour jitter (brightness, contrast, saturation, hue) on randomly cropped views."""
    if view.crop != "random":
        return video
    return fn.color_twist(video, brightness=params[BRIGHTNESS], contrast=params[CONTRAST],
                          saturation=params[SATURATION], hue=params[HUE_DEG])


def blur_step(video, params, view: ViewSpec, aug: AugmentConfig, mean, std, dtype):
    """Gaussian blur with the view group's probability (drawn in ``params``)."""
    blur_p = aug.blur_probability(view.group) if view.crop == "random" else 0.0
    if blur_p >= 1:
        # Always blurred (DINO global_0): no conditional split/merge of the batch.
        video = fn.gaussian_blur(video, sigma=params[SIGMA])
    elif blur_p > 0:
        if params[BLUR] > 0.5:
            video = fn.gaussian_blur(video, sigma=params[SIGMA])
    return video


def solarize_step(video, params, view: ViewSpec, aug: AugmentConfig, mean, std, dtype):
    """Solarization with the view group's probability (drawn in ``params``)."""
    if view.crop == "random" and aug.solarize_probability(view.group) > 0:
        if params[SOLARIZE] > 0.5:
            video = solarize(video, aug.solarize_threshold)
    return video


def normalize_step(video, params, view: ViewSpec, aug: AugmentConfig, mean, std, dtype):
    """Flip, normalize with ``mean``/``std`` (0..1 scale) and transpose FHWC uint8 -> CFHW ``dtype``."""
    return fn.crop_mirror_normalize(
        video, mirror=fn.cast(params[FLIP], dtype=types.INT32), output_layout="CFHW", dtype=dtype,
        mean=[255.0 * m for m in mean], std=[255.0 * s for s in std])


VIEW_STEPS = (("resize", resize_step), ("color", color_step), ("blur", blur_step),
              ("solarize", solarize_step), ("normalize", normalize_step))


def augment_view(frames_fhwc, params, view: ViewSpec, aug: AugmentConfig, mean: tuple[float, ...],
                 std: tuple[float, ...], dtype: types.DALIDataType):
    """Every step of ``VIEW_STEPS`` on one view's gathered frames; FHWC uint8 -> CFHW ``dtype``.

    ``params`` is the view's per-sample vector from ``views.view_params``.
    """
    video = frames_fhwc
    for _, step in VIEW_STEPS:
        video = step(video, params, view, aug, mean, std, dtype)
    return video


@pipeline_def(enable_conditionals=True)
def views_pipeline(source: Callable, views: list[ViewSpec], slots: list[str], device: str,
                   aug: AugmentConfig, mean: tuple[float, ...], std: tuple[float, ...],
                   dtype: types.DALIDataType, repeats: int = 1, frames_guard: bool = False):
    """Decode once, then every view of the recipe, ``repeats`` times. ``source`` returns one batch of
    videos per call: (encoded, frames, then per view-set: positions per slot..., params per view...).
    Outputs: one per view (``(R, C, T, H, W)`` per video when ``repeats`` > 1), then ``frames_check``.
    ``frames_guard``: the frames end with a guard copy of the last one (``frames_check``).
    """
    per_set = len(slots) + len(views)
    inputs = fn.external_source(source=source, num_outputs=2 + repeats * per_set, batch=True)
    encoded, frames = inputs[0], inputs[1]
    video = decode_union(encoded, frames, device)
    view_sets = []
    for r in range(repeats):
        rest = inputs[2 + r * per_set:2 + (r + 1) * per_set]
        positions = dict(zip(slots, rest[:len(slots)]))
        params = rest[len(slots):]
        slot_frames = {slot: gather(video, positions[slot]) for slot in slots}
        view_sets.append([augment_view(slot_frames[v.slot], p, v, aug, mean, std, dtype)
                          for v, p in zip(views, params)])
    if repeats == 1:
        outputs = view_sets[0]
    else:
        outputs = [fn.stack(*per_view, axis=0, axis_name="R") for per_view in zip(*view_sets)]
    return (*outputs, frames_check(video, frames_guard))


@pipeline_def
def decode_only_pipeline(source: Callable, device: str):
    """The decode step alone (same frames), for benchmarks and for isolating a corrupt sample."""
    encoded, frames = fn.external_source(source=source, num_outputs=2, batch=True)
    return decode_union(encoded, frames, device)
