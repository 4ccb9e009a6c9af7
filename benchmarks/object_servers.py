"""Object-storage servers as real processes on free local ports, for tests and the data benchmark.

- ``start_moto()``: moto's standalone S3 server (``python -m moto.server``), the S3-compatible store
  s3fs's own test suite runs against; ``s3_environment(server)`` is the standard AWS environment that
  points boto at it (dummy keys, ``AWS_ENDPOINT_URL``), so the code under test finds it the way it
  finds a real bucket.
- ``start_range_http(folder)``: ``python -m RangeHTTPServer`` serving a folder, honouring Range requests.
- ``start_fault_proxy(upstream)``: ``benchmarks.fault_proxy`` in front of either (latency, 5xx, short
  and cut responses, resets), told what to do over HTTP (``FaultProxy.add_rule``).
Each is stopped by its pid (``stop``) and can be restarted on the same port (``restart``).
``upload_folder`` copies a shard folder to a URL through the storage layer, manifest last.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from storage import Storage, join

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server child process on a local port; ``url`` is its base URL."""

    def __init__(self, argv: list[str], port: int, cwd: str | os.PathLike | None = None, name: str = "server"):
        self.argv, self.port, self.cwd, self.name = argv, port, cwd, name
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self, timeout: float = 60.0) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
        self.proc = subprocess.Popen(self.argv, cwd=self.cwd, env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} ({' '.join(self.argv)}) exited with {self.proc.returncode}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"{self.name} did not listen on port {self.port} within {timeout} s")
                time.sleep(0.05)

    def stop(self) -> None:
        """Kill the process (by its pid) and wait for it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_moto(port: int | None = None) -> ServerProcess:
    port = port or free_port()
    return ServerProcess([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], port,
                         name="moto S3 server")


def start_range_http(folder: str | os.PathLike, port: int | None = None) -> ServerProcess:
    port = port or free_port()
    return ServerProcess([sys.executable, "-m", "RangeHTTPServer", str(port), "--bind", "127.0.0.1"], port,
                         cwd=folder, name="Range HTTP server")


class FaultProxy(ServerProcess):
    """``benchmarks.fault_proxy`` as a process; rules and latency are set over its control URL."""

    def add_rule(self, **rule) -> dict:
        return self._control("POST", rule)

    def clear(self) -> dict:
        return self._control("DELETE")

    def set_latency(self, delay_ms: float) -> dict:
        return self._control("POST", {"action": "latency", "delay_ms": delay_ms})

    def stats(self) -> dict:
        return self._control("GET")

    def _control(self, method: str, body: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"{self.url}/__proxy__/rules", data=data, method=method)
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())


def start_fault_proxy(upstream: ServerProcess | str, delay_ms: float = 0.0, port: int | None = None) -> FaultProxy:
    """The proxy in front of a server process or a plain-HTTP ``host:port``."""
    port = port or free_port()
    target = f"127.0.0.1:{upstream.port}" if isinstance(upstream, ServerProcess) else upstream
    return FaultProxy([sys.executable, "-m", "benchmarks.fault_proxy", "--upstream", target,
                       "--port", str(port), "--delay-ms", str(delay_ms)], port, name="fault proxy")


def s3_environment(endpoint: str) -> dict[str, str]:
    """The standard AWS environment for an S3-compatible endpoint (test keys; no instance-metadata probe)."""
    return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint, "AWS_EC2_METADATA_DISABLED": "true"}


def create_bucket(bucket: str) -> None:
    """Create a bucket on the endpoint the AWS environment names."""
    import fsspec

    fsspec.filesystem("s3", skip_instance_cache=True).mkdir(bucket)


def upload_folder(folder: str | os.PathLike, url: str, storage: Storage | None = None) -> list[str]:
    """Copy every file of a shard folder (not its hidden work files) to ``url``, the manifest last so
    a reader never sees a manifest whose shards are not there yet; returns the uploaded names."""
    storage = storage or Storage()
    names = sorted(p.name for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith("."))
    names.sort(key=lambda n: n == "manifest.json")
    for n in names:
        storage.put_file(Path(folder) / n, join(url, n))
    return names
