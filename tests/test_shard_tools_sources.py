"""Listing inputs (Kinetics CSV, SSv2 JSON, folders) and planning shards: no video is decoded here."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shard_tools.__main__ import parse_shard_size
from shard_tools.sources import (MAX_KEY_LENGTH, hashed_key, read_folder, read_kinetics_csv, read_ssv2,
                                 sanitize_key)
from shard_tools.writer import plan_shards


def _kinetics_csv(path: Path, rows: list[list[str]], header=("label", "youtube_id", "time_start",
                                                              "time_end", "split", "is_cc")) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


ROWS = [["air drumming", "abc123DEF_-", "10", "20", "train", "0"],
        ["abseiling", "zzz999yyy00", "0", "10", "train", "1"],
        ["abseiling", "qqq111rrr22", "5", "15", "train", "0"]]


@pytest.mark.parametrize("layout", ["flat", "class_spaces", "class_underscores"])
def test_kinetics_layouts_resolve_the_same_keys_and_labels(tmp_path, layout):
    videos = tmp_path / "videos"
    for label, youtube_id, start, end, *_ in ROWS:
        folder = {"flat": videos, "class_spaces": videos / label,
                  "class_underscores": videos / label.replace(" ", "_")}[layout]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{youtube_id}_{int(start):06d}_{int(end):06d}.mp4").write_bytes(b"x")
    listing = read_kinetics_csv(_kinetics_csv(tmp_path / "train.csv", ROWS), videos)
    assert listing.label_map == {"abseiling": 0, "air drumming": 1}
    assert [v.key for v in listing.inputs] == ["abc123DEF_-_000010_000020", "qqq111rrr22_000005_000015",
                                               "zzz999yyy00_000000_000010"]
    assert all(Path(v.path).exists() for v in listing.inputs)
    assert [v.label for v in listing.inputs] == [1, 0, 0]
    assert listing.split == "train" and not listing.rejected


def test_kinetics_without_is_cc_and_bad_rows(tmp_path):
    rows = [r[:5] for r in ROWS] + [
        ["abseiling", "aaa", "x", "10", "train"],            # time not a number
        ["abseiling", "bbb", "10", "5", "train"],            # end before start
        ["abseiling", "bad/id.", "0", "10", "train"],        # key charset
        ["abseiling", "ccc", "0"],                           # too few columns
        ["abseiling", "zzz999yyy00", "0", "10", "train"],    # duplicate of row 3
    ]
    header = ("label", "youtube_id", "time_start", "time_end", "split")
    listing = read_kinetics_csv(_kinetics_csv(tmp_path / "k.csv", rows, header), tmp_path)
    assert len(listing.inputs) == 3 and listing.num_inputs == 8
    reasons = {r.input_id: r.reason for r in listing.rejected}
    assert reasons == {"k.csv:5": "bad annotation row", "k.csv:6": "bad annotation row",
                       "k.csv:7": "bad annotation row", "k.csv:8": "bad annotation row",
                       "k.csv:9": "duplicate key"}
    details = {r.input_id: r.detail for r in listing.rejected}
    assert "'x'" in details["k.csv:5"] and "time_end" in details["k.csv:6"]
    # Missing files are listed (they are quarantined as "missing" when probed, not dropped here).
    assert all(not Path(v.path).exists() for v in listing.inputs)


def test_kinetics_split_selection_and_fixed_label_map(tmp_path):
    rows = ROWS + [["abseiling", "val00000001", "0", "10", "validate", "0"]]
    path = _kinetics_csv(tmp_path / "all.csv", rows)
    with pytest.raises(ValueError, match="several splits.*--split"):
        read_kinetics_csv(path, tmp_path)
    val = read_kinetics_csv(path, tmp_path, split="validate",
                            label_map={"abseiling": 7, "air drumming": 3, "zumba": 9})
    assert [v.key for v in val.inputs] == ["val00000001_000000_000010"] and val.num_inputs == 1
    assert val.inputs[0].label == 7 and val.label_map["zumba"] == 9
    with pytest.raises(ValueError, match="not the Kinetics format"):
        read_kinetics_csv(_kinetics_csv(tmp_path / "x.csv", [], header=("a", "b")), tmp_path)


def test_ssv2_label_from_template_without_brackets(tmp_path):
    labels = {"Holding something next to something": "0", "Pushing something from left to right": "1"}
    (tmp_path / "labels.json").write_text(json.dumps(labels))
    rows = [{"id": "42", "label": "holding a cup next to a pen", "placeholders": ["a cup", "a pen"],
             "template": "Holding [something] next to [something]"},
            {"id": "7", "label": "pushing a box", "placeholders": ["a box"],
             "template": "Pushing [something] from left to right"},
            {"id": "8", "template": "Not a [real] class"},
            {"label": "no id"}]
    (tmp_path / "validation.json").write_text(json.dumps(rows))
    with pytest.raises(ValueError, match="videos: the video folder does not exist"):
        read_ssv2(tmp_path / "validation.json", tmp_path / "labels.json", tmp_path / "videos")
    (tmp_path / "videos").mkdir()
    listing = read_ssv2(tmp_path / "validation.json", tmp_path / "labels.json", tmp_path / "videos")
    assert listing.split == "validation"
    assert [(v.key, v.label, v.label_name) for v in listing.inputs] == [
        ("42", 0, "Holding something next to something"), ("7", 1, "Pushing something from left to right")]
    assert Path(listing.inputs[0].path).name == "42.webm"
    assert sorted(r.reason for r in listing.rejected) == ["bad annotation row"] * 2
    (tmp_path / "test.json").write_text(json.dumps([{"id": "5"}]))
    test = read_ssv2(tmp_path / "test.json", tmp_path / "labels.json", tmp_path)
    assert [(v.key, v.label) for v in test.inputs] == [("5", -1)]


def test_class_folders_and_unlabelled_folder(tmp_path):
    for rel in ["walk/a.mp4", "walk/b c.webm", "run/a.mp4", "run/notes.txt", "loose.mp4", "run/x.y.mp4",
                "run/x_y.mp4", "run/clip.mp5"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"v")
    listing = read_folder(tmp_path, labelled=True)
    assert listing.label_map == {"run": 0, "walk": 1}
    # run/x.y.mp4 and run/x_y.mp4 both sanitise to run_x_y: each keeps a key of its own path.
    x_dot, x_under = hashed_key("run_x_y", "run/x.y.mp4"), hashed_key("run_x_y", "run/x_y.mp4")
    assert [(v.input_id, v.key, v.label) for v in listing.inputs] == sorted(
        [("run/a.mp4", "run_a", 0), ("run/x.y.mp4", x_dot, 0), ("run/x_y.mp4", x_under, 0),
         ("walk/a.mp4", "walk_a", 1), ("walk/b c.webm", "walk_b_c", 1)], key=lambda t: t[1])
    assert {v.key: v.key_hash["of"] for v in listing.inputs if v.key_hash} == {x_dot: "run/x.y.mp4",
                                                                                x_under: "run/x_y.mp4"}
    # Nothing is dropped silently: the loose video is quarantined, other extensions are counted.
    assert [(r.input_id, r.reason) for r in listing.rejected] == [("loose.mp4", "not in a class folder")]
    assert listing.skipped["count"] == 2 and listing.skipped["by_extension"] == {".mp5": 1, ".txt": 1}
    assert listing.skipped["examples"] == ["run/clip.mp5", "run/notes.txt"]
    unlabelled = read_folder(tmp_path, labelled=False)
    assert "loose" in [v.key for v in unlabelled.inputs] and not unlabelled.rejected
    assert {v.label for v in unlabelled.inputs} == {-1}
    assert sanitize_key("a b/c.d") == "a_b_c_d"


def test_folder_keys_are_stable_when_files_are_added(tmp_path):
    """A colliding key depends only on the file's own path, not on which other files exist."""
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "clip 1.mp4").write_bytes(b"v")
    (tmp_path / "c" / "clip_1.mp4").write_bytes(b"v")
    first = {v.input_id: v.key for v in read_folder(tmp_path, labelled=True).inputs}
    (tmp_path / "c" / "clip-1.mp4").write_bytes(b"v")
    (tmp_path / "c" / "clip_1.webm").write_bytes(b"v")
    second = {v.input_id: v.key for v in read_folder(tmp_path, labelled=True).inputs}
    assert len(second) == 4 and len(set(second.values())) == 4
    assert {k: second[k] for k in first} == first and second["c/clip-1.mp4"] == "c_clip-1"


