"""Files that readers see whole or not at all, and JSON-lines records.

Every write goes to a temporary name beside its target (``NAME.<random>.tmp``, unique per writer, so
two processes writing the same file never share one) and is renamed over the target once complete:
a reader, a concurrent writer or a run killed half-way sees the old file or the whole new one. A
folder that collects leftovers of killed writers can remove ``*.tmp``. ``sync`` (default) fsyncs the
data before the rename, so after a power loss the target holds the old or the new bytes, never a
file of zeros; scratch files that a rerun rebuilds pass ``sync=False``.

Standard library only: ``shard_tools`` writes its manifest, shards and indexes with it on Ray workers.
"""
from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_writer", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "read_jsonl",
           "write_jsonl"]

TMP_SUFFIX = ".tmp"


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, *, sync: bool = True) -> Iterator[IO[bytes]]:
    """A binary file to write ``path``'s new contents into; renamed over ``path`` when the block ends
    without an error, removed when it raises. Its ``name`` is the temporary path (complete once flushed).

    Takes anything that writes to a file object: ``torch.save(obj, f)``, ``np.savez(f, ...)`` (which
    appends no ``.npz`` to a file object), a tar stream.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:12]}{TMP_SUFFIX}")
    f = open(tmp, "xb")  # not mkstemp: its files are 0600, a shard folder's are the umask's, as any open()'s
    try:
        with f:
            yield f
            f.flush()
            if sync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, sync: bool = True) -> None:
    """Write ``data`` to ``path`` whole or not at all (``atomic_writer``)."""
    with atomic_writer(path, sync=sync) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str, *, sync: bool = True) -> None:
    """Write ``text`` (UTF-8) to ``path`` whole or not at all."""
    atomic_write_bytes(path, text.encode(), sync=sync)


def atomic_write_json(path: str | os.PathLike, value: Any, *, indent: int = 2, sort_keys: bool = False,
                      sync: bool = True) -> None:
    """Write ``value`` as indented JSON plus a final newline to ``path`` whole or not at all."""
    atomic_write_text(path, json.dumps(value, indent=indent, sort_keys=sort_keys) + "\n", sync=sync)


def write_jsonl(path: str | os.PathLike, records: list[dict], *, sync: bool = True) -> None:
    """Write ``records`` as JSON lines (keys sorted) to ``path`` whole or not at all."""
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records), sync=sync)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a JSON-lines file, in order; blank lines skipped, a missing file holds none.

    A line that is not JSON is a ``ValueError`` naming the file and the line number.
    """
    path = Path(path)
    if not path.exists():
        return []
    records = []
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}: line {number} is not JSON ({err.msg})") from err
    return records
