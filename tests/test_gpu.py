"""The GPU paths, parametrised over devices so that their code runs everywhere.

The DALI graph runs with ``device="cpu"`` (every machine, CI included) and ``device="mixed"`` (NVDEC
decode + GPU ops), the models on ``cpu`` and ``cuda``; the GPU cases are skipped where no CUDA GPU is
visible (this project's CI machines have none), and ``scripts/gpu_check.sh`` runs the whole file on a
GPU machine. Each test checks what matters on a GPU on both: outputs on the right device with the
right dtype, the mixed graph equal to the CPU graph within a stated tolerance (the CPU graph against
itself: bit-identical), undecodable and truncated members replaced and reported, samples under NVDEC's
minimum size replaced before decoding (on the CPU the loader's ``min_side`` stands for NVDEC's, the
same code path). Fixture videos are 160x128: NVDEC rejects VP9 frames smaller than 128x128, so the
64x48 CPU fixtures of test_pipelines.py cannot be reused.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline_fixtures import (FixtureVideo, assert_views_hold_planned_frames, frame_indices,
                               index_videos, meta_of, write_shards)

from footage import write_synthetic_video
from pipelines import DataConfig, build_loader
from pipelines.config import AugmentConfig, LSTCLConfig, SVTConfig
from pipelines.loader import NVDEC_VP9_MIN_SIDE
from pipelines.views import plan_sample

GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU (DALI device='mixed' with NVDEC, torch 'cuda')")
DATA_DEVICES = ["cpu", pytest.param("mixed", marks=needs_gpu)]
TORCH_DEVICES = ["cpu", pytest.param("cuda", marks=needs_gpu)]

LENGTHS = [40, 64, 90, 3, 130, 17]
WIDTH, HEIGHT = 160, 128
# mixed against cpu, in normalized units (std ~0.225, so 0.05 ~ 3/255): NVDEC's YUV->RGB and the GPU
# resampling round differently from the CPU's; a wrong frame or crop differs by far more
MIXED_MEAN_TOL, MIXED_MAX_TOL = 0.05, 0.5


def output_device(device: str) -> str:
    return "cuda" if device == "mixed" else "cpu"


def assert_real_planned_frames(batches: list[dict], loader, cfg, shards: Path, seed: int) -> None:
    """Every delivered sample (spares included) holds exactly its planned frames: no padding slipped
    through the frames check."""
    metas = meta_of(shards)
    for batch in batches:
        for b, key in enumerate(batch["key"]):
            plan = plan_sample(cfg, loader.views, seed=seed, epoch=0, key=key,
                               **{k: metas[key][k] for k in ("num_frames", "fps", "width", "height")})
            for view in loader.views:
                assert frame_indices(batch[view.name][b:b + 1], cfg)[0] == plan.view_frames(view).tolist(), key


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


@pytest.mark.parametrize("device", DATA_DEVICES)
def test_repeated_view_sets_hold_their_planned_frames(gpu_shards, device):
    """data.repeats=2 through the same graph on both decoders: one decode per video, two view-sets of
    it (``fn.stack``) on adjacent rows, each holding its own plan's frames, on the output device."""
    cfg = config(gpu_shards, device, recipe="svt", repeats=2)
    loader = build_loader(cfg, batch_size=4, seed=3)
    for batch in assert_views_hold_planned_frames(loader, cfg, gpu_shards, seed=3):
        assert batch["repeat"].tolist() == [0, 1, 0, 1]
        for name in loader.view_names:
            assert batch[name].device.type == output_device(device) and batch[name].shape[0] == 4, name


@pytest.mark.parametrize("recipe", ["svt", "lstcl"])
@pytest.mark.parametrize("device", DATA_DEVICES)
def test_views_hold_exactly_their_planned_frames(gpu_shards, device, recipe):
    cfg = config(gpu_shards, device, recipe=recipe)
    loader = build_loader(cfg, batch_size=3, seed=3)
    batches = assert_views_hold_planned_frames(loader, cfg, gpu_shards, seed=3)
    for batch in batches:
        for name in loader.view_names:
            assert batch[name].device.type == output_device(device), name
            assert batch[name].dtype == torch.float32, name
        assert batch["label"].device.type == "cpu" and isinstance(batch["data_step"], tuple)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("device", DATA_DEVICES)
