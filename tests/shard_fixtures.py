"""Datasets for the shard_tools tests: Kinetics CSV / SSv2 JSON in the official formats, real and
synthetic videos, and one bad input of every quarantine kind (all written with PyAV, all tiny)."""

from __future__ import annotations

import csv
import json
import shutil
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from footage import write_synthetic_video

KINETICS_HEADER = ["label", "youtube_id", "time_start", "time_end", "split", "is_cc"]


def write_audio_only(path: Path) -> Path:
    """An mp4 holding only an AAC stream (quarantine: no video stream)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        samples = np.zeros((1, 1024), np.float32)
        for i in range(8):
            frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def write_with_audio(path: Path, *, num_frames: int = 24, width: int = 96, height: int = 64) -> Path:
    """A VP9 + Opus WebM (the output must drop the audio)."""
    with av.open(str(path), "w") as container:
        video = container.add_stream("libvpx-vp9", rate=24)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        audio = container.add_stream("libopus", rate=48000)
        for i in range(num_frames):
            img = np.full((height, width, 3), (i * 9) % 256, np.uint8)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, 24)
            for packet in video.encode(frame):
                container.mux(packet)
        for i in range(num_frames * 2000 // 960):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 960), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 48000, i * 960
            for packet in audio.encode(frame):
                container.mux(packet)
        for stream in (video, audio):
            for packet in stream.encode(None):
                container.mux(packet)
    return path


def write_unsupported_codec(path: Path) -> Path:
    """A Matroska file whose video CodecID FFmpeg does not know (quarantine: unsupported codec).

    Written as MPEG-4 Part 2, then the CodecID string is replaced by an unknown one of equal length.
    """
    tmp = path.with_name(path.stem + "_src.mkv")
    with av.open(str(tmp), "w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(20):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), i * 10, np.uint8), format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, 25)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    data = tmp.read_bytes()
    assert data.count(b"V_MPEG4/ISO/ASP") == 1
    path.write_bytes(data.replace(b"V_MPEG4/ISO/ASP", b"V_ZZZZZ/ISO/ASP"))
    tmp.unlink()
    return path


def write_encoder_breaker(path: Path) -> Path:
    """A valid 32x70000 FFV1 video: it decodes, but VP9 (max 65536) and x264 refuse the frame size.
    (32 wide: the narrowest the default --min-side lets through to the encoder.)"""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=25)
        stream.width, stream.height, stream.pix_fmt = 32, 70000, "yuv420p"
        for i in range(2):
            frame = av.VideoFrame(32, 70000, "yuv420p")
            for plane in frame.planes:
                plane.update(bytes(plane.buffer_size))
            frame.pts, frame.time_base = i, Fraction(1, 25)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def write_truncated(path: Path, source: Path) -> Path:
    """The first 40% of an mp4 whose index (moov) sits at the end (quarantine: truncated)."""
    data = Path(source).read_bytes()
    path.write_bytes(data[: int(len(data) * 0.4)])
    return path


def make_bad_inputs(folder: Path, media: Path) -> dict[str, Path | None]:
    """One file per file-level quarantine kind; ``missing`` maps to None (no file)."""
    folder.mkdir(parents=True, exist_ok=True)
    good_mp4 = write_synthetic_video(media / "trunc_src.mp4", num_frames=30, width=64, height=48, codec="h264")
    return {
        "zero bytes": _touch(folder / "zero.mp4"),
        "not a video": _write(folder / "text.mp4", b"this is not a video, just some text\n" * 20),
        "no video stream": write_audio_only(folder / "audio.mp4"),
        "truncated": write_truncated(folder / "cut.mp4", good_mp4),
        "too short": write_synthetic_video(folder / "short.webm", num_frames=8, width=64, height=48),
        "unsupported codec": write_unsupported_codec(folder / "weird.mkv"),
        "encoder error": write_encoder_breaker(folder / "tall.mkv"),
        "missing": None,
    }


def _touch(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def make_good_videos(folder: Path, *, bikes: Path | None = None, carphone: Path | None = None) -> dict[str, Path]:
    """Small videos in several codecs, sizes, frame rates and lengths (+ real footage if given)."""
    folder.mkdir(parents=True, exist_ok=True)
    videos = {
        "vp9_160x120": write_synthetic_video(folder / "a.webm", num_frames=30, width=160, height=120),
        "vp9_odd_65x49": write_synthetic_video(folder / "b.webm", num_frames=20, width=65, height=49,
                                               pattern="moving_left"),
        "h264_96x64": write_synthetic_video(folder / "c.mp4", num_frames=24, width=96, height=64, codec="h264",
                                            pattern="moving_right"),
        "mjpeg_portrait_48x96": write_synthetic_video(folder / "d.avi", num_frames=20, width=48, height=96,
                                                      codec="mjpeg"),
        "mpeg4_60fps": write_synthetic_video(folder / "e.avi", num_frames=40, width=64, height=48, fps=60,
                                             codec="mpeg4"),
        "vp9_vfr": write_synthetic_video(folder / "f.webm", num_frames=36, width=64, height=48, vfr=True),
        "h264_1080p": write_synthetic_video(folder / "g.mp4", num_frames=16, width=1920, height=1080,
                                            codec="h264"),
        "with_audio": write_with_audio(folder / "h.webm"),
    }
    if bikes is not None:
        videos["bikes"] = Path(bikes)
    if carphone is not None:
        videos["carphone"] = Path(carphone)
    return videos


def build_kinetics(root: Path, media: Path, *, layout: str, bikes: Path | None = None,
                   carphone: Path | None = None) -> tuple[Path, Path, dict[str, str]]:
    """A Kinetics-style dataset: CSV (official columns + is_cc) and a flat or class-folder video tree.

    Returns (csv path, video root, expected outcome per CSV input id: "ok" or the quarantine reason).
    """
    assert layout in ("flat", "class")
    video_root = root / "videos"
    video_root.mkdir(parents=True, exist_ok=True)
    labels = ["abseiling", "air drumming", "playing cards"]
    rows, expected = [], {}
    good = make_good_videos(media / "good", bikes=bikes, carphone=carphone)
    bad = make_bad_inputs(media / "bad", media)

    def add(label: str, source: Path | None, reason: str, start: int = 10) -> None:
        youtube_id = f"yt{len(rows):03d}abcXY"[:11]
        key = f"{youtube_id}_{start:06d}_{start + 10:06d}"
        if source is not None:
            folder = video_root / label if layout == "class" else video_root
            folder.mkdir(exist_ok=True)
            shutil.copyfile(source, folder / (key + Path(source).suffix))
        rows.append([label, youtube_id, str(start), str(start + 10), "train", "0"])
        expected[f"train.csv:{len(rows) + 1}"] = reason

    for i, path in enumerate(good.values()):
        add(labels[i % len(labels)], path, "ok")
    for reason, path in bad.items():
        add(labels[0], path, reason)
    # A duplicate of the first row (same youtube_id and times) and malformed rows.
    rows.append(list(rows[0]))
    expected[f"train.csv:{len(rows) + 1}"] = "duplicate key"
    rows.append([labels[1], "ytbadtime01", "ten", "20", "train", "0"])
    expected[f"train.csv:{len(rows) + 1}"] = "bad annotation row"
    rows.append([labels[1], "ytshortrow1", "10"])
    expected[f"train.csv:{len(rows) + 1}"] = "bad annotation row"
    # A row of another split is not an input of a train run.
    rows.append([labels[2], "ytvalsplit1", "0", "10", "validate", "0"])
    csv_path = root / "train.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(KINETICS_HEADER)
        writer.writerows(rows)
    return csv_path, video_root, expected


def build_ssv2(root: Path, media: Path) -> tuple[Path, Path, Path, dict[str, str]]:
    """An SSv2-style dataset: labels.json, train.json, {id}.webm. Returns (ann, labels, videos, expected)."""
    video_root = root / "20bn-something-something-v2"
    video_root.mkdir(parents=True, exist_ok=True)
    templates = ["Holding [something] next to [something]", "Pushing [something] from left to right",
                 "Putting [something] on a surface"]
    labels = {t.replace("[", "").replace("]", ""): str(i) for i, t in enumerate(templates)}
    (root / "labels.json").write_text(json.dumps(labels, indent=1))
    rows, expected = [], {}
    for i in range(4):
        video_id = str(1000 + i)
        write_synthetic_video(video_root / f"{video_id}.webm", num_frames=20 + 4 * i, width=80, height=64,
                              pattern="moving_right" if i % 2 else "index")
        rows.append({"id": video_id, "label": "some object description",
                     "template": templates[i % 3], "placeholders": ["a", "b"]})
        expected[f"train.json:{i}"] = "ok"
    rows.append({"id": "1099", "label": "x", "template": templates[0], "placeholders": []})
    expected[f"train.json:{len(rows) - 1}"] = "missing"
    rows.append({"id": "1100", "label": "x", "template": "Unknown [something] template", "placeholders": []})
    expected[f"train.json:{len(rows) - 1}"] = "bad annotation row"
    (root / "train.json").write_text(json.dumps(rows))
    return root / "train.json", root / "labels.json", video_root, expected
