"""The model benchmark runs end to end on tiny shapes and writes its JSON (no timing assertions)."""
from __future__ import annotations

import json

import pytest

from models import benchmark


def test_model_benchmark_writes_table_and_json(tmp_path, capsys):
    out = tmp_path / "model.json"
    argv = ["--sizes", "tiny", "--depth", "1", "--global-size", "32", "--local-size", "16", "--out-dim", "64",
            "--warmup", "0", "--repeats", "1", "--batch", "2", "--out", str(out)]
    assert benchmark.main(argv) == 0
    report = json.loads(out.read_text())
    (row,) = report["results"]
    assert row["views_per_step"] == 10 and row["batch"] == 2
    assert row["grouped_views_per_s"] > 0 and row["loop_views_per_s"] > 0
    assert len(row["step_seconds"]["grouped"]) == len(row["step_seconds"]["loop"]) == 1
    assert "ratio" in capsys.readouterr().out


def test_model_benchmark_rejects_unknown_sizes():
    with pytest.raises(SystemExit):
        benchmark.main(["--sizes", "huge"])
