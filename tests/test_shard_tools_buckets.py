"""Sharding into and from buckets, against moto's S3 server run as a separate process: local videos ->
s3 and s3 videos -> s3 (Kinetics CSV, SSv2 JSON, class folders) against local runs, kill -9 during the
uploads and resume, a transient upload failure (the fault proxy), a missing bucket or credentials."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

import storage
from benchmarks.object_servers import start_range_http
from executor_fixtures import overlap_probe
from footage import write_synthetic_video
from object_store_fixtures import moto_server, s3_env, s3_proxy  # noqa: F401 (fixtures)
from shard_fixtures import build_ssv2
from shard_tools.__main__ import main
from shard_tools.executors import map_unordered
from shard_tools.stats import format_stats
from shard_tools.verify import verify_shards

REPO = Path(__file__).resolve().parents[1]
COMMON = ["--shard-size", "2", "--seed", "5", "--no-progress"]


@pytest.fixture(autouse=True)
def fresh_default_storage(monkeypatch):
    """The process-wide Storage keeps one driver per protocol, made with the environment of its first
    use; each test here sets its own endpoint (moto or the proxy) or credentials."""
    monkeypatch.setattr(storage, "_default", None)


def _class_folders(root: Path, count: int = 4, *, num_frames: int = 20) -> Path:
    """Small videos in two class folders, plus a file that is not an input, a video loose in the root
    (quarantined) and an empty one (zero bytes)."""
    for i in range(count):
        write_synthetic_video(root / ("cats" if i % 2 else "dogs") / f"clip{i}.webm", num_frames=num_frames,
                              width=64, height=48, pattern="noise", seed=i)
    (root / "cats").mkdir(exist_ok=True)
    (root / "dogs" / "notes.txt").write_text("not a video\n")
    write_synthetic_video(root / "loose.webm", num_frames=20, width=64, height=48, seed=9)
    (root / "cats" / "empty.mp4").write_bytes(b"")
    return root


def _kinetics(root: Path) -> tuple[Path, Path]:
    """A Kinetics CSV and class-folder clips: three videos, a row whose clip is missing, a bad row."""
    videos = root / "videos"
    rows = []
    for i, label in enumerate(["abseiling", "air drumming", "abseiling"]):
        youtube_id = f"yt{i:03d}abcdef"
        write_synthetic_video(videos / label / f"{youtube_id}_000010_000020.webm", num_frames=20, width=64,
                              height=48, pattern="noise", seed=i)
        rows.append([label, youtube_id, "10", "20", "train", "0"])
    rows.append(["abseiling", "ytmissing00", "0", "10", "train", "0"])
    rows.append(["abseiling", "ytbadrow000", "x", "10", "train", "0"])
    csv_path = root / "train.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["label", "youtube_id", "time_start", "time_end", "split", "is_cc"])
        writer.writerows(rows)
    return csv_path, videos


def _upload_tree(folder: Path, url: str) -> None:
    store = storage.Storage()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            store.put_file(path, f"{url}/{path.relative_to(folder).as_posix()}")


def _objects(url: str) -> dict[str, bytes]:
    store = storage.Storage()
    return {name: store.read_bytes(f"{url}/{name}") for name in sorted(store.list_files(url))}


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _tar_members(data: bytes) -> list[tuple[str, bytes]]:
    import io

    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as archive:
        return [(m.name, archive.extractfile(m).read()) for m in archive if m.isreg()]


def _assert_same_shards_but_sources(remote: dict[str, bytes], local: dict[str, bytes], url: str, folder: str):
    """Shards of inputs in a bucket equal shards of the same inputs on disk: the same files, shards
    holding the same samples in the same order with byte-identical videos and labels; the json
    records, quarantine and manifest differ only where they name the source (URL vs path)."""
    assert sorted(remote) == sorted(local)
    for name in local:
        if name.endswith(".tar"):
            ours, theirs = _tar_members(remote[name]), _tar_members(local[name])
            assert [n for n, _ in ours] == [n for n, _ in theirs], name
            for (member, a), (_, b) in zip(ours, theirs):
                assert (a.replace(url.encode(), folder.encode()) if member.endswith(".json") else a) == b, member
        elif name in ("manifest.json",):
            ours, theirs = (json.loads(text.replace(url, folder)) for text in (remote[name].decode(), local[name].decode()))
            ours.pop("job_fingerprint"), theirs.pop("job_fingerprint")
            assert ours == theirs
        elif name == "quarantine.jsonl":
            assert remote[name].decode().replace(url, folder) == local[name].decode()


def test_local_videos_to_s3_equal_a_local_run_byte_for_byte(s3_env, tmp_path, capsys, monkeypatch):
    videos = _class_folders(tmp_path / "videos")
    argv = ["--videos", str(videos), *COMMON, "--workers", "0"]
    assert main(argv + ["--out", str(tmp_path / "local")]) == 0
    url = f"s3://{s3_env}/shards/train"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the default --work-dir lives there
    assert main(argv + ["--out", url]) == 0
    assert _objects(url) == _files(tmp_path / "local")  # tars, indexes, quarantine, manifest
    assert verify_shards(url)["ok"] and format_stats(url).splitlines()[1:] == \
        format_stats(tmp_path / "local").splitlines()[1:]
    assert f"building shards in {tmp_path / 'cache' / 'shard_tools' / 'work'}/" in capsys.readouterr().err
    # Every shard left the work folder once uploaded, and the journals went at the end.
    assert not list((tmp_path / "cache" / "shard_tools" / "work").iterdir())
    # A rerun of a finished job does nothing; other arguments are refused, naming the URL.
    assert main(argv + ["--out", url]) == 0
    assert main(["--videos", str(videos), "--shard-size", "3", "--no-progress", "--workers", "0", "--out", url]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {url} already holds a finished job with other arguments or inputs; write to a new prefix")


@pytest.mark.parametrize("layout", ["kinetics", "ssv2", "folder"])
def test_s3_videos_to_s3_equal_a_local_run(s3_env, tmp_path, layout):
    """Inputs and annotations in the bucket: listed there, fetched one by one into bounded local
    space, and sharded into the same samples as the same files on disk."""
    root = tmp_path / "data"
    if layout == "kinetics":
        csv_path, videos = _kinetics(root)
        inputs = lambda base: ["--annotations", f"{base}/train.csv", "--videos", f"{base}/videos"]  # noqa: E731
    elif layout == "ssv2":
        build_ssv2(root, tmp_path / "media")
        inputs = lambda base: ["--annotations", f"{base}/train.json", "--labels", f"{base}/labels.json",  # noqa: E731
                               "--videos", f"{base}/20bn-something-something-v2"]
    else:
        _class_folders(root / "videos")
        inputs = lambda base: ["--videos", f"{base}/videos"]  # noqa: E731
    data_url = f"s3://{s3_env}/datasets/{layout}"
    _upload_tree(root, data_url)
    workers = ["--workers", "1"] if layout == "folder" else ["--workers", "0"]  # pool workers fetch too
    assert main(inputs(str(root)) + COMMON + ["--workers", "0", "--out", str(tmp_path / "local")]) == 0
    out = f"s3://{s3_env}/shards/{layout}"
    assert main(inputs(data_url) + COMMON + workers + ["--fetch-bytes", "20KB", "--out", out,
                                                       "--work-dir", str(tmp_path / "work")]) == 0
    remote = _objects(out)
    _assert_same_shards_but_sources(remote, _files(tmp_path / "local"), data_url, str(root))
    quarantine = [json.loads(line) for line in remote["quarantine.jsonl"].splitlines()]
    missing = [q for q in quarantine if q["reason"] == "missing"]
    if layout != "folder":  # a row whose clip is not in the bucket: the line names the URL it looked for
        assert missing and all(q["detail"].startswith(f"{data_url}/") for q in missing)
    else:
        assert {q["reason"] for q in quarantine} == {"zero bytes", "not in a class folder"}
        assert all(data_url in q["detail"] for q in quarantine)
    assert not (tmp_path / "work").exists()
    # verify in the bucket: every video decodes, and the invariant holds against the sources listed
    # again from the bucket (the manifest's source names the URLs).
    report = verify_shards(out)
    assert report["ok"], report["problems"]
    assert report["invariant"] == f"sources listed again: {report['inputs']} inputs"


def test_videos_behind_an_http_server_equal_a_local_run(tmp_path):
    """``--videos https://host/prefix``: listed through the server's index pages (names
    percent-decoded, sizes from HEAD requests), fetched whole; a Range HTTP server process."""
    videos = _class_folders(tmp_path / "data" / "videos", count=2)
    (videos / "dogs").rename(videos / "air drumming")  # a class folder whose URL needs quoting
    argv = [*COMMON, "--workers", "0"]
    assert main(["--videos", str(videos), "--out", str(tmp_path / "local")] + argv) == 0
    with start_range_http(tmp_path) as server:
        url = f"{server.url}/data/videos"
        assert main(["--videos", url, "--out", str(tmp_path / "from_http")] + argv) == 0
        _assert_same_shards_but_sources(_files(tmp_path / "from_http"), _files(tmp_path / "local"), url, str(videos))
        # The shards read back over HTTP: verify (relisting the inputs over HTTP) and stats agree with
        # the local folder.
        report = verify_shards(f"{server.url}/from_http")
        assert report["ok"] and report["invariant"] == f"sources listed again: {report['inputs']} inputs"
        assert format_stats(f"{server.url}/from_http").splitlines()[1:] == \
            format_stats(tmp_path / "from_http").splitlines()[1:]


def test_inputs_in_flight_stay_within_the_fetch_bound(tmp_path):
    """The cost window of map_unordered (what bounds fetched bytes on disk): with costs 6 and a bound
    of 10, two pool workers never run two tasks at once; with a bound of 12 they do."""
    def run(max_cost: int) -> int:
        marks = tmp_path / f"marks{max_cost}"
        marks.mkdir()
        tasks = [(str(marks), i) for i in range(4)]
        return max(map_unordered(overlap_probe, tasks, workers=2, cost=lambda task: 6, max_cost=max_cost))

    assert run(10) == 1
    assert run(12) == 2


def _uploaded_tars(store: storage.Storage, url: str) -> list[str]:
    try:
        return [n for n in store.list_files(url) if n.endswith(".tar")]
    except storage.StorageAccessError:  # the prefix holds nothing yet
        return []


@pytest.mark.slow
def test_kill9_during_the_uploads_then_resume(s3_env, tmp_path):
    """SIGKILL the CLI once its first shard is in the bucket; the rerun re-encodes no input (the
    journal holds one line per input) and the bucket ends byte-identical to a local run."""
    videos = _class_folders(tmp_path / "videos", count=8, num_frames=60)
    argv = ["--videos", str(videos), "--shard-size", "1", "--seed", "5", "--no-progress"]
    assert main(argv + ["--out", str(tmp_path / "local"), "--workers", "0"]) == 0
    url, work = f"s3://{s3_env}/shards", tmp_path / "work"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "shard_tools", *argv, "--out", url, "--work-dir", str(work),
                             "--workers", "1"], cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    store = storage.Storage()  # one driver session: each poll is one listing request
    while not _uploaded_tars(store, url):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no shard was uploaded"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its pool worker
    proc.wait()
    at_kill = _uploaded_tars(store, url)
    assert 1 <= len(at_kill) < 8 and "manifest.json" not in store.list_files(url)
    uploads = work / ".work" / "uploads.jsonl"  # confirmed uploads: at most the tars in the bucket
    assert (uploads.read_text().count("\n") if uploads.exists() else 0) <= len(at_kill)

    assert main(argv + ["--out", url, "--work-dir", str(work), "--workers", "1", "--keep-work"]) == 0
    lines = [json.loads(line) for line in (work / ".work" / "journal.jsonl").read_text().splitlines()]
    keys = [line["key"] for line in lines]
    assert len(keys) == len(set(keys)) == 9, "an input was processed twice"
    assert not list(work.glob("*.tar")) and not list(work.glob("*.idx"))  # uploaded, then deleted here
    assert _objects(url) == _files(tmp_path / "local")


def test_a_transient_upload_failure_costs_a_retry(s3_env, s3_proxy, tmp_path):
    """503 SlowDown on a shard's upload and a dropped connection on the manifest's: both retried,
    the bucket ends as a local run's folder."""
    videos = _class_folders(tmp_path / "videos", count=2)
    argv = ["--videos", str(videos), *COMMON, "--workers", "0"]
    assert main(argv + ["--out", str(tmp_path / "local")]) == 0
    s3_proxy.add_rule(action="status", status=503, count=2, method="PUT", path=".tar")
    s3_proxy.add_rule(action="reset", count=1, method="PUT", path="manifest.json")
    url = f"s3://{s3_env}/shards"
    assert main(argv + ["--out", url, "--work-dir", str(tmp_path / "work")]) == 0
    assert s3_proxy.stats()["faults"] == 3
    assert _objects(url) == _files(tmp_path / "local")


