"""Test shards for the pipelines tests, written in the shard contract's format (docs/design.md section 1).

Tars are written directly with webdataset's TarWriter and indexed with DALI's own ``wds2idx`` (not
shard_tools' writer), so the pipeline tests also pin the contract itself; names and the manifest come
from ``shard_tools.format``, the one definition of the format.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import av
import torch
import webdataset as wds

from footage import decode_index_color, write_synthetic_video
from pipelines.views import plan_sample
from shard_tools.format import (QUARANTINE_NAME, Manifest, QuarantineSummary, ShardEntry, ShardSize, Totals,
                                index_file_name, read_manifest, shard_file_name, write_manifest)

WDS2IDX = Path(sys.executable).parent / "wds2idx"


@dataclass
class FixtureVideo:
    key: str
    path: Path
    label: int = 0
    ext: str = "webm"
    raw: bytes | None = None   # bytes written instead of the file (corrupt-sample tests)


def probe(path: Path) -> dict:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(video=0))
        return {"num_frames": frames, "fps": float(stream.average_rate or 25),
                "width": stream.codec_context.width, "height": stream.codec_context.height}


def write_shards(folder: Path, videos: list[FixtureVideo], *, per_shard: int, codec: str = "vp9",
                 name: str = "test", split: str = "train", meta_override: dict | None = None) -> Path:
    """Write ``videos`` into tar shards of ``per_shard`` samples plus index files and manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    probes = {v.key: probe(v.path) for v in videos}
    for s in range(0, len(videos), per_shard):
        chunk = videos[s:s + per_shard]
        tar = folder / shard_file_name(name, split, s // per_shard)
        with wds.TarWriter(str(tar)) as writer:
            for v in chunk:
                meta = {"key": v.key, "label": v.label, "label_name": f"class{v.label}", "dataset": "test",
                        "split": split, "source": str(v.path), **probes[v.key],
                        "duration": probes[v.key]["num_frames"] / probes[v.key]["fps"]}
                meta.update((meta_override or {}).get(v.key, {}))
                writer.write({"__key__": v.key, v.ext: v.raw if v.raw is not None else v.path.read_bytes(),
                              "json": json.dumps(meta).encode(), "cls": str(v.label).encode()})
        idx = folder / index_file_name(tar.name)
        subprocess.run([str(WDS2IDX), str(tar), str(idx)], check=True, capture_output=True)
        shards.append(ShardEntry(path=tar.name, idx_path=idx.name, num_samples=len(chunk), bytes=tar.stat().st_size,
                                 keys=[v.key for v in chunk], sources=[str(v.path) for v in chunk],
                                 num_frames=sum(probes[v.key]["num_frames"] for v in chunk)))
    container = "webm" if codec == "vp9" else "mp4"
    manifest = Manifest(
        tool_version="tests.pipeline_fixtures", name=name, dataset="test", split=split, codec=codec,
        container=container, extension=container, encode={}, seed=0,
        shard_size=ShardSize(max_samples=per_shard, max_bytes=None), label_map={}, shards=shards,
        totals=Totals(inputs=len(videos), samples=len(videos), quarantined=0, shards=len(shards),
                      frames=sum(s.num_frames for s in shards), bytes=sum(s.bytes for s in shards)),
        quarantine=QuarantineSummary(path=QUARANTINE_NAME, by_reason={}), source={}, job_fingerprint="")
    write_manifest(folder, manifest, sync=False)
    (folder / QUARANTINE_NAME).write_text("")
    return folder


def index_videos(folder: Path, lengths: list[int], *, width: int = 64, height: int = 48,
                 prefix: str = "idx") -> list[FixtureVideo]:
    """Videos whose frames encode their own index (footage pattern "index")."""
    videos = []
    for i, n in enumerate(lengths):
        path = folder / f"{prefix}{i:03d}.webm"
        if not path.exists():
            write_synthetic_video(path, num_frames=n, width=width, height=height, pattern="index")
        videos.append(FixtureVideo(f"{prefix}{i:03d}", path, label=i % 5))
    return videos


def reencode_vp9(src: Path, dst: Path, *, max_frames: int | None = None, short_side: int = 128) -> Path:
    """Re-encode real footage (e.g. H.264 bikes.mp4) to VP9 WebM for the CPU decoder."""
    if dst.exists():
        return dst
    with av.open(str(src)) as inp, av.open(str(dst), "w") as out:
        in_stream = inp.streams.video[0]
        w, h = in_stream.codec_context.width, in_stream.codec_context.height
        scale = short_side / min(w, h)
        ow, oh = int(round(w * scale / 2)) * 2, int(round(h * scale / 2)) * 2
        stream = out.add_stream("libvpx-vp9", rate=in_stream.average_rate or 25)
        stream.width, stream.height, stream.pix_fmt = ow, oh, "yuv420p"
        stream.options = {"deadline": "realtime", "cpu-used": "8", "crf": "32", "b": "0", "g": "16"}
        for i, frame in enumerate(inp.decode(video=0)):
            if max_frames is not None and i >= max_frames:
                break
            frame = frame.reformat(width=ow, height=oh, format="yuv420p")
            frame.pts = None
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return dst


def frame_indices(view: torch.Tensor, cfg) -> list[list[int]]:
    """Decode the index colour of every frame of a (B, C, T, H, W) normalized view (any device)."""
    mean = torch.tensor(cfg.mean).view(1, 3, 1, 1, 1)
    std = torch.tensor(cfg.std).view(1, 3, 1, 1, 1)
    rgb = ((view.float().cpu() * std + mean) * 255).mean((3, 4))   # (B, C, T)
    return [[decode_index_color(rgb[b, :, t].numpy()) for t in range(rgb.shape[2])]
            for b in range(rgb.shape[0])]


def meta_of(shards: Path) -> dict[str, dict]:
    """Every sample's json in a shard folder, by key."""
    metas = {}
    for tar, _ in read_manifest(shards).shard_files(shards):
        for sample in wds.DataPipeline(wds.SimpleShardList([str(tar)]),
                                       wds.tarfile_to_samples()):
            meta = json.loads(sample["json"])
            metas[meta["key"]] = meta
    return metas


def assert_views_hold_planned_frames(loader, cfg, shards: Path, seed: int) -> list[dict]:
    """One epoch of ``loader`` over index videos: every view of every view-set holds exactly the frames
    its plan names, in order, with the sample's label; every sample of ``shards`` comes once per epoch
    with its ``cfg.repeats`` view-sets next to each other (repeat 0 .. R-1). Returns the epoch's
    batches (for checks of their own, e.g. the device the views are on)."""
    metas = meta_of(shards)
    seen = []
    r = cfg.repeats
    # All steps are collected first: the zero-copy outputs of early steps must survive later steps.
    batches = list(loader)
    for batch in batches:
        assert set(batch) == set(loader.view_names) | {"label", "key", "video_id", "repeat", "data_step"}
        assert batch["repeat"].tolist() == list(range(r)) * (len(batch["key"]) // r)
        for b, key in enumerate(batch["key"]):
            m = metas[key]
            plan = plan_sample(cfg, loader.views, seed=seed, epoch=0, key=key, num_frames=m["num_frames"],
                               fps=m["fps"], width=m["width"], height=m["height"])
            for view in loader.views:
                got = frame_indices(batch[view.name][b:b + 1], cfg)[0]
                assert got == plan.view_frames(view, int(batch["repeat"][b])).tolist(), (key, view.name)
            assert batch["label"][b].item() == m["label"]
            assert batch["key"][b - b % r] == key and batch["video_id"][b] == batch["video_id"][b - b % r]
        seen += batch["key"][::r]
    assert set(seen) == set(metas)              # one epoch: every sample (a partial last step wraps)
    return batches
