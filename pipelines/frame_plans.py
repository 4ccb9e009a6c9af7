"""Frame plans: pure, seeded functions ``(num_frames, fps, rng) -> {slot: frame indices}``.

A plan names, for one video, which source frames every temporal slot of a recipe holds, in order.
The DALI graph and the baseline loader both call these functions, so both make the same clips.

Short-video rule (never a crash): a clip asks for T frames spread over a span of the video. The span
is clamped to the video (``1 <= span <= num_frames``), and indices are spread over it by rounding
``linspace``; when the span holds fewer than T frames, neighbouring positions round to the same frame,
so frames repeat (nearest-frame resampling). Strided clips whose extent ``(T - 1) * stride + 1`` does
not fit shrink their stride to the largest that fits (at least 1), and when even stride 1 does not
fit, the indices past the end are clamped to the last frame (edge repeat). A zero-frame video is the
only input rejected (the shard tools quarantine such inputs).

Randomness comes only from ``rng``; ``sample_rng(seed, epoch, key)`` makes one per sample from its key,
so a sample's plan does not depend on the order it is read in, on the rank, or on prefetching, and a
resumed run recomputes exactly the plans it would have made.
"""

from __future__ import annotations

import zlib

import numpy as np

from .config import EvalConfig, LSTCLConfig, SVTConfig


def sample_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    """Per-sample generator: same (seed, epoch, key) -> same plan and augmentation, on every loader."""
    return np.random.default_rng([seed & 0xFFFFFFFF, epoch & 0xFFFFFFFF, zlib.crc32(key.encode())])


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


def fit_stride(num: int, stride: int, available: int) -> int:
    """Largest stride <= ``stride`` whose clip extent fits in ``available`` frames (at least 1)."""
    if num == 1:
        return stride
    return max(1, min(stride, (available - 1) // (num - 1)))


def strided_indices(start: int, num: int, stride: int, region: int) -> np.ndarray:
    """``start + stride * k`` for k < num, edge-clamped to the clip's region ``[start, start + region)``."""
    return np.minimum(start + stride * np.arange(num, dtype=np.int64), start + max(region, 1) - 1)


def svt_frame_plan(num_frames: int, fps: float, rng: np.random.Generator,
                   cfg: SVTConfig) -> dict[str, np.ndarray]:
    """SVT: global views over random ``global_span`` spans, local views over random ``local_span``.

    ``fps`` is unused: SVT spans are fractions of the clip (frame rate is capped when sharding).
    """
    del fps
    plan = {}
    for i, t in enumerate(cfg.global_frames):
        plan[f"global_{i}"] = random_span_indices(num_frames, t, cfg.global_span, rng)
    for i, t in enumerate(cfg.local_frames):
        plan[f"local_{i}"] = random_span_indices(num_frames, t, cfg.local_span, rng)
    return plan


def _clip_extent(num: int, stride: int) -> int:
    return (num - 1) * stride + 1


def lstcl_frame_plan(num_frames: int, fps: float, rng: np.random.Generator,
                     cfg: LSTCLConfig) -> dict[str, np.ndarray]:
    """LSTCL: a short clip and a long clip, placed ``independent`` | ``included`` | ``disjoint``.

    ``included``: the short clip lies inside the long clip's extent. ``disjoint``: their extents do not
    overlap; when the video is too short for both, each gets its share of the frames in proportion to
    its extent and shrinks its stride to fit (the short-video rule above). ``fps`` is unused: strides
    are in frames of the shard's frame rate.
    """
    del fps
    _check_num_frames(num_frames)
    short_stride, long_stride = cfg.short_stride, cfg.long_stride
    if cfg.random_strides:
        short_stride = int(rng.integers(cfg.short_stride_range[0], cfg.short_stride_range[1] + 1))
        long_stride = int(rng.integers(cfg.long_stride_range[0], cfg.long_stride_range[1] + 1))
    ts, tl = cfg.short_frames, cfg.long_frames

    if cfg.placement == "disjoint":
        ext_s, ext_l = _clip_extent(ts, short_stride), _clip_extent(tl, long_stride)
        if ext_s + ext_l > num_frames:
            # Split the frames between the clips in proportion to their extents.
            ext_s = min(max(1, int(num_frames * ext_s / (ext_s + ext_l))), max(1, num_frames - 1))
            ext_l = max(1, num_frames - ext_s)
            short_stride = fit_stride(ts, short_stride, ext_s)
            long_stride = fit_stride(tl, long_stride, ext_l)
        gap_total = max(0, num_frames - ext_s - ext_l)
        # Random order of the two clips, random split of the free frames before/between/after them.
        cuts = np.sort(rng.integers(0, gap_total + 1, size=2))
        before, between = int(cuts[0]), int(cuts[1] - cuts[0])
        if rng.random() < 0.5:
            short_start, long_start = before, before + ext_s + between
        else:
            long_start, short_start = before, before + ext_l + between
        short_start, long_start = min(short_start, num_frames - 1), min(long_start, num_frames - 1)
        return {"short": strided_indices(short_start, ts, short_stride, min(ext_s, num_frames - short_start)),
                "long": strided_indices(long_start, tl, long_stride, min(ext_l, num_frames - long_start))}

    long_stride = fit_stride(tl, long_stride, num_frames)
    ext_l = min(_clip_extent(tl, long_stride), num_frames)
    long_start = int(rng.integers(0, num_frames - ext_l + 1))
    if cfg.placement == "included":
        region_start, region = long_start, ext_l
    else:
        region_start, region = 0, num_frames
    short_stride = fit_stride(ts, short_stride, region)
    ext_s = min(_clip_extent(ts, short_stride), region)
    short_start = region_start + int(rng.integers(0, region - ext_s + 1))
    return {"short": strided_indices(short_start, ts, short_stride, ext_s),
            "long": strided_indices(long_start, tl, long_stride, ext_l)}


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

    Clip ``k`` holds ``slow_frames`` frames every ``cfg.stride`` frames from ``uniform_clip_starts``;
    its fast slot spreads ``fast_frames`` over the same extent. A video shorter than one clip's extent
    shrinks the stride to fit (the short-video rule above). Deterministic; ``fps`` and ``rng`` unused:
    the stride counts frames of the shard's frame rate, like the LSTCL training strides.
    """
    del fps, rng
    _check_num_frames(num_frames)
    stride = fit_stride(cfg.slow_frames, cfg.stride, num_frames)
    extent = min(_clip_extent(cfg.slow_frames, stride), num_frames)
    plan = {}
    for k, start in enumerate(uniform_clip_starts(num_frames, extent, cfg.clips)):
        plan[f"slow_{k}"] = strided_indices(int(start), cfg.slow_frames, stride, extent)
        plan[f"fast_{k}"] = spread_indices(int(start), extent, cfg.fast_frames)
    return plan


def union_and_positions(plan: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Sorted unique frames of all slots, and each slot's positions into that union.

    The decoder reads the union once; each slot is then ``union[positions]`` (a gather, never a
    strided slice: DALI 2.4's CPU step-slicing returns wrong frames).
    """
    union = np.unique(np.concatenate(list(plan.values())))
    positions = {slot: np.searchsorted(union, idx).astype(np.int32) for slot, idx in plan.items()}
    return union.astype(np.int32), positions
