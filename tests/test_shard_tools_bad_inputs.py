"""Bad-input suite: one folder of class subfolders holding good footage next to every kind of bad
input we know (all written with PyAV), sharded once by the real ``python -m shard_tools shard`` CLI in
a subprocess and checked by ``verify``. Each input is asserted to land where it belongs: good ones in
the shards (never quarantined), bad ones in the quarantine with their reason, files that are not
inputs counted in the manifest."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from footage import write_synthetic_video, write_timestamped_video
from shard_fixtures import (write_audio_only, write_encoder_breaker, write_truncated, write_unsupported_codec,
                            write_with_audio)
from shard_tools.sources import MAX_KEY_LENGTH
from shard_tools.verify import read_shard_samples

REPO = Path(__file__).resolve().parents[1]
LONG_NAME = "a_very_long_file_name_" * 9 + "end"  # 201 characters: over MAX_KEY_LENGTH


def write_last_frame_lasting(path: Path, seconds: float = 600.0) -> Path:
    """20 VP9 frames at 25 fps whose last packet claims to last ``seconds`` (Matroska BlockDuration)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libvpx-vp9", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        packets = []
        for i in range(20):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), i * 9, np.uint8), format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, 25)
            packets += stream.encode(frame)
        packets += stream.encode(None)
        packets[-1].duration = int(seconds / packets[-1].time_base)
        for packet in packets:
            container.mux(packet)
    return path


def _image_bytes(codec: str) -> bytes:
    """One still image file (``png`` or ``mjpeg`` = JPEG) encoded by PyAV's codec alone, no container."""
    pix_fmt = {"png": "rgb24", "mjpeg": "yuvj420p"}[codec]
    context = av.CodecContext.create(codec, "w")
    context.width, context.height, context.pix_fmt = 64, 48, pix_fmt
    context.time_base = Fraction(1, 25)
    frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 90, np.uint8), format="rgb24").reformat(format=pix_fmt)
    frame.pts = 0
    return b"".join(bytes(p) for p in context.encode(frame) + context.encode(None))


def write_still_gif(path: Path) -> Path:
    """A one-frame GIF (FFmpeg's gif demuxer: one video frame, which is an image, not a short video)."""
    with av.open(str(path), "w", format="gif") as container:
        stream = container.add_stream("gif", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "rgb8"
        frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 90, np.uint8), format="rgb24")
        frame.pts, frame.time_base = 0, Fraction(1, 10)
        for packet in stream.encode(frame) + stream.encode(None):
            container.mux(packet)
    return path


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _gapped(gap_seconds: int) -> tuple[list[int], Fraction]:
    """30 frames at 25 fps with a ``gap_seconds`` hole after frame 15 (time base 1/25)."""
    return [i for i in range(15)] + [i + gap_seconds * 25 for i in range(15, 30)], Fraction(1, 25)


