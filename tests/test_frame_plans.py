"""Frame plans and view parameters as properties (hypothesis), plus the data config's key checks."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.config import DataConfig, EvalConfig, LSTCLConfig, SVTConfig
from pipelines.frame_plans import (draw_lstcl_strides, eval_frame_plan, lstcl_frame_plan, sample_rng,
                                   svt_frame_plan, union_and_positions)
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


PLACEMENTS = ["independent", "included", "disjoint"]
# LSTCL paper Table 1, rows 1-3 (random strides), and its last row (fixed 8/32, the default).
TABLE1 = {
    "short4_long_random": dict(short_stride=4, long_stride_choices=(8, 16, 32)),
    "long32_short_random": dict(long_stride=32, short_stride_choices=(4, 8, 16)),
    "both_random": dict(short_stride_choices=(4, 8, 16, 32), long_stride_choices=(4, 8, 16, 32)),
    "fixed": dict(),
}
TABLE1_PAIRS = {
    "short4_long_random": {(4, 8), (4, 16), (4, 32)},
    "long32_short_random": {(4, 32), (8, 32), (16, 32)},
    "both_random": {(s, t) for s in (4, 8, 16, 32) for t in (4, 8, 16, 32) if s <= t},
    "fixed": {(8, 32)},
}


def one_stride(idx: np.ndarray) -> int:
    steps = set(np.diff(idx).tolist())
    assert len(steps) == 1, idx
    return steps.pop()


@FAST
@given(n=num_frames, seed=seeds, placement=st.sampled_from(PLACEMENTS), row=st.sampled_from(sorted(TABLE1)))
def test_lstcl_plan_strides_and_placement(n, seed, placement, row):
    cfg = LSTCLConfig(placement=placement, **TABLE1[row])
    plan = lstcl_frame_plan(n, 30.0, np.random.default_rng(seed), cfg)
    assert_in_video(plan, n)
    short, long = plan["short"], plan["long"]
    assert len(short) == cfg.short_frames and len(long) == cfg.long_frames
    if n >= 2 * 8 * 32:
        # Long enough for both clips at any stride: exactly a stride pair of the row (30 fps = reference).
        assert (one_stride(short), one_stride(long)) in TABLE1_PAIRS[row]
    if placement == "included":
        assert long.min() <= short.min() and short.max() <= long.max()
    if placement == "disjoint" and n >= 2:
        assert short.max() < long.min() or long.max() < short.min()


@FAST
@given(n=st.integers(2 * 8 * 32, 1500), seed=seeds, placement=st.sampled_from(PLACEMENTS),
       row=st.sampled_from(sorted(TABLE1)))
def test_table1_strides_are_drawn_from_the_sets_with_short_le_long(n, seed, placement, row):
    cfg = LSTCLConfig(placement=placement, **TABLE1[row])
    plan = lstcl_frame_plan(n, 30.0, np.random.default_rng(seed), cfg)
    short, long = one_stride(plan["short"]), one_stride(plan["long"])
    assert short in (cfg.short_stride_choices or (cfg.short_stride,))
    assert long in (cfg.long_stride_choices or (cfg.long_stride,))
    assert short <= long
    # Clip extents as planned: T frames, first to last (T - 1) * stride frames apart.
    assert plan["short"][-1] - plan["short"][0] == (cfg.short_frames - 1) * short
    assert plan["long"][-1] - plan["long"][0] == (cfg.long_frames - 1) * long
    assert (short, long) == draw_lstcl_strides(cfg, np.random.default_rng(seed))  # the plan's first draw


@pytest.mark.parametrize("row", sorted(TABLE1))
def test_table1_every_stride_pair_is_reachable(row):
    cfg = LSTCLConfig(**TABLE1[row])
    assert set(cfg.stride_pairs()) == TABLE1_PAIRS[row]
    seen = {(one_stride(p["short"]), one_stride(p["long"]))
            for p in (lstcl_frame_plan(600, 30.0, np.random.default_rng(seed), cfg) for seed in range(300))}
    assert seen == TABLE1_PAIRS[row]   # every member of every set is drawn, nothing else


def test_table1_rows_from_yaml_and_bad_stride_sets_rejected():
    cfg = DataConfig.from_dict({"recipe": "lstcl", "lstcl": {"short_stride": 4, "long_stride_choices": [8, 16, 32]}})
    assert cfg.lstcl.long_stride_choices == (8, 16, 32) and cfg.lstcl.short_stride_choices == ()
    assert LSTCLConfig().stride_pairs() == [(8, 32)]       # the default stays fixed 8/32
    with pytest.raises(ValueError, match="long 2 has no partner"):
        LSTCLConfig(short_stride=4, long_stride_choices=(2, 8))
    with pytest.raises(ValueError, match="short 64 has no partner"):
        LSTCLConfig(short_stride_choices=(4, 64), long_stride_choices=(8, 32))
    with pytest.raises(ValueError, match="distinct strides"):
        LSTCLConfig(short_stride_choices=(4, 4))
    with pytest.raises(ValueError, match="data.lstcl.random_strides"):
        DataConfig.from_dict({"lstcl": {"random_strides": True}})


@FAST
@given(seconds=st.floats(20.0, 50.0), seed=seeds, placement=st.sampled_from(PLACEMENTS),
       row=st.sampled_from(sorted(TABLE1)))
def test_lstcl_plans_cover_the_same_seconds_at_15_25_30_fps(seconds, seed, placement, row):
    cfg = LSTCLConfig(placement=placement, **TABLE1[row])
    at30 = lstcl_frame_plan(round(seconds * 30), 30.0, np.random.default_rng(seed), cfg)
    for fps in (15.0, 25.0, 29.97, 30.0):
        n = round(seconds * fps)
        plan = lstcl_frame_plan(n, fps, np.random.default_rng(seed), cfg)
        assert_in_video(plan, n)
        for slot in ("short", "long"):
            stride = one_stride(at30[slot])            # strides count frames at 30 fps
            offsets = (plan[slot] - plan[slot][0]) / fps
            # Frame k sits k * stride / 30 s after the first, to the nearest frame of this video.
            assert np.all(np.abs(offsets - np.arange(len(offsets)) * stride / 30) <= 0.5 / fps + 1e-9), (slot, fps)
        if placement == "included":
            assert plan["long"].min() <= plan["short"].min() and plan["short"].max() <= plan["long"].max()
        if placement == "disjoint":
            assert plan["short"].max() < plan["long"].min() or plan["long"].max() < plan["short"].min()


@FAST
@given(seconds=st.floats(1.0, 50.0), seed=seeds, clips=st.integers(1, 5))
def test_svt_and_eval_spans_cover_the_same_seconds_at_15_25_30_fps(seconds, seed, clips):
    for fps in (15.0, 25.0, 30.0):
        n = round(seconds * fps)
        svt = svt_frame_plan(n, fps, np.random.default_rng(seed), SVTConfig())
        # Span fractions of the video: the global views' first-to-last frames cover 90% of its seconds.
        assert abs((svt["global_1"][-1] - svt["global_1"][0] + 1) / fps - 0.9 * seconds) <= 1.5 / fps
        ev = eval_frame_plan(n, fps, None, EvalConfig(clips=clips))
        for k in range(clips):
            assert abs(ev[f"fast_{k}"][0] / fps - k * seconds / clips) <= 1.5 / fps


def test_strided_clips_in_short_videos_spread_over_the_video():
    cfg = LSTCLConfig()
    for n, fps in ((100, 30.0), (50, 15.0), (5, 30.0), (1, 25.0)):
        long = lstcl_frame_plan(n, fps, np.random.default_rng(0), cfg)["long"]
        assert long[0] == 0 and long[-1] == n - 1, (n, long)   # the whole video, evenly
        assert np.all(np.diff(long) >= 0)


def test_strided_plans_reject_a_missing_frame_rate():
    for fps in (0.0, -25.0, float("nan")):
        with pytest.raises(ValueError, match="fps"):
            lstcl_frame_plan(300, fps, np.random.default_rng(0), LSTCLConfig())


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
    rng = np.random.default_rng(seed)
    plans = [svt_frame_plan(n, 30.0, rng, SVTConfig()) for _ in range(3)]   # three view-sets of a video
    union, positions = union_and_positions(plans)
    assert np.all(np.diff(union) > 0)      # sorted, each frame decoded once
    assert set(union) == {int(i) for plan in plans for idx in plan.values() for i in idx}
    for plan, pos in zip(plans, positions):
        for slot, idx in plan.items():
            assert np.array_equal(union[pos[slot]], idx)


def test_plans_are_seeded_per_sample():
    cfg = DataConfig(recipe="svt")
    views = recipe_views(cfg)
    kw = dict(num_frames=300, fps=30.0, width=340, height=256)
    a = plan_sample(cfg, views, seed=1, epoch=0, key="abc", **kw)
    b = plan_sample(cfg, views, seed=1, epoch=0, key="abc", **kw)
    assert np.array_equal(a.frames, b.frames)
    assert all(np.array_equal(a.view_sets[0].params[v], b.view_sets[0].params[v]) for v in a.view_sets[0].params)
    for other in (dict(seed=2, epoch=0, key="abc"), dict(seed=1, epoch=1, key="abc"),
                  dict(seed=1, epoch=0, key="abd")):
        c = plan_sample(cfg, views, **other, **kw)
        assert not np.array_equal(a.view_sets[0].params["global_0"], c.view_sets[0].params["global_0"])
    assert sample_rng(0, 0, "k").random() == sample_rng(0, 0, "k").random()


@pytest.mark.parametrize("recipe", ["svt", "lstcl"])
def test_repeated_view_sets_are_independent_and_depend_only_on_their_repeat_index(recipe):
    kw = dict(seed=3, epoch=2, key="vid", num_frames=300, fps=30.0, width=340, height=256)
    one = DataConfig(recipe=recipe)
    four = DataConfig(recipe=recipe, repeats=4)
    views = recipe_views(one)
    single = plan_sample(one, views, **kw)
    plan = plan_sample(four, views, **kw)
    assert len(plan.view_sets) == 4
    # view-set 0 is the plan of data.repeats=1; view-set r is the same with 2, 3 or 4 repeats
    for view in views:
        assert np.array_equal(plan.view_frames(view, 0), single.view_frames(view))
        assert np.array_equal(plan.view_sets[0].params[view.name], single.view_sets[0].params[view.name])
    two = plan_sample(DataConfig(recipe=recipe, repeats=2), views, **kw)
    for view in views:
        assert np.array_equal(two.view_frames(view, 1), plan.view_frames(view, 1))
    # each view-set draws its own frames and augmentation; the union holds every one's frames once
    first = views[0]
    assert len({tuple(plan.view_sets[r].params[first.name]) for r in range(4)}) == 4
    if recipe == "svt":   # LSTCL's fixed strides can coincide in frames, never in all parameters
        assert len({tuple(plan.view_frames(first, r)) for r in range(4)}) == 4
    wanted = {int(i) for r in range(4) for v in views for i in plan.view_frames(v, r)}
    assert set(plan.frames.tolist()) == wanted and np.all(np.diff(plan.frames) > 0)


def test_repeats_must_be_positive_and_random():
    with pytest.raises(ValueError, match="data.repeats must be >= 1"):
        DataConfig(repeats=0)
    with pytest.raises(ValueError, match="eval recipe"):
        DataConfig(recipe="eval", repeats=2)


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


def test_loader_views_span_the_same_seconds_in_15_25_30_fps_shards(tmp_path):
    """Real DALI loader over index videos of 8 s at 15, 25 and 30 fps (one shard set): each LSTCL view
    holds its planned frames, and frame k of a clip sits k * stride / 30 s after its first frame."""
    import sys
    from pathlib import Path

    from pipeline_fixtures import FixtureVideo, assert_views_hold_planned_frames, frame_indices, meta_of, write_shards

    from pipelines import build_loader
    from pipelines.config import AugmentConfig
    from footage import write_synthetic_video

    videos = []
    for fps in (15, 25, 30):
        path = write_synthetic_video(tmp_path / f"v{fps}.webm", num_frames=8 * fps, width=64, height=48, fps=fps)
        videos.append(FixtureVideo(f"v{fps}", path))
    shards = write_shards(tmp_path / "shards", videos, per_shard=3)
    cfg = DataConfig(shards=str(shards), recipe="lstcl", num_threads=2, shuffle=False,
                     lstcl=LSTCLConfig(size=32), augment=AugmentConfig(enabled=False))
    assert_views_hold_planned_frames(build_loader(cfg, batch_size=3, seed=0), cfg, shards, seed=0)
    metas = meta_of(shards)
    (batch,) = list(build_loader(cfg, batch_size=3, seed=0))
    for slot, stride in (("short", cfg.lstcl.short_stride), ("long", cfg.lstcl.long_stride)):
        for key, frames in zip(batch["key"], frame_indices(batch[slot], cfg)):
            fps = metas[key]["fps"]
            offsets = (np.array(frames) - frames[0]) / fps
            assert np.all(np.abs(offsets - np.arange(len(frames)) * stride / 30) <= 0.5 / fps + 1e-9), (key, slot)


def test_lstcl_stswin_t16_recipe_is_the_papers_final_setting():
    """LSTCL paper Sec 5.2: Space-Time Swin, T=16 for both clips, tau_S=4, tau_L=16, MoCo v3."""
    from pathlib import Path

    from training.config import load_config

    cfg = load_config(Path(__file__).parents[1] / "configs" / "lstcl_stswin_t16.yaml")
    lstcl = cfg.data.lstcl
    assert (lstcl.short_frames, lstcl.short_stride, lstcl.long_frames, lstcl.long_stride) == (16, 4, 16, 16)
    assert lstcl.stride_pairs() == [(4, 16)] and lstcl.placement == "independent"
    assert cfg.model.backbone == "stswin_b" and cfg.objective.name == "mocov3"
    plan = lstcl_frame_plan(300, 30.0, np.random.default_rng(0), lstcl)
    assert plan["short"][-1] - plan["short"][0] == 15 * 4 and plan["long"][-1] - plan["long"][0] == 15 * 16
