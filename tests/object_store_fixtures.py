"""Object-storage fixtures: real server processes on free ports (moto's S3 server, a Range HTTP server,
the fault proxy in front of either), the AWS environment that points the code under test at moto, and
a small shard folder uploaded to both. The processes come from ``benchmarks.object_servers`` (the data
benchmark uses the same ones); every one is stopped by its pid when its fixture ends.
"""
from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest

from benchmarks.object_servers import (create_bucket, s3_environment, start_fault_proxy, start_moto,
                                       start_range_http, upload_folder)
from pipeline_fixtures import index_videos, write_shards

_buckets = itertools.count()


@pytest.fixture(scope="session")
def moto_server():
    with start_moto() as server:
        yield server


@pytest.fixture
def s3_env(moto_server, monkeypatch):
    """The AWS environment for moto (keys, endpoint); a fresh bucket name per test."""
    for key, value in s3_environment(moto_server.url).items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    bucket = f"bucket{os.getpid()}-{next(_buckets)}"
    create_bucket(bucket)
    return bucket


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory) -> Path:
    """8 short index-pattern videos in 2 shards (the loaders' test format)."""
    root = tmp_path_factory.mktemp("object_store_shards")
    videos = index_videos(root / "videos", [24] * 8)
    return write_shards(root / "shards", videos, per_shard=4)


@pytest.fixture
def s3_shards(s3_env, small_shards) -> str:
    """``small_shards`` uploaded to a fresh bucket on moto; its URL."""
    url = f"s3://{s3_env}/shards"
    upload_folder(small_shards, url)
    return url


@pytest.fixture(scope="session")
def http_server(small_shards):
    """A Range HTTP server whose root is the parent of ``small_shards``."""
    with start_range_http(small_shards.parent) as server:
        yield server


@pytest.fixture
def http_shards(http_server, small_shards) -> str:
    return f"{http_server.url}/{small_shards.name}"


@pytest.fixture
def http_proxy(http_server):
    """The fault proxy in front of the Range HTTP server; rules cleared after each test."""
    with start_fault_proxy(http_server) as proxy:
        yield proxy


@pytest.fixture
def s3_proxy(moto_server, s3_env, monkeypatch):
    """The fault proxy in front of moto, with the AWS endpoint pointing at the proxy."""
    with start_fault_proxy(moto_server) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        yield proxy
