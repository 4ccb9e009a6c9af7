"""Inputs listed from a URL are fetched whole to local temporary space before they are probed.

FFmpeg probes, seeks and decodes a local file far better than a stream of ranged reads, so the
worker that processes a URL input downloads it (the storage layer retries transient failures),
probes / encodes / test-decodes the local copy, and deletes it as soon as it is done, whatever the
outcome. The bound on that space is kept by the driver, which knows every size from the listing:
the inputs in flight never sum to more than ``--fetch-bytes`` (``map_unordered``'s cost window), so
at any moment the fetched copies on a machine take at most that much disk (one larger input runs
alone). Records and quarantine lines name the URL, never the copy.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import storage

# Where a worker puts fetched copies when the driver gave no folder (a Ray node's own temp space).
DEFAULT_FETCH_FOLDER = "shard_tools_fetch"


class FetchFailed(Exception):
    """The input could not be fetched: ``reason`` ``missing`` (the object is not there: a Kinetics /
    SSv2 row naming a clip the bucket lacks, or an object deleted since the listing) or
    ``unreadable`` (denied, or still failing after the storage layer's retries)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


@contextmanager
def local_input(path: str, key: str, fetch_dir: str | None) -> Iterator[str]:
    """The local file to open for the input at ``path``: ``path`` itself when it is local, else a
    copy fetched into ``fetch_dir`` (default: the system temp folder) that is deleted on exit."""
    if not storage.is_url(path):
        yield path
        return
    folder = fetch_dir or os.path.join(tempfile.gettempdir(), DEFAULT_FETCH_FOLDER)
    os.makedirs(folder, exist_ok=True)
    name = path.rsplit("/", 1)[-1]
    suffix = name[name.rfind("."):] if "." in name[1:] else ""
    local = os.path.join(folder, key + suffix)  # keys are unique in a job: no two inputs share a copy
    try:
        try:
            storage.default_storage().get_file(path, local)
        except storage.StorageAccessError as err:
            if err.reason == "missing":
                raise FetchFailed("missing", f"{path} does not exist") from err
            raise FetchFailed("unreadable", str(err)) from err
        except OSError as err:  # StorageReadError: retries spent, or a local disk problem
            raise FetchFailed("unreadable", f"{path}: cannot fetch it ({err})") from err
        yield local
    finally:
        for leftover in (local, local + ".part"):  # get_file writes .part, then renames
            try:
                os.unlink(leftover)
            except FileNotFoundError:
                pass