def test_reduced_precision_outputs(gpu_shards, device, dtype):
    """A bf16 recipe's views arrive in bf16 on the decode device (DALI emits float16, converted once)."""
    loader = build_loader(config(gpu_shards, device, recipe="lstcl", dtype=dtype), batch_size=3, seed=0)
    batch = next(iter(loader))
    for name in loader.view_names:
        assert batch[name].device.type == output_device(device)
        assert batch[name].dtype == getattr(torch, dtype)


@pytest.mark.parametrize("device", DATA_DEVICES)
def test_device_matches_cpu(gpu_shards, device):
    """Same plans and parameters on both devices: the same samples, the same views up to resampling
    rounding on ``mixed`` (MIXED_MEAN_TOL / MIXED_MAX_TOL), bit-identical views on ``cpu``."""
    augmented = dict(recipe="svt", augment=AugmentConfig())
    loader = build_loader(config(gpu_shards, device, **augmented), batch_size=3, seed=1)
    cpu = list(build_loader(config(gpu_shards, "cpu", **augmented), batch_size=3, seed=1))
    other = list(loader)
    assert [b["key"] for b in cpu] == [b["key"] for b in other]
    for a, b in zip(cpu, other):
        assert set(a) == set(b)
        for name in set(a) - set(loader.view_names):  # keys, labels, data step, video ids, repeats
            assert torch.equal(a[name], b[name]) if torch.is_tensor(a[name]) else a[name] == b[name], name
        for name in loader.view_names:
            diff = (a[name].float() - b[name].float().cpu()).abs()
            if device == "cpu":
                assert float(diff.max()) == 0.0, name
            else:
                assert diff.mean() < MIXED_MEAN_TOL and diff.max() < MIXED_MAX_TOL, name


@pytest.mark.parametrize("device", DATA_DEVICES)
def test_h264_shards(tmp_path, device):
    """H.264 shards decode on ``mixed``; on ``cpu`` (DALI's CPU decoder has no H.264) the loader stops
    at build time with one line naming the manifest."""
    videos = []
    for i, n in enumerate([30, 45]):
        path = write_synthetic_video(tmp_path / f"h{i}.mp4", num_frames=n, width=WIDTH, height=HEIGHT, codec="h264")
        videos.append(FixtureVideo(f"h{i}", path, ext="mp4"))
    shards = write_shards(tmp_path / "shards", videos, per_shard=2, codec="h264")
    cfg = config(shards, device, recipe="lstcl", shuffle=False)
    if device == "cpu":
        with pytest.raises(ValueError, match="manifest.json: shards are H.264"):
            build_loader(cfg, batch_size=2, seed=0)
        return
    loader = build_loader(cfg, batch_size=2, seed=0)
    (batch,) = list(loader)
    assert sorted(batch["key"]) == ["h0", "h1"] and batch["long"].is_cuda
    assert_real_planned_frames([batch], loader, cfg, shards, seed=0)


