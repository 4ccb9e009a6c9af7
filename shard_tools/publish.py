"""Where finished shards go: the output folder itself, or a bucket they are uploaded to.

:class:`FolderOutput` (``--out`` a local folder): shards are written in place; the manifest in the
folder marks a finished job.

:class:`BucketOutput` (``--out s3://bucket/prefix``, any storage URL): shards are built in a local
work folder, and each finished tar + ``.idx`` is uploaded (the storage layer retries transient
failures), confirmed, journaled, then deleted from the work folder, so the work folder holds about
one shard besides the encoded videos of shards not yet built. ``quarantine.jsonl`` and then
``manifest.json`` are uploaded last: a reader that finds the manifest finds every shard it lists,
and never sees a partial shard (objects appear whole).

Resume (``kill -9`` at any point, same command again): ``WORK/.work/uploads.jsonl`` has one line per
confirmed upload (shard name, a hash of its keys, the tar's and the index's sizes), appended and
fsynced only after both objects were read back with the right size. A shard with a line whose objects are still in the bucket is done: its inputs
are not processed again and its local files, if a kill left them, are deleted. A shard uploaded but
killed before its line is written is still in the work folder (local files are deleted only after
the line) and is uploaded again, not rebuilt.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import storage

from shard_tools.format import MANIFEST_NAME, QUARANTINE_NAME, Manifest, read_manifest
from shard_tools.journal import append_synced_line, read_complete_lines

UPLOADS_NAME = "uploads.jsonl"


def uploaded_objects(url: str) -> dict[str, int]:
    """Objects directly under an output prefix: name -> bytes (empty for a new prefix). Also the
    start-up check of a URL ``--out``: a missing bucket, missing credentials or a denied listing
    raise ``storage.StorageAccessError`` (one line naming the URL, exit 2) before any work."""
    try:
        return storage.default_storage().list_files(url.rstrip("/"))
    except storage.StorageAccessError as err:
        if err.reason != "missing":
            raise
        return {}


def keys_digest(keys: list[str]) -> str:
    """What identifies a shard's content in the uploads journal (the plan fixes its keys)."""
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()


class FolderOutput:
    """Shards stay in the output folder where they are written."""

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)

    def finished(self, fingerprint: str, *, resumable: bool) -> Manifest | None:
        """The folder's manifest if it is a complete job with this fingerprint; None to (re)run."""
        manifest_path = self.out_dir / MANIFEST_NAME
        if not manifest_path.exists():
            return None
        manifest = read_manifest(self.out_dir)
        if manifest.job_fingerprint != fingerprint:
            raise ValueError(f"{self.out_dir} already holds a finished job with other arguments or inputs; "
                             "write to a new folder")
        missing = [s.path for s in manifest.shards
                   if not (self.out_dir / s.path).exists() or not (self.out_dir / s.idx_path).exists()]
        if not missing:
            return manifest
        if not resumable:
            raise ValueError(f"{self.out_dir}: shards {missing[:3]} are gone and .work was deleted; "
                             "rerun into a new folder")
        manifest_path.unlink()
        return None

    def published_bytes(self, tar_name: str, keys: list[str]) -> int | None:
        """Shards in a folder are judged by the files themselves (the writer checks them)."""
        return None

    def publish_shard(self, tar_path: Path, idx_path: Path, keys: list[str]) -> int:
        return tar_path.stat().st_size

    def publish_final(self) -> None:
        """quarantine.jsonl and manifest.json are already in place."""

    def cleanup(self, work_dir: Path) -> None:
        shutil.rmtree(work_dir)

    def describe(self) -> str:
        return str(self.out_dir)


