"""``scripts/gpu_check.sh`` in its dry mode (CPU, tiny sizes): the script a lent GPU node runs cannot rot.

The dry run executes every part with the same commands as on a GPU (devices ``cpu``, tiny footage and
models), offline: synthetic footage, sharded by ``python -m shard_tools``. A failing part is reported
and the later parts still run.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
PARTS = ["env", "tests", "footage", "shards", "data_svt", "data_lstcl", "ops_svt", "ops_lstcl", "model", "e2e"]

pytestmark = pytest.mark.slow


def run_script(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PY=sys.executable, PYTHONPATH=str(ROOT), PART_TIMEOUT="600", OMP_NUM_THREADS="1")
    env.pop("DS_ACCELERATOR", None)  # the dry mode sets it itself
    return subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", str(out), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)


def summary(out: Path) -> dict[str, str]:
    rows = [line.split(None, 2) for line in (out / "summary.txt").read_text().splitlines() if line.strip()]
    return {name: status for name, status, _ in rows}


def test_dry_run_runs_every_part_and_packs_the_results(tmp_path):
    out = tmp_path / "gpu"
    result = run_script(out)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert summary(out) == {part: "ok" for part in PARTS}
    for name in ("data_svt_cpu.json", "data_lstcl_cpu.json", "ops_svt_cpu.json", "ops_lstcl_cpu.json",
                 "model_cpu.json", "e2e.json"):
        assert (out / name).is_file(), name
    assert (out / "shards" / "manifest.json").is_file()
    assert "no GPU (dry run" in (out / "env.log").read_text()
    assert "host syncs/step" in (out / "e2e.log").read_text()
    with tarfile.open(f"{out}.tar.gz") as tar:  # what a GPU run sends back: logs and JSON, no footage
        names = tar.getnames()
    assert "gpu/summary.txt" in names and "gpu/e2e.json" in names
    assert not any(n.startswith(("gpu/footage/", "gpu/shards/")) or n in ("gpu/footage", "gpu/shards") for n in names)


def test_a_failing_part_is_reported_and_the_others_still_run(tmp_path):
    out = tmp_path / "gpu"
    result = run_script(out, "--parts", "data_lstcl,model", "--shards", str(tmp_path / "no_such_shards"))
    assert result.returncode == 1
    assert summary(out) == {"data_lstcl": "failed", "model": "ok"}
    assert "no_such_shards" in (out / "data_lstcl.log").read_text()
    assert "send back:" in result.stdout
