"""``bench.py shard``: the sharding job's benchmark (``benchmarks/shard.py``, ``--scale``: ``benchmarks/shard_scale.py``)."""

from __future__ import annotations

import json

from benchmarks.cli import main
from benchmarks.shard_scale import run_scale_bench


def test_bench_shard_scale_at_a_tiny_size(tmp_path, capsys):
    out = tmp_path / "scale.json"
    assert main(["shard", "--scale", "--sizes", "200", "--shard-size", "100", "--work-dir", str(tmp_path / "work"),
                 "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["benchmark"] == "shard_tools scale" and [r["inputs"] for r in report["rows"]] == [200]
    assert report["rows"][0]["samples"] + report["rows"][0]["quarantined"] == 200
    assert out.with_suffix(".png").exists() and "cost per input" in capsys.readouterr().out


def test_scale_bench_runs_at_a_tiny_size(tmp_path):
    result = run_scale_bench([300], tmp_path / "work", tmp_path / "scale.json", shard_size=100)
    rows = result["rows"]
    assert [r["inputs"] for r in rows] == [300] and result["max_over_min_cpu_ms_per_input"] == 1.0
    for row in rows:
        assert row["samples"] + row["quarantined"] == row["inputs"] and row["shards"] >= 3
        assert row["wall_ms_per_input"] > 0 and row["driver_cpu_ms_per_input"] > 0 and row["peak_rss_mb"] > 0
    assert json.loads((tmp_path / "scale.json").read_text())["rows"] == rows
    assert (tmp_path / "scale.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "work" / "n300").exists()
