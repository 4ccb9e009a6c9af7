"""Typed data configuration: which shards, which recipe's views, how they are augmented, where decoded.

Every section is a plain dataclass. ``DataConfig.from_dict`` builds one from YAML-style nested dicts and
rejects unknown keys with a message naming the field, so a typo in a config file is an error rather
than a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from common.precision import PRECISIONS, precision_name
from common.typed_config import dataclass_from_dict
from storage import RetryPolicy

RECIPES = ("svt", "lstcl", "eval")
DEVICES = ("cpu", "mixed", "auto")
DTYPES = tuple(name for _, name in PRECISIONS)  # float32, bfloat16, float16 (bf16 etc. accepted, normalized)
PLACEMENTS = ("independent", "included", "disjoint")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class AugmentConfig:
    """Per-view augmentation. One random draw per view and sample, applied to every frame of it.

    ``blur_p`` / ``solarize_p`` are keyed by view group ("global_0", "global_1", "local", "short",
    "long"); a group missing from the dict gets probability 0.
    """

    enabled: bool = True
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.0
    grayscale_p: float = 0.2
    blur: bool = True
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    # DINO (SVT) and MoCo v3 (LSTCL) settings: first view always blurred, second rarely + solarized.
    blur_p: dict[str, float] = field(default_factory=lambda: {"global_0": 1.0, "global_1": 0.1,
                                                              "local": 0.5, "short": 1.0, "long": 0.1})
    solarize: bool = True
    solarize_p: dict[str, float] = field(default_factory=lambda: {"global_1": 0.2, "long": 0.2})
    solarize_threshold: int = 128

    def __post_init__(self) -> None:
        for name in ("flip_p", "jitter_p", "grayscale_p"):
            _check_probability(name, getattr(self, name))
        for table in ("blur_p", "solarize_p"):
            for group, p in getattr(self, table).items():
                if not re.fullmatch(r"global_\d+|local|short|long", group):
                    raise ValueError(f"augment.{table}: unknown view group {group!r} "
                                     f"(global_N, local, short, long)")
                _check_probability(f"{table}[{group}]", p)
        if not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(f"augment.blur_sigma must be 0 < low <= high, got {self.blur_sigma}")
        if not 0 <= self.hue <= 0.5:
            raise ValueError(f"augment.hue must be in [0, 0.5], got {self.hue}")

    def blur_probability(self, group: str) -> float:
        return self.blur_p.get(group, 0.0) if self.enabled and self.blur else 0.0

    def solarize_probability(self, group: str) -> float:
        return self.solarize_p.get(group, 0.0) if self.enabled and self.solarize else 0.0


@dataclass
class SVTConfig:
    """SVT views: global clips over a random ``global_span`` fraction, locals over ``local_span``."""

    global_frames: tuple[int, ...] = (8, 16)
    global_size: int = 224
    global_span: float = 0.9
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_frames: tuple[int, ...] = (2, 2, 4, 4, 8, 8, 16, 16)
    local_size: int = 96
    local_span: float = 0.125
    local_scale: tuple[float, float] = (0.05, 0.4)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def __post_init__(self) -> None:
        if not self.global_frames:
            raise ValueError("svt.global_frames needs at least one global view")
        for name in ("global_frames", "local_frames"):
            if any(t < 1 for t in getattr(self, name)):
                raise ValueError(f"svt.{name} must be positive frame counts, got {getattr(self, name)}")
        for name in ("global_span", "local_span"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"svt.{name} must be in (0, 1], got {getattr(self, name)}")
        for name in ("global_size", "local_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"svt.{name} must be >= 1 pixels, got {getattr(self, name)}")
        _check_scale("svt.global_scale", self.global_scale)
        _check_scale("svt.local_scale", self.local_scale)


@dataclass
class LSTCLConfig:
    """LSTCL short/long clips: T frames each, every ``stride`` frames at ``reference_fps``.

    Strides count frames at the reference rate (30 fps, as PySlowFast's ``target_fps``), so a clip
    covers the same seconds whatever the shard's frame rate: stride 8 is 8/30 s between frames, i.e.
    4 frames of a 15 fps shard and 6.67 (rounded per frame) of a 25 fps one.

    Random strides (LSTCL paper, Table 1): a non-empty ``short_stride_choices`` /
    ``long_stride_choices`` replaces that clip's fixed stride with a per-video draw from the set.
    Table 1's rows: ``short_stride: 4, long_stride_choices: [8, 16, 32]``; ``long_stride: 32,
    short_stride_choices: [4, 8, 16]``; both sets ``[4, 8, 16, 32]``. The pair is drawn uniformly
    from the pairs with short <= long (the same as drawing each uniformly and redrawing until
    short <= long), so every set member must take part in at least one such pair.
    """

    short_frames: int = 8
    short_stride: int = 8              # paper Sec 5.1 / Fig 2: best tau_S = 8
    long_frames: int = 8
    long_stride: int = 32              # paper Sec 5.1 / Fig 2: best tau_L = 32 (Table 1, last row)
    short_stride_choices: tuple[int, ...] = ()   # Table 1 random tau_S; empty = short_stride
    long_stride_choices: tuple[int, ...] = ()    # Table 1 random tau_L; empty = long_stride
    reference_fps: float = 30.0        # strides count frames at this rate (PySlowFast target_fps 30)
    placement: str = "independent"
    size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise ValueError(f"lstcl.placement must be one of {PLACEMENTS}, got {self.placement!r}")
        for name in ("short_frames", "short_stride", "long_frames", "long_stride", "size"):
            if getattr(self, name) < 1:
                raise ValueError(f"lstcl.{name} must be >= 1, got {getattr(self, name)}")
        if not self.reference_fps > 0:
            raise ValueError(f"lstcl.reference_fps must be > 0, got {self.reference_fps}")
        for name in ("short_stride_choices", "long_stride_choices"):
            choices = getattr(self, name)
            if any(c < 1 for c in choices) or len(set(choices)) != len(choices):
                raise ValueError(f"lstcl.{name} must be distinct strides >= 1, got {choices}")
        shorts = self.short_stride_choices or (self.short_stride,)
        longs = self.long_stride_choices or (self.long_stride,)
        if self.short_stride_choices or self.long_stride_choices:
            # Table 1 draws with tau_S <= tau_L: a member with no partner could never be drawn.
            short_field = "short_stride_choices" if self.short_stride_choices else "short_stride"
            long_field = "long_stride_choices" if self.long_stride_choices else "long_stride"
            lonely = ([f"lstcl.{short_field}: short {s}" for s in shorts if s > max(longs)]
                      + [f"lstcl.{long_field}: long {t}" for t in longs if t < min(shorts)])
            if lonely:
                raise ValueError(f"{'; '.join(lonely)} has no partner with short <= long, so it is never drawn "
                                 f"(short strides {list(shorts)}, long strides {list(longs)})")
        _check_scale("lstcl.scale", self.scale)

    def stride_pairs(self) -> list[tuple[int, int]]:
        """Every (short, long) stride pair a video can draw; one pair when both strides are fixed."""
        shorts = self.short_stride_choices or (self.short_stride,)
        longs = self.long_stride_choices or (self.long_stride,)
        if not (self.short_stride_choices or self.long_stride_choices):
            return [(self.short_stride, self.long_stride)]
        return [(s, t) for s in shorts for t in longs if s <= t]


@dataclass
class EvalConfig:
    """Slow-fast evaluation views: ``clips`` temporal positions x ``crops`` spatial crops each.

    ``stride`` 0: each clip spreads its frames over its own 1/``clips`` of the video (SVT).
    ``stride`` > 0: clips of ``slow_frames`` frames every ``stride`` frames, starts spread uniformly
    over the video (LSTCL: 5 clips, stride 8, centre crop; ``frame_plans.strided_eval_frame_plan``).
    """

    slow_frames: int = 8
    slow_size: int = 224
    fast_frames: int = 64
    fast_size: int = 96
    clips: int = 1
    crops: int = 3
    stride: int = 0

    def __post_init__(self) -> None:
        if self.clips < 1 or self.crops not in (1, 3):
            raise ValueError(f"eval.clips must be >= 1 and eval.crops 1 or 3, got {self.clips}, {self.crops}")
        if self.stride < 0:
            raise ValueError(f"eval.stride must be >= 0 (0 = spread over the segment), got {self.stride}")
        for name in ("slow_frames", "slow_size", "fast_frames", "fast_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"eval.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class DataConfig:
    """Everything the loader needs besides batch size, rank and seed (passed to ``build_loader``).

    Args:
        shards: folder holding ``manifest.json`` and the tar shards it lists: a local path or a URL
            (``s3://bucket/prefix``, ``gs://...``, ``https://host/prefix``; ``storage``).
        recipe: ``svt`` | ``lstcl`` | ``eval``; picks the frame plan and the views.
        device: decoder device, ``cpu`` | ``mixed`` (NVDEC) | ``auto`` (mixed when a GPU is visible).
        num_threads: DALI worker threads for decoding and augmentation (baseline: DataLoader workers).
        dtype: output dtype of the view tensors (``float32`` | ``bfloat16`` | ``float16``, or ``fp32`` ...).
        mean, std: the backbone's normalization, in 0..1 units.
        shuffle: each epoch a seeded permutation of every sample (pipelines/order.py); False keeps
            manifest order.
        block_shards: 0 = full permutation; k > 0 = block shuffle for slow random reads: shard order
            permuted, then samples permuted within windows of k shards (less mixed batches).
        drop_last: drop the partial last global step (its samples become the epoch's spares)
            instead of filling it by wrapping to the start of the epoch's order.
        prefetch: batches the decode pipeline works ahead.
        repeats: view-sets per video visit (repeated sampling, R). 1 is the papers' setting. R > 1
            decodes the union of R independent plans' frames once and emits R view-sets, each with its
            own frames, crops, flips, colour, blur and solarize; a per-rank batch of B view-sets then
            holds B / R videos (R must divide it), each video's R view-sets next to each other.
        read_ahead_steps: data steps whose members are read (and plans drawn) ahead of the decoder,
            on the read-ahead threads (``pipelines.read_ahead``); 0 reads on the loader's own thread.
        read_ahead_bytes: memory budget of the read-ahead: member bytes read or being read but not
            yet handed to the decoder (per rank; the baseline splits it over its workers).
        read_threads: read-ahead threads (each waits on one read at a time; remote reads are latency
            bound, so more threads than cores pay off).
        cache_dir: node-local disk cache of remote member reads ("" = off); ranks and workers on a
            node share it. Useful for multi-epoch runs on a bucket.
        cache_bytes: the cache's size bound in bytes (least recently used entries go first).
        retry: attempts, backoff, deadline and timeout of every remote request (``storage.RetryPolicy``).
    """

    shards: str = ""
    recipe: str = "svt"
    device: str = "cpu"
    num_threads: int = 2
    dtype: str = "float32"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    shuffle: bool = True
    block_shards: int = 0
    drop_last: bool = False
    prefetch: int = 2
    repeats: int = 1
    # Our choices: two steps ahead hide a 50 ms request latency at CPU decode rates (docs/benchmarks.md,
    # object storage) while holding at most 256 MiB of encoded video per rank.
    read_ahead_steps: int = 2
    read_ahead_bytes: int = 256 * 2**20
    read_threads: int = 16
    cache_dir: str = ""
    cache_bytes: int = 0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    svt: SVTConfig = field(default_factory=SVTConfig)
    lstcl: LSTCLConfig = field(default_factory=LSTCLConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise ValueError(f"data.recipe must be one of {RECIPES}, got {self.recipe!r}")
        if self.device not in DEVICES:
            raise ValueError(f"data.device must be one of {DEVICES}, got {self.device!r}")
        self.dtype = precision_name(self.dtype, "data.dtype", long=True)
        if self.block_shards < 0:
            raise ValueError(f"data.block_shards must be >= 0 (0 = full permutation), got {self.block_shards}")
        if self.repeats < 1:
            raise ValueError(f"data.repeats must be >= 1 (view-sets per video visit), got {self.repeats}")
        if self.repeats > 1 and self.recipe == "eval":
            raise ValueError(f"data.repeats={self.repeats}: the eval recipe's views are deterministic, so its "
                             f"repeats would be identical copies; use data.repeats=1")
        if self.num_threads < 1 or self.prefetch < 1:
            raise ValueError("data.num_threads and data.prefetch must be >= 1")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"data.mean/std need 3 values with std > 0, got {self.mean}, {self.std}")
        if self.read_ahead_steps < 0 or self.read_ahead_bytes < 1 or self.read_threads < 1:
            raise ValueError(f"data.read_ahead_steps must be >= 0, data.read_ahead_bytes and data.read_threads "
                             f">= 1, got {self.read_ahead_steps}, {self.read_ahead_bytes}, {self.read_threads}")
        if self.cache_dir and self.cache_bytes < 1:
            raise ValueError(f"data.cache_dir {self.cache_dir!r} needs data.cache_bytes >= 1 (its size bound)")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "DataConfig":
        """Build from nested dicts (YAML), rejecting unknown keys with the field's dotted name."""
        return dataclass_from_dict(cls, values, "data")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_probability(name: str, p: float) -> None:
    if not 0 <= p <= 1:
        raise ValueError(f"augment.{name} must be a probability in [0, 1], got {p}")


def _check_scale(name: str, scale: tuple[float, float]) -> None:
    if not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"{name} must be 0 < low <= high <= 1, got {scale}")
