"""``bench.py shard`` dispatches to the shard tools' own benchmark (``python -m shard_tools bench``)."""

from __future__ import annotations

import json

from benchmarks import shard


def test_bench_shard_scale_at_a_tiny_size(tmp_path, capsys):
    out = tmp_path / "scale.json"
    assert shard.main(["--scale", "--sizes", "200", "--shard-size", "100", "--work-dir", str(tmp_path / "work"),
                       "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["benchmark"] == "shard_tools scale" and [r["inputs"] for r in report["rows"]] == [200]
    assert report["rows"][0]["samples"] + report["rows"][0]["quarantined"] == 200
    assert out.with_suffix(".png").exists() and "cost per input" in capsys.readouterr().out