class BucketOutput:
    """Shards built in ``work_folder`` and uploaded to ``url`` (see the module docstring).

    Args:
        url: the output prefix (``s3://bucket/prefix``).
        work_folder: the local folder shards are built in (``--work-dir``); its ``.work`` holds the
            job's journals.
    """

    def __init__(self, url: str, work_folder: Path):
        self.url = url.rstrip("/")
        self.work_folder = Path(work_folder)
        self.journal_path = self.work_folder / ".work" / UPLOADS_NAME
        self.store = storage.default_storage()
        self.remote = uploaded_objects(self.url)  # listed once when the job starts
        self.uploads = {line["shard"]: line for line in read_complete_lines(self.journal_path)}

    def _object(self, name: str) -> str:
        return f"{self.url}/{name}"

    def finished(self, fingerprint: str, *, resumable: bool) -> Manifest | None:
        """The bucket's manifest if it is a complete job with this fingerprint; None to (re)run."""
        for leftover in (MANIFEST_NAME, QUARANTINE_NAME):  # a kill before their upload: rewritten
            (self.work_folder / leftover).unlink(missing_ok=True)
        if MANIFEST_NAME not in self.remote:
            return None
        manifest = read_manifest(self.url, self.store)
        if manifest.job_fingerprint != fingerprint:
            raise ValueError(f"{self.url} already holds a finished job with other arguments or inputs; "
                             "write to a new prefix")
        missing = [s.path for s in manifest.shards
                   if self.remote.get(s.path) != s.bytes or s.idx_path not in self.remote]
        if not missing:
            return manifest
        if not resumable:
            raise ValueError(f"{self.url}: shards {missing[:3]} are gone and the work folder "
                             f"{self.work_folder} holds no journal; rerun into a new prefix")
        self.store.remove(self._object(MANIFEST_NAME))  # not complete any more: readers must not trust it
        del self.remote[MANIFEST_NAME]
        return None

    def published_bytes(self, tar_name: str, keys: list[str]) -> int | None:
        """The tar's size if this shard (with these keys) is uploaded and still in the bucket."""
        line = self.uploads.get(tar_name)
        idx_name = line["idx"] if line else None
        if (line is None or line["keys"] != keys_digest(keys) or self.remote.get(tar_name) != line["bytes"]
                or self.remote.get(idx_name) != line["idx_bytes"]):
            return None
        for name in (tar_name, idx_name):  # a kill between the journal line and the deletion
            (self.work_folder / name).unlink(missing_ok=True)
        return line["bytes"]

    def publish_shard(self, tar_path: Path, idx_path: Path, keys: list[str]) -> int:
        """Upload the index, then the tar; confirm both; journal; delete them locally. Returns the
        tar's size."""
        sizes = {}
        for path in (idx_path, tar_path):
            sizes[path.name] = self._upload(path)
        line = {"shard": tar_path.name, "keys": keys_digest(keys), "bytes": sizes[tar_path.name],
                "idx": idx_path.name, "idx_bytes": sizes[idx_path.name]}
        append_synced_line(self.journal_path, line)
        self.uploads[tar_path.name] = line
        tar_path.unlink()
        idx_path.unlink()
        return line["bytes"]

    def publish_final(self) -> None:
        """quarantine.jsonl, then manifest.json: the manifest is the last object written."""
        for name in (QUARANTINE_NAME, MANIFEST_NAME):
            self._upload(self.work_folder / name)

    def _upload(self, path: Path) -> int:
        """Upload one file (the storage layer retries transient failures, re-sending it whole) and
        confirm the stored object's size (the S3 driver also sends a checksum the store verifies)."""
        size = path.stat().st_size
        where = self._object(path.name)
        self.store.put_file(path, where)
        stored = self.store.size(where)
        if stored != size:
            raise OSError(f"{where}: uploaded {size} bytes of {path}, the store holds {stored}")
        self.remote[path.name] = size
        return size

    def cleanup(self, work_dir: Path) -> None:
        """The job is complete: drop the journals and the local manifest / quarantine copies."""
        shutil.rmtree(work_dir, ignore_errors=True)
        for name in (MANIFEST_NAME, QUARANTINE_NAME):
            (self.work_folder / name).unlink(missing_ok=True)
        try:
            self.work_folder.rmdir()  # only when nothing else was in it
        except OSError:
            pass

    def describe(self) -> str:
        return self.url


def default_work_folder(url: str) -> Path:
    """Where a URL ``--out`` is built when ``--work-dir`` is not given: one folder per output URL
    under ``$XDG_CACHE_HOME/shard_tools/work`` (``~/.cache/...``), so rerunning the same command
    finds its journals again."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    readable = "".join(c if c.isalnum() or c in "-_." else "_" for c in url.split("://", 1)[-1])[:80]
    return cache / "shard_tools" / "work" / f"{readable}-{hashlib.sha256(url.encode()).hexdigest()[:12]}"