def test_long_keys_stay_within_file_name_limits(tmp_path):
    deep = tmp_path / "cls" / ("d" * 120) / ("e" * 200)
    deep.mkdir(parents=True)
    (deep / ("v" * 240 + ".mp4")).write_bytes(b"v")
    (deep / ("v" * 239 + "w.mp4")).write_bytes(b"v")  # same first 77 characters of key
    listing = read_folder(tmp_path, labelled=True)
    keys = [v.key for v in listing.inputs]
    assert len(keys) == 2 and len(set(keys)) == 2 and all(len(k) <= MAX_KEY_LENGTH for k in keys)
    assert all(v.key_hash["of"] == v.input_id and "longer than" in v.key_hash["why"] for v in listing.inputs)
    assert read_folder(tmp_path, labelled=True).inputs == listing.inputs  # stable
    long_id = "L" * 300
    path = _kinetics_csv(tmp_path / "k.csv", [["abseiling", long_id, "0", "10", "train", "0"],
                                              ["abseiling", long_id, "0", "10", "train", "0"]])
    kinetics = read_kinetics_csv(path, tmp_path)
    assert len(kinetics.inputs[0].key) == MAX_KEY_LENGTH
    assert kinetics.inputs[0].key_hash["of"] == f"{long_id}_000000_000010"
    assert [r.reason for r in kinetics.rejected] == ["duplicate key"]  # a real duplicate stays one


