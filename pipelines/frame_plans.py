"""Frame plans: pure, seeded functions ``(num_frames, fps, rng) -> {slot: frame indices}``.

A plan names, for one video, which source frames every temporal slot of a recipe holds, in order.
The DALI graph and the baseline loader both call these functions, so both make the same clips.

Plans are in time, not in frame counts, so a 15, 25 or 30 fps shard gives views over the same
seconds. Spans that are fractions of the video (SVT's spans, the eval segments) are the same seconds
at any rate already. Strides (LSTCL) count frames at a reference rate (``reference_fps``, 30 as
PySlowFast's ``target_fps``): stride ``s`` puts clip frame ``k`` at ``k * s / reference_fps`` seconds
after the clip's first frame, i.e. source frame ``start + round(k * s * fps / reference_fps)``, so
at 30 fps the indices are exactly ``start + s * k`` and at 15 fps every other one of those frames.

Short-video rule (never a crash): a clip asks for T frames spread over a span of the video. The span
is clamped to the video (``1 <= span <= num_frames``), and indices are spread over it by rounding
``linspace``; when the span holds fewer than T frames, neighbouring positions round to the same frame,
so frames repeat (nearest-frame resampling). A strided clip whose extent does not fit shrinks its
step (in source frames, fractional) to the largest that fits, i.e. its frames spread evenly over
what is available, repeating frames when fewer than T are there. A zero-frame video and a frame
rate that is not a positive number are the only inputs rejected (the shard tools quarantine such
inputs).

Randomness comes only from ``rng``; ``sample_rng(seed, epoch, key, repeat)`` makes one per view-set
of a sample from its key, so a sample's plan does not depend on the order it is read in, on the rank,
or on prefetching, and a resumed run recomputes exactly the plans it would have made. With repeated
sampling (``data.repeats: R``) a video visit has R independent plans (repeat 0 .. R-1, repeat 0 being
the plan of R = 1) and the decoder reads the union of their frames once (``union_and_positions``).
"""

from __future__ import annotations

import zlib

import numpy as np

from .config import EvalConfig, LSTCLConfig, SVTConfig


def sample_rng(seed: int, epoch: int, key: str, repeat: int = 0) -> np.random.Generator:
    """Per-view-set generator: same (seed, epoch, key, repeat) -> same plan and augmentation, on every
    loader. Repeat 0 draws exactly what a run without repeated sampling draws."""
    entropy = [seed & 0xFFFFFFFF, epoch & 0xFFFFFFFF, zlib.crc32(key.encode())]
    if repeat:
        entropy.append(repeat)
    return np.random.default_rng(entropy)


def _check_num_frames(num_frames: int) -> None:
    if num_frames < 1:
        raise ValueError(f"a frame plan needs a video with at least one frame, got num_frames={num_frames}")


