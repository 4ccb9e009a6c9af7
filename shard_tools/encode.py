"""Probe, re-encode and test-decode one video with PyAV (no shell, no system ffmpeg).

:func:`process_video` is the per-video unit of work that the process pool and Ray both run. It
never raises for a bad video: every failure becomes a quarantine record with the stage it happened
in and one of the reasons in :data:`QUARANTINE_REASONS`. It returns the encoded bytes to the caller
instead of writing them, so a Ray worker on another machine needs no shared output folder.

Output: constant frame rate ``min(source average rate, max_fps)`` (VFR sources are resampled by
timestamp: each output slot shows the source frame on screen at that time; a source frame is held
at most ``max_gap`` seconds, so no input costs more output frames than ``max_gap * rate`` per decoded
frame), short side scaled down to ``short_side`` (never up; an odd side loses one pixel), both sides
at least ``min_side``, aspect ratio kept (sample aspect ratio applied), both sides even, yuv420p, a
keyframe exactly every ``keyframe_interval`` frames, no audio. Encoders run with one thread and the
muxer in bitexact mode, so the same input gives the same bytes on every run
(resume relies on it) -- parallelism comes from running many videos at once.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

import av

from common.typed_config import dataclass_from_dict
from shard_tools.fetch import FetchFailed, local_input
from shard_tools.sources import VideoInput

QUARANTINE_REASONS = ("missing", "zero bytes", "unreadable", "not a video", "no video stream", "truncated",
                      "too short", "too small", "timestamp gap", "unsupported codec", "encoder error",
                      "duplicate key", "bad annotation row", "not in a class folder", "unexpected error")
# codec name -> (PyAV encoder, container format, file suffix / webdataset extension, default CRF)
CODEC_TABLE = {
    "vp9": ("libvpx-vp9", "webm", "webm", 32),
    "h264": ("libx264", "mp4", "mp4", 23),
}
# Smallest output side by default: degenerate inputs (1x1, 4000x16) out, 64x48 test footage in.
DEFAULT_MIN_SIDE = 32
# FFmpeg demuxer names that accept the target container (for --copy).
COPYABLE_FORMATS = {"vp9": {"matroska", "webm"}, "h264": {"mov", "mp4"}}
# FFmpeg "video" formats that are not videos of a scene (a text file opens as ANSI art; a still
# image opens through an image demuxer as one frame, which is not a short video either).
NON_VIDEO_FORMATS = {"tty", "image2"}
IMAGE_FORMAT_SUFFIX = "_pipe"  # png_pipe, jpeg_pipe, webp_pipe, bmp_pipe, tiff_pipe, ...


@dataclass(frozen=True)
class EncodeSettings:
    """Target encoding, recorded in the manifest.

    Args:
        codec: ``vp9`` (WebM; DALI's CPU and GPU decoders read it) or ``h264`` (mp4; GPU decoder only).
        short_side: the shorter side is scaled down to this (never up).
        max_fps: frame-rate cap; sources above it are resampled to it.
        keyframe_interval: a keyframe every N frames (bounds DALI's seek cost for random clips).
        crf: constant-quality level; None means the codec default (VP9 32, H.264 23), picked so that
            256p clips stay visually clean at ~1 bit per pixel-second budgets (docs/design.md section 5).
        vp9_cpu_used: libvpx speed (8 = fastest realtime setting).
        vp9_deadline: libvpx deadline (``realtime`` is ~5x faster than ``good`` for ~20% more bytes).
        h264_preset: x264 preset.
        min_frames: videos with fewer output frames are quarantined as ``too short``.
        min_side: videos whose output width or height is below this are quarantined as ``too small``
            (sizes are never scaled up). None means 32 (or ``short_side`` if smaller): 32 rejects
            degenerate inputs (1x1, 4000x16) and keeps the project's 64x48 test footage; NVDEC
            decodes VP9 only from 128x128 (NVIDIA's decoder documentation), so shards for GPU
            decoding of VP9 want ``min_side=128``.
        max_gap: seconds one source frame may be held (a timestamp gap between decoded frames, or the
            last frame's duration); a longer gap is quarantined as ``timestamp gap`` instead of
            becoming thousands of repeated output frames. 5 s is far above the holds of real
            footage (sparse-timestamp AVIs hold a frame for a few ticks, ~0.5 s).
        copy: keep the original bytes when the source already meets every target.
    """

    codec: str = "vp9"
    short_side: int = 256
    max_fps: float = 30.0
    keyframe_interval: int = 16
    crf: int | None = None
    vp9_cpu_used: int = 8
    vp9_deadline: str = "realtime"
    h264_preset: str = "veryfast"
    min_frames: int = 16
    min_side: int | None = None
    max_gap: float = 5.0
    copy: bool = False

    def __post_init__(self):
        if self.codec not in CODEC_TABLE:
            raise ValueError(f"codec {self.codec!r}: choose from {sorted(CODEC_TABLE)}")
        if self.short_side < 2 or self.keyframe_interval < 1 or self.max_fps <= 0 or self.min_frames < 1:
            raise ValueError(f"invalid encode settings {self}: short_side >= 2, keyframe_interval >= 1, "
                             "max_fps > 0 and min_frames >= 1 are required")
        if self.min_side is None:
            object.__setattr__(self, "min_side", min(DEFAULT_MIN_SIDE, self.short_side))
        if not 2 <= self.min_side <= self.short_side:
            raise ValueError(f"min_side {self.min_side}: must be in 2..short_side ({self.short_side}), "
                             "otherwise every video would be too small")
        if not self.max_gap > 0:
            raise ValueError(f"max_gap {self.max_gap}: must be > 0 seconds")
        if not -8 <= self.vp9_cpu_used <= 8:
            raise ValueError(f"vp9_cpu_used {self.vp9_cpu_used}: libvpx accepts -8..8")
        if self.crf is None:
            object.__setattr__(self, "crf", CODEC_TABLE[self.codec][3])

    @classmethod
    def from_dict(cls, raw: dict, prefix: str = "encode") -> "EncodeSettings":
        """Strict construction from plain data (a manifest's ``encode`` entry, YAML) by
        ``common.typed_config``: unknown keys and values of the wrong type are errors naming ``prefix.key``."""
        return dataclass_from_dict(cls, raw, prefix)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def container(self) -> str:
        return CODEC_TABLE[self.codec][1]

    @property
    def extension(self) -> str:
        return CODEC_TABLE[self.codec][2]

    def encoder_options(self) -> dict[str, str]:
        kf = str(self.keyframe_interval)
        if self.codec == "vp9":
            # b=0 + crf: constant quality. row-mt stays on (free with threads=1, helps if raised).
            return {"deadline": self.vp9_deadline, "cpu-used": str(self.vp9_cpu_used), "row-mt": "1",
                    "crf": str(self.crf), "b": "0", "threads": "1", "g": kf, "keyint_min": kf,
                    "lag-in-frames": "0"}
        # sc_threshold=0: no extra scene-cut keyframes, so keyframes fall exactly every N frames.
        return {"preset": self.h264_preset, "crf": str(self.crf), "threads": "1", "g": kf,
                "keyint_min": kf, "sc_threshold": "0"}


class VideoRejected(Exception):
    """A video that must go to the quarantine: ``stage`` it failed in and a ``reason``."""

    def __init__(self, stage: str, reason: str, detail: str):
        assert reason in QUARANTINE_REASONS, reason
        super().__init__(f"{stage}: {reason}: {detail}")
        self.stage, self.reason, self.detail = stage, reason, detail


@dataclass
class VideoOutcome:
    """Result of :func:`process_video`: ``record`` is the sample json or the quarantine entry."""

    key: str
    input_id: str
    ok: bool
    record: dict
    payload: bytes | None


def _has_container_magic(head: bytes) -> bool:
    """True when the bytes start like an mp4/mov, Matroska/WebM or AVI file."""
    return (head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip")
            or head[:4] == b"\x1a\x45\xdf\xa3" or (head[:4] == b"RIFF" and head[8:11] == b"AVI"))


def _even(x: float) -> int:
    # Rounded down to even, never up: a 1-pixel side becomes 0 (then ``too small``), not 2.
    return int(round(x)) // 2 * 2


def target_size(width: int, height: int, sample_aspect: Fraction | None, short_side: int) -> tuple[int, int]:
    """Output (width, height): display aspect kept, short side scaled down to ``short_side``, even
    (rounded down, so never above the display size; may be 0 for 1-pixel sources)."""
    display_width = width * sample_aspect if sample_aspect and sample_aspect > 0 else Fraction(width)
    scale = min(Fraction(1), Fraction(short_side) / min(display_width, height))
    return _even(display_width * scale), _even(height * scale)


def output_rate(stream, max_fps: float) -> Fraction:
    """Constant output frame rate: the source's average rate, capped at ``max_fps``."""
    cap = Fraction(max_fps).limit_denominator(1001)
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not rate or rate <= 0 or rate > 1000:
        return cap
    return min(Fraction(rate), cap)


def _open_source(item: VideoInput, local: str):
    """Open the input's local file (``item.path``, or the fetched copy of a URL input); messages
    name the input (the URL), never the copy."""
    path = Path(local)
    shown = path if local == item.path else item.path
    if not path.exists():
        broken = " (a broken symlink)" if path.is_symlink() else ""
        raise VideoRejected("probe", "missing", f"{shown} does not exist{broken}")
    if not path.is_file():
        raise VideoRejected("probe", "not a video", f"{shown} is not a regular file")
    size = path.stat().st_size
    if size == 0:
        raise VideoRejected("probe", "zero bytes", f"{shown} is empty")
    # Read the head first: an unreadable file fails here with the OS's own reason (PermissionError
    # -> "unreadable" in process_video), not as an FFmpeg error that looks like a bad video.
    with open(path, "rb") as f:
        head = f.read(16)
    try:
        container = av.open(str(path), metadata_errors="ignore")
    except OSError:
        raise  # av.error.PermissionError & co. are OSErrors: the file, not its content, is the problem
    except (av.error.FFmpegError, UnicodeDecodeError) as err:
        reason = "truncated" if _has_container_magic(head) else "not a video"
        raise VideoRejected("probe", reason, f"{shown}: FFmpeg cannot open it ({err})") from None
    format_name = container.format.name
    still = format_name.endswith(IMAGE_FORMAT_SUFFIX) or (
        format_name == "gif" and container.streams.video and container.streams.video[0].frames <= 1)
    if format_name in NON_VIDEO_FORMATS or still:
        container.close()
        what = "a still image" if still or format_name == "image2" else "not a video"
        raise VideoRejected("probe", "not a video", f"{shown}: FFmpeg reads it as {format_name!r} ({what})")
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["none"]
        container.close()
        raise VideoRejected("probe", "no video stream", f"{shown}: streams: {', '.join(kinds)}")
    stream = container.streams.video[0]
    codec_context = stream.codec_context
    if codec_context is None or not codec_context.name:
        container.close()
        raise VideoRejected("probe", "unsupported codec", f"{shown}: FFmpeg has no decoder for its video codec")
    return container, stream, size


def _declared_end(stream, container) -> float | None:
    """End time in seconds the container claims for the video (None if it does not say)."""
    if stream.duration and stream.time_base:
        return float((stream.start_time or 0) * stream.time_base + stream.duration * stream.time_base)
    if container.duration and len(container.streams) == 1:
        return container.duration / 1_000_000
    return None


def _keyframe_interval_ok(path: str, max_interval: int) -> bool:
    with av.open(path) as container:
        since_key = 0
        for packet in container.demux(video=0):
            if packet.size == 0:
                continue
            since_key = 0 if packet.is_keyframe else since_key + 1
            if since_key >= max_interval:
                return False
    return True


def _can_copy(local: str, container, stream, settings: EncodeSettings, rate: Fraction,
              size: tuple[int, int]) -> bool:
    codec_context = stream.codec_context
    return (settings.copy
            and codec_context.name == settings.codec
            and bool(set(container.format.name.split(",")) & COPYABLE_FORMATS[settings.codec])
            and len(container.streams) == 1
            and codec_context.pix_fmt == "yuv420p"
            and (codec_context.width, codec_context.height) == size
            and stream.average_rate is not None and Fraction(stream.average_rate) == rate
            and _keyframe_interval_ok(local, settings.keyframe_interval))


class _Encoder:
    """Streaming encoder into memory; opened lazily on the first frame (size known then)."""

    def __init__(self, settings: EncodeSettings, rate: Fraction, width: int, height: int):
        self.settings, self.rate, self.width, self.height = settings, rate, width, height
        self.buffer = io.BytesIO()
        # bitexact: no random Matroska UIDs / version strings, so reruns give identical bytes.
        # (mp4 "+faststart" would reopen the output by file name, which an in-memory buffer has not.)
        self.container = av.open(self.buffer, mode="w", format=settings.container,
                                 options={"fflags": "+bitexact"})
        encoder = CODEC_TABLE[settings.codec][0]
        self.stream = self.container.add_stream(encoder, rate=rate)
        self.stream.width, self.stream.height, self.stream.pix_fmt = width, height, "yuv420p"
        self.stream.codec_context.time_base = 1 / rate
        self.stream.options = settings.encoder_options()
        self.num_frames = 0

    def encode(self, frame: av.VideoFrame) -> None:
        out = frame.reformat(width=self.width, height=self.height, format="yuv420p",
                             interpolation="AREA" if frame.width > self.width else "BILINEAR")
        out.pts, out.time_base = self.num_frames, 1 / self.rate
        out.pict_type = av.video.frame.PictureType.NONE  # let the encoder place keyframes
        for packet in self.stream.encode(out):
            self.container.mux(packet)
        self.num_frames += 1

    def finish(self) -> bytes:
        for packet in self.stream.encode(None):
            self.container.mux(packet)
        self.container.close()
        return self.buffer.getvalue()


def transcode(item: VideoInput, container, stream, settings: EncodeSettings, rate: Fraction,
              size: tuple[int, int]) -> tuple[bytes, int]:
    """Decode the source, resample to the constant ``rate`` by timestamp and encode."""
    slot = Fraction(1) / rate
    max_gap = Fraction(settings.max_gap).limit_denominator(1000)
    encoder = None
    prev_frame, prev_time, next_slot = None, None, 0
    first_time = None
    decoded = 0
    default_duration = 1 / Fraction(stream.average_rate or rate)
    stream.thread_type = "AUTO"  # decoder threads only speed up big sources; output is unaffected

    def emit_until(limit: Fraction) -> None:
        nonlocal next_slot, encoder
        while next_slot * slot < limit:
            if encoder is None:
                try:
                    encoder = _Encoder(settings, rate, *size)
                except av.error.FFmpegError as err:
                    raise VideoRejected("encode", "encoder error", f"{item.path}: {err}") from None
            try:
                encoder.encode(prev_frame)
            except av.error.FFmpegError as err:
                raise VideoRejected("encode", "encoder error", f"{item.path}: {err}") from None
            next_slot += 1

    try:
        for frame in container.decode(stream):
            decoded += 1
            if frame.pts is not None and frame.time_base is not None:
                t = Fraction(frame.pts) * frame.time_base
            else:
                t = (decoded - 1) * default_duration
            if first_time is None:
                first_time = t
            t -= first_time
            if prev_frame is not None:
                if t <= prev_time:  # out-of-order or duplicate timestamp: the newer frame wins
                    prev_frame = frame
                    continue
                if t - prev_time > max_gap:  # checked before emitting: a 2-hour gap costs nothing
                    raise VideoRejected("decode", "timestamp gap",
                                        f"{item.path}: frame {decoded - 1} comes {float(t - prev_time):.2f}s "
                                        f"after the previous one (at {float(prev_time):.2f}s) > --max-gap "
                                        f"{settings.max_gap}s: it would be held for "
                                        f"{int((t - prev_time) * rate)} output frames")
                emit_until(t)
            prev_frame, prev_time = frame, t
    except av.error.DecoderNotFoundError as err:
        raise VideoRejected("decode", "unsupported codec", f"{item.path}: {err}") from None
    except av.error.FFmpegError as err:
        raise VideoRejected("decode", "truncated", f"{item.path}: decoding failed after "
                                                   f"{decoded} frames ({err})") from None
    if prev_frame is None:
        raise VideoRejected("decode", "too short" if decoded == 0 else "truncated",
                            f"{item.path}: no decodable frame")
    last_duration = (Fraction(prev_frame.duration) * prev_frame.time_base
                     if prev_frame.duration and prev_frame.time_base else default_duration)
    if last_duration > max_gap:
        raise VideoRejected("decode", "timestamp gap", f"{item.path}: the last frame lasts "
                                                       f"{float(last_duration):.2f}s > --max-gap {settings.max_gap}s")
    emit_until(prev_time + last_duration)
    # A file cut short often decodes cleanly up to the cut: compare where the decoded frames end with
    # the stream's declared duration. Not with the container's frame count: an AVI holding frames
    # for several ticks (sparse timestamps) counts every tick as a frame (414 "frames" for 60 real ones).
    # Tolerance: 3 frames or 2% (edit lists and encoder delay shift the ends of intact files a little).
    declared_end = _declared_end(stream, container)
    decoded_end = float(prev_time + last_duration + (first_time or 0))
    tolerance = max(3 * float(default_duration), 0.02 * (declared_end or 0))
    if declared_end and decoded_end < declared_end - tolerance:
        raise VideoRejected("decode", "truncated", f"{item.path}: frames end at {decoded_end:.2f}s, "
                                                   f"the container says {declared_end:.2f}s")
    if encoder.num_frames < settings.min_frames:
        raise VideoRejected("decode", "too short", f"{item.path}: {encoder.num_frames} frames at "
                                                   f"{float(rate):.3f} fps < --min-frames {settings.min_frames}")
    try:
        return encoder.finish(), encoder.num_frames
    except av.error.FFmpegError as err:
        raise VideoRejected("encode", "encoder error", f"{item.path}: {err}") from None


def preflight(settings: EncodeSettings) -> None:
    """Encode two blank frames with ``settings``: a setting the encoder rejects fails the job here,
    with one clear error, instead of quarantining every video as ``encoder error``."""
    try:
        encoder = _Encoder(settings, Fraction(25), 64, 64)
        for _ in range(2):
            encoder.encode(av.VideoFrame(64, 64, "yuv420p"))
        encoder.finish()
    except av.error.FFmpegError as err:
        raise ValueError(f"the {settings.codec} encoder rejects the settings {settings.to_dict()}: {err}") from None


def test_decode(payload: bytes, settings: EncodeSettings, size: tuple[int, int]) -> tuple[int, Fraction]:
    """Decode the output end to end; return (frame count, average rate)."""
    count = 0
    with av.open(io.BytesIO(payload), mode="r") as container:
        stream = container.streams.video[0]
        rate = Fraction(stream.average_rate or stream.guessed_rate or 0)
        for frame in container.decode(stream):
            if (frame.width, frame.height) != size:
                raise ValueError(f"frame {count} is {frame.width}x{frame.height}, expected {size}")
            count += 1
    return count, rate


def _process(item: VideoInput, local: str, settings: EncodeSettings) -> tuple[dict, bytes]:
    container, stream, source_bytes = _open_source(item, local)
    with container:
        codec_context = stream.codec_context
        if stream.frames and stream.frames < settings.min_frames and stream.average_rate \
                and Fraction(stream.average_rate) <= Fraction(settings.max_fps).limit_denominator(1001):
            raise VideoRejected("probe", "too short", f"{item.path}: {stream.frames} frames "
                                                      f"< --min-frames {settings.min_frames}")
        width, height = codec_context.width, codec_context.height
        if not width or not height:
            raise VideoRejected("probe", "not a video", f"{item.path}: video stream has no frame size")
        sar = codec_context.sample_aspect_ratio
        size = target_size(width, height, Fraction(sar) if sar else None, settings.short_side)
        if min(size) < settings.min_side:
            raise VideoRejected("probe", "too small", f"{item.path}: {width}x{height} source -> {size[0]}x{size[1]} "
                                                      f"output (never scaled up) < --min-side {settings.min_side}")
        rate = output_rate(stream, settings.max_fps)
        source_info = {"source_codec": codec_context.name, "source_width": width,
                       "source_height": height, "source_bytes": source_bytes}
        copied = _can_copy(local, container, stream, settings, rate, size)
        if copied:
            payload = Path(local).read_bytes()
        else:
            payload, _ = transcode(item, container, stream, settings, rate, size)
    try:
        num_frames, decoded_rate = test_decode(payload, settings, size)
    except (av.error.FFmpegError, ValueError) as err:
        raise VideoRejected("test-decode", "truncated" if copied else "encoder error",
                            f"{item.path}: the output does not decode end to end ({err})") from None
    if num_frames < settings.min_frames:
        raise VideoRejected("test-decode", "too short", f"{item.path}: output has {num_frames} frames "
                                                        f"< --min-frames {settings.min_frames}")
    fps = float(rate)
    record = {"key": item.key, "label": item.label, "label_name": item.label_name,
              "dataset": item.dataset, "split": item.split, "source": item.path,
              "input_id": item.input_id, "num_frames": num_frames, "fps": round(fps, 6),
              "width": size[0], "height": size[1], "duration": round(num_frames / fps, 6),
              "codec": settings.codec, "copied": copied, **source_info}
    if item.key_hash:  # the key carries a hash suffix: say of what and why
        record["key_hash"] = item.key_hash
    return record, payload


_STAGE_OF_FUNCTION = {"_open_source": "probe", "_can_copy": "probe", "_keyframe_interval_ok": "probe",
                      "transcode": "decode", "_Encoder.__init__": "encode", "_Encoder.encode": "encode",
                      "_Encoder.finish": "encode", "test_decode": "test-decode"}


def _failed_stage(err: BaseException) -> str:
    """The stage a generic exception came from: the innermost of this module's stage functions
    on its traceback (probe / decode / encode / test-decode)."""
    stage = "probe"
    tb = err.__traceback__
    while tb is not None:  # outermost frame first: the last match is the innermost
        stage = _STAGE_OF_FUNCTION.get(tb.tb_frame.f_code.co_qualname, stage)
        tb = tb.tb_next
    return stage


def process_video(item: VideoInput, settings: EncodeSettings, fetch_dir: str | None = None) -> VideoOutcome:
    """Probe, re-encode (or copy) and test-decode one video; every failure becomes a quarantine record.

    One input never stops the job: a file the OS will not let us read (PermissionError, I/O error, a
    path that vanished, an object that cannot be fetched after the storage layer's retries) is
    ``unreadable``; any other exception is ``unexpected error`` with its type and message (the
    manifest's ``by_reason`` counts them; many of them point at the environment).

    Args:
        fetch_dir: where a URL input is fetched to (:func:`shard_tools.fetch.local_input`).
    """
    try:
        with local_input(item.path, item.key, fetch_dir) as local:
            record, payload = _process(item, local, settings)
    except FetchFailed as err:
        stage, reason, detail = "probe", err.reason, str(err)
    except VideoRejected as rejected:
        stage, reason, detail = rejected.stage, rejected.reason, rejected.detail
    except OSError as err:  # includes av.error.PermissionError / FileNotFoundError (they are OSErrors)
        stage, reason = _failed_stage(err), "unreadable"
        detail = f"{item.path}: {type(err).__name__}: {err.strerror or err}"
    except Exception as err:  # noqa: BLE001 -- per-input failures must not end the job
        stage, reason = _failed_stage(err), "unexpected error"
        detail = f"{item.path}: {type(err).__name__}: {' '.join(str(err).split())}"  # one line
    else:
        return VideoOutcome(item.key, item.input_id, True, record, payload)
    entry = quarantine_entry(item.input_id, item.key, item.path, stage, reason, detail)
    return VideoOutcome(item.key, item.input_id, False, entry, None)


def quarantine_entry(input_id: str, key: str | None, source: str, stage: str, reason: str,
                     detail: str) -> dict:
    """One quarantine.jsonl line."""
    if reason not in QUARANTINE_REASONS:
        raise ValueError(f"unknown quarantine reason {reason!r}")
    return {"input_id": input_id, "key": key, "source": source, "stage": stage, "reason": reason,
            "detail": detail}