def test_kinetics_clip_under_an_unlisted_extension_is_still_the_rows_input(tmp_path):
    """A row's clip saved as .mxf is probed (not reported missing); downloader sidecars are not."""
    rows = [["abseiling", "aaaaaaaaaaa", "0", "10", "train", "0"],
            ["abseiling", "bbbbbbbbbbb", "0", "10", "train", "0"]]
    (tmp_path / "aaaaaaaaaaa_000000_000010.mxf").write_bytes(b"v")
    (tmp_path / "bbbbbbbbbbb_000000_000010.info.json").write_bytes(b"{}")
    (tmp_path / "bbbbbbbbbbb_000000_000010.description").write_bytes(b"text")
    listing = read_kinetics_csv(_kinetics_csv(tmp_path / "k.csv", rows), tmp_path)
    paths = {v.key: Path(v.path).name for v in listing.inputs}
    assert paths == {"aaaaaaaaaaa_000000_000010": "aaaaaaaaaaa_000000_000010.mxf",
                     "bbbbbbbbbbb_000000_000010": "bbbbbbbbbbb_000000_000010.mp4"}


def test_shard_size_parsing():
    assert parse_shard_size("1000") == (1000, None)
    assert parse_shard_size("256MB") == (None, 256_000_000)
    assert parse_shard_size("1GiB") == (None, 2**30)
    for bad in ("0", "1.5", "12XB", "big"):
        with pytest.raises(Exception, match="--shard-size"):
            parse_shard_size(bad)


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 5000), min_size=1, max_size=60), seed=st.integers(0, 2**31),
       max_samples=st.one_of(st.none(), st.integers(1, 10)), max_bytes=st.one_of(st.none(), st.integers(1, 20000)))
def test_plan_shards_covers_every_sample_once_within_limits(sizes, seed, max_samples, max_bytes):
    if max_samples is None and max_bytes is None:
        max_samples = 4
    sample_bytes = {f"k{i:03d}": s for i, s in enumerate(sizes)}
    plan = plan_shards(sample_bytes, seed=seed, max_samples=max_samples, max_bytes=max_bytes)
    keys = [k for shard in plan for k in shard.keys]
    assert sorted(keys) == sorted(sample_bytes)
    assert [s.index for s in plan] == list(range(len(plan)))
    for shard in plan:
        assert shard.keys
        if max_samples:
            assert len(shard.keys) <= max_samples
        if max_bytes and len(shard.keys) > 1:
            assert sum(sample_bytes[k] for k in shard.keys) <= max_bytes
    # Deterministic in the seed and independent of the dict's insertion order.
    reordered = dict(reversed(list(sample_bytes.items())))
    assert plan_shards(reordered, seed=seed, max_samples=max_samples, max_bytes=max_bytes) == plan


def test_plan_shards_shuffles_with_the_seed():
    sample_bytes = {f"k{i:03d}": 10 for i in range(40)}
    a = plan_shards(sample_bytes, seed=0, max_samples=10, max_bytes=None)
    b = plan_shards(sample_bytes, seed=1, max_samples=10, max_bytes=None)
    assert a != b and [k for s in a for k in s.keys] != sorted(sample_bytes)


def test_kinetics_test_csv_without_labels_is_unlabelled(tmp_path):
    path = _kinetics_csv(tmp_path / "test.csv", [["abc123DEF_-", "10", "20", "test"]],
                         header=("youtube_id", "time_start", "time_end", "split"))
    listing = read_kinetics_csv(path, tmp_path)
    assert [(v.key, v.label, v.label_name) for v in listing.inputs] == [("abc123DEF_-_000010_000020", -1, "")]
    assert listing.split == "test" and listing.label_map == {}
