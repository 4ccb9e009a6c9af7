"""``Storage``: read, list and write locations (local paths or URLs) with retries, counting what it did.

Every byte the project takes from a shard folder or a bucket goes through here: the manifest and the
``.idx`` files as whole small reads (``read_bytes``), each tar member as one ranged read at its
``.idx`` offset (``read_range``), whole shards for ``verify`` (``get_file``), uploads for the sharding
job (``put_file``). Local paths are read with ``os.pread`` on cached descriptors; URLs through fsspec
(s3fs for ``s3://``, gcsfs for ``gs://``, fsspec's aiohttp driver for ``http(s)://``, any other
installed fsspec protocol as is). The drivers' own retry loops are turned off where they have a knob
(s3fs, botocore), so ``retry.RetryPolicy`` is the one bound on a request's attempts and time.

Credentials come only from the drivers' standard places (for S3: ``AWS_*`` environment variables,
``~/.aws/config`` and ``credentials``, instance roles; ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``
for an S3-compatible store; for GCS: ``GOOGLE_APPLICATION_CREDENTIALS`` or gcloud's login), never from
a config file of this project.

Errors: a start-up read (``read_bytes``, ``size``, ``sizes``, ``list_files``, ``exists``) that cannot
work at all raises ``StorageAccessError`` (a ``ValueError``: one line naming the URL, exit 2);
``read_range`` raises ``StorageReadError`` (an ``OSError`` naming the URL and range) once its
retries are spent or on a permanent error, which the loaders turn into a bad sample.

A ``Storage`` is safe to share between threads (the read-ahead pool uses one), survives ``fork``
(the child opens its own descriptors and driver sessions) and pickles without them.
"""
from __future__ import annotations

import concurrent.futures
import os
import shutil
import threading
from collections.abc import Iterable
from urllib.parse import unquote
from typing import Any

from common.atomic_io import atomic_write_bytes, atomic_writer

from .counters import StorageCounters
from .disk_cache import DiskCache
from .errors import ShortRead, StorageAccessError, StorageReadError, access_problem, describe
from .locations import is_url, local_path, name, parent, protocol
from .retry import RetryPolicy, with_retries

# Remote size checks issued at once (HTTP has no listing to answer them in one request).
_SIZE_CHECKS_IN_FLIGHT = 32


