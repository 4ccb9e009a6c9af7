"""The shard format, in one place: file names, the manifest, tar member names and the DALI index.

A shard folder holds ``{name}-{split}-{shard:06d}.tar`` shards, one DALI index ``{same}.idx`` beside
each, ``manifest.json`` (:class:`Manifest`) and ``quarantine.jsonl`` (docs/design.md section 1).
Everything that writes or reads these goes through this module: the sharding job writes the
manifest with :func:`write_manifest`; the loaders, ``evaluate.py`` and ``verify`` / ``stats`` read
it with :func:`read_manifest`. Shard paths come from the manifest only (count-sized shards are
fixed seeded groups, so shard numbers can skip), relative to the manifest's folder.

Standard library only (plus ``common``'s strict loader and atomic writes and ``storage``'s reads of
a shard folder at a URL, whose drivers load only when a URL is read): Ray ships ``shard_tools``,
``common`` and ``storage`` to its workers, and ``pipelines`` imports
this module without pulling torch or DALI in (webdataset imports torch, so its key split is
restated here and a test pins it to webdataset's).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.atomic_io import atomic_write_bytes, atomic_write_json
from common.typed_config import ConfigError, dataclass_from_dict
from storage import StorageAccessError, default_storage, is_url, join

MANIFEST_NAME = "manifest.json"
QUARANTINE_NAME = "quarantine.jsonl"
TAR_SUFFIX = ".tar"
INDEX_SUFFIX = ".idx"
# The index version DALI's ``wds2idx`` writes and ``fn.readers.webdataset`` reads.
DALI_INDEX_VERSION = "v1.2"
VIDEO_EXTENSIONS = ("webm", "mp4")
CODECS = ("vp9", "h264")


class ManifestError(ValueError):
    """A manifest (or the shard files it lists) is missing or does not fit the format."""


# ---------------------------------------------------------------- file and member names
def shard_file_name(name: str, split: str, index: int) -> str:
    """``{name}-{split}-{index:06d}.tar``."""
    return f"{name}-{split}-{index:06d}{TAR_SUFFIX}"


def index_file_name(tar_name: str) -> str:
    """The DALI index beside a shard: ``x.tar`` -> ``x.idx``."""
    if not tar_name.endswith(TAR_SUFFIX):
        raise ValueError(f"{tar_name}: a shard name ends in {TAR_SUFFIX}")
    return tar_name[:-len(TAR_SUFFIX)] + INDEX_SUFFIX


# webdataset.tariterators.base_plus_ext: the key is everything before the first dot of the last
# path component, the extension everything after it (so keys must not hold a dot).
_BASE_PLUS_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def split_member_name(name: str) -> tuple[str | None, str | None]:
    """A tar member name -> (sample key, extension) as webdataset groups samples;
    ``(None, None)`` for a name webdataset skips (no dot in its last component, or a leading dot)."""
    match = _BASE_PLUS_EXT.match(name)
    if not match:
        return None, None
    return match.group(1), match.group(2)


def members_by_sample(archive: tarfile.TarFile) -> Iterator[tuple[str, list[tuple[str, tarfile.TarInfo]]]]:
    """``(key, [(extension, member), ...])`` per sample of an open shard, in order, grouped as webdataset
    groups them (:func:`split_member_name`)."""
    key, group = None, []
    for member in archive:
        if not member.isreg():
            continue
        member_key, ext = split_member_name(member.name)
        if member_key is None:
            continue
        if member_key != key:
            if group:
                yield key, group
            key, group = member_key, []
        group.append((ext, member))
    if group:
        yield key, group


def _dali_split_name(name: str) -> tuple[str, str]:
    """wds2idx's ``IndexCreator.split_name`` (DALI 2.x), kept verbatim so the index bytes match
    DALI's own; on every name a shard holds (keys ``[A-Za-z0-9_-]``) it equals :func:`split_member_name`."""
    dot = name.find(".", name.rfind("/") + 1)
    return name[:dot], name[dot + 1:]


# ---------------------------------------------------------------- manifest
@dataclass
class ShardSize:
    """A shard closes at whichever limit is hit first (samples, estimated tar bytes)."""

    max_samples: int | None
    max_bytes: int | None


@dataclass
class ShardEntry:
    """One shard: paths relative to the manifest's folder, its samples in tar order."""

    path: str
    idx_path: str
    num_samples: int
    bytes: int
    keys: list[str]
    sources: list[str]
    num_frames: int


@dataclass
class Totals:
    inputs: int
    samples: int
    quarantined: int
    shards: int
    frames: int
    bytes: int


