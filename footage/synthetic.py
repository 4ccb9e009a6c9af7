"""Synthetic videos written with PyAV, for tests, benchmarks and the demo.

``pattern="index"`` paints every frame one uniform colour that encodes its own frame index, so a test
can read back which source frame ended up in a view after cropping, flipping, resizing and lossy
compression.
"""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

__all__ = ["CODECS", "index_color", "decode_index_color", "write_synthetic_video", "write_timestamped_video"]

# PyAV encoder name, container suffix and pixel format per codec name.
CODECS = {
    "vp9": ("libvpx-vp9", ".webm", "yuv420p"),
    "h264": ("libx264", ".mp4", "yuv420p"),
    "mpeg4": ("mpeg4", ".avi", "yuv420p"),
    "mjpeg": ("mjpeg", ".avi", "yuvj420p"),
}


def index_color(i: int) -> tuple[int, int, int]:
    """RGB colour that encodes frame index ``i`` (0 <= i < 256); levels 16 apart survive compression."""
    if not 0 <= i < 256:
        raise ValueError(f"index pattern encodes frames 0..255, got {i}")
    return 8 + 16 * (i % 16), 8 + 16 * ((i // 16) % 16), 128


def decode_index_color(rgb_mean) -> int:
    """Invert :func:`index_color` from the mean colour (0..255 RGB) of one frame."""
    r, g = float(rgb_mean[0]), float(rgb_mean[1])
    low = int(np.clip(np.round((r - 8) / 16), 0, 15))
    high = int(np.clip(np.round((g - 8) / 16), 0, 15))
    return high * 16 + low


def _frame(pattern: str, i: int, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    if pattern == "index":
        return np.broadcast_to(np.array(index_color(i), np.uint8), (height, width, 3)).copy()
    if pattern in ("moving_left", "moving_right"):
        # A bright vertical bar over a dark gradient, moving 1/16 of the width per frame.
        x = np.arange(width)
        img = np.empty((height, width, 3), np.uint8)
        img[:] = (np.linspace(30, 90, height, dtype=np.uint8)[:, None, None])
        step = max(1, width // 16)
        pos = (i * step) % width if pattern == "moving_right" else (-i * step) % width
        bar = (x - pos) % width < max(2, width // 8)
        img[:, bar] = (230, 200, 60)
        return img
    if pattern == "noise":
        return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    raise ValueError(f"unknown pattern {pattern!r}; choose index, moving_left, moving_right or noise")


def write_synthetic_video(path: str | os.PathLike, *, num_frames: int, width: int, height: int,
                          fps: float = 25.0, codec: str = "vp9", pattern: str = "index",
                          vfr: bool = False, seed: int = 0) -> Path:
    """Write a synthetic video with PyAV.

    Args:
        path: output file; its suffix should match the codec's container (.webm, .mp4, .avi).
        num_frames: number of frames written.
        width, height: frame size (odd sizes are allowed for codecs that accept them).
        fps: nominal frame rate.
        codec: ``vp9`` | ``h264`` | ``mpeg4`` | ``mjpeg``.
        pattern: ``index`` (uniform colour encoding the frame index, see :func:`index_color`),
            ``moving_left`` / ``moving_right`` (a bar sweeping across), or ``noise``.
        vfr: write variable-frame-rate timestamps (frame gaps alternate between 1 and 2 ticks).
        seed: seed for the noise pattern.
    """
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; choose from {sorted(CODECS)}")
    encoder, _, pix_fmt = CODECS[codec]
    if codec == "h264" and (width % 2 or height % 2):
        # libx264 with yuv420p needs even sizes; FFmpeg's own error names neither file nor size.
        raise ValueError(f"{path}: h264 with yuv420p needs even width and height, got {width}x{height}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(encoder, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        if codec == "vp9":
            stream.options = {"deadline": "realtime", "cpu-used": "8", "crf": "20", "b": "0"}
        elif codec == "h264":
            stream.options = {"preset": "veryfast", "crf": "18"}
        elif codec == "mpeg4":
            stream.options = {"qscale": "2"}
        # A finer time base lets VFR timestamps express uneven gaps (1 or 2 ticks per frame).
        time_base = Fraction(1, int(round(float(rate) * 2))) if vfr else 1 / rate
        stream.codec_context.time_base = time_base
        pts = 0
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(_frame(pattern, i, width, height, rng), format="rgb24")
            frame.pts = pts
            frame.time_base = time_base
            pts += (1 + (i % 2)) if vfr else 1
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_timestamped_video(path: str | os.PathLike, pts: list[int], time_base: Fraction, *,
                            codec: str = "mpeg4", width: int = 64, height: int = 48) -> Path:
    """Write a video whose frame i has timestamp ``pts[i] * time_base`` (PyAV encoder name ``codec``).

    For timestamp edge cases: sparse timestamps (frames held several ticks), gaps, 1x1 sources.
    Frame i is a uniform grey of level ``37 * i mod 256``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=1 / time_base)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.time_base = time_base
        for i, p in enumerate(pts):
            image = np.full((height, width, 3), (i * 37) % 256, np.uint8)
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = p, time_base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path
