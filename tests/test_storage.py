"""The storage layer against real servers: moto's S3 server, a Range HTTP server, the fault proxy.

Ranged reads return exactly the bytes asked on every backend; transient faults (503 SlowDown, short
and cut responses, a stalled server, a killed and restarted server) cost retries, counted; a fault
that outlasts the retry policy is one ``StorageReadError`` naming the URL and range; start-up problems
(no credentials, no bucket, denied, not found) are one ``StorageAccessError`` line naming the URL.
"""
from __future__ import annotations

import pickle
import random
import threading
import time

import pytest

from benchmarks.object_servers import start_range_http, upload_folder
from object_store_fixtures import http_proxy, moto_server, s3_env, s3_proxy  # noqa: F401 (fixtures)
from storage import RetryPolicy, Storage, StorageAccessError, StorageReadError, join

FAST = RetryPolicy(attempts=5, base_delay_s=0.01, max_delay_s=0.05, deadline_s=10.0, timeout_s=5.0)
PAYLOAD = bytes(random.Random(0).randbytes(200_000))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("storage")
    (root / "f").mkdir()
    (root / "f" / "blob.bin").write_bytes(PAYLOAD)
    (root / "f" / "manifest.json").write_text('{"a": 1}')
    return root


@pytest.fixture(scope="module")
def http_server(folder):
    """A Range HTTP server on this module's folder (``http_proxy`` fronts it)."""
    with start_range_http(folder) as server:
        yield server


@pytest.fixture
def http(http_server):
    return http_server


@pytest.fixture
def s3_folder(s3_env, folder):
    url = f"s3://{s3_env}/f"
    upload_folder(folder / "f", url)
    return url


def _locations(kind, folder, http, s3_folder=None):
    return {"local": str(folder / "f"), "http": f"{http.url}/f", "s3": s3_folder}[kind]


@pytest.mark.parametrize("kind", ["local", "http", "s3"])
def test_ranged_reads_listing_and_sizes(kind, folder, http, request):
    base = _locations(kind, folder, http, request.getfixturevalue("s3_folder") if kind == "s3" else None)
    st = Storage(FAST)
    blob = join(base, "blob.bin")
    # not (0, 1): rangehttpserver 1.4.0 reads "bytes=0-0" as no end and sends the whole file
    for offset, length in [(0, 16), (1, 1), (12345, 4096), (len(PAYLOAD) - 10, 10)]:
        assert st.read_range(blob, offset, length) == PAYLOAD[offset:offset + length]
    assert st.read_bytes(join(base, "manifest.json")) == b'{"a": 1}'
    assert st.size(blob) == len(PAYLOAD)
    assert st.exists(blob) and not st.exists(join(base, "nothing.bin"))
    assert st.sizes([blob, join(base, "nothing.bin")]) == {blob: len(PAYLOAD), join(base, "nothing.bin"): None}
    assert {"blob.bin", "manifest.json"} <= set(st.list_files(base))
    counts = st.counters.snapshot()
    assert counts["retries"] == 0 and counts["failures"] == 0
    # the counted payload is exactly what was asked (no whole-object downloads behind a ranged read)
    assert counts["bytes"] >= 16 + 1 + 4096 + 10 + 8


def test_a_read_past_the_end_is_a_read_error_naming_the_range(folder, http):
    st = Storage(FAST)
    with pytest.raises(StorageReadError, match=r"blob.bin bytes 199990\.\.200010"):
        st.read_range(str(folder / "f" / "blob.bin"), len(PAYLOAD) - 10, 20)
    with pytest.raises(StorageReadError, match=r"blob.bin bytes 199990\.\.200010"):
        st.read_range(f"{http.url}/f/blob.bin", len(PAYLOAD) - 10, 20)