def build_bad_input_folder(root: Path) -> tuple[dict[str, str], list[str]]:
    """Write the dataset. Returns (input id -> "ok" or quarantine reason, files that are not inputs)."""
    v = root / "videos"
    media = root / "media"
    media.mkdir(parents=True)
    expected: dict[str, str] = {}

    def add(rel: str, outcome: str, make) -> None:
        path = v / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        make(path)
        expected[rel] = outcome

    # Good footage: every one of these must end up in a shard.
    add("good/vp9.webm", "ok", lambda p: write_synthetic_video(p, num_frames=24, width=96, height=64))
    add("good/odd_65x49.webm", "ok", lambda p: write_synthetic_video(p, num_frames=20, width=65, height=49))
    add("good/min_side_32x32.avi", "ok",
        lambda p: write_synthetic_video(p, num_frames=20, width=32, height=32, codec="mpeg4"))
    add("good/vfr.webm", "ok", lambda p: write_synthetic_video(p, num_frames=36, width=64, height=48, vfr=True))
    add("good/with_audio.webm", "ok", lambda p: write_with_audio(p))
    add("good/upper.MP4", "ok", lambda p: write_synthetic_video(p, num_frames=20, width=64, height=48, codec="h264"))
    # Sparse timestamps: 60 real frames held 7 ticks each (the AVI counts 414 "frames").
    add("good/sparse_pts.avi", "ok", lambda p: write_timestamped_video(p, [7 * i for i in range(60)], Fraction(1, 15)))
    # Two names that sanitise to the same key (good_clip_1): both are kept, under distinct keys.
    add("good/clip 1.mp4", "ok", lambda p: write_synthetic_video(p, num_frames=20, width=64, height=48, codec="h264"))
    add("good/clip_1.mp4", "ok", lambda p: write_synthetic_video(p, num_frames=22, width=64, height=48, codec="h264"))
    add(f"good/{LONG_NAME}.webm", "ok", lambda p: write_synthetic_video(p, num_frames=20, width=64, height=48))
    add("good/webm_named.mp4", "ok", lambda p: shutil.copyfile(
        write_synthetic_video(media / "w.webm", num_frames=20, width=64, height=48), p))

    # Bad inputs, one reason each.
    add("bad/zero.mp4", "zero bytes", lambda p: p.write_bytes(b""))
    add("bad/text.mp4", "not a video", lambda p: p.write_bytes(b"just some text, not a video\n" * 30))
    add("bad/random.webm", "not a video",
        lambda p: p.write_bytes(np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes()))
    add("bad/png.mp4", "not a video", lambda p: p.write_bytes(_image_bytes("png")))
    add("bad/jpeg.mp4", "not a video", lambda p: p.write_bytes(_image_bytes("mjpeg")))
    add("bad/gif_still.mp4", "not a video", write_still_gif)
    add("bad/fifo.mp4", "not a video", lambda p: os.mkfifo(p))
    add("bad/audio_only.mp4", "no video stream", write_audio_only)
    h264_src = write_synthetic_video(media / "src.mp4", num_frames=30, width=64, height=48, codec="h264")
    add("bad/cut_moov_at_end.mp4", "truncated", lambda p: write_truncated(p, h264_src))
    webm_src = write_synthetic_video(media / "src.webm", num_frames=60, width=96, height=64, pattern="noise")
    add("bad/cut_60pct.webm", "truncated",
        lambda p: p.write_bytes(webm_src.read_bytes()[: int(webm_src.stat().st_size * 0.6)]))

    def mid_corrupt(p: Path) -> None:
        data = bytearray(webm_src.read_bytes())
        third = len(data) // 3
        data[third:2 * third] = np.random.default_rng(0).integers(0, 256, third, dtype=np.uint8).tobytes()
        p.write_bytes(bytes(data))

    add("bad/corrupt_middle.webm", "truncated", mid_corrupt)
    add("bad/header_zeroed.webm", "not a video",
        lambda p: p.write_bytes(bytes(64) + webm_src.read_bytes()[64:]))
    add("bad/short_8_frames.webm", "too short", lambda p: write_synthetic_video(p, num_frames=8, width=64, height=48))
    add("bad/weird_codec.mkv", "unsupported codec", write_unsupported_codec)
    add("bad/too_tall_for_vp9.mkv", "encoder error", write_encoder_breaker)
    add("bad/1x1.mkv", "too small",
        lambda p: write_timestamped_video(p, list(range(20)), Fraction(1, 25), codec="ffv1", width=1, height=1))
    add("bad/2x2.avi", "too small",
        lambda p: write_timestamped_video(p, list(range(20)), Fraction(1, 25), width=2, height=2))
    add("bad/4000x16.avi", "too small",
        lambda p: write_timestamped_video(p, list(range(20)), Fraction(1, 25), width=4000, height=16))
    add("bad/gap_5_minutes.webm", "timestamp gap",
        lambda p: write_timestamped_video(p, *_gapped(300), codec="libvpx-vp9"))
    add("bad/gap_2_hours.webm", "timestamp gap",
        lambda p: write_timestamped_video(p, *_gapped(7200), codec="libvpx-vp9"))
    add("bad/last_frame_10_minutes.webm", "timestamp gap", write_last_frame_lasting)
    add("bad/broken_link.mp4", "missing", lambda p: p.symlink_to(root / "nowhere" / "gone.mp4"))

    def unreadable(p: Path) -> None:
        write_synthetic_video(p, num_frames=20, width=64, height=48)
        p.chmod(0)

    add("bad/unreadable.webm", "unreadable", unreadable)
    # A folder that cannot be listed: its files cannot be inputs, the manifest names the folder.
    write_synthetic_video(v / "bad" / "locked" / "hidden.webm", num_frames=20, width=64, height=48)
    (v / "bad" / "locked").chmod(0)
    # Loose in the root of a class-folder layout: no class to take a label from.
    add("loose.webm", "not in a class folder",
        lambda p: write_synthetic_video(p, num_frames=20, width=64, height=48))
    # Not inputs (extension not a listed video suffix): counted in the manifest, not silently dropped.
    not_inputs = ["good/clip.mxf", "good/notes.txt", "README"]
    write_synthetic_video(media / "x.webm", num_frames=20, width=64, height=48)
    shutil.copyfile(media / "x.webm", v / not_inputs[0])
    _write(v / not_inputs[1], b"notes")
    _write(v / not_inputs[2], b"readme")
    return expected, not_inputs


def _without_read_override() -> list[str]:
    """A command prefix under which chmod 000 really makes a file unreadable.

    Root reads any file (CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH); setpriv drops both capabilities from
    the bounding set, so the job (and its spawned workers) run as root without the override.
    """
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: cannot make a file unreadable")
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search", "--"]