def spread_indices(start: int, span: int, num: int) -> np.ndarray:
    """``num`` indices spread uniformly over ``[start, start + span)``, repeating when span < num."""
    if num == 1:
        return np.array([start + (span - 1) // 2], np.int64)
    return start + np.round(np.linspace(0, span - 1, num)).astype(np.int64)


def random_span_indices(num_frames: int, num: int, span_fraction: float,
                        rng: np.random.Generator) -> np.ndarray:
    """``num`` indices uniform over a span of ``span_fraction * num_frames`` frames at a random start."""
    _check_num_frames(num_frames)
    span = int(np.clip(round(span_fraction * num_frames), 1, num_frames))
    start = int(rng.integers(0, num_frames - span + 1))
    return spread_indices(start, span, num)


def _check_fps(fps: float) -> float:
    fps = float(fps)
    if not np.isfinite(fps) or fps <= 0:
        raise ValueError(f"a strided frame plan needs the video's frame rate (the sample json's fps) > 0, got {fps}")
    return fps


# The LSTCL test protocol's stride counts frames at the same reference rate as training (PySlowFast's
# target_fps 30), so a 15 or 25 fps shard is tested on clips covering the same seconds.
EVAL_REFERENCE_FPS = 30.0


def source_step(stride: int, fps: float, reference_fps: float) -> float:
    """A stride in frames at ``reference_fps`` as a step in the video's own frames (fractional)."""
    return stride * _check_fps(fps) / reference_fps


def step_extent(num: int, step: float) -> int:
    """Source frames a clip of ``num`` frames ``step`` apart covers, first to last inclusive."""
    return int(np.floor((num - 1) * step + 0.5)) + 1


def fit_step(num: int, step: float, available: int) -> float:
    """Largest step <= ``step`` whose clip extent fits in ``available`` frames."""
    if num == 1 or step_extent(num, step) <= available:   # fits once its last frame is rounded
        return step
    return (max(available, 1) - 1) / (num - 1)


def stepped_indices(start: int, num: int, step: float, region: int) -> np.ndarray:
    """``start + round(step * k)`` for k < num (half up), clamped to the region ``[start, start + region)``."""
    idx = start + np.floor(step * np.arange(num) + 0.5).astype(np.int64)
    return np.minimum(idx, start + max(region, 1) - 1)


def draw_lstcl_strides(cfg: LSTCLConfig, rng: np.random.Generator) -> tuple[int, int]:
    """(short, long) strides of one video: the fixed pair, or LSTCL Table 1's random draw.

    Fixed strides draw nothing from ``rng``, so the default recipe's plans do not depend on this.
    """
    if not (cfg.short_stride_choices or cfg.long_stride_choices):
        return cfg.short_stride, cfg.long_stride
    pairs = cfg.stride_pairs()
    return pairs[int(rng.integers(len(pairs)))]


def svt_frame_plan(num_frames: int, fps: float, rng: np.random.Generator,
                   cfg: SVTConfig) -> dict[str, np.ndarray]:
    """SVT: global views over random ``global_span`` spans, local views over random ``local_span``.

    ``fps`` is unused: SVT spans are fractions of the video, so they cover the same seconds at any
    frame rate (SVT paper Sec 3.1: a random 90% / 1/8 portion of the video's time axis).
    """
    del fps
    plan = {}
    for i, t in enumerate(cfg.global_frames):
        plan[f"global_{i}"] = random_span_indices(num_frames, t, cfg.global_span, rng)
    for i, t in enumerate(cfg.local_frames):
        plan[f"local_{i}"] = random_span_indices(num_frames, t, cfg.local_span, rng)
    return plan


def lstcl_frame_plan(num_frames: int, fps: float, rng: np.random.Generator,
                     cfg: LSTCLConfig) -> dict[str, np.ndarray]:
    """LSTCL: a short clip and a long clip, placed ``independent`` | ``included`` | ``disjoint``.

    Strides are drawn first (``draw_lstcl_strides``) and turned into steps of the video's own frames
    (``fps`` against ``cfg.reference_fps``). ``included``: the short clip lies inside the long clip's
    extent. ``disjoint``: their extents do not overlap; when the video is too short for both, each
    gets its share of the frames in proportion to its extent and shrinks its step to fit (the
    short-video rule above).
    """
    _check_num_frames(num_frames)
    short_stride, long_stride = draw_lstcl_strides(cfg, rng)
    short_step = source_step(short_stride, fps, cfg.reference_fps)
    long_step = source_step(long_stride, fps, cfg.reference_fps)
    ts, tl = cfg.short_frames, cfg.long_frames

    if cfg.placement == "disjoint":
        ext_s, ext_l = step_extent(ts, short_step), step_extent(tl, long_step)
        if ext_s + ext_l > num_frames:
            # Split the frames between the clips in proportion to their extents.
            ext_s = min(max(1, int(num_frames * ext_s / (ext_s + ext_l))), max(1, num_frames - 1))
            ext_l = max(1, num_frames - ext_s)
            short_step = fit_step(ts, short_step, ext_s)
            long_step = fit_step(tl, long_step, ext_l)
            ext_s, ext_l = step_extent(ts, short_step), step_extent(tl, long_step)
        gap_total = max(0, num_frames - ext_s - ext_l)
        # Random order of the two clips, random split of the free frames before/between/after them.
        cuts = np.sort(rng.integers(0, gap_total + 1, size=2))
        before, between = int(cuts[0]), int(cuts[1] - cuts[0])
        if rng.random() < 0.5:
            short_start, long_start = before, before + ext_s + between
        else:
            long_start, short_start = before, before + ext_l + between
        short_start, long_start = min(short_start, num_frames - 1), min(long_start, num_frames - 1)
        return {"short": stepped_indices(short_start, ts, short_step, min(ext_s, num_frames - short_start)),
                "long": stepped_indices(long_start, tl, long_step, min(ext_l, num_frames - long_start))}

    long_step = fit_step(tl, long_step, num_frames)
    ext_l = min(step_extent(tl, long_step), num_frames)
    long_start = int(rng.integers(0, num_frames - ext_l + 1))
    if cfg.placement == "included":
        region_start, region = long_start, ext_l
    else:
        region_start, region = 0, num_frames
    short_step = fit_step(ts, short_step, region)
    ext_s = min(step_extent(ts, short_step), region)
    short_start = region_start + int(rng.integers(0, region - ext_s + 1))
    return {"short": stepped_indices(short_start, ts, short_step, ext_s),
            "long": stepped_indices(long_start, tl, long_step, ext_l)}


def eval_frame_plan(num_frames: int, fps: float, rng: np.random.Generator | None,
                    cfg: EvalConfig) -> dict[str, np.ndarray]:
    """Evaluation: ``clips`` equal temporal segments; per segment a slow and a fast clip over it.

    Deterministic (``rng`` and ``fps`` unused), so every run evaluates the same frames.
    """
    del fps, rng
    _check_num_frames(num_frames)
    plan = {}
    for k in range(cfg.clips):
        lo = int(np.floor(k * num_frames / cfg.clips))
        hi = max(lo + 1, int(np.floor((k + 1) * num_frames / cfg.clips)))
        plan[f"slow_{k}"] = spread_indices(lo, hi - lo, cfg.slow_frames)
        plan[f"fast_{k}"] = spread_indices(lo, hi - lo, cfg.fast_frames)
    return plan


def uniform_clip_starts(num_frames: int, extent: int, clips: int) -> np.ndarray:
    """Start frames of ``clips`` clips of ``extent`` frames spread uniformly over the video.

    PySlowFast's test placement with ``use_offset`` (``decoder.get_start_end_idx``): one clip sits in
    the centre; several start at ``k * floor(delta / (clips - 1))`` with ``delta = num_frames - extent``,
    so the first clip starts at frame 0 and the last ends at (or just before) the last frame.
    """
    delta = max(num_frames - extent, 0)
    if clips == 1:
        return np.array([delta // 2], np.int64)
    return np.arange(clips, dtype=np.int64) * (delta // (clips - 1))


def strided_eval_frame_plan(num_frames: int, fps: float, rng: np.random.Generator | None,
                            cfg: EvalConfig) -> dict[str, np.ndarray]:
    """Evaluation with strided clips (LSTCL: "5 clips uniformly ... with center cropping", stride 8).

    Clip ``k`` holds ``slow_frames`` frames every ``cfg.stride`` frames at ``EVAL_REFERENCE_FPS``
    (in time, as the LSTCL training strides) from ``uniform_clip_starts``; its fast slot spreads
    ``fast_frames`` over the same extent. A video shorter than one clip's extent shrinks the step to fit
    (the short-video rule above). Deterministic: ``rng`` is unused.
    """
    del rng
    _check_num_frames(num_frames)
    step = fit_step(cfg.slow_frames, source_step(cfg.stride, fps, EVAL_REFERENCE_FPS), num_frames)
    extent = min(step_extent(cfg.slow_frames, step), num_frames)
    plan = {}
    for k, start in enumerate(uniform_clip_starts(num_frames, extent, cfg.clips)):
        plan[f"slow_{k}"] = stepped_indices(int(start), cfg.slow_frames, step, extent)
        plan[f"fast_{k}"] = spread_indices(int(start), extent, cfg.fast_frames)
    return plan


def union_and_positions(plans: list[dict[str, np.ndarray]]) -> tuple[np.ndarray, list[dict[str, np.ndarray]]]:
    """Sorted unique frames of every slot of every plan (one plan per view-set of a video), and each
    plan's slot positions into that union.

    The decoder reads the union once; each slot is then ``union[positions]`` (a gather, never a
    strided slice: DALI 2.4's CPU step-slicing returns wrong frames).
    """
    union = np.unique(np.concatenate([idx for plan in plans for idx in plan.values()]))
    positions = [{slot: np.searchsorted(union, idx).astype(np.int32) for slot, idx in plan.items()}
                 for plan in plans]
    return union.astype(np.int32), positions
