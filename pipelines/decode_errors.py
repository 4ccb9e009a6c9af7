"""Which video decoder failures make a sample bad, and which stop the run.

A sample is bad only when decoding it fails on its own bytes. CUDA errors, out of memory (device or
host), NVDEC session failures (NVDEC decoders are allocated per coded size, outside PyTorch's and
DALI's memory pools) and other device errors say nothing about the samples in flight: marking them
bad would save good keys into the checkpoint's position, and every resume would skip them. So the
loader (loader.py) classifies each failure before it touches the position:

- ``device``: the error names the device (CUDA, NVDEC/CUVID, out of memory, allocation): the run
  stops at once with ``DecoderDeviceError``, one line, nothing recorded;
- ``data``: DALI's messages for bytes it cannot decode (below): the samples in flight are decoded
  one by one to find the bad one; only a sample whose own decode fails with a data error is bad;
- anything else: treated like ``data`` for the search, but a sample is marked bad only by a data
  error of its own decode, and if none is found the run stops with the original error.

The data messages are DALI 2.4's (``frames_decoder_base.cc``, ``video_decoder_base.h``), seen on the
CPU decoder for non-video bytes, an empty member, a cut header and a flipped container; the mixed
decoder shares the container code (libavformat) and these messages.
"""
from __future__ import annotations

__all__ = ["DecoderDeviceError", "decode_error_kind", "decoder_message"]

DATA_MARKERS = (
    "Failed to create video decoder for",              # the container cannot be opened / no video stream
    "does not support empty input samples",
    "No valid frames found in video file",
    "has no valid timestamps",
    "Could not open video file from memory buffer",
    "Invalid data found when processing input",
)
DEVICE_MARKERS = ("CUDA", "cuda", "out of memory", "Out of memory", "OOM", "NVDEC", "nvdec", "CUVID", "cuvid",
                  "NvDecoder", "bad_alloc", "allocation failed", "Can't allocate", "NVML", "driver")


def decoder_message(err: BaseException) -> str:
    """What the decoder said, without the pipeline-definition traceback DALI puts before it (its file
    paths and source lines could contain any marker)."""
    texts = []
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        text = str(err)
        if "encountered:" in text:
            text = text.split("encountered:", 1)[1]
        texts.append(text.split("C++ context:", 1)[0].strip())
        err = err.__cause__ or err.__context__
    return " ".join(" ".join(t.split()) for t in texts if t)


def decode_error_kind(err: BaseException) -> str:
    """``device``, ``data`` or ``unknown`` (see the module docstring); device markers win."""
    message = decoder_message(err)
    if any(marker in message for marker in DEVICE_MARKERS):
        return "device"
    if any(marker in message for marker in DATA_MARKERS):
        return "data"
    return "unknown"


class DecoderDeviceError(OSError):
    """The video decoder failed on the device (or for no reason a sample explains): the run stops.

    An OSError, like a full disk: the environment, not the data, needs attention, and the command
    line reports it as one line (``common.errors``). The position holds nothing from the failure.
    """

    @classmethod
    def from_error(cls, err: BaseException, *, shards: str, device: str, why: str) -> "DecoderDeviceError":
        text = decoder_message(err) or type(err).__name__
        if len(text) > 300:
            text = text[:297] + "..."
        return cls(f"{shards}: the video decoder failed on the {device} device, {why} ({text}); no sample was "
                   f"marked bad. Free the device (out of memory: lower data.num_threads, data.prefetch or the "
                   f"batch size), then resume with --resume auto")
