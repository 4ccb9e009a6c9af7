"""A real two-node Ray cluster on this machine (``ray start --head`` + ``ray start --address``):
the sharding job runs on it with ``--executor ray --ray-address``; killing the worker node mid-job
loses and duplicates no input (Ray retries its tasks on the head); a killed driver resumes.

Ray stays small (1 CPU and 100 MB object store per node, no dashboard UI) and private: every port
is chosen free, each node has its own ``--temp-dir``, and cleanup kills only the processes whose
command line names those folders (never ``ray stop``, which would stop every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from footage import write_synthetic_video
from shard_tools.__main__ import main
from shard_tools.verify import verify_shards

pytestmark = pytest.mark.slow  # multi-process runs (make test-fast skips them)

REPO = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).parent / "ray"
ENV = {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _ppid(pid: int) -> int | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(text[text.rindex(")") + 2:].split()[1])


def _pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def _node_pids(temp_dir: str) -> set[int]:
    """Every process of one node: those naming its temp dir, and their children (Ray workers
    rename themselves ``ray::...`` and no longer name it)."""
    own = {pid for pid in _pids() if temp_dir in _cmdline(pid)}
    return own | {pid for pid in _pids() if _ppid(pid) in own}


def _kill(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _start_node(temp_dir: str, head_address: str | None) -> str:
    """``ray start`` one node; returns the cluster address."""
    ports = _free_ports(9)
    command = [str(RAY), "start", "--num-cpus", "1", "--object-store-memory", str(100 * 10**6),
               "--temp-dir", temp_dir, "--disable-usage-stats",
               "--node-manager-port", str(ports[0]), "--object-manager-port", str(ports[1]),
               "--dashboard-agent-listen-port", str(ports[2]), "--dashboard-agent-grpc-port", str(ports[3]),
               "--runtime-env-agent-port", str(ports[4]), "--metrics-export-port", str(ports[5])]
    if head_address is None:
        command += ["--head", "--include-dashboard", "false", "--port", str(ports[6]), "--ray-client-server-port", str(ports[7]),
                    "--dashboard-port", str(ports[8])]
    else:
        command += ["--address", head_address]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    if head_address is not None:
        return head_address
    match = re.search(r"ray start --address='([^']+)'", result.stdout + result.stderr)
    assert match, result.stdout[-3000:]
    return match.group(1)


@pytest.fixture
def ray_cluster():
    """Head + one worker node, 1 CPU each; everything they started is killed afterwards."""
    temp_dirs = [tempfile.mkdtemp(prefix="rsh", dir="/tmp") for _ in range(2)]  # short: socket paths
    try:
        address = _start_node(temp_dirs[0], None)
        _start_node(temp_dirs[1], address)
        yield {"address": address, "head_dir": temp_dirs[0], "worker_dir": temp_dirs[1]}
    finally:
        for temp_dir in temp_dirs:
            _kill(_node_pids(temp_dir))
        time.sleep(0.5)
        for temp_dir in temp_dirs:
            _kill(_node_pids(temp_dir))  # anything a dying raylet started meanwhile
            shutil.rmtree(temp_dir, ignore_errors=True)


def _journal_lines(out: Path) -> int:
    path = out / ".work" / "journal.jsonl"
    return path.read_bytes().count(b"\n") if path.exists() else 0


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _start_job(common: list[str], out: Path, address: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "shard_tools", *common, "--out", str(out), "--executor", "ray",
                             "--ray-address", address], cwd=REPO, env=ENV, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait(condition, proc: subprocess.Popen, what: str, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the job ended before {what}: {proc.stderr.read().decode()[-3000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_two_node_cluster_survives_a_killed_worker_node_and_a_killed_driver(ray_cluster, tmp_path):
    videos = tmp_path / "videos" / "c"
    for i in range(10):
        write_synthetic_video(videos / f"{i:02d}.webm", num_frames=60, width=160, height=120, pattern="noise",
                              seed=i)
    common = ["--videos", str(tmp_path / "videos"), "--shard-size", "3", "--seed", "5", "--no-progress"]
    reference = tmp_path / "reference"
    assert main(common + ["--out", str(reference), "--workers", "0"]) == 0

    # 1. The worker node dies while it runs one of the job's tasks.
    out = tmp_path / "node_killed"
    proc = _start_job(common, out, ray_cluster["address"])
    try:
        worker_dir = ray_cluster["worker_dir"]
        raylet = [pid for pid in _pids() if worker_dir in _cmdline(pid) and "raylet" in _cmdline(pid).split()[0]]
        assert len(raylet) == 1, raylet

        def worker_node_busy() -> bool:
            return any(_cmdline(pid).startswith("ray::process_video") for pid in _pids() if _ppid(pid) == raylet[0])

        _wait(worker_node_busy, proc, "a task ran on the worker node")
        _kill(_node_pids(worker_dir))
        assert proc.wait(timeout=600) == 0, proc.stderr.read().decode()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert _files(out) == _files(reference)  # every input once: nothing lost, nothing duplicated
    assert verify_shards(out, decoder="none")["ok"]

    # 2. The driver dies mid-job (kill -9); the same command resumes on the cluster (the head).
    out = tmp_path / "driver_killed"
    proc = _start_job(common, out, ray_cluster["address"])
    try:
        _wait(lambda: _journal_lines(out) >= 2, proc, "two inputs were done")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert not (out / "manifest.json").exists()
    proc = _start_job(common, out, ray_cluster["address"])
    try:
        assert proc.wait(timeout=600) == 0, proc.stderr.read().decode()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "resuming" in proc.stderr.read().decode()
    assert _files(out) == _files(reference)

    # 3. verify runs its per-shard checks as Ray tasks on the same cluster.
    result = subprocess.run([sys.executable, "-m", "shard_tools", "verify", str(out), "--workers", "2", "--executor",
                             "ray", "--ray-address", ray_cluster["address"]], cwd=REPO, env=ENV,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    # Ray forwards cluster events ("(raylet) The node with node id ...") to the driver's stdout: the
    # report is the JSON document that starts at the first line opening with "{"
    start = 0 if result.stdout.startswith("{") else result.stdout.index("\n{") + 1
    report, _ = json.JSONDecoder().raw_decode(result.stdout[start:])
    assert report["ok"] and report["videos_decoded"] == 10 and report["decoded_with"].startswith("pyav")
