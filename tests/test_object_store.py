"""Shards in a bucket (moto's S3 server) and behind HTTP (a Range HTTP server), end to end, with real
server processes and the fault proxy: the loaders, ``train.py``, ``evaluate.py``, ``shard_tools
verify|stats`` read URLs as they read a local folder; faults cost retries, a member that cannot be
read is a bad sample (replaced, counted, logged with its URL), and start-up problems are one line
naming the URL with exit status 2 (docs/pipelines.md, object storage)."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from benchmarks.object_servers import start_range_http, upload_folder
from object_store_fixtures import (http_proxy, http_server, http_shards, moto_server, s3_env, s3_proxy,  # noqa: F401
                                   s3_shards, small_shards)
from pipelines import build_loader
from pipelines.config import DataConfig
from pipelines.shard_index import read_sample_index, read_shard_set
from test_train_elastic import CKPT, _losses, _train, elastic_shards  # noqa: F401 (fixture)
from train_fixtures import subprocess_env
from training.lineage import read_lineage

ROOT = Path(__file__).resolve().parents[1]
FAST_RETRY = {"attempts": 3, "base_delay_s": 0.01, "max_delay_s": 0.05, "deadline_s": 10.0, "timeout_s": 5.0}
LSTCL_SMALL = {"size": 32, "short_frames": 4, "long_frames": 4, "long_stride": 4}


def config(shards: str, **extra) -> DataConfig:
    return DataConfig.from_dict({"shards": str(shards), "recipe": "lstcl", "num_threads": 1, "lstcl": LSTCL_SMALL,
                                 "retry": FAST_RETRY, **extra})


def epoch(shards: str, loader: str = "dali", batch_size: int = 2, **extra):
    ld = build_loader(config(shards, **extra), batch_size=batch_size, seed=7, loader=loader)
    return list(ld), ld


def assert_same_batches(got: list[dict], want: list[dict]) -> None:
    assert [b["key"] for b in got] == [b["key"] for b in want]
    for a, b in zip(got, want):
        for name in ("short", "long", "label"):
            assert torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def local_epoch(small_shards):
    return epoch(small_shards)[0]


@pytest.mark.parametrize("backend", ["s3", "http"])
def test_the_loader_reads_a_bucket_or_http_like_the_local_folder(backend, request, local_epoch):
    url = request.getfixturevalue(f"{backend}_shards")
    batches, loader = epoch(url)
    assert_same_batches(batches, local_epoch)
    # one ranged read per sample (json and video together): no whole-tar downloads, no listing per sample
    assert loader.read_ahead_stats["delivered"] == 8
    before = loader.store.counters.snapshot()
    batches = list(loader)
    counts = {k: v - before[k] for k, v in loader.store.counters.snapshot().items()}
    assert counts["requests"] == 8 and counts["retries"] == 0
    member_bytes = sum(s.meta.size + s.video.size for s in loader.index)
    assert member_bytes <= counts["bytes"] <= member_bytes + 8 * 4096


@pytest.mark.slow
def test_the_baseline_loader_reads_a_bucket(s3_shards, local_epoch):
    batches, _ = epoch(s3_shards, loader="baseline")
    assert [b["key"] for b in batches] == [b["key"] for b in local_epoch]


def test_a_member_that_keeps_failing_is_a_bad_sample_replaced_counted_and_logged(s3_shards, s3_proxy, small_shards,
                                                                               caplog):
    local, _ = epoch(small_shards, batch_size=2)
    target = local[1]["key"][0]
    shards = read_shard_set(s3_shards)
    sample = next(s for s in read_sample_index(shards.paths, shards.index_paths, shards.num_samples)
                  if s.key == target)
    start = min(sample.meta.offset, sample.video.offset)
    s3_proxy.add_rule(action="status", status=503, count=-1, path=sample.shard.rsplit("/", 1)[1], range_start=start)
    caplog.set_level(logging.WARNING)
    batches, loader = epoch(s3_shards, batch_size=2)
    keys = [b["key"] for b in batches]
    assert target not in sum(keys, [])
    assert keys[0] == local[0]["key"] and keys[2:] == [b["key"] for b in local[2:]]
    assert keys[1][1] == local[1]["key"][1] and keys[1][0] != target      # only its position changed
    assert loader.stats["decode_failures"] == 1
    assert [r["key"] for r in loader.stats["replacements"]] == [target]
    assert loader.state_dict()["bad_keys"] == {target: sample.shard}       # in the resumable position
    logged = caplog.text
    assert f"bad sample {target} of {sample.shard}" in logged and "still failing after 3 attempts" in logged
    assert f"bytes {start}.." in logged and "reduce your request rate" in logged      # the 503 SlowDown


def test_a_short_response_is_detected_and_retried(http_shards, http_proxy, small_shards, local_epoch):
    shards = read_shard_set(http_shards)
    sample = read_sample_index(shards.paths, shards.index_paths, shards.num_samples)[3]
    start = min(sample.meta.offset, sample.video.offset)
    http_proxy.add_rule(action="short", keep=100, count=1, range_start=start)
    batches, loader = epoch(f"{http_proxy.url}/{small_shards.name}")
    assert_same_batches(batches, local_epoch)
    assert loader.store.counters.snapshot()["retries"] == 1 and not loader.stats["replacements"]
    assert http_proxy.stats()["faults"] == 1


def test_a_server_killed_and_restarted_mid_epoch_costs_retries_not_the_run(small_shards, tmp_path):
    local, _ = epoch(small_shards, batch_size=1)
    with start_range_http(small_shards.parent) as server:
        retry = {"attempts": 30, "base_delay_s": 0.05, "max_delay_s": 0.2, "deadline_s": 60.0, "timeout_s": 5.0}
        ld = build_loader(config(f"{server.url}/{small_shards.name}", retry=retry, read_ahead_steps=1),
                          batch_size=1, seed=7)
        batches = []
        restart = None
        for batch in ld:
            batches.append(batch)
            if len(batches) == 1:          # 7 of 8 steps to go, at most 3 of them read ahead
                server.stop()
                restart = threading.Timer(1.5, server.start)
                restart.start()
        restart.join()
    assert_same_batches(batches, local)
    assert ld.store.counters.snapshot()["retries"] >= 1 and not ld.stats["replacements"]


# ----------------------------------------------------------------- entry points
def _run(argv: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("backend", ["s3", "http"])
def test_verify_and_stats_read_a_url(backend, request, small_shards):
    """The same reports as for the local folder (the fixture's shards are the loaders' test format, not
    a sharding job's, so verify finds the same job-level problems in both: no input ids)."""
    url = request.getfixturevalue(f"{backend}_shards")
    reports = {}
    for name, folder in (("url", url), ("local", str(small_shards))):
        verify = _run(["-m", "shard_tools", "verify", folder])
        assert verify.returncode in (0, 1), verify.stderr[-3000:]
        reports[name] = json.loads(verify.stdout)
        assert reports[name].pop("out") == folder
    assert reports["url"] == reports["local"]
    assert reports["url"]["samples"] == 8 and reports["url"]["videos_decoded"] == 8
    assert not any("decoded" in p or "index" in p or "bytes" in p for p in reports["url"]["problems"])
    stats, local = _run(["-m", "shard_tools", "stats", url]), _run(["-m", "shard_tools", "stats", str(small_shards)])
    assert stats.returncode == 0, stats.stderr[-3000:]
    assert stats.stdout.splitlines()[1:] == local.stdout.splitlines()[1:]      # the first line names the folder
    assert stats.stdout.startswith(f"{url}: ")


def test_a_missing_bucket_credentials_or_manifest_is_one_line_and_exit_2(s3_shards, s3_env, http_shards, monkeypatch):
    cases = [
        (["-m", "shard_tools", "stats", f"s3://no-such-bucket-{s3_env}/shards"],
         f"error: s3://no-such-bucket-{s3_env}/shards/manifest.json: the bucket 'no-such-bucket-{s3_env}' does not exist"),
        (["-m", "shard_tools", "verify", f"{http_shards}/../nothing"],
         f"error: {http_shards}/../nothing/manifest.json: no manifest; is {http_shards}/../nothing a shard folder"),
        ([str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "demo_cpu.yaml"),
          f"data.shards=s3://no-such-bucket-{s3_env}/shards", "trainer.output_dir=" + str(ROOT / "runs" / "never")],
         f"error: s3://no-such-bucket-{s3_env}/shards/manifest.json: the bucket 'no-such-bucket-{s3_env}' does not"),
    ]
    for argv, line in cases:
        result = _run(argv)
        assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith(line), result.stderr
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    result = _run(["-m", "shard_tools", "verify", s3_shards])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {s3_shards}/manifest.json: no credentials found")


