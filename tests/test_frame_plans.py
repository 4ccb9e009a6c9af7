"""Frame plans and view parameters as properties (hypothesis), plus the data config's key checks."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.config import DataConfig, EvalConfig, LSTCLConfig, SVTConfig
from pipelines.frame_plans import (eval_frame_plan, lstcl_frame_plan, sample_rng, svt_frame_plan,
                                   union_and_positions)
from pipelines.views import (ROI_X0, ROI_X1, ROI_Y0, ROI_Y1, plan_sample, random_resized_crop_box,
                             recipe_views)

num_frames = st.integers(min_value=1, max_value=1500)
seeds = st.integers(min_value=0, max_value=2**31 - 1)
FAST = settings(max_examples=150, deadline=None, derandomize=True)  # same examples every run (CI)


def assert_in_video(plan: dict[str, np.ndarray], n: int) -> None:
    for slot, idx in plan.items():
        assert idx.dtype.kind == "i", slot
        assert idx.min() >= 0 and idx.max() < n, (slot, idx, n)
        assert np.all(np.diff(idx) >= 0), (slot, idx)   # frames stay in temporal order


@FAST
@given(n=num_frames, seed=seeds)
def test_svt_plan_counts_spans_and_order(n, seed):
    cfg = SVTConfig()
    plan = svt_frame_plan(n, 30.0, np.random.default_rng(seed), cfg)
    assert list(plan) == [f"global_{i}" for i in range(2)] + [f"local_{i}" for i in range(8)]
    assert_in_video(plan, n)
    global_span = max(1, round(0.9 * n))
    local_span = max(1, round(n / 8))
    for i, t in enumerate(cfg.global_frames):
        idx = plan[f"global_{i}"]
        assert len(idx) == t
        assert idx[-1] - idx[0] + 1 <= global_span
        if global_span >= t:
            assert len(np.unique(idx)) == t          # enough frames: no repeats
        if t > 1:
            assert idx[-1] - idx[0] + 1 == global_span  # spread over the whole span
    for i, t in enumerate(cfg.local_frames):
        idx = plan[f"local_{i}"]
        assert len(idx) == t
        assert idx[-1] - idx[0] + 1 <= local_span


@FAST
@given(n=num_frames, seed=seeds, placement=st.sampled_from(["independent", "included", "disjoint"]),
       random_strides=st.booleans())
def test_lstcl_plan_strides_and_placement(n, seed, placement, random_strides):
    cfg = LSTCLConfig(placement=placement, random_strides=random_strides)
    plan = lstcl_frame_plan(n, 30.0, np.random.default_rng(seed), cfg)
    assert_in_video(plan, n)
    short, long = plan["short"], plan["long"]
    assert len(short) == cfg.short_frames and len(long) == cfg.long_frames
    if not random_strides and n >= 400:
        # Long enough for both clips at full stride: exactly the configured strides.
        assert set(np.diff(short)) == {cfg.short_stride}
        assert set(np.diff(long)) == {cfg.long_stride}
    if random_strides and n >= 400:
        assert len(set(np.diff(short))) == 1 and cfg.short_stride_range[0] <= np.diff(short)[0] <= cfg.short_stride_range[1]
        assert len(set(np.diff(long))) == 1 and cfg.long_stride_range[0] <= np.diff(long)[0] <= cfg.long_stride_range[1]
    if placement == "included":
        assert long.min() <= short.min() and short.max() <= long.max()
    if placement == "disjoint" and n >= 2:
        assert short.max() < long.min() or long.max() < short.min()


@FAST
@given(n=num_frames, clips=st.integers(1, 5))
def test_eval_plan_is_deterministic_and_segmented(n, clips):
    cfg = EvalConfig(clips=clips)
    plan = eval_frame_plan(n, 30.0, None, cfg)
    assert_in_video(plan, n)
    assert plan.keys() == {f"{s}_{k}" for s in ("slow", "fast") for k in range(clips)}
    for k in range(clips):
        assert len(plan[f"slow_{k}"]) == 8 and len(plan[f"fast_{k}"]) == 64
        lo, hi = k * n // clips, max(k * n // clips + 1, (k + 1) * n // clips)
        assert plan[f"fast_{k}"].min() >= lo and plan[f"fast_{k}"].max() < max(hi, lo + 1)
    again = eval_frame_plan(n, 30.0, np.random.default_rng(1), cfg)
    assert all(np.array_equal(plan[s], again[s]) for s in plan)


@FAST
@given(n=num_frames, seed=seeds)
def test_union_positions_reconstruct_every_slot(n, seed):
    plan = svt_frame_plan(n, 30.0, np.random.default_rng(seed), SVTConfig())
    union, positions = union_and_positions(plan)
    assert np.all(np.diff(union) > 0)      # sorted, each frame decoded once
    for slot, idx in plan.items():
        assert np.array_equal(union[positions[slot]], idx)


def test_plans_are_seeded_per_sample():
    cfg = DataConfig(recipe="svt")
    views = recipe_views(cfg)
    kw = dict(num_frames=300, fps=30.0, width=340, height=256)
    a = plan_sample(cfg, views, seed=1, epoch=0, key="abc", **kw)
    b = plan_sample(cfg, views, seed=1, epoch=0, key="abc", **kw)
    assert np.array_equal(a.frames, b.frames)
    assert all(np.array_equal(a.params[v], b.params[v]) for v in a.params)
    for other in (dict(seed=2, epoch=0, key="abc"), dict(seed=1, epoch=1, key="abc"),
                  dict(seed=1, epoch=0, key="abd")):
        c = plan_sample(cfg, views, **other, **kw)
        assert not np.array_equal(a.params["global_0"], c.params["global_0"])
    assert sample_rng(0, 0, "k").random() == sample_rng(0, 0, "k").random()


@FAST
@given(seed=seeds, width=st.integers(16, 1000), height=st.integers(16, 1000),
       lo=st.floats(0.05, 0.5), span=st.floats(0.0, 0.5))
def test_random_resized_crop_box_in_frame_and_scale(seed, width, height, lo, span):
    scale, ratio = (lo, lo + span), (3 / 4, 4 / 3)
    box = random_resized_crop_box(np.random.default_rng(seed), width, height, scale, ratio)
    y0, x0, y1, x1 = box[ROI_Y0], box[ROI_X0], box[ROI_Y1], box[ROI_X1]
    assert 0 <= y0 < y1 <= 1 + 1e-6 and 0 <= x0 < x1 <= 1 + 1e-6
    h, w = (y1 - y0) * height, (x1 - x0) * width
    # Box sides are whole pixels: allow half a pixel of rounding on each side (matters when tiny).
    in_ratio_range = (w + 0.5) / max(h - 0.5, 1e-6) >= ratio[0] * 0.999 and (w - 0.5) / (h + 0.5) <= ratio[1] * 1.001
    fallback = abs((y1 - y0) - 1) < 1e-6 or abs((x1 - x0) - 1) < 1e-6
    assert in_ratio_range or fallback


def test_short_video_never_crashes():
    for recipe in ("svt", "lstcl", "eval"):
        cfg = DataConfig(recipe=recipe)
        for n in (1, 2, 3, 7):
            plan = plan_sample(cfg, recipe_views(cfg), seed=0, epoch=0, key="k", num_frames=n, fps=30.0,
                               width=64, height=48)
            assert plan.frames.max() < n
    with pytest.raises(ValueError, match="at least one frame"):
        svt_frame_plan(0, 30.0, np.random.default_rng(0), SVTConfig())


def test_config_rejects_unknown_keys_naming_the_field():
    with pytest.raises(ValueError, match="data.svt.global_frame"):
        DataConfig.from_dict({"recipe": "svt", "svt": {"global_frame": [8]}})
    with pytest.raises(ValueError, match="data.bogus"):
        DataConfig.from_dict({"bogus": 1})
    cfg = DataConfig.from_dict({"recipe": "lstcl", "lstcl": {"placement": "disjoint", "scale": [0.2, 1.0]}})
    assert cfg.lstcl.placement == "disjoint" and cfg.lstcl.scale == (0.2, 1.0)
    with pytest.raises(ValueError, match="unknown view group 'globl_0'"):
        DataConfig.from_dict({"augment": {"blur_p": {"globl_0": 1.0}}})
    with pytest.raises(ValueError, match="placement"):
        DataConfig.from_dict({"lstcl": {"placement": "overlapping"}})
