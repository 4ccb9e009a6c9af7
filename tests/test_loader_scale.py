"""``bench.py data --scale-shards``: the DALI loader built over many small shards (start-up and
per-epoch rebuild against the shard count), run at a tiny size."""

from __future__ import annotations

import json

from pipelines.benchmark import build_parser, loader_scale


def test_loader_scale_bench_at_a_tiny_size(tmp_path):
    args = build_parser().parse_args(["--scale-shards", "6", "--batch-size", "2", "--out",
                                      str(tmp_path / "data.json")])
    assert loader_scale(args) == 0
    report = json.loads((tmp_path / "data_scale.json").read_text())
    assert [r["shards"] for r in report["rows"]] == [6]
    for row in report["rows"]:
        assert row["samples"] == 2 * row["shards"]
        assert 0 < row["manifest_s"] <= row["startup_s"] and row["epoch_rebuild_s"] > 0
    manifest = json.loads((tmp_path / "loader_scale" / "n6" / "manifest.json").read_text())
    assert len(manifest["shards"]) == 6 and all((tmp_path / "loader_scale" / "n6" / s["idx_path"]).exists()
                                                for s in manifest["shards"])
