"""bench.py data end to end on tiny shards: three modes, JSON with the ratios, PNG chart; ``--op-costs``
(the views graph cut after each step); ``--scale-shards`` (the DALI loader over many small shards);
the benchmark's shard sets, written by the sharding job; the public loader and graph APIs it uses."""

from __future__ import annotations

import json
import sys

import pytest
from pipeline_fixtures import index_videos, write_shards

from benchmarks import data as benchmark


@pytest.mark.slow
def test_bench_data_writes_json_and_chart(tmp_path, capsys):
    shards = write_shards(tmp_path / "shards", index_videos(tmp_path / "media", [40, 50, 60, 70, 80, 90]),
                          per_shard=3)
    out = tmp_path / "bench" / "data.json"
    rc = benchmark.main(["--recipe", "lstcl", "--shards", str(shards), "--batch-size", "2", "--warmup", "1",
                         "--batches", "1", "--rounds", "1", "--threads", "1", "--out", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"dali", "baseline", "decode_only"}
    for mode, r in report["results"].items():
        # CPU time ticks in 10 ms: decoding 2 tiny videos may not register one, so >= 0 here.
        assert r["videos"] == 2 and r["videos_per_s"] > 0 and r["cpu_s_per_video"] >= 0, mode
        assert r["peak_rss_mb"] > 50
    assert report["results"]["dali"]["views_per_s"] == 2 * report["results"]["dali"]["videos_per_s"]
    assert {"dali_over_baseline_videos_per_s", "dali_over_decode_only_videos_per_s"} <= set(report["ratios"])
    assert out.with_suffix(".png").stat().st_size > 1000
    assert "dali_over_baseline" in capsys.readouterr().out


def test_resource_meter_keeps_cpu_of_exited_grandchildren():
    """DataLoader workers under a forkserver are grandchildren reaped by the forkserver: once they end,
    neither psutil nor RUSAGE_CHILDREN sees their CPU time, yet it must stay in the total."""
    import subprocess
    import time

    busy = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.6: pass"
    parent = f"import subprocess, sys, time; subprocess.run([sys.executable, '-c', {busy!r}]); time.sleep(30)"
    meter = benchmark._ResourceMeter()
    before = meter.cpu_seconds()
    child = subprocess.Popen([sys.executable, "-c", parent])
    try:
        readings = []
        for _ in range(40):  # the grandchild runs ~0.6 s CPU, then ends while its parent sleeps on
            time.sleep(0.1)
            readings.append(meter.cpu_seconds())
        assert readings == sorted(readings), "the total must never fall"
        assert readings[-1] - before >= 0.5
    finally:
        child.kill()
        child.wait()
        meter.stop()


def test_bench_data_op_costs(tmp_path, capsys):
    shards = write_shards(tmp_path / "shards", index_videos(tmp_path / "media", [40, 50, 60]), per_shard=3)
    out = tmp_path / "ops.json"
    assert benchmark.main(["--op-costs", "--recipe", "svt", "--shards", str(shards), "--batch-size", "2",
                           "--batches", "1", "--threads", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["stage"] for r in report["rows"]] == ["decode", "gather", "resize", "color", "blur", "solarize",
                                                    "normalize"]
    assert all(r["cpu_ms_per_video"] >= 0 and r["wall_ms_per_video"] > 0 for r in report["rows"])
    assert report["dali_over_decode_only_cpu_bound"] >= 1.0
    assert "normalize" in capsys.readouterr().out


def test_predecoded_views_graph_is_the_loaders_graph(tmp_path):
    """--op-costs times the production graph: fed the decoded frames of the loader's first batch, its
    full cut gives exactly the loader's views (augmentation on, so every step is in play)."""
    import numpy as np
    import torch

    from pipelines.config import AugmentConfig, DataConfig, SVTConfig
    from pipelines.graph import decode_only_pipeline

    shards = write_shards(tmp_path / "shards", index_videos(tmp_path / "media", [40, 50, 60]), per_shard=3)
    cfg = DataConfig(shards=str(shards), recipe="svt", num_threads=1, shuffle=False, augment=AugmentConfig(),
                     svt=SVTConfig(global_size=32, local_size=16))
    loader, batch = benchmark.first_batch(cfg, 3)
    want = next(iter(loader))
    decode = decode_only_pipeline(batch.decode_inputs, "cpu",
                                  batch_size=3, num_threads=1, device_id=None)
    decode.build()
    (decoded,) = decode.run()
    frames = [np.array(decoded[i]) for i in range(3)]
    outputs = benchmark.predecoded_views_pipeline(loader, batch, frames, batch_size=3, num_threads=1,
                                                  device_id=None).run()
    assert want["key"] == batch.keys
    for view, got in zip(loader.views, outputs):
        assert torch.equal(torch.from_numpy(np.array(got.as_tensor())), want[view.name]), view.name


def test_loader_scale_bench_at_a_tiny_size(tmp_path):
    """``--scale-shards``: start-up and per-epoch rebuild against the shard count, at a tiny size."""
    args = benchmark.build_parser().parse_args(["--scale-shards", "6", "--batch-size", "2", "--out",
                                                str(tmp_path / "data.json")])
    assert benchmark.loader_scale(args) == 0
    report = json.loads((tmp_path / "data_scale.json").read_text())
    assert [r["shards"] for r in report["rows"]] == [6]
    for row in report["rows"]:
        assert row["samples"] == 2 * row["shards"]
        assert 0 < row["manifest_s"] <= row["startup_s"] and row["epoch_rebuild_s"] > 0
    manifest = json.loads((tmp_path / "loader_scale" / "n6" / "manifest.json").read_text())
    assert len(manifest["shards"]) == 6 and all((tmp_path / "loader_scale" / "n6" / s["idx_path"]).exists()
                                                for s in manifest["shards"])
    # Written by the sharding job itself (its fingerprint and totals), not by hand.
    assert manifest["job_fingerprint"] and manifest["totals"]["samples"] == 12
    assert manifest["totals"]["quarantined"] == 0


def test_bench_shard_set_is_the_sharding_jobs(tmp_path):
    """The data benchmark's shard set: copies of one clip written by ``run_shard_job`` (readable by the
    loader), confirmed on a second call, replaced when the size asked for changes."""
    from pipelines.shard_index import read_shard_set
    from shard_tools.encode import EncodeSettings
    from footage import write_synthetic_video

    clip = write_synthetic_video(tmp_path / "clip.webm", num_frames=32, width=64, height=48)  # 19 at 15 fps
    folder = tmp_path / "set"
    benchmark.write_copies(folder, clip, 5, 3, EncodeSettings(max_fps=15.0), "bench", key="bikes_{i:04d}")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["encode"]["max_fps"] == 15.0 and manifest["job_fingerprint"]
    assert sorted(k for s in manifest["shards"] for k in s["keys"]) == [f"bikes_{i:04d}" for i in range(5)]
    assert read_shard_set(folder).num_samples == [3, 2]
    mtime = (folder / "manifest.json").stat().st_mtime_ns
    benchmark.write_copies(folder, clip, 5, 3, EncodeSettings(max_fps=15.0), "bench", key="bikes_{i:04d}")
    assert (folder / "manifest.json").stat().st_mtime_ns == mtime  # built once
    benchmark.write_copies(folder, clip, 4, 2, EncodeSettings(max_fps=15.0), "bench", key="bikes_{i:04d}")
    assert read_shard_set(folder).num_samples == [2, 2]


def test_planned_batches_are_what_the_loader_delivers(tmp_path):
    """``DALILoader.planned_batches(epoch)``: the same batches, in the same order, as iterating the epoch."""
    from pipelines import build_loader
    from pipelines.config import DataConfig, SVTConfig

    shards = write_shards(tmp_path / "shards", index_videos(tmp_path / "media", [40, 50, 60, 70, 80]), per_shard=3)
    cfg = DataConfig(shards=str(shards), recipe="svt", num_threads=1, svt=SVTConfig(global_size=32, local_size=16))
    loader = build_loader(cfg, batch_size=2, loader="dali", seed=3)
    loader.set_epoch(1)
    delivered = [batch["key"] for batch in loader]
    planned = list(loader.planned_batches(1))
    assert [b.keys for b in planned] == delivered and len(delivered) == len(loader) == 3  # 5 samples, batch 2
    assert [len(b.decode_inputs()[0]) for b in planned] == [2, 2, 2]


def test_views_graph_exports_its_steps_not_benchmark_parameters():
    """The production graph takes no benchmark-only arguments; the steps a view goes through are a
    public, ordered list the benchmark cuts itself."""
    import inspect

    from pipelines import graph

    assert [name for name, _ in graph.VIEW_STEPS] == ["resize", "color", "blur", "solarize", "normalize"]
    assert benchmark.CUTS == ("gather", "resize", "color", "blur", "solarize", "normalize")
    for fn in (graph.augment_view, graph.views_pipeline):
        params = inspect.signature(inspect.unwrap(fn)).parameters
        assert "dtype" in params and "until" not in params and "predecoded" not in params, fn.__name__


def test_benchmark_help_speaks_of_the_product(capsys):
    """User-facing benchmark text names the product, not the tracker's issues."""
    import pytest

    import bench
    from benchmarks import cli, e2e, model, shard

    texts = [bench.__doc__, cli.build_parser().format_help(), benchmark.build_parser().format_help(),
             e2e.build_parser().format_help()]
    for main in (model.main, shard.main):
        with pytest.raises(SystemExit):
            main(["--help"])
        texts.append(capsys.readouterr().out)
    for text in texts:
        assert text and "issue" not in text.lower(), text[:200]