@dataclass
class QuarantineSummary:
    """Where the quarantine lines are (relative to the folder) and how many per reason."""

    path: str
    by_reason: dict[str, int]


@dataclass
class Manifest:
    """``manifest.json``: what the job wrote and how (key order = the file's).

    Args:
        tool_version: ``shard_tools.__version__`` of the writer.
        name, dataset, split: shard name prefix, source dataset kind, split.
        codec, container, extension: ``vp9``/``webm``/``webm`` or ``h264``/``mp4``/``mp4``.
        encode: the encode settings (``shard_tools.encode.EncodeSettings.to_dict()``).
        seed: the seed that shuffled samples across shards.
        shard_size: the shard limits.
        label_map: class name -> label id (empty for unlabelled data).
        shards: every shard, in order (numbers can skip: take names from here, never guess them).
        totals: inputs = samples + quarantined; shards, frames and bytes summed over ``shards``.
        quarantine: the quarantine file and counts per reason.
        source: how the inputs were listed (``kind``, ``annotations``, ``labels``, ``videos``,
            ``split``, ``label_map``, and ``skipped_files`` when files were not inputs), so
            ``verify`` can list them again; empty for jobs run from the API without one.
        job_fingerprint: sha256 of everything that determines the output bytes (resume check).
    """

    tool_version: str
    name: str
    dataset: str
    split: str
    codec: str
    container: str
    extension: str
    encode: dict[str, Any]
    seed: int
    shard_size: ShardSize
    label_map: dict[str, int]
    shards: list[ShardEntry]
    totals: Totals
    quarantine: QuarantineSummary
    source: dict[str, Any]
    job_fingerprint: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str = MANIFEST_NAME) -> Manifest:
        """Strict (``common.typed_config``): unknown or missing keys and values of the wrong type are
        errors naming ``where`` and the dotted field."""
        if not isinstance(data, dict):
            raise ManifestError(f"{where}: the manifest must be a JSON object, got {type(data).__name__}")
        try:
            manifest = dataclass_from_dict(cls, data, "")
        except ConfigError as err:
            raise ManifestError(f"{where}: {err}") from err
        manifest.check(where)
        return manifest

    def check(self, where: str = MANIFEST_NAME) -> None:
        """What the types alone do not say; raises :class:`ManifestError` naming ``where``."""
        if self.codec not in CODECS:
            raise ManifestError(f"{where}: codec {self.codec!r} is not one of {' | '.join(CODECS)}")
        for i, shard in enumerate(self.shards):
            for name in ("path", "idx_path"):
                value = getattr(shard, name)
                if not value or os.path.isabs(value) or ".." in Path(value).parts:
                    raise ManifestError(f"{where}: shards[{i}].{name} {value!r} must be a path relative to "
                                        "the manifest's folder")
            if not (shard.num_samples == len(shard.keys) == len(shard.sources)) or shard.num_samples < 1:
                raise ManifestError(f"{where}: shards[{i}] ({shard.path}): num_samples {shard.num_samples}, "
                                    f"{len(shard.keys)} keys and {len(shard.sources)} sources must agree (>= 1)")
        # Totals against the shard list and the quarantine are ``verify``'s checks (it reports them
        # all rather than stopping at the first).

    def shard_files(self, folder: str | os.PathLike, *, must_exist: bool = True) -> list[tuple[Path, Path]]:
        """``(tar, idx)`` of every shard, under ``folder`` (the manifest's). With ``must_exist``, a
        listed file that is missing is an error naming the manifest and the file."""
        folder = Path(folder)
        files = [(folder / s.path, folder / s.idx_path) for s in self.shards]
        if must_exist:
            for pair in files:
                for p in pair:
                    if not p.is_file():
                        raise FileNotFoundError(f"{folder / MANIFEST_NAME}: lists {p}, which does not exist")
        return files


    def shard_locations(self, folder: str | os.PathLike) -> list[tuple[str, str]]:
        """``(tar, idx)`` of every shard as locations under ``folder``, a local path or a URL
        (``storage.locations``); nothing is checked (``pipelines.shard_index`` checks them in one listing)."""
        return [(join(folder, s.path), join(folder, s.idx_path)) for s in self.shards]


