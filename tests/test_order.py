"""The global sample order (pipelines/order.py) as properties: permutation per epoch, independent of
the world size; rank slices that tile each data step; spares that depend on position only; the
.idx sample index read against real shards."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.config import DataConfig
from pipelines.member_reads import MemberReader
from pipelines.order import GlobalOrder, build_order
from pipelines.position import Position
from pipelines.shard_index import ShardSet, read_sample_index


@st.composite
def orders(draw):
    n = draw(st.integers(1, 200))
    world = draw(st.integers(1, 6))
    per_rank = draw(st.integers(1, 8))
    drop_last = draw(st.booleans()) and n >= world * per_rank
    sizes = ()
    block = draw(st.integers(0, 4))
    if block:
        cuts = sorted(draw(st.lists(st.integers(1, n - 1), max_size=8, unique=True))) if n > 1 else []
        sizes = tuple(np.diff([0, *cuts, n]).tolist())
    return GlobalOrder(n, world * per_rank, seed=draw(st.integers(0, 2**31)), drop_last=drop_last,
                       shard_sizes=sizes, block_shards=block), world


@settings(max_examples=150, deadline=None)
@given(orders(), st.integers(0, 5))
def test_each_epoch_is_a_permutation_and_steps_cover_it(order_world, epoch):
    order, world = order_world
    perm = order.permutation(epoch)
    assert sorted(perm.tolist()) == list(range(order.num_samples))
    taken = [order.sample_at(epoch, p) for s in range(order.steps) for r in range(world)
             for p in order.positions(s, r, world)]
    g, n = order.global_batch, order.num_samples
    assert len(taken) == order.steps * g                     # fixed batch sizes
    if order.drop_last:
        assert len(set(taken)) == len(taken) == (n // g) * g   # each sample at most once
    else:
        assert set(taken) == set(range(n))                   # every sample, the wrap repeats only the start
        assert len(taken) - n < g


@settings(max_examples=150, deadline=None)
@given(orders(), st.integers(0, 3))
def test_rank_slices_tile_the_step_at_every_divisor_world_size(order_world, epoch):
    order, _ = order_world
    g = order.global_batch
    for step in range(min(order.steps, 4)):
        whole = [order.sample_at(epoch, p) for p in order.positions(step, 0, 1)]
        for world in (w for w in range(1, g + 1) if g % w == 0):
            sliced = [order.sample_at(epoch, p) for r in range(world) for p in order.positions(step, r, world)]
            assert sliced == whole                            # same samples in the same places


@settings(max_examples=80, deadline=None)
@given(orders(), st.integers(0, 3), st.integers(0, 400))
def test_spares_depend_on_position_only_and_avoid_the_sample(order_world, epoch, position):
    order, _ = order_world
    first = list(order.spare_candidates(epoch, position))
    again = list(GlobalOrder(**{f: getattr(order, f) for f in order.__dataclass_fields__}).spare_candidates(
        epoch, position))
    assert first == again
    g = order.global_batch
    step = {order.sample_at(epoch, p) for p in range(position // g * g, position // g * g + g)}
    tail = set()
    if order.drop_last and order.num_samples % g:
        tail = set(order.permutation(epoch)[order.steps * g:].tolist())
        assert set(first[:len(tail)]) == tail                 # the unused tail first
    outside = set(range(order.num_samples)) - step
    drawn = first[len(tail):len(tail) + len(outside)]
    assert set(drawn) == outside                              # samples of other data steps first
    own = order.sample_at(epoch, position)
    assert set(first[len(tail) + len(outside):]) == step - {own}   # then (tiny data sets) the step's
    # What the loaders try: the sample itself, then these spares (never the sample again at the
    # positions of the epoch's steps, the only ones the loaders ask for).
    assert list(order.candidates(epoch, position)) == [own, *first]
    if position < order.steps * g:
        assert own not in first


def test_epochs_and_seeds_differ_and_world_size_must_divide():
    order = GlobalOrder(50, 6, seed=1)
    assert order.permutation(0).tolist() != order.permutation(1).tolist()
    assert order.permutation(0).tolist() != GlobalOrder(50, 6, seed=2).permutation(0).tolist()
    with pytest.raises(ValueError, match="6 samples does not divide over 4 ranks"):
        order.positions(0, 0, 4)
    assert GlobalOrder(5, 2, shuffle=False).permutation(3).tolist() == [0, 1, 2, 3, 4]


def loader_position(cfg: DataConfig, shards: ShardSet, batch_size: int, num_shards: int, seed: int) -> Position:
    """What ``PositionedLoader._open`` makes: the order over ``shards`` and a position at its start."""
    return Position(build_order(cfg, shards, batch_size, num_shards, seed), batch_size, num_shards, cfg.repeats)


def test_repeated_sampling_orders_videos_and_keeps_the_global_batch_in_view_sets():
    """data.repeats=R: the order's steps hold G / R videos (an epoch visits each video once), the
    position's global batch stays the configured G view-sets, and a position resumes only with the
    same R and per-rank batches of whole videos."""
    shards = ShardSet(Path("s"), "vp9", ["a.tar", "b.tar"], ["a.idx", "b.idx"], [30, 20])
    cfg = DataConfig(repeats=4)
    position = loader_position(cfg, shards, batch_size=8, num_shards=3, seed=5)   # 24 view-sets per step
    assert position.order.global_batch == 6 and position.order.steps == -(-50 // 6)
    assert GlobalOrder(50, 6, seed=5).permutation(0).tolist() == position.order.permutation(0).tolist()
    state = position.state_dict()
    assert (state["global_batch"], state["repeats"]) == (24, 4)
    elsewhere = loader_position(cfg, shards, batch_size=4, num_shards=6, seed=0)    # 1 video per rank
    elsewhere.load_state_dict(state)
    assert elsewhere.seed == 5 and elsewhere.order.global_batch == 6
    with pytest.raises(ValueError, match="data.repeats=4"):
        loader_position(DataConfig(repeats=2), shards, batch_size=12, num_shards=2, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="batch_size_per_gpu=12"):
        loader_position(cfg, shards, batch_size=4, num_shards=2, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="24 does not divide over 4 ranks in whole videos of 4 view-sets"):
        loader_position(cfg, shards, batch_size=4, num_shards=4, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="must divide the per-rank batch of 6"):
        loader_position(cfg, shards, batch_size=6, num_shards=4, seed=0)
    # one view-set per video: the position is what it always was (no repeats other than 1)
    single = loader_position(DataConfig(), shards, batch_size=8, num_shards=3, seed=5).state_dict()
    assert (single["global_batch"], single["repeats"]) == (24, 1)


def test_block_shuffle_reads_a_window_of_shards_at_a_time():
    sizes = (10,) * 8
    order = GlobalOrder(80, 4, seed=0, shard_sizes=sizes, block_shards=2)
    perm = order.permutation(0)
    for w in range(4):
        shards = {int(s) // 10 for s in perm[w * 20:(w + 1) * 20]}
        assert len(shards) == 2                               # 20 samples from exactly 2 shards
    assert perm.tolist() != sorted(perm.tolist())


def test_sample_index_reads_members_by_offset(tmp_path):
    import json

    from pipeline_fixtures import index_videos, write_shards
    videos = index_videos(tmp_path / "media", [6, 7, 8])
    shards = write_shards(tmp_path / "shards", videos, per_shard=2)
    manifest = json.loads((shards / "manifest.json").read_text())
    paths = [str(shards / e["path"]) for e in manifest["shards"]]
    index = read_sample_index(paths, [p.replace(".tar", ".idx") for p in paths],
                              [e["num_samples"] for e in manifest["shards"]])
    assert [s.key for s in index] == [v.key for v in videos]
    reader = MemberReader()
    for sample, video in zip(index, videos):
        assert reader.read(sample.shard, sample.video) == video.path.read_bytes()
        assert json.loads(reader.read(sample.shard, sample.meta))["key"] == video.key
    with pytest.raises(ValueError, match=r"000000\.idx: indexes 2 samples, the manifest says 3"):
        read_sample_index(paths[:1], [paths[0].replace(".tar", ".idx")], [3])