@pytest.mark.parametrize("device", DATA_DEVICES)
def test_corrupt_and_truncated_samples_are_replaced_and_reported(tmp_path, device):
    """An undecodable and a truncated member (the decoder stops early and pads): the same
    frames_check and spares on both devices, and the delivered views hold only real frames. The
    check runs with the guard copy of the last frame (graph.py's ``frames_guard``: NVDEC may leave a
    slot unwritten), on ``mixed`` by default and forced on ``cpu``: the same graph on both."""
    videos = index_videos(tmp_path / "media", [30, 40, 50, 60], width=WIDTH, height=HEIGHT)
    videos.insert(1, FixtureVideo("broken", videos[0].path, raw=b"\x1aE\xdf\xa3 this is not a video" * 50))
    cut = videos[4].path.read_bytes()
    videos.insert(3, FixtureVideo("cut", videos[4].path, raw=cut[:int(len(cut) * 0.3)]))
    shards = write_shards(tmp_path / "shards", videos, per_shard=2,
                          meta_override={"broken": {"num_frames": 30}})
    cfg = config(shards, device, recipe="lstcl", shuffle=False)
    loader = build_loader(cfg, batch_size=2, seed=0)
    assert loader.frames_guard == (device == "mixed")
    loader.frames_guard = True
    batches = list(loader)
    steps = [batch["key"] for batch in batches]
    assert [len(k) for k in steps] == [2, 2, 2]
    assert {k for keys in steps for k in keys} == {v.key for v in videos if v.key not in ("broken", "cut")}
    assert loader.stats["decode_failures"] == 2
    # "cut" is also the first spare of "broken" (then found short itself and replaced in turn)
    assert {r["key"] for r in loader.stats["replacements"]} == {"broken", "cut"}
    assert sorted(loader.state_dict()["bad_keys"]) == ["broken", "cut"]
    assert all(b[view].device.type == output_device(device) for b in batches for view in loader.view_names)
    assert_real_planned_frames(batches, loader, cfg, shards, seed=0)


@pytest.mark.parametrize("device", DATA_DEVICES)
def test_samples_below_nvdec_minimum_are_replaced(tmp_path, device):
    """VP9 under 128x128 would fail NVDEC: replaced before decoding, reported and counted. On the CPU
    (no minimum) the loader's ``min_side`` is set to NVDEC's, the same code path."""
    small = index_videos(tmp_path / "media", [24, 24], width=96, height=64, prefix="small")
    large = index_videos(tmp_path / "media", [24, 24, 24, 24], width=WIDTH, height=HEIGHT, prefix="large")
    shards = write_shards(tmp_path / "shards", small + large, per_shard=3)
    loader = build_loader(config(shards, device, recipe="lstcl"), batch_size=3, seed=0)
    assert loader.min_side == (NVDEC_VP9_MIN_SIDE if device == "mixed" else 0)
    loader.min_side = NVDEC_VP9_MIN_SIDE
    batches = list(loader)
    assert [len(b["key"]) for b in batches] == [3, 3]
    assert {k for b in batches for k in b["key"]} == {v.key for v in large}
    assert sorted(r["key"] for r in loader.stats["skipped_keys"]) == ["small000", "small001"]
    assert all(b[name].device.type == output_device(device) for b in batches for name in loader.view_names)