@pytest.fixture(scope="session")
def bad_input_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    expected, not_inputs = build_bad_input_folder(root)
    out = root / "out"
    cmd = _without_read_override() + [
        sys.executable, "-m", "shard_tools", "shard", "--source", "folder", "--videos", str(root / "videos"),
        "--out", str(out), "--shard-size", "6", "--workers", "2", "--no-progress"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    # verify lists the sources again: with the same (un)readable files as the job, i.e. the same prefix.
    checked = subprocess.run(_without_read_override() + [sys.executable, "-m", "shard_tools", "verify", str(out)],
                             cwd=REPO, capture_output=True, text=True, timeout=600)
    manifest = json.loads((out / "manifest.json").read_text())
    quarantine = [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]
    samples = {}
    for shard in manifest["shards"]:
        for sample in read_shard_samples(out / shard["path"]):
            record = json.loads(sample["members"]["json"])
            samples[record["input_id"]] = record
    return {"out": out, "expected": expected, "not_inputs": not_inputs, "manifest": manifest,
            "quarantine": quarantine, "samples": samples, "stderr": result.stderr,
            "verify": json.loads(checked.stdout), "verify_rc": checked.returncode}


def test_suite_covers_enough_kinds(bad_input_run):
    assert len(bad_input_run["expected"]) + len(bad_input_run["not_inputs"]) >= 25


def test_every_good_input_is_a_sample_and_none_is_quarantined(bad_input_run):
    expected, samples = bad_input_run["expected"], bad_input_run["samples"]
    good = {k for k, v in expected.items() if v == "ok"}
    quarantined_good = [q for q in bad_input_run["quarantine"] if q["input_id"] in good]
    assert not quarantined_good
    assert set(samples) == good


def test_every_bad_input_is_one_quarantine_line_with_its_reason(bad_input_run):
    expected, quarantine = bad_input_run["expected"], bad_input_run["quarantine"]
    got = {q["input_id"]: q["reason"] for q in quarantine}
    assert len(got) == len(quarantine)
    assert got == {k: v for k, v in expected.items() if v != "ok"}
    for q in quarantine:  # one clear line: stage, the file named, a reason
        assert q["stage"] in ("listing", "probe", "decode", "encode", "test-decode"), q
        assert Path(q["input_id"]).name in q["detail"] and "\n" not in q["detail"], q
    stages = {q["input_id"]: q["stage"] for q in quarantine}
    assert stages["bad/unreadable.webm"] == "probe" and stages["loose.webm"] == "listing"
    assert stages["bad/gap_2_hours.webm"] == "decode"


def test_verify_passes_and_counts_agree(bad_input_run):
    report, manifest = bad_input_run["verify"], bad_input_run["manifest"]
    assert report["ok"] and bad_input_run["verify_rc"] == 0, report["problems"]
    assert report["videos_decoded"] == report["samples"] == len(bad_input_run["samples"])
    assert "sources listed again" in report["invariant"]
    assert manifest["totals"]["inputs"] == len(bad_input_run["expected"])


def test_files_that_are_not_inputs_are_reported_in_the_manifest(bad_input_run):
    skipped = bad_input_run["manifest"]["source"]["skipped_files"]
    assert skipped["count"] == 3
    assert skipped["by_extension"] == {"(none)": 1, ".mxf": 1, ".txt": 1}
    assert sorted(skipped["examples"]) == sorted(bad_input_run["not_inputs"])
    assert "3 file(s) are not inputs" in bad_input_run["stderr"]
    assert skipped["unreadable_folders"] == ["bad/locked"]
    assert "1 folder(s) cannot be read" in bad_input_run["stderr"]


def test_sparse_timestamps_are_held_not_truncated(bad_input_run):
    record = bad_input_run["samples"]["good/sparse_pts.avi"]
    # 60 frames x 7 ticks at 15 fps = 27.6 s: each real frame shown for its 7 ticks.
    assert record["fps"] == 15.0 and record["num_frames"] == 60 * 7 - 6


def test_colliding_and_long_keys_get_stable_hash_suffixes(bad_input_run):
    samples = bad_input_run["samples"]
    a, b = samples["good/clip 1.mp4"], samples["good/clip_1.mp4"]
    assert a["key"] != b["key"] and a["key"].startswith("good_clip_1_") and b["key"].startswith("good_clip_1_")
    assert a["key_hash"]["of"] == "good/clip 1.mp4" and "shared by 1 other" in a["key_hash"]["why"]
    long = samples[f"good/{LONG_NAME}.webm"]
    assert len(long["key"]) <= MAX_KEY_LENGTH and "longer than" in long["key_hash"]["why"]
    assert all(len(s["key"]) <= MAX_KEY_LENGTH for s in samples.values())
    assert "key_hash" not in samples["good/vp9.webm"]  # plain keys stay as they were


def test_sizes_are_never_scaled_up(bad_input_run):
    for record in bad_input_run["samples"].values():
        assert record["width"] <= record["source_width"] and record["height"] <= record["source_height"]
        assert min(record["width"], record["height"]) >= 32
    assert (bad_input_run["samples"]["good/odd_65x49.webm"]["width"],
            bad_input_run["samples"]["good/odd_65x49.webm"]["height"]) == (64, 48)
