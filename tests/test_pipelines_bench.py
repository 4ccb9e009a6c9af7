"""bench.py data end to end on tiny shards: three modes, JSON with the ratios, PNG chart."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from pipeline_fixtures import index_videos, write_shards  # noqa: E402

from benchmarks import data as benchmark  # noqa: E402


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
