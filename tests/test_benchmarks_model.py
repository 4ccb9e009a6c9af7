"""The model benchmark runs end to end on tiny shapes and writes its JSON (no timing assertions)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import model as benchmark

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_model_benchmark_writes_table_and_json(tmp_path, capsys, dtype):
    out = tmp_path / "model.json"
    argv = ["--sizes", "tiny", "--depth", "1", "--warmup", "0", "--repeats", "1", "--batch", "2", "--dtype", dtype,
            "--out", str(out), "data.svt.global_size=32", "data.svt.local_size=16", "model.out_dim=64"]
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
    # The views are the recipe's (configs/svt_vitb16.yaml: SVT paper Sec. 3.1), at the overridden sizes.
    assert (report["global_frames"], report["local_frames"]) == ("8,16", "2,2,4,4,8,8,16,16")
    assert (report["global_size"], report["local_size"], report["out_dim"]) == (32, 16, 64)


@pytest.mark.parametrize("bad", [["--sizes", "huge"], ["--modes", "grouped"],
                                 ["--config", str(ROOT / "configs" / "lstcl_timesformer_mocov3.yaml")]])
def test_model_benchmark_rejects_bad_arguments(bad):
    with pytest.raises(SystemExit):
        benchmark.main(bad)
