"""bench.py data end to end on tiny shards: three modes, JSON with the ratios, PNG chart."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from pipeline_fixtures import index_videos, write_shards  # noqa: E402

from pipelines import benchmark  # noqa: E402


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
