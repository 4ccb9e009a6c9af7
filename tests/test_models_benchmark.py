"""The model benchmark runs end to end on tiny shapes and writes its JSON (no timing assertions)."""
from __future__ import annotations

import json

import pytest

from models import benchmark


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_model_benchmark_writes_table_and_json(tmp_path, capsys, dtype):
    out = tmp_path / "model.json"
    argv = ["--sizes", "tiny", "--depth", "1", "--global-size", "32", "--local-size", "16", "--out-dim", "64",
            "--warmup", "0", "--repeats", "1", "--batch", "2", "--dtype", dtype, "--out", str(out)]
    assert benchmark.main(argv) == 0
    report = json.loads(out.read_text())
    (row,) = report["results"]
    assert row["views_per_step"] == 10 and row["batch"] == 2
    assert set(row["views_per_s"]) == {"grouped", "packed", "loop"}
    assert all(v > 0 for v in row["views_per_s"].values())
    assert set(row["speedup_over_loop"]) == {"grouped", "packed"}
    assert all(len(t) == 1 for t in row["step_seconds"].values())
    assert report["dtype"] == dtype and report["gemm_peak_gflops_per_s"] > 0 and all(v > 0 for v in row["achieved_gflops_per_s"].values())
    assert "x loop" in capsys.readouterr().out


@pytest.mark.parametrize("bad", [["--sizes", "huge"], ["--modes", "grouped"]])
def test_model_benchmark_rejects_bad_arguments(bad):
    with pytest.raises(SystemExit):
        benchmark.main(bad)
