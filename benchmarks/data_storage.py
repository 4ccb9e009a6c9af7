"""``python bench.py data --shards URL`` (or ``--serve http|s3``): the DALI loader on shards at a URL
beside the same shards on local disk, in one run.

Modes, each a child process of ``benchmarks.data`` (the same ``run_mode("dali")``), taking turns for
``--rounds`` rounds so that load from other users of the machine falls on all alike:
- ``local``: the local copy (``--local-copy``; by default downloaded once to ``runs/bench/url_copy/``);
- ``url``: the URL, read through ``storage`` (one ranged GET per sample, read ahead);
- ``url+<N>ms``: the same URL through ``benchmarks.fault_proxy`` adding ``--latency-ms`` to every request
  (for an ``http://`` URL, or ``s3://`` with a plain-HTTP ``AWS_ENDPOINT_URL``; TLS endpoints cannot be
  proxied here and skip this mode).
``--serve http`` / ``--serve s3`` serve the local ``--shards`` folder from a Range HTTP server or from
moto's S3 server (uploaded to a bucket) started here, so the whole comparison runs on one machine.

Reported per mode: videos/s, CPU-seconds per video (the loader process and its threads: the storage
driver's event loop and the read-ahead included; not the servers'), bytes fetched over the member bytes
of the timed samples, requests per video, retries, and the time the decoder waited for a read that
was not ready yet (read-ahead misses); ratios ``url/local`` and ``latency/local`` videos/s
(goal for the latency mode: >= 0.9) and the byte ratio (goal: <= 1.05). ``--reads-only`` times the
loader's reads and plans without the decoder (``planned_batches``): what the storage and the read-ahead
can deliver. JSON to ``--out`` (default ``runs/bench/data_storage.json``).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

from benchmarks.object_servers import (create_bucket, s3_environment, start_fault_proxy, start_moto,
                                       start_range_http, upload_folder)
from shard_tools.format import MANIFEST_NAME, read_manifest
from storage import Storage, is_url, join, protocol

REPO_ROOT = Path(__file__).resolve().parents[1]

COLUMNS = [("videos/s", "videos_per_s", ".2f"), ("CPU-s/video", "cpu_s_per_video", ".3f"),
           ("bytes/member", "bytes_over_member_bytes", ".3f"), ("requests/video", "requests_per_video", ".2f"),
           ("retries", "retries", "d"), ("read wait ms/video", "read_wait_ms_per_video", ".1f")]


def local_copy(url: str, folder: Path) -> Path:
    """A local copy of a remote shard folder (manifest, quarantine, every tar and index), kept for reuse."""
    store = Storage()
    manifest = read_manifest(url, store)
    folder.mkdir(parents=True, exist_ok=True)
    names = [n for s in manifest.shards for n in (s.path, s.idx_path)] + [manifest.quarantine.path]
    for name in names:
        target = folder / name
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            if store.exists(join(url, name)):
                store.get_file(join(url, name), target)
    store.get_file(join(url, MANIFEST_NAME), folder / MANIFEST_NAME)
    return folder


def _child(argv: list[str], mode: str, shards: str, env: dict[str, str]) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.data", *argv, "--child", mode, "--shards", shards]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT,
                          env={**os.environ, **env, "OMP_NUM_THREADS": "1"})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"benchmark child on {shards} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def _without_serve(argv: list[str]) -> list[str]:
    """``argv`` less ``--serve X`` (children read the URL they are given)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--serve":
            skip = True
        elif not a.startswith("--serve="):
            out.append(a)
    return out


def _latency_target(url: str, env: dict[str, str]) -> tuple[str, str] | None:
    """``(upstream host:port, what to rewrite)`` for the latency proxy, or None when it cannot sit in front."""
    if protocol(url) == "http":
        return urlsplit(url).netloc, "url"
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if protocol(url) in ("s3", "s3a") and endpoint and endpoint.startswith("http://"):
        return urlsplit(endpoint).netloc, "endpoint"
    return None


def storage_bench(args, argv: list[str]) -> int:
    from benchmarks.data import combine, plot, print_table

    servers = []
    env: dict[str, str] = {}
    try:
        if args.serve:
            if is_url(args.shards):
                raise ValueError("--serve serves a local shard folder; --shards is a URL already")
            local = Path(args.shards).resolve()
            if args.serve == "http":
                servers.append(start_range_http(local.parent))
                url = f"{servers[-1].url}/{local.name}"
            else:
                servers.append(start_moto())
                env = s3_environment(servers[-1].url)
                os.environ.update(env)
                create_bucket("bench")
                url = f"s3://bench/{local.name}"
                upload_folder(local, url)
        else:
            url = args.shards
            env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
            local = args.local_copy or Path("runs/bench/url_copy") / re.sub(r"[^A-Za-z0-9_.-]+", "_", url)
            local = local_copy(url, Path(local))
        modes = {"local": (str(local), {}), "url": (url, env)}
        target = _latency_target(url, env) if args.latency_ms > 0 else None
        if args.latency_ms > 0 and target is None:
            print(f"no latency mode: {url} cannot be proxied here (TLS or no plain-HTTP endpoint)", file=sys.stderr)
        if target is not None:
            proxy = start_fault_proxy(target[0], delay_ms=args.latency_ms)
            servers.append(proxy)
            if target[1] == "url":
                parts = urlsplit(url)
                proxied, proxied_env = parts._replace(netloc=f"127.0.0.1:{proxy.port}").geturl(), env
            else:
                proxied, proxied_env = url, {**env, "AWS_ENDPOINT_URL": proxy.url, "AWS_ENDPOINT_URL_S3": proxy.url}
            modes[f"url+{args.latency_ms:g}ms"] = (proxied, proxied_env)
        child_argv = _without_serve(argv)
        runs: dict[str, list[dict]] = {mode: [] for mode in modes}
        for _ in range(args.rounds):
            for mode, (shards, mode_env) in modes.items():
                runs[mode].append(_child(child_argv, "reads" if args.reads_only else "dali", shards, mode_env))
    finally:
        for server in reversed(servers):
            server.stop()
    results = {}
    for mode, mode_runs in runs.items():
        totals = combine(mode_runs)
        io = {k: sum(r["io"][k] for r in mode_runs) for k in mode_runs[0]["io"]}
        totals.update(bytes_over_member_bytes=io["bytes"] / io["member_bytes"],
                      requests_per_video=io["requests"] / totals["videos"], retries=io["retries"],
                      read_wait_ms_per_video=1000 * io["read_wait_s"] / totals["videos"], io=io)
        results[mode] = totals
    ratios = {f"{mode}_over_local_videos_per_s": results[mode]["videos_per_s"] / results["local"]["videos_per_s"]
              for mode in results if mode != "local"}
    report = {"recipe": args.recipe, "batch_size": args.batch_size, "threads": args.threads, "device": args.device,
              "shards": url, "local_copy": str(local), "serve": args.serve, "latency_ms": args.latency_ms,
              "reads_only": args.reads_only,
              "batches": args.batches, "rounds": args.rounds, "cpu_count": os.cpu_count(),
              "load_average": os.getloadavg(), "results": results, "ratios": ratios}
    what = "reading and planning only (no decode)" if args.reads_only else "DALI loader"
    print_table(report, COLUMNS, title=f"{url} beside {local}, {what}: ")
    out = args.out if args.out != Path("runs/bench/data.json") else Path("runs/bench/data_storage.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    plot(report, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0