class Storage:
    """Reads and writes of local paths and URLs under one retry policy, with one set of counters.

    Args:
        retry: attempts, backoff, deadline and per-attempt timeout of every remote request.
        counters: where requests, bytes, retries and failures are counted (a new set if None).
        cache: a node-local disk cache of remote ranged reads (``DiskCache``), or None.
    """

    def __init__(self, retry: RetryPolicy | None = None, counters: StorageCounters | None = None,
                 cache: DiskCache | None = None):
        self.retry = retry or RetryPolicy()
        self.counters = counters or StorageCounters()
        self.cache = cache
        self._reset()

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._filesystems: dict[tuple, Any] = {}
        self._fds: dict[str, int] = {}
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        return {"retry": self.retry, "counters": self.counters, "cache": self.cache}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    def close(self) -> None:
        """Close the cached descriptors (driver sessions close with the process)."""
        with self._lock:
            fds, self._fds = self._fds, {}
        if self._pid == os.getpid():
            for fd in fds.values():
                os.close(fd)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # ----------------------------------------------------------------- reads
    def read_range(self, location: str, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes of ``location`` from ``offset`` (one ranged GET for a URL).

        Raises:
            StorageReadError: naming the location and range, when the bytes cannot be had within the
                retry policy (a short response is retried first; a longer one means the server ignores
                Range requests and is not).
        """
        what = f"{location} bytes {offset}..{offset + length}"
        if not is_url(location):
            return self._pread(location, offset, length, what)
        if self.cache is not None:
            cached = self.cache.get(location, offset, length)
            if cached is not None:
                self.counters.add(cache_hits=1, cache_bytes=length)
                return cached
        fs, path = self._fs(location)

        def attempt() -> bytes:
            data = fs.cat_file(path, start=offset, end=offset + length)
            self.counters.add(bytes=len(data))
            if len(data) < length:
                raise ShortRead(f"{len(data)} of {length} bytes")
            if len(data) > length:
                raise StorageReadError(f"{what}: the server sent {len(data)} bytes for a {length}-byte range "
                                       "(it ignores HTTP Range requests, which ranged member reads need)")
            return data

        try:
            data = with_retries(attempt, self.retry, what, self.counters)
        except StorageReadError:
            raise
        except Exception as err:
            self.counters.add(failures=1)
            problem = access_problem(err)
            raise StorageReadError(f"{what}: {problem[1] if problem else describe(err)}") from err
        if self.cache is not None:
            self.cache.put(location, offset, length, data)
        return data

    def _pread(self, location: str, offset: int, length: int, what: str) -> bytes:
        path = local_path(location)
        try:
            data = os.pread(self._fd(path), length, offset)
        except OSError as err:
            self.counters.add(requests=1, failures=1)
            raise StorageReadError(f"{what}: {err.strerror or describe(err)}") from err
        self.counters.add(requests=1, bytes=len(data))
        if len(data) != length:
            self.counters.add(failures=1)
            raise StorageReadError(f"{what}: cut short ({len(data)} of {length} bytes); the file does not match "
                                   f"its .idx")
        return data

    def _fd(self, path: str) -> int:
        self._check_pid()
        fd = self._fds.get(path)
        if fd is None:
            with self._lock:
                fd = self._fds.get(path)
                if fd is None:
                    fd = self._fds[path] = os.open(path, os.O_RDONLY)
        return fd

    def read_bytes(self, location: str) -> bytes:
        """The whole of a small file (a manifest, an index)."""
        if not is_url(location):
            with _access(location):
                with open(local_path(location), "rb") as f:
                    data = f.read()
            self.counters.add(requests=1, bytes=len(data))
            return data
        fs, path = self._fs(location)

        def attempt() -> bytes:
            data = fs.cat_file(path)
            self.counters.add(bytes=len(data))
            return data

        with _access(location):
            return with_retries(attempt, self.retry, location, self.counters)

    def size(self, location: str) -> int:
        """The size in bytes of a file or object."""
        if not is_url(location):
            with _access(location):
                return os.path.getsize(local_path(location))
        fs, path = self._fs(location)
        with _access(location):
            return int(with_retries(lambda: fs.info(path)["size"], self.retry, location, self.counters))

    def exists(self, location: str) -> bool:
        """Whether a file or object is there (credential and permission problems still raise)."""
        try:
            self.size(location)
            return True
        except StorageAccessError as err:
            if err.reason == "missing":
                return False
            raise

    def sizes(self, locations: Iterable[str]) -> dict[str, int | None]:
        """The size of each location, None where it is missing: one listing per folder where the
        storage lists (local, object stores), concurrent HEAD requests for HTTP."""
        locations = list(locations)
        found: dict[str, int | None] = {}
        heads = [loc for loc in locations if protocol(loc) in ("http", "https")]
        by_folder: dict[str, list[str]] = {}
        for loc in locations:
            if protocol(loc) not in ("http", "https"):
                by_folder.setdefault(parent(loc), []).append(loc)
        for folder, members in by_folder.items():
            try:
                listing = self.list_files(folder)
            except StorageAccessError as err:
                if err.reason != "missing":
                    raise
                listing = {}
            for loc in members:
                found[loc] = listing.get(name(loc))
        if heads:
            def head(loc: str) -> int | None:
                try:
                    return self.size(loc)
                except StorageAccessError as err:
                    if err.reason == "missing":
                        return None
                    raise
            with concurrent.futures.ThreadPoolExecutor(min(_SIZE_CHECKS_IN_FLIGHT, len(heads))) as pool:
                found.update(zip(heads, pool.map(head, heads)))
        return {loc: found[loc] for loc in locations}

    def list_files(self, folder: str) -> dict[str, int]:
        """``{name: size}`` of the files directly in a folder or under a prefix (one listing)."""
        if not is_url(folder):
            with _access(folder):
                with os.scandir(local_path(folder)) as it:
                    return {e.name: e.stat().st_size for e in it if e.is_file()}
        fs, path = self._fs(folder)

        def attempt() -> list[dict[str, Any]]:
            fs.invalidate_cache(path)
            return fs.ls(path, detail=True)

        with _access(folder):
            entries = with_retries(attempt, self.retry, folder, self.counters)
        return {name(e["name"]): int(e.get("size") or 0) for e in entries if e.get("type") == "file"}

    def list_tree(self, folder: str) -> dict[str, int]:
        """``{relative path: size}`` of every file under a folder or prefix, at any depth ('/'-separated
        paths; one recursive listing of an object store, paged by the driver, not one per folder)."""
        if not is_url(folder):
            root = local_path(folder)
            found = {}
            with _access(folder):
                for dirpath, _, files in os.walk(root):
                    for f in files:
                        full = os.path.join(dirpath, f)
                        found[os.path.relpath(full, root).replace(os.sep, "/")] = os.path.getsize(full)
            return found
        fs, path = self._fs(folder)
        path = path.rstrip("/")

        def attempt() -> dict[str, Any]:
            fs.invalidate_cache(path)
            return fs.find(path, detail=True)

        with _access(folder):
            entries = with_retries(attempt, self.retry, folder, self.counters)
        found = {key[len(path) + 1:]: e.get("size") for key, e in entries.items()
                 if e.get("type") == "file" and key.startswith(path + "/") and not key.endswith("/")}
        if protocol(folder) in ("http", "https"):
            # An HTTP listing is the server's index pages: links are percent-encoded and carry no
            # size (one HEAD per file gives it, as ``sizes`` does).
            found = {unquote(rel): size for rel, size in found.items()}
            unknown = [rel for rel, size in found.items() if size is None]
            sizes = self.sizes(f"{folder.rstrip('/')}/{rel}" for rel in unknown)
            found.update(zip(unknown, sizes.values()))
        return {rel: int(size or 0) for rel, size in found.items()}

    def remove(self, location: str) -> None:
        """Delete a file or object (gone already is fine)."""
        if not is_url(location):
            try:
                os.unlink(local_path(location))
            except FileNotFoundError:
                pass
            return
        fs, path = self._fs(location)

        def attempt() -> None:
            try:
                fs.rm_file(path)
            except FileNotFoundError:
                pass

        with _access(location):
            with_retries(attempt, self.retry, location, self.counters)

    def get_file(self, location: str, local: str | os.PathLike) -> None:
        """Copy a whole file or object to a local path (written to a temporary name, then renamed)."""
        local = os.fspath(local)
        tmp = f"{local}.part"
        if not is_url(location):
            with _access(location):
                with open(local_path(location), "rb") as src, open(tmp, "wb") as dst:
                    while chunk := src.read(1 << 22):
                        dst.write(chunk)
        else:
            fs, path = self._fs(location)
            with _access(location):
                with_retries(lambda: fs.get_file(path, tmp), self.retry, location, self.counters)
        self.counters.add(bytes=os.path.getsize(tmp))
        os.replace(tmp, local)

    # ----------------------------------------------------------------- writes
    def put_file(self, local: str | os.PathLike, location: str) -> None:
        """Upload (or copy) a local file to ``location``; a transient failure uploads it again whole,
        so the object is either absent, the old one or the complete new one."""
        if not is_url(location):
            target = local_path(location)
            os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
            with atomic_writer(target) as dst, open(local, "rb") as src:
                shutil.copyfileobj(src, dst, 1 << 22)
            return
        fs, path = self._fs(location)
        with _access(location):
            with_retries(lambda: fs.put_file(os.fspath(local), path), self.retry, location, self.counters)

    def put_bytes(self, location: str, data: bytes) -> None:
        """Write a small file (a manifest) whole."""
        if not is_url(location):
            target = local_path(location)
            os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
            atomic_write_bytes(target, data)
            return
        fs, path = self._fs(location)
        with _access(location):
            with_retries(lambda: fs.pipe_file(path, data), self.retry, location, self.counters)

    # ----------------------------------------------------------------- drivers
    def _check_pid(self) -> None:
        if self._pid != os.getpid():  # a forked child: the parent's sessions and descriptors are not ours
            self._reset()

    def _fs(self, location: str) -> tuple[Any, str]:
        """The fsspec filesystem for a URL's protocol and its path: one per Storage, process and
        driver environment (the drivers read endpoints and credentials from ``AWS_*`` / ``GOOGLE_*`` /
        ``FSSPEC_*`` variables when they start, so a changed variable gets a fresh driver)."""
        self._check_pid()
        key = (protocol(location), _driver_environment())
        fs = self._filesystems.get(key)
        if fs is None:
            with self._lock:
                fs = self._filesystems.get(key)
                if fs is None:
                    fs = self._filesystems[key] = _filesystem(key[0], self.retry, location)
        return fs, fs._strip_protocol(location)


def _driver_environment() -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(("AWS_", "GOOGLE_", "FSSPEC_"))))


def _filesystem(proto: str, retry: RetryPolicy, location: str):
    """A fresh fsspec filesystem for ``proto`` whose own retries are off and whose timeouts are ours."""
    import fsspec

    options: dict[str, Any] = {"skip_instance_cache": True}
    if proto in ("s3", "s3a"):
        # botocore's retry modes count attempts in total_max_attempts; 1 = no retries of its own.
        options.update(use_listings_cache=False, config_kwargs={
            "retries": {"total_max_attempts": 1}, "connect_timeout": retry.timeout_s, "read_timeout": retry.timeout_s})
    elif proto in ("http", "https"):
        import aiohttp
        options.update(client_kwargs={"timeout": aiohttp.ClientTimeout(sock_connect=retry.timeout_s,
                                                                      sock_read=retry.timeout_s)})
    try:
        fs = fsspec.filesystem(proto, **options)
    except (ImportError, ValueError) as err:
        raise StorageAccessError(f"{location}: no storage driver for {proto}:// ({describe(err)}); s3:// needs "
                                 "s3fs, gs:// gcsfs (requirements.txt)", reason="driver") from err
    if proto in ("s3", "s3a"):
        fs.retries = 1   # s3fs's own retry loop (_error_wrapper): one attempt, RetryPolicy retries
    return fs


class _access:
    """Turns a failed start-up read into ``StorageAccessError`` naming the location and the reason."""

    def __init__(self, location: str):
        self.location = location

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, err, tb) -> bool:
        if err is None or isinstance(err, StorageAccessError) or not isinstance(err, Exception):
            return False
        if not is_url(self.location) and isinstance(err, OSError):
            if isinstance(err, FileNotFoundError):
                raise StorageAccessError(f"{self.location}: not found", reason="missing") from err
            raise StorageReadError(f"{self.location}: {err.strerror or describe(err)}") from err
        problem = access_problem(err)
        if problem is not None:
            reason, why = problem
            raise StorageAccessError(f"{self.location}: {why}", reason=reason) from err
        if isinstance(err, StorageReadError):
            return False
        raise StorageReadError(f"{self.location}: {describe(err)}") from err