@pytest.mark.parametrize("backend", ["http", "s3"])
@pytest.mark.parametrize("fault", [{"action": "status", "status": 503, "count": 2},
                                   {"action": "status", "status": 500, "count": 1},
                                   {"action": "short", "keep": 100, "count": 2},
                                   {"action": "cut", "keep": 100, "count": 1},
                                   {"action": "delay", "delay_ms": 1500, "count": 1}],
                         ids=["503", "500", "short", "cut", "stall"])
def test_transient_faults_cost_retries(backend, fault, request, monkeypatch):
    if backend == "http":
        proxy = request.getfixturevalue("http_proxy")
        blob = f"{proxy.url}/f/blob.bin"
    else:
        proxy = request.getfixturevalue("s3_proxy")
        blob = join(request.getfixturevalue("s3_folder"), "blob.bin")
    policy = RetryPolicy(attempts=5, base_delay_s=0.01, max_delay_s=0.05, deadline_s=10.0, timeout_s=0.5)
    st = Storage(policy)
    proxy.add_rule(path="blob.bin", **fault)
    assert st.read_range(blob, 1000, 5000) == PAYLOAD[1000:6000]
    counts = st.counters.snapshot()
    assert counts["retries"] == fault["count"] and counts["failures"] == 0
    assert proxy.stats()["faults"] == fault["count"]


def test_a_persistent_fault_is_one_error_naming_url_range_and_reason(http_proxy):
    st = Storage(RetryPolicy(attempts=3, base_delay_s=0.01, max_delay_s=0.02))
    http_proxy.add_rule(path="blob.bin", action="status", status=503, count=-1)
    with pytest.raises(StorageReadError) as info:
        st.read_range(f"{http_proxy.url}/f/blob.bin", 10, 90)
    line = str(info.value)
    assert "/f/blob.bin bytes 10..100: still failing after 3 attempts" in line and "503" in line
    assert "\n" not in line
    assert st.counters.snapshot()["failures"] == 1 and st.counters.snapshot()["retries"] == 2


def test_the_deadline_bounds_the_retries(http_proxy):
    st = Storage(RetryPolicy(attempts=100, base_delay_s=0.2, max_delay_s=0.2, deadline_s=1.0))
    http_proxy.add_rule(path="blob.bin", action="status", status=503, count=-1)
    start = time.monotonic()
    with pytest.raises(StorageReadError, match="still failing"):
        st.read_range(f"{http_proxy.url}/f/blob.bin", 10, 90)
    assert time.monotonic() - start < 5.0
    assert st.counters.snapshot()["requests"] < 100


def test_a_killed_and_restarted_server_costs_retries_not_the_read(folder):
    with start_range_http(folder) as server:
        st = Storage(RetryPolicy(attempts=12, base_delay_s=0.1, max_delay_s=0.5, deadline_s=30.0))
        blob = f"{server.url}/f/blob.bin"
        assert st.read_range(blob, 0, 10) == PAYLOAD[:10]
        server.stop()
        restart = threading.Timer(1.0, server.start)
        restart.start()
        try:
            assert st.read_range(blob, 500, 1000) == PAYLOAD[500:1500]
        finally:
            restart.join()
        assert st.counters.snapshot()["retries"] >= 1


def test_start_up_problems_are_one_line_naming_the_url(s3_folder, http, monkeypatch, s3_env):
    st = Storage(FAST)
    cases = {
        f"s3://no-such-bucket-{s3_env}/f/manifest.json": ("bucket", "does not exist"),
        join(s3_folder, "missing.json"): ("missing", "not found"),
        f"{http.url}/f/missing.json": ("missing", "not found"),
    }
    for url, (reason, text) in cases.items():
        with pytest.raises(StorageAccessError) as info:
            st.read_bytes(url)
        assert info.value.reason == reason and str(info.value).startswith(f"{url}: ") and text in str(info.value)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    with pytest.raises(StorageAccessError, match=r"^s3://.*/f/manifest.json: no credentials found") as info:
        Storage(FAST).read_bytes(join(s3_folder, "manifest.json"))
    assert info.value.reason == "credentials"