def test_missing_bucket_or_credentials_one_line_exit_2(s3_env, tmp_path, capsys, monkeypatch):
    videos = _class_folders(tmp_path / "videos", count=1)
    argv = [*COMMON, "--workers", "0"]
    assert main(["--videos", str(videos), "--out", "s3://no-such-bucket-r18b/shards",
                 "--work-dir", str(tmp_path / "w1")] + argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: s3://no-such-bucket-r18b/shards:") and "does not exist" in err
    assert main(["--videos", "s3://no-such-bucket-r18b/videos", "--out", str(tmp_path / "o")] + argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        "error: s3://no-such-bucket-r18b/videos:")
    assert not (tmp_path / "w1").exists() and not (tmp_path / "o").exists()

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setattr(storage, "_default", None)  # its S3 driver was made with the keys above
    url = f"s3://{s3_env}/shards"
    assert main(["--videos", str(videos), "--out", url, "--work-dir", str(tmp_path / "w2")] + argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith(f"error: {url}:") and "credentials" in lines[-1]


def test_a_shard_gone_from_the_bucket_is_rebuilt_from_the_work_folder(s3_env, tmp_path, capsys):
    """A finished bucket job whose shard object was deleted: with the work folder kept, the rerun
    takes the manifest down, rebuilds that shard from the kept encodes (no input encoded again) and
    uploads it alone, then publishes the same manifest; without the work folder it refuses in one
    line naming the URL."""
    videos = _class_folders(tmp_path / "videos", count=3)
    url, work = f"s3://{s3_env}/shards", tmp_path / "work"
    argv = ["--videos", str(videos), *COMMON, "--workers", "0", "--out", url, "--work-dir", str(work), "--keep-work"]
    assert main(argv) == 0
    before = _objects(url)
    tars = sorted(n for n in before if n.endswith(".tar"))
    store = storage.Storage()
    store.remove(f"{url}/{tars[0]}")
    assert main(argv) == 0
    assert _objects(url) == before
    uploads = [json.loads(line)["shard"] for line in (work / ".work" / "uploads.jsonl").read_text().splitlines()]
    assert sorted(uploads) == sorted(tars + [tars[0]])
    keys = [json.loads(line)["key"] for line in (work / ".work" / "journal.jsonl").read_text().splitlines()]
    assert len(keys) == len(set(keys)) == 4  # three videos and the empty file, each processed once

    store.remove(f"{url}/{tars[0]}")
    shutil.rmtree(work)
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"error: {url}: shards ['{tars[0]}']")
