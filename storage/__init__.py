"""Storage: one way to read and write a local folder or a URL (``s3://``, ``gs://``, ``https://``, any
fsspec protocol), with retries, clear start-up errors and counters.

- ``locations``: a location is one string, a local path or a URL; ``join`` / ``parent`` / ``is_url``.
- ``store.Storage``: ``read_bytes`` (manifest, ``.idx``), ``read_range`` (one tar member at its
  ``.idx`` offset, length checked), ``size`` / ``sizes`` / ``exists`` / ``list_files`` / ``list_tree``
  (a whole input tree in one recursive listing), ``get_file``, ``put_file`` / ``put_bytes`` /
  ``remove`` (the sharding job's uploads).
- ``retry.RetryPolicy``: exponential backoff with full jitter, bounded in attempts and time.
- ``errors``: transient vs permanent; ``StorageAccessError`` (credentials, bucket, denied, not found:
  one line naming the URL, exit 2), ``StorageReadError`` (a read that failed for good).
- ``counters.StorageCounters``: requests, bytes, retries, failures, cache hits.
- ``disk_cache.DiskCache``: an optional node-local LRU cache of member bytes, bounded in bytes.

No project imports: ``shard_tools``, ``pipelines`` and the CLIs all build on it.
"""
from .counters import StorageCounters
from .disk_cache import DiskCache
from .errors import ShortRead, StorageAccessError, StorageReadError, is_transient
from .locations import is_url, join, local_path, name, parent, protocol
from .retry import RetryPolicy, with_retries
from .store import Storage

__all__ = ["Storage", "DiskCache", "RetryPolicy", "StorageCounters", "StorageAccessError", "StorageReadError", "ShortRead",
           "is_transient", "with_retries", "is_url", "join", "local_path", "name", "parent", "protocol",
           "default_storage", "read_bytes", "read_range"]

_default: Storage | None = None


def default_storage() -> Storage:
    """The process's shared ``Storage`` with the default retry policy (tools that take no config)."""
    global _default
    if _default is None:
        _default = Storage()
    return _default


def read_bytes(location: str) -> bytes:
    """A whole small file through the default storage."""
    return default_storage().read_bytes(location)


def read_range(location: str, offset: int, length: int) -> bytes:
    """Exactly ``length`` bytes at ``offset`` through the default storage."""
    return default_storage().read_range(location, offset, length)