def test_denied_is_an_access_error(s3_folder, s3_proxy):
    s3_proxy.add_rule(action="status", status=403, count=1)
    with pytest.raises(StorageAccessError, match="access denied") as info:
        Storage(FAST).read_bytes(join(s3_folder, "manifest.json"))
    assert info.value.reason == "denied"


def test_uploads_and_downloads(s3_env, tmp_path, folder):
    st = Storage(FAST)
    url = f"s3://{s3_env}/up"
    st.put_file(folder / "f" / "blob.bin", join(url, "blob.bin"))
    st.put_bytes(join(url, "manifest.json"), b"{}")
    assert st.read_range(join(url, "blob.bin"), 7, 3) == PAYLOAD[7:10]
    st.get_file(join(url, "blob.bin"), tmp_path / "copy.bin")
    assert (tmp_path / "copy.bin").read_bytes() == PAYLOAD
    local = tmp_path / "local" / "sub" / "blob.bin"
    st.put_file(folder / "f" / "blob.bin", str(local))
    assert local.read_bytes() == PAYLOAD


def test_a_storage_pickles_and_reads_in_the_copy(s3_folder, folder):
    st = Storage(FAST)
    st.read_range(str(folder / "f" / "blob.bin"), 0, 4)
    copy = pickle.loads(pickle.dumps(st))
    assert copy.read_range(join(s3_folder, "blob.bin"), 4, 4) == PAYLOAD[4:8]
    assert copy.read_range(str(folder / "f" / "blob.bin"), 8, 4) == PAYLOAD[8:12]


def test_retry_policy_is_checked_and_jitter_stays_under_the_ceiling():
    with pytest.raises(ValueError, match="attempts"):
        RetryPolicy(attempts=0)
    with pytest.raises(ValueError, match="delays"):
        RetryPolicy(base_delay_s=2.0, max_delay_s=1.0)
    policy = RetryPolicy(base_delay_s=0.1, max_delay_s=1.0)
    rng = random.Random(0)
    delays = [policy.delay(r, rng) for r in range(10) for _ in range(50)]
    assert all(0 <= d <= 1.0 for d in delays)
    assert max(policy.delay(0, rng) for _ in range(200)) <= 0.1
    assert len({round(d, 6) for d in delays}) > 100     # jittered, not a fixed schedule


def test_the_disk_cache_serves_repeated_reads_and_stays_within_its_bound(http, tmp_path):
    from storage import DiskCache

    bound = 60_000
    st = Storage(FAST, cache=DiskCache(tmp_path / "cache", bound))
    blob = f"{http.url}/f/blob.bin"
    ranges = [(i * 10_000, 10_000) for i in range(20)]
    for offset, length in ranges:
        assert st.read_range(blob, offset, length) == PAYLOAD[offset:offset + length]
        held = sum(p.stat().st_size for p in (tmp_path / "cache").iterdir())
        assert held <= bound + bound // 8          # one process: at most an eighth over between sweeps
    requests = st.counters.snapshot()["requests"]
    for offset, length in ranges[-3:]:              # the most recent reads are still cached
        assert st.read_range(blob, offset, length) == PAYLOAD[offset:offset + length]
    counts = st.counters.snapshot()
    assert counts["requests"] == requests and counts["cache_hits"] == 3
    assert st.read_range(blob, *ranges[0]) == PAYLOAD[:10_000]   # the oldest was evicted: read again
    assert st.counters.snapshot()["requests"] == requests + 1
    # another process's cache over the same folder (a second rank on the node) hits what this one wrote
    other = Storage(FAST, cache=DiskCache(tmp_path / "cache", bound))
    assert other.read_range(blob, *ranges[-1]) == PAYLOAD[190_000:200_000]
    assert other.counters.snapshot()["cache_hits"] == 1 and other.counters.snapshot()["requests"] == 0
