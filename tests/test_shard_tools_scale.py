"""shard_tools at scale: the driver's journal (batched durability, crash recovery), orphan-free pool
workers after kill -9, parallel streaming verify, shard sizes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from footage import write_synthetic_video
from shard_tools.__main__ import main
from shard_tools.verify import verify_shards

REPO = Path(__file__).resolve().parents[1]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _proc_stat(pid: int) -> tuple[int, str, int] | None:
    """(ppid, state, start time) of a live process, None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(")") + 2:].split()
    return int(fields[1]), fields[0], int(fields[19])


def _children(pid: int) -> dict[int, int]:
    """Direct children of ``pid``: child pid -> start time (to tell a reused pid apart)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _proc_stat(int(entry.name))
            if stat and stat[0] == pid:
                found[int(entry.name)] = stat[2]
    return found


def _alive(pid: int, start_time: int) -> bool:
    stat = _proc_stat(pid)
    return stat is not None and stat[2] == start_time and stat[1] != "Z"


def test_kill9_of_the_parent_leaves_no_pool_worker_or_resource_tracker(tmp_path):
    videos = tmp_path / "videos" / "c"
    for i in range(8):
        write_synthetic_video(videos / f"{i}.webm", num_frames=150, width=160, height=120, pattern="noise",
                              seed=i)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "shard_tools", "--videos", str(tmp_path / "videos"), "--out",
                             str(tmp_path / "out"), "--workers", "2", "--no-progress"],
                            cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    children: dict[int, int] = {}
    try:
        deadline = time.monotonic() + 120
        while len(children) < 3:  # two pool workers and the resource tracker
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, f"no pool started: children {children}"
            time.sleep(0.05)
            children = _children(proc.pid)
        time.sleep(0.5)  # let the workers pass their initializer and start encoding
        assert proc.poll() is None, "the job finished before the kill; give it more work"
        os.kill(proc.pid, signal.SIGKILL)  # the parent only, not its process group
        proc.wait()
        deadline = time.monotonic() + 30  # a liveness bound, not a speed assertion
        while any(_alive(pid, start) for pid, start in children.items()) and time.monotonic() < deadline:
            time.sleep(0.1)
        survivors = [pid for pid, start in children.items() if _alive(pid, start)]
        assert not survivors, f"children outlived the killed parent: {survivors}"
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        for pid, start in children.items():  # never leave a stray process behind
            if _alive(pid, start):
                os.kill(pid, signal.SIGKILL)


def _small_dataset(root: Path, count: int, num_frames: int = 20) -> Path:
    videos = root / "videos"
    for i in range(count):
        write_synthetic_video(videos / ("a" if i % 2 else "b") / f"v{i:02d}.webm", num_frames=num_frames, width=64,
                              height=48, pattern="noise", seed=i)
    (videos / "b" / "empty.mp4").write_bytes(b"")
    return videos


def test_journal_batches_fsyncs_and_recovers_from_a_torn_tail_and_lost_payloads(tmp_path):
    from shard_tools.journal import WorkJournal

    journal = WorkJournal(tmp_path, sync_every=4, sync_seconds=1e9, segment_bytes=10_000)
    journal.open({})
    for i in range(10):
        journal.append(f"k{i}", i != 3, {"i": i}, None if i == 3 else bytes([i]) * 60)
    assert journal.syncs == 2  # one fsync pair per 4 records, not one per record
    # No close: as after kill -9, every record was written (one write each) but 2 were never synced.
    # A crash that tore the last line and lost one payload's bytes:
    with open(tmp_path / "journal.jsonl", "ab") as f:
        f.write(b'{"key": "k10", "ok": tr')
    entries = WorkJournal(tmp_path).load()
    assert sorted(entries) == sorted(f"k{i}" for i in range(10))
    assert (tmp_path / "journal.jsonl").read_bytes().endswith(b"}\n")  # the torn tail was cut off
    segment, offset, length, _ = entries["k7"]["payload"]
    with open(tmp_path / f"payloads-{segment:06d}.bin", "r+b") as f:
        f.seek(offset)
        f.write(b"\0" * length)
    reader = WorkJournal(tmp_path)
    assert reader.read_payload(entries["k7"]) is None  # redone on resume
    assert reader.read_payload(entries["k8"]) == bytes([8]) * 60
    assert reader.existing_segments() == [0]  # files per segment, never per input


def test_resume_redoes_inputs_whose_records_or_bytes_a_crash_lost(tmp_path):
    videos = _small_dataset(tmp_path, 6)
    argv = ["--videos", str(videos), "--shard-size", "2", "--workers", "0", "--no-progress", "--keep-work"]
    out = tmp_path / "out"
    assert main(argv + ["--out", str(out)]) == 0
    reference = _files(out)
    manifest = json.loads((out / "manifest.json").read_text())
    journal = out / ".work" / "journal.jsonl"
    lines = journal.read_bytes().splitlines(keepends=True)
    for path in out.iterdir():  # back to a state before any shard was written
        if path.is_file():
            path.unlink()
    lost_record = json.loads(lines[-1])["key"]
    damaged = manifest["shards"][0]["keys"][0]
    journal.write_bytes(b"".join(lines[:-1]) + lines[-1][:25])  # last record torn mid-line
    for line in lines:
        entry = json.loads(line)
        if entry["key"] == damaged:  # its bytes never reached the disk
            segment, offset, length, _ = entry["payload"]
            with open(out / ".work" / f"payloads-{segment:06d}.bin", "r+b") as f:
                f.seek(offset)
                f.write(bytes(length))
    assert main(argv + ["--out", str(out)]) == 0
    assert _files(out) == reference
    redone = [json.loads(line)["key"] for line in journal.read_bytes().splitlines()[len(lines) - 1:]]
    assert sorted(redone) == sorted({lost_record, damaged})


@pytest.fixture(scope="module")
def verified_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    videos = _small_dataset(root, 6, num_frames=16)
    out = root / "out"
    assert main(["--videos", str(videos), "--out", str(out), "--shard-size", "2", "--workers", "0",
                 "--no-progress"]) == 0
    return out


def test_verify_with_workers_streams_every_video(verified_shards):
    report = verify_shards(verified_shards, workers=2)
    assert report["ok"], report["problems"]
    assert report["decoded_with"].startswith("pyav (streamed") and report["videos_decoded"] == 6
    assert report["samples"] == 6 and report["quarantined"] == 1


def test_verify_catches_size_frame_count_and_corruption_in_parallel(verified_shards, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(verified_shards, out)
    manifest = json.loads((out / "manifest.json").read_text())
    tar0, tar1 = out / manifest["shards"][0]["path"], out / manifest["shards"][1]["path"]
    # Shard 0: one json now claims 17 frames (same length, the index stays valid).
    pristine = tar0.read_bytes()
    tar0.write_bytes(pristine.replace(b'"num_frames":16', b'"num_frames":17', 1))
    # Shard 1: one video's bytes overwritten with garbage of the same length.
    line = (out / manifest["shards"][1]["idx_path"]).read_text().splitlines()[1].split()
    offset, size = int(line[line.index("webm") + 1]), int(line[line.index("webm") + 2])
    data = bytearray(tar1.read_bytes())
    data[offset:offset + size] = bytes(size)
    tar1.write_bytes(bytes(data))
    # Shard 2: the manifest's size is off by one block.
    manifest["shards"][2]["bytes"] += 512
    (out / "manifest.json").write_text(json.dumps(manifest))
    report = verify_shards(out, workers=2)
    assert not report["ok"]
    text = "\n".join(report["problems"])
    assert "decoded 16 frames, its json says 17" in text
    assert "PyAV cannot decode it" in text or "decoded 0 frames" in text, text
    expected_size = manifest["shards"][2]["bytes"] - 512
    assert f"{manifest['shards'][2]['path']}: {expected_size} bytes, the manifest says {expected_size + 512}" in text


def test_streamed_frame_count_holds_one_frame_not_the_video(tmp_path):
    """400 frames of 320x240 are 92 MB as arrays; counting them costs a few MB of peak memory."""
    path = write_synthetic_video(tmp_path / "long.webm", num_frames=400, width=320, height=240, pattern="noise")
    code = ("import resource, sys; from shard_tools.verify import stream_frame_count; "
            "r0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
            "n = stream_frame_count(open(sys.argv[1], 'rb')); "
            "print(n, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - r0)")
    result = subprocess.run([sys.executable, "-c", code, str(path)], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, check=True)
    frames, grown_kb = map(int, result.stdout.split())
    assert frames == 400
    assert grown_kb < 30 * 1024, f"peak RSS grew {grown_kb} KB while counting"