@pytest.mark.parametrize("device", TORCH_DEVICES)
def test_models_grouped_equals_loop_and_bf16_is_close(device):
    from models import DINOHead, MultiViewRunner, build_backbone
    torch.manual_seed(0)
    backbone = build_backbone("timesformer_tiny_patch16", depth=2, num_frames=8, img_size=64).to(device)
    runner = MultiViewRunner(backbone, DINOHead(backbone.embed_dim, out_dim=256)).to(device).eval()
    views = [torch.randn(2, 3, t, s, s, device=device) for t, s in [(8, 64), (4, 64), (2, 32), (2, 32), (4, 32)]]
    with torch.no_grad():
        grouped = runner(views)
        loop = [runner.head(backbone.forward_features(v)) for v in views]
        with torch.autocast(device, dtype=torch.bfloat16):
            half = runner(views)
    for g, lp, h in zip(grouped, loop, half):
        assert g.device.type == device and h.dtype == torch.bfloat16
        torch.testing.assert_close(g, lp, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(h.float(), g, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("device", DATA_DEVICES)
def test_bench_data(gpu_shards, tmp_path, device):
    from benchmarks import data as benchmark
    out = tmp_path / "data.json"
    assert benchmark.main(["--recipe", "lstcl", "--shards", str(gpu_shards), "--device", device, "--modes", "dali",
                           "--batch-size", "2", "--warmup", "1", "--batches", "1", "--rounds", "1",
                           "--threads", "2", "--out", str(out)]) == 0
    assert out.is_file()


def test_frames_check_guard_flags_a_slot_the_decoder_never_wrote():
    """graph.frames_check with the guard copy: a sentinel last frame gives 0 (padded), two identical
    real copies give their distance from the sentinel, two differing copies (stale memory in a slot
    NVDEC never wrote) give 0; without the guard only the sentinel counts."""
    import numpy as np
    from nvidia.dali import fn, pipeline_def

    from pipelines.graph import MISSING_FILL, frames_check

    rng = np.random.default_rng(0)
    real = rng.integers(0, 200, (4, 6, 3), dtype=np.uint8)
    stale = rng.integers(0, 200, (4, 6, 3), dtype=np.uint8)
    sentinel = np.broadcast_to(np.array(MISSING_FILL, np.uint8), (4, 6, 3))
    videos = [np.stack([real, real, real]), np.stack([real, sentinel, sentinel]), np.stack([real, real, stale])]

    @pipeline_def(batch_size=len(videos), num_threads=1, device_id=None)
    def check(guarded):
        video = fn.external_source(source=lambda: videos, batch=True, layout="FHWC")
        return frames_check(video, guarded)

    results = {}
    for guarded in (False, True):
        pipe = check(guarded)
        pipe.build()
        (out,) = pipe.run()
        results[guarded] = [int(np.asarray(out[i])) for i in range(len(videos))]
    assert results[True][0] > 0 and results[True][1] == 0 and results[True][2] == 0
    assert results[False][0] > 0 and results[False][1] == 0 and results[False][2] > 0  # stale passes unguarded


@pytest.fixture(scope="module")
def damaged_gpu_shards(tmp_path_factory):
    """Steps of 2 (no shuffle): [idx000, broken], [idx001, cut], [idx002, idx003]."""
    root = tmp_path_factory.mktemp("damaged_gpu")
    videos = index_videos(root / "media", [30, 40, 50, 60], width=WIDTH, height=HEIGHT)
    videos.insert(1, FixtureVideo("broken", videos[0].path, raw=b"\x1aE\xdf\xa3 this is not a video" * 50))
    cut = videos[4].path.read_bytes()
    videos.insert(3, FixtureVideo("cut", videos[4].path, raw=cut[:int(len(cut) * 0.3)]))
    return write_shards(root / "shards", videos, per_shard=2, meta_override={"broken": {"num_frames": 30}})


# (where the hook raises, on which keys, the error text): a CUDA out-of-memory while a batch is fed,
# NVDEC's session failure while a sample is decoded alone to find a corrupt one, a device error while
# a spare is decoded, and an error nothing explains (every sample in flight decodes alone)
INJECTED = {
    "batch": ("batch", "idx002", "CUDA error: out of memory (tried to allocate 2.00 GiB)"),
    "alone": ("alone", "idx000", "CUDA driver API error CUDA_ERROR_OUT_OF_MEMORY (2): cuvidCreateDecoder "
                                 "failed: NVDEC session limit reached"),
    "spare": ("spare", None, "NvDecoder: cuvidMapVideoFrame failed: CUDA_ERROR_LAUNCH_FAILED"),
    "unexplained": ("batch", "idx002", "something no sample explains"),
}


@pytest.mark.parametrize("case", sorted(INJECTED))
@pytest.mark.parametrize("device", DATA_DEVICES)
def test_device_errors_stop_the_run_and_mark_nothing_bad(damaged_gpu_shards, device, case):
    """Only data errors make a sample bad. A device error raised from the decoder feed (a real
    RuntimeError through a real pipe.run(), injected by the loader's feed_hook) stops the iteration
    with one line, and the position holds no key the error touched; the data errors around it (the
    undecodable and the truncated member) are still found."""
    from common.errors import error_line
    from pipelines.decode_errors import DecoderDeviceError

    where, key, text = INJECTED[case]
    cfg = config(damaged_gpu_shards, device, recipe="lstcl", shuffle=False)
    loader = build_loader(cfg, batch_size=2, seed=0)

    def hook(keys, stage):
        if stage == where and (key is None or key in keys):
            raise RuntimeError(text)

    loader.feed_hook = hook
    delivered = []
    with pytest.raises(DecoderDeviceError) as caught:
        for batch in loader:
            delivered.append(batch["key"])
    line = error_line(caught.value)
    assert "\n" not in line and "no sample was marked bad" in line and str(damaged_gpu_shards) in line
    assert text.split(":")[0] in line
    assert isinstance(caught.value, OSError)  # the command lines print it as one `error:` line, exit 2
    bad = set(loader.state_dict()["bad_keys"])
    assert bad <= {"broken", "cut"}, bad
    if key is not None:
        assert key not in bad
    if case in ("batch", "unexplained", "spare"):
        assert "broken" in bad  # the real corrupt sample before the failure was still found and replaced
    if case == "unexplained":
        assert "every sample in flight decodes on its own" in line


def test_decode_error_kinds():
    """Device markers win over data markers; only what the decoder said counts, not the pipeline
    definition's traceback DALI puts before it."""
    from pipelines.decode_errors import decode_error_kind

    wrap = ('Critical error in pipeline:\nError in MIXED operator `nvidia.dali.fn.decoders.video`,\nwhich was used '
            'in the pipeline definition with the following traceback:\n\n  File "/home/cuda_user/pipelines/'
            'graph.py", line 56\n\nencountered:\n\n{}\nC++ context: [/opt/dali/dali/operators/video/x.cc:1]')
    assert decode_error_kind(RuntimeError(wrap.format('Assert on "frames_decoders_[s]->IsValid()" failed: Failed '
                                                      'to create video decoder for "memory file"'))) == "data"
    assert decode_error_kind(RuntimeError(wrap.format("CUDA error: out of memory"))) == "device"
    assert decode_error_kind(RuntimeError(wrap.format("Failed to create video decoder for x: CUDA_ERROR_"
                                                      "OUT_OF_MEMORY"))) == "device"
    assert decode_error_kind(RuntimeError(wrap.format("Current pipeline object is no longer valid"))) == "unknown"


@pytest.mark.parametrize("device", DATA_DEVICES)
def test_member_reads_and_plans_of_the_next_steps_run_on_the_read_ahead_threads(gpu_shards, device, monkeypatch):
    """GPU readiness, issue 20 item 5: while a step is decoded and trained on, the members of the next
    steps are read and their plans drawn on the read-ahead's own threads (pipelines/read_ahead.py),
    never on the training thread, and the next step's reads start before the current step reaches the
    trainer; the views are the same as without read-ahead."""
    import threading
    import time

    import pipelines.loader as loader_module

    events = []  # (what, key, thread name, start)
    plan = loader_module.plan_sample

    def recording_plan(cfg, views, *, key, **kw):
        events.append(("plan", key, threading.current_thread().name, time.perf_counter()))
        return plan(cfg, views, key=key, **kw)

    monkeypatch.setattr(loader_module, "plan_sample", recording_plan)
    cfg = config(gpu_shards, device, recipe="lstcl", shuffle=False, read_ahead_steps=2, read_threads=2)
    loader = build_loader(cfg, batch_size=1, seed=0)
    read = loader.reader.read_sample

    def recording_read(entry):
        events.append(("read", entry.key, threading.current_thread().name, time.perf_counter()))
        return read(entry)

    loader.reader.read_sample = recording_read
    delivered = {}   # key -> when its step reached the consumer
    batches = []
    for batch in loader:
        delivered[batch["key"][0]] = time.perf_counter()
        batches.append(batch)
        time.sleep(0.05)  # the training step
    keys = [b["key"][0] for b in batches]
    assert len(keys) == len(LENGTHS) and {e[1] for e in events} == set(keys)
    assert all(name.startswith("read-ahead") for _, _, name, _ in events), {e[2] for e in events}
    for what in ("read", "plan"):
        started = {key: t for w, key, _, t in events if w == what}
        # step s + 1's member is read and planned before step s is delivered
        assert all(started[nxt] < delivered[cur] for cur, nxt in zip(keys, keys[1:])), what
    plain = list(build_loader(config(gpu_shards, device, recipe="lstcl", shuffle=False, read_ahead_steps=0),
                              batch_size=1, seed=0))
    assert [b["key"] for b in plain] == [b["key"] for b in batches]
    for a, b in zip(plain, batches):
        for name in loader.view_names:
            assert torch.equal(a[name].cpu(), b[name].cpu()), name
