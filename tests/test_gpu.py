"""The GPU paths: the same DALI graph with ``device="mixed"`` (NVDEC + GPU ops), H.264 shards, models on CUDA.

Skipped where no CUDA GPU is visible (this project's CI machines have none). On a GPU machine run
``scripts/gpu_check.sh``, which runs this file and the GPU benchmarks. Fixture videos here are
160x128: NVDEC rejects VP9 frames smaller than 128x128, so the 64x48 CPU fixtures cannot be reused.
"""

from __future__ import annotations


import pytest
import torch

from pipeline_fixtures import (FixtureVideo, assert_views_hold_planned_frames, frame_indices,
                              index_videos, write_shards)

from pipelines import DataConfig, build_loader
from pipelines.config import AugmentConfig, LSTCLConfig, SVTConfig
from shard_tools.media import write_synthetic_video

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (device='mixed', NVDEC)")

LENGTHS = [40, 64, 90, 3, 130, 17]
WIDTH, HEIGHT = 160, 128


@pytest.fixture(scope="module")
def gpu_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu")
    return write_shards(root / "shards", index_videos(root / "media", LENGTHS, width=WIDTH, height=HEIGHT),
                        per_shard=3)


def config(shards: Path, device: str, **kw) -> DataConfig:
    kw.setdefault("svt", SVTConfig(global_size=64, local_size=32))
    kw.setdefault("lstcl", LSTCLConfig(size=64))
    kw.setdefault("augment", AugmentConfig(enabled=False))
    return DataConfig(shards=str(shards), device=device, num_threads=2, **kw)


@pytest.mark.parametrize("recipe", ["svt", "lstcl"])
def test_mixed_views_hold_exactly_their_planned_frames(gpu_shards, recipe):
    cfg = config(gpu_shards, "mixed", recipe=recipe)
    loader = build_loader(cfg, batch_size=3, seed=3)
    assert all(tensor.is_cuda for name, tensor in next(iter(loader)).items() if name not in ("key", "label"))
    assert_views_hold_planned_frames(loader, cfg, gpu_shards, seed=3)


def test_mixed_matches_cpu(gpu_shards):
    """Same plans and parameters on both devices: same samples, same views up to resampling rounding."""
    augmented = dict(recipe="svt", augment=AugmentConfig())
    cpu = list(build_loader(config(gpu_shards, "cpu", **augmented), batch_size=3, seed=1))
    gpu = list(build_loader(config(gpu_shards, "mixed", **augmented), batch_size=3, seed=1))
    assert [b["key"] for b in cpu] == [b["key"] for b in gpu]
    for a, b in zip(cpu, gpu):
        for name in a:
            if name in ("key", "label"):
                continue
            # Normalized units (std ~0.225, so 0.05 ~ 3/255): YUV->RGB and resampling round differently.
            diff = (a[name].float() - b[name].float().cpu()).abs()
            assert diff.mean() < 0.05 and diff.max() < 0.5, name


def test_h264_shards_decode_on_mixed(tmp_path):
    videos = []
    for i, n in enumerate([30, 45]):
        path = write_synthetic_video(tmp_path / f"h{i}.mp4", num_frames=n, width=WIDTH, height=HEIGHT, codec="h264")
        videos.append(FixtureVideo(f"h{i}", path, ext="mp4"))
    shards = write_shards(tmp_path / "shards", videos, per_shard=2, codec="h264")
    cfg = config(shards, "mixed", recipe="lstcl", shuffle=False)
    (batch,) = list(build_loader(cfg, batch_size=2, seed=0))
    assert sorted(batch["key"]) == ["h0", "h1"] and batch["long"].is_cuda
    assert all(i >= 0 for row in frame_indices(batch["short"], cfg) for i in row)


def test_mixed_corrupt_and_truncated_samples_are_replaced_and_reported(tmp_path):
    """Undecodable and truncated members on NVDEC: the same frames_check and spares as on the CPU."""
    videos = index_videos(tmp_path / "media", [30, 40, 50, 60], width=WIDTH, height=HEIGHT)
    videos.insert(1, FixtureVideo("broken", videos[0].path, raw=b"\x1aE\xdf\xa3 this is not a video" * 50))
    cut = videos[4].path.read_bytes()
    videos.insert(3, FixtureVideo("cut", videos[4].path, raw=cut[:int(len(cut) * 0.3)]))
    shards = write_shards(tmp_path / "shards", videos, per_shard=2, meta_override={"broken": {"num_frames": 30}})
    loader = build_loader(config(shards, "mixed", recipe="lstcl", shuffle=False), batch_size=2, seed=0)
    steps = [batch["key"] for batch in loader]
    assert [len(k) for k in steps] == [2, 2, 2]
    assert {k for keys in steps for k in keys} == {v.key for v in videos if v.key not in ("broken", "cut")}
    assert loader.stats["decode_failures"] == 2
    assert sorted(r["key"] for r in loader.stats["replacements"]) == ["broken", "cut"]


def test_models_on_cuda_grouped_equals_loop_and_bf16_is_close():
    from models import DINOHead, MultiViewRunner, build_backbone
    torch.manual_seed(0)
    backbone = build_backbone("timesformer_tiny_patch16", depth=2, num_frames=8, img_size=64).cuda()
    runner = MultiViewRunner(backbone, DINOHead(backbone.embed_dim, out_dim=256)).cuda().eval()
    views = [torch.randn(2, 3, t, s, s, device="cuda") for t, s in [(8, 64), (4, 64), (2, 32), (2, 32), (4, 32)]]
    with torch.no_grad():
        grouped = runner(views)
        loop = [runner.head(backbone.forward_features(v)) for v in views]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            half = runner(views)
    for g, lp, h in zip(grouped, loop, half):
        torch.testing.assert_close(g, lp, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(h.float(), g, rtol=0.05, atol=0.05)


def test_bench_data_on_mixed(gpu_shards, tmp_path):
    from benchmarks import data as benchmark
    out = tmp_path / "data.json"
    assert benchmark.main(["--recipe", "lstcl", "--shards", str(gpu_shards), "--device", "mixed",
                           "--batch-size", "2", "--warmup", "1", "--batches", "1", "--rounds", "1",
                           "--threads", "2", "--out", str(out)]) == 0
    assert out.is_file()