def test_evaluate_extracts_the_same_features_from_a_bucket(s3_shards, small_shards, tmp_path, capsys):
    from evaluation import cli

    args = ["extract", "--checkpoint", "random", "--model", "timesformer_tiny_patch16", "--model-kwargs",
            '{"depth": 1, "img_size": 32, "num_frames": 4}', "--slow-frames", "4", "--slow-size", "32",
            "--fast-frames", "4", "--fast-size", "32", "--batch-size", "4", "--num-threads", "1"]
    feats = {}
    for name, shards in (("local", str(small_shards)), ("s3", s3_shards)):
        feats[name] = tmp_path / f"{name}.pt"
        assert cli.main([*args, "--shards", shards, "--out", str(feats[name])]) == 0, capsys.readouterr().err
    from evaluation.features import FeatureSet

    local, remote = FeatureSet.load(feats["local"]), FeatureSet.load(feats["s3"])
    assert remote.keys == local.keys and torch.equal(remote.slow, local.slow) and torch.equal(remote.fast, local.fast)
    assert remote.meta["shards"] == s3_shards


@pytest.mark.slow
def test_training_on_a_bucket_gives_the_local_runs_lineage_and_losses_and_resumes_at_another_world_size(
        s3_env, elastic_shards, tmp_path):
    """The elastic tests' shards (12 good samples, one truncated member) locally, in a bucket and behind
    HTTP: the same samples (spares included) and losses at every step; a checkpoint of the local run
    resumes on the bucket at two ranks exactly as the local run continued."""
    bucket = f"s3://{s3_env}/elastic"
    upload_folder(elastic_shards, bucket)
    runs = {name: tmp_path / name for name in ("local", "s3", "http")}
    with start_range_http(elastic_shards.parent) as server:
        _train(elastic_shards, runs["local"], world=1, stage=2)
        _train(bucket, runs["s3"], world=1, stage=2)
        _train(f"{server.url}/{elastic_shards.name}", runs["http"], world=1, stage=2)
    reference = _lineage(runs["local"])
    assert any(line.get("replaced") for line in reference)              # the truncated member was replaced
    for name in ("s3", "http"):
        assert _lineage(runs[name]) == reference
        assert _losses(runs[name]) == pytest.approx(_losses(runs["local"]), rel=1e-6)
    resumed = tmp_path / "resumed"
    _train(bucket, resumed, world=2, stage=2, resume=str(runs["local"] / "checkpoints" / f"step_{CKPT:08d}"))
    assert _lineage(resumed) == [line for line in reference if line["step"] > CKPT]
    ref, new = _losses(runs["local"]), _losses(resumed)
    assert sorted(new) == [step for step in sorted(ref) if step > CKPT]
    for step in new:
        assert new[step] == pytest.approx(ref[step], rel=1e-4, abs=1e-5), step


def _lineage(run: Path) -> list[dict]:
    """A run's lineage with each replaced sample's shard named by file (a path or a URL otherwise)."""
    lines = read_lineage(run / "lineage.jsonl")
    for line in lines:
        for r in line.get("replaced", []):
            r["shard"] = r["shard"].rsplit("/", 1)[-1]
    return lines