def read_manifest(folder: str | os.PathLike, store=None) -> Manifest:
    """``folder/manifest.json`` as a :class:`Manifest`; errors name the file and what is wrong.

    ``folder`` may be a URL (``s3://bucket/prefix``, ``https://host/prefix``): the manifest is then
    read through ``store`` (a ``storage.Storage``; the process's default if None), and a missing
    bucket, missing credentials or a denied read is one ``StorageAccessError`` naming the URL.
    """
    if is_url(folder):
        path = join(folder, MANIFEST_NAME)
        try:
            raw = (store or default_storage()).read_bytes(path)
        except StorageAccessError as err:
            if err.reason != "missing":
                raise
            raise StorageAccessError(f"{path}: no manifest; is {folder} a shard folder written by "
                                     "`python -m shard_tools` (and did the job finish)?", reason="missing") from err
    else:
        path = Path(folder) / MANIFEST_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no manifest; is {folder} a shard folder written by "
                                    "`python -m shard_tools` (and did the job finish)?")
        raw = path.read_bytes()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ManifestError(f"{path}: not valid JSON ({err})") from err
    return Manifest.from_dict(data, str(path))


def write_manifest(folder: str | os.PathLike, manifest: Manifest, *, sync: bool = True) -> Path:
    """Write ``folder/manifest.json`` atomically (the manifest marks a finished job); return its path."""
    manifest.check(str(Path(folder) / MANIFEST_NAME))
    path = Path(folder) / MANIFEST_NAME
    atomic_write_json(path, manifest.to_dict(), indent=1, sync=sync)
    return path


# ---------------------------------------------------------------- DALI index
@dataclass(frozen=True)
class IndexMember:
    """One member of a sample in a DALI index line: ``ext offset size name`` (offset of its data)."""

    ext: str
    offset: int
    size: int
    name: str


def write_dali_index(tar_path: str | os.PathLike, idx_path: str | os.PathLike, *, sync: bool = True) -> None:
    """Write the index DALI's ``fn.readers.webdataset`` reads (:func:`dali_index_bytes`) atomically."""
    atomic_write_bytes(Path(idx_path), dali_index_bytes(tar_path), sync=sync)


def dali_index_bytes(tar_path: str | os.PathLike) -> bytes:
    """The index DALI's ``fn.readers.webdataset`` reads for a shard, in ``wds2idx``'s v1.2 format.

    One line per sample: ``ext offset size name`` for each member, offsets of the member data.
    Byte-identical to DALI's ``wds2idx`` (a test compares them), without spawning ``tar`` twice.
    """
    samples: list[list[IndexMember]] = []
    last_base = None
    with tarfile.open(tar_path, "r:") as archive:
        for member in archive:
            if not member.isreg():
                continue
            base, ext = _dali_split_name(member.name)
            if not base or base.endswith("/"):
                continue
            component = IndexMember(ext, member.offset_data, member.size, member.name)
            if base != last_base:
                samples.append([component])
                last_base = base
            else:
                samples[-1].append(component)
    if not samples:
        raise ValueError(f"{tar_path}: empty shard, nothing to index")
    lines = [f"{DALI_INDEX_VERSION} {len(samples)}"]
    lines += [" ".join(f"{c.ext} {c.offset} {c.size} {c.name}" for c in sample) for sample in samples]
    return ("\n".join(lines) + "\n").encode()


def read_dali_index(idx_path: str | os.PathLike, store=None) -> list[list[IndexMember]]:
    """Every sample of a DALI index (its members in tar order); errors name the index file. A URL is
    read through ``store`` (as :func:`read_manifest`)."""
    if is_url(idx_path):
        raw = (store or default_storage()).read_bytes(os.fspath(idx_path))
        try:
            lines = raw.decode().splitlines()
        except UnicodeDecodeError as err:
            raise ManifestError(f"{idx_path}: not a DALI webdataset index ({err})") from err
    else:
        with open(idx_path) as fh:
            lines = fh.read().splitlines()
    header = lines[0].split() if lines else []
    if len(header) != 2 or not header[0].startswith("v") or not header[1].isdigit():
        raise ManifestError(f"{idx_path}: not a DALI webdataset index (first line {lines[:1]})")
    samples = []
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split()
        if not fields:
            continue
        if len(fields) % 4:
            raise ManifestError(f"{idx_path}: line {number} is not groups of 'ext offset size name'")
        try:
            samples.append([IndexMember(fields[i], int(fields[i + 1]), int(fields[i + 2]), fields[i + 3])
                            for i in range(0, len(fields), 4)])
        except ValueError as err:
            raise ManifestError(f"{idx_path}: line {number}: {err}") from err
    if len(samples) != int(header[1]):
        raise ManifestError(f"{idx_path}: the header announces {header[1]} samples, {len(samples)} lines follow")
    return samples
