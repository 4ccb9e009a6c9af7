"""Manifest readers: turn what users have on disk into a sorted list of inputs to shard.

Every reader returns a :class:`SourceListing`: the videos to process (:class:`VideoInput`) plus the
inputs that are already known to be bad (unparseable annotation rows, duplicate keys), which go
straight to the quarantine. ``inputs + rejected`` covers every row / file of the source exactly once,
which is what ``verify`` checks later.

Supported layouts:
- Kinetics-400/600/700 CSV (``label,youtube_id,time_start,time_end,split[,is_cc]``) with videos laid
  out flat (``{youtube_id}_{start:06d}_{end:06d}.mp4``) or in class folders
  (``{label}/{youtube_id}_{start:06d}_{end:06d}.mp4``); any video extension is accepted.
- Something-Something v2: ``labels.json`` (name -> id) plus ``train.json`` / ``validation.json``
  (list of {id, label, template, placeholders}); the label is the template with the brackets
  removed, as the dataset's own code does. ``test.json`` rows (id only) are unlabelled.
- A folder of class subfolders (label = subfolder name, ids in sorted name order).
- A folder of unlabelled videos (label -1).

Keys stay within :data:`MAX_KEY_LENGTH` characters of ``[A-Za-z0-9_-]`` (file names in ``.work``
and tar member names); a longer key, or a folder key that two files share after sanitising
(``clip 1.mp4`` / ``clip_1.mp4``), gets a stable hash suffix of the text it came from, recorded on
the input (and in its sample json as ``key_hash``). Files that are not inputs are never dropped
silently: loose videos in a class-folder layout are quarantined (``not in a class folder``) and
files with an extension outside :data:`VIDEO_SUFFIXES` are counted in ``SourceListing.skipped``
(the manifest lists them). Kinetics / SSv2 rows whose clip exists only under another extension
use that file (the probe then says what it is).

Every location (video root, annotation file, label map) may be a local path or a storage URL
(``s3://bucket/prefix``, ``gs://...``, any listable fsspec URL; :mod:`storage`). A URL video root is
listed once (one recursive listing, not one request per folder) and gives the same keys, input ids,
labels and order as the same files on disk; the inputs' ``path`` is then the object's URL and
``SourceListing.sizes`` holds its size, which bounds the temporary space that fetching takes
(:mod:`shard_tools.fetch`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import storage

VIDEO_SUFFIXES = frozenset({".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v", ".mpg", ".mpeg",
                            ".flv", ".wmv", ".3gp", ".ogv", ".ts", ".mts", ".m2ts", ".vob", ".f4v",
                            ".divx", ".asf", ".y4m", ".gif"})
KEY_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")
# `{key}.{ext}` must fit a POSIX ustar member name (100 bytes) so shards need no PAX long-name
# headers, and `{key}.json.tmp` must fit NAME_MAX (255): 90 characters leave room for any extension.
MAX_KEY_LENGTH = 90
KEY_HASH_CHARS = 12  # 48 bits of sha256: a collision among a million keys has probability ~2e-3 %
MAX_SKIPPED_EXAMPLES = 20
KINETICS_COLUMNS = ("label", "youtube_id", "time_start", "time_end", "split")
DATASET_KINDS = ("kinetics", "ssv2", "folder", "unlabelled")


@dataclass(frozen=True)
class VideoInput:
    """One input video to shard.

    Args:
        input_id: unique id of the input row/file (``train.csv:12``, ``train.json:3``, relative path);
            the invariant "every input exactly once in shards or quarantine" is checked on it.
        key: sample key in the shards, restricted to ``[A-Za-z0-9_-]``.
        path: the video file (may not exist: then it is quarantined as ``missing``).
        label: class id, -1 when unlabelled.
        label_name: class name, "" when unlabelled.
        dataset: ``kinetics`` | ``ssv2`` | ``folder`` | ``unlabelled``.
        split: split name written into the sample's json.
        key_hash: when the key carries a hash suffix: {"of": hashed text, "why": reason}
            (written into the sample json); None for plain keys.
    """

    input_id: str
    key: str
    path: str
    label: int
    label_name: str
    dataset: str
    split: str
    key_hash: dict | None = field(default=None, hash=False)  # a dict is unhashable: equality only


@dataclass(frozen=True)
class RejectedInput:
    """An input that never reaches the encoder (bad annotation row, duplicate key)."""

    input_id: str
    key: str | None
    source: str
    stage: str
    reason: str
    detail: str


@dataclass
class SourceListing:
    """Everything a reader found: videos to process, rejected inputs and the label map."""

    dataset: str
    split: str
    inputs: list[VideoInput] = field(default_factory=list)
    rejected: list[RejectedInput] = field(default_factory=list)
    label_map: dict[str, int] = field(default_factory=dict)
    # Files that are not inputs: under a folder layout, those whose extension is not in VIDEO_SUFFIXES
    # ({"count", "reason", "by_extension", "examples"}); under any layout, "unreadable_folders"
    # (relative paths). Empty when there are none.
    skipped: dict = field(default_factory=dict)
    # URL inputs only: object URL -> bytes (from the listing), what fetching it will take on disk.
    sizes: dict[str, int] = field(default_factory=dict)

    @property
    def num_inputs(self) -> int:
        return len(self.inputs) + len(self.rejected)


def sanitize_key(text: str) -> str:
    """Map any text to the key charset: every other character (also '.' and '/') becomes '_'."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)


def hashed_key(base: str, hashed_text: str) -> str:
    """``base`` cut so that ``{base}_{hash}`` fits :data:`MAX_KEY_LENGTH`; the hash is sha256 of
    ``hashed_text`` (stable across runs and machines)."""
    digest = hashlib.sha256(hashed_text.encode("utf-8", "surrogateescape")).hexdigest()[:KEY_HASH_CHARS]
    return f"{base[:MAX_KEY_LENGTH - KEY_HASH_CHARS - 1]}_{digest}"


def bound_key(key: str, hashed_text: str) -> tuple[str, dict | None]:
    """(key, key_hash record): keys over :data:`MAX_KEY_LENGTH` get a hash suffix of ``hashed_text``."""
    if len(key) <= MAX_KEY_LENGTH:
        return key, None
    return hashed_key(key, hashed_text), {"of": hashed_text,
                                          "why": f"key longer than {MAX_KEY_LENGTH} characters"}


def is_url(location: str | os.PathLike) -> bool:
    """``s3://...``, ``gs://...``, ``https://...``: a location the storage layer reads (a local path otherwise)."""
    return isinstance(location, str) and storage.is_url(location)


def as_location(text: str | os.PathLike) -> str | Path:
    """A URL stays text (``Path`` would fold its ``//``), without a trailing '/'; anything else is a
    local ``Path`` (``file:///x`` too)."""
    if not is_url(text):
        return Path(storage.local_path(text))
    stripped = text.rstrip("/")
    return stripped if not stripped.endswith(":") else text


def location_name(location: str | Path) -> str:
    """The last path component: ``train.csv`` of ``s3://b/k400/train.csv`` or of ``k400/train.csv``."""
    return location.rstrip("/").rsplit("/", 1)[-1] if is_url(location) else Path(location).name


def read_location_text(location: str | Path) -> str:
    """A small text file (annotations, label map) from disk or from a URL."""
    if is_url(location):
        return storage.read_bytes(location).decode("utf-8")
    return Path(location).read_text()


def _walk_files(root: str, unreadable: list[str]):
    """(directory, [file names]) for every folder under ``root``, depth first in sorted order.

    os.scandir with plain strings: one system call per folder and no Path object per file, which
    is what keeps listing half a million files to seconds. Symlinked folders are followed (datasets
    are often assembled from links), each real folder once, so a link cycle ends; a symlink to a file
    is listed like the file (a broken one is quarantined as missing when probed). Folders that
    cannot be read are appended to ``unreadable`` (their files cannot be listed, so callers report
    them); an unreadable ``root`` is an error.
    """
    stack = [root]
    seen: set[tuple[int, int]] = set()
    while stack:
        folder = stack.pop()
        try:
            info = os.stat(folder)
            entries = list(os.scandir(folder))
        except OSError as err:
            if folder == root:
                raise ValueError(f"{root}: cannot list the video folder ({err.strerror or err})") from None
            unreadable.append(folder)
            continue
        if (info.st_dev, info.st_ino) in seen:
            continue
        seen.add((info.st_dev, info.st_ino))
        files, subfolders = [], []
        for entry in entries:
            try:
                is_dir = entry.is_dir()
            except OSError:
                is_dir = False
            (subfolders if is_dir else files).append(entry.name)
        files.sort()
        yield folder, files
        stack.extend(os.path.join(folder, d) for d in sorted(subfolders, reverse=True))


# Files downloaders write next to a clip: never taken for the clip itself.
SIDECAR_SUFFIXES = frozenset({".json", ".txt", ".description", ".part", ".ytdl", ".jpg", ".jpeg",
                              ".png", ".webp", ".srt", ".vtt", ".log", ".csv"})


def _not_sidecars(paths: list[str] | None) -> list[str]:
    return [p for p in paths or () if _suffix(os.path.basename(p)) not in SIDECAR_SUFFIXES]


def _suffix(name: str) -> str:
    dot = name.rfind(".")
    return name[dot:].lower() if dot > 0 else ""


def _walk_url(root: str, sizes: dict[str, int]):
    """:func:`_walk_files` for a URL prefix: one recursive listing, regrouped into (folder URL, [file
    names]) in the local walk's order (a folder's files sorted, then its subfolders depth first in
    sorted order), so a bucket and a local copy give the same inputs in the same order. Fills
    ``sizes`` (URL -> bytes)."""
    listed = storage.default_storage().list_tree(root)
    if not listed:
        raise ValueError(f"{root}: no files under this URL (is the prefix right?)")

    def walk_order(rel: str) -> tuple:
        *folders, name = rel.split("/")
        return tuple((1, f) for f in folders) + ((0, name),)

    current, names = None, []
    for rel, size in sorted(listed.items(), key=lambda item: walk_order(item[0])):
        folder, _, name = rel.rpartition("/")
        if folder != current:
            if names:
                yield _join(root, current), names
            current, names = folder, []
        names.append(name)
        sizes[_join(root, rel)] = size
    if names:
        yield _join(root, current), names


def _join(root: str, rel: str) -> str:
    return f"{root}/{rel}" if rel else root


def _relative(path: str, root: str) -> str:
    """``path`` relative to ``root`` with '/' separators (a URL or a local path under ``root``)."""
    if is_url(root):
        return path[len(root) + 1:]
    return os.path.relpath(path, root)


def index_files_by_stem(root: str | Path, sizes: dict[str, int] | None = None
                        ) -> tuple[dict[str, list[str]], dict[str, list[str]], list[str]]:
    """One walk of ``root`` (a folder or a URL prefix): (video files by stem, other files by stem,
    folders that could not be read), paths as sorted strings (URLs under a URL root, whose sizes go
    into ``sizes``)."""
    videos: dict[str, list[str]] = {}
    others: dict[str, list[str]] = {}
    unreadable: list[str] = []
    if is_url(root):
        walk = _walk_url(str(as_location(root)), {} if sizes is None else sizes)
    else:
        if not Path(root).is_dir():
            raise ValueError(f"{root}: the video folder does not exist or is not a folder")
        walk = _walk_files(str(root), unreadable)
    for folder, names in walk:
        for name in names:
            suffix = _suffix(name)
            stem = name[:len(name) - len(suffix)] if suffix else name
            (videos if suffix in VIDEO_SUFFIXES else others).setdefault(stem, []).append(
                _join(folder, name) if is_url(folder) else os.path.join(folder, name))
    return videos, others, unreadable


def _skipped_summary(root: str | Path, paths: list[str], unreadable_folders: list[str]) -> dict:
    """What the manifest says about files that are not inputs: under a folder layout, files with an
    unlisted extension; under any layout, folders that could not be read."""
    summary: dict = {}
    if paths:
        by_extension = Counter(_suffix(os.path.basename(p)) or "(none)" for p in paths)
        summary.update({"count": len(paths), "reason": f"extension not one of {' '.join(sorted(VIDEO_SUFFIXES))}",
                        "by_extension": dict(sorted(by_extension.items())),
                        "examples": [_relative(p, str(root)) for p in sorted(paths)[:MAX_SKIPPED_EXAMPLES]]})
    if unreadable_folders:
        summary["unreadable_folders"] = sorted(os.path.relpath(p, root) for p in unreadable_folders)
    return summary


def load_label_map(path: str | Path) -> dict[str, int]:
    """A label map file (path or URL): JSON {name: id} or a text file with one class name per line
    (id = line)."""
    path = as_location(path)
    text = read_location_text(path)
    if location_name(path).endswith(".json"):
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: label map JSON must be an object name -> id")
        return {str(k): int(v) for k, v in raw.items()}
    names = [line.strip() for line in text.splitlines() if line.strip()]
    return {name: i for i, name in enumerate(names)}


def _dedupe(listing: SourceListing, candidates: list[VideoInput]) -> None:
    """Keep the first input per key (in source order); later ones are quarantined as duplicates."""
    first_by_key: dict[str, VideoInput] = {}
    for item in candidates:
        if item.key in first_by_key:
            listing.rejected.append(RejectedInput(
                item.input_id, item.key, item.path, "listing", "duplicate key",
                f"key {item.key!r} already used by {first_by_key[item.key].input_id}"))
            continue
        first_by_key[item.key] = item
        listing.inputs.append(item)
    listing.inputs.sort(key=lambda v: v.key)


def _parse_seconds(text: str) -> int:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"time {text!r} is not a number of seconds") from None
    if not value.is_integer() or value < 0:
        raise ValueError(f"time {text!r} is not a non-negative whole number of seconds")
    return int(value)


def read_kinetics_csv(csv_path: str | Path, video_root: str | Path, *, split: str | None = None,
                      label_map: dict[str, int] | None = None) -> SourceListing:
    """Read an official Kinetics annotation CSV.

    Args:
        csv_path: ``label,youtube_id,time_start,time_end,split[,is_cc]`` with a header row (the test
            CSVs without ``label`` are read as unlabelled).
        video_root: folder with the clips, flat or in class folders.
        split: keep only rows of this split; required when the CSV mixes several splits.
        label_map: fixed name -> id map (so train and val agree); default: sorted CSV labels.
    Either location may be a URL (the CSV is read whole; the videos are listed once).
    """
    csv_path, video_root = as_location(csv_path), as_location(video_root)
    if is_url(csv_path):
        rows = list(csv.reader(io.StringIO(read_location_text(csv_path), newline="")))
    else:
        with open(csv_path, newline="") as f:
            rows = list(csv.reader(f))
    header = [h.strip() for h in rows[0]] if rows else []
    required = ("youtube_id", "time_start", "time_end")
    if not all(name in header for name in required) or set(header) - set(KINETICS_COLUMNS) - {"is_cc"}:
        raise ValueError(f"{csv_path}: header {header} is not the Kinetics format "
                         f"{','.join(KINETICS_COLUMNS)}[,is_cc]")
    width = len(header)
    columns = [header.index(name) if name in header else None
               for name in ("label", "youtube_id", "time_start", "time_end", "split")]

    def cells(row: list[str]) -> tuple[str, ...]:
        """(label, youtube_id, time_start, time_end, split), stripped; "" when absent or malformed."""
        if len(row) != width:
            return ("",) * 5
        return tuple(row[c].strip() if c is not None else "" for c in columns)

    body = [(line_no, row, cells(row)) for line_no, row in enumerate(rows[1:], start=2)
            if any(c.strip() for c in row)]
    del rows
    splits = sorted({c[4] for _, _, c in body} - {""})
    if split is None:
        if len(splits) > 1:
            raise ValueError(f"{csv_path}: rows of several splits {splits}; choose one with --split")
        split = splits[0] if splits else "train"
    if label_map is None:
        names = sorted({c[0] for _, _, c in body} - {""})
        label_map = {name: i for i, name in enumerate(names)}
    listing = SourceListing("kinetics", split, label_map=dict(label_map))
    by_stem, other_by_stem, unreadable = index_files_by_stem(video_root, listing.sizes)
    listing.skipped = _skipped_summary(video_root, [], unreadable)
    root_text, csv_name, csv_text = str(video_root), location_name(csv_path), str(csv_path)
    candidates = []
    for line_no, row, (label_name, youtube_id, start_text, end_text, row_split) in body:
        if row_split not in ("", split):
            continue  # another split's row is not an input of this run
        input_id = f"{csv_name}:{line_no}"
        try:
            if len(row) != width:
                raise ValueError(f"expected {width} columns ({','.join(header)}), got {len(row)}")
            start, end = _parse_seconds(start_text), _parse_seconds(end_text)
            if not KEY_PATTERN.match(youtube_id):
                raise ValueError(f"youtube_id {youtube_id!r} is empty or outside [A-Za-z0-9_-]")
            if end <= start:
                raise ValueError(f"time_end {end} <= time_start {start}")
            if label_name and label_name not in label_map:
                raise ValueError(f"label {label_name!r} is not in the label map")
        except ValueError as err:
            listing.rejected.append(RejectedInput(input_id, None, f"{csv_text}:{line_no}", "listing",
                                                  "bad annotation row", str(err)))
            continue
        stem = f"{youtube_id}_{start:06d}_{end:06d}"
        # A clip saved under an unlisted extension is still this row's input (the probe judges it).
        paths = by_stem.get(stem) or by_stem.get(youtube_id) or _not_sidecars(other_by_stem.get(stem))
        if len(paths) > 1:  # prefer the file inside the row's class folder (spaces or '_')
            in_class = [p for p in paths
                        if os.path.basename(os.path.dirname(p)) in (label_name, label_name.replace(" ", "_"))]
            paths = in_class or paths
        path = paths[0] if paths else _missing_path(root_text, stem + ".mp4")
        label = label_map[label_name] if label_name else -1
        key, key_hash = bound_key(stem, stem)
        candidates.append(VideoInput(input_id, key, path, label, label_name, "kinetics", split, key_hash))
    _dedupe(listing, candidates)
    return listing


def _missing_path(root_text: str, name: str) -> str:
    """Where a row's clip would be (it is not there: the probe quarantines it as ``missing``)."""
    return _join(root_text, name) if is_url(root_text) else os.path.join(root_text, name)


def ssv2_template_to_label(template: str) -> str:
    """SSv2's convention: the class name is the template with '[' and ']' removed."""
    return template.replace("[", "").replace("]", "")


def read_ssv2(annotation_path: str | Path, labels_path: str | Path, video_root: str | Path, *,
              split: str | None = None) -> SourceListing:
    """Read Something-Something v2 annotations.

    Args:
        annotation_path: ``train.json`` / ``validation.json`` (rows with template) or ``test.json``.
        labels_path: ``labels.json`` mapping class name -> id (ids may be strings).
        video_root: folder with ``{id}.webm``.
        split: split name; default from the annotation file name (``train``, ``validation``...).
    Any of the three locations may be a URL.
    """
    annotation_path, video_root = as_location(annotation_path), as_location(video_root)
    label_map = load_label_map(labels_path)
    rows = json.loads(read_location_text(annotation_path))
    if not isinstance(rows, list):
        raise ValueError(f"{annotation_path}: expected a JSON list of {{id, label, template, placeholders}}")
    annotation_name = location_name(annotation_path)
    listing = SourceListing("ssv2", split or Path(annotation_name).stem, label_map=label_map)
    by_stem, other_by_stem, unreadable = index_files_by_stem(video_root, listing.sizes)
    listing.skipped = _skipped_summary(video_root, [], unreadable)
    root_text = str(video_root)
    candidates = []
    for index, row in enumerate(rows):
        input_id = f"{annotation_name}:{index}"
        source = f"{annotation_path}:{index}"
        try:
            if not isinstance(row, dict) or "id" not in row:
                raise ValueError("row is not an object with an 'id'")
            video_id = str(row["id"]).strip()
            if not KEY_PATTERN.match(video_id):
                raise ValueError(f"id {video_id!r} is empty or outside [A-Za-z0-9_-]")
            if "template" in row:
                label_name = ssv2_template_to_label(str(row["template"]))
                if label_name not in label_map:
                    raise ValueError(f"template {row['template']!r} -> {label_name!r} is not in {labels_path}")
                label = label_map[label_name]
            else:
                label_name, label = "", -1
        except ValueError as err:
            listing.rejected.append(RejectedInput(input_id, None, source, "listing",
                                                  "bad annotation row", str(err)))
            continue
        paths = (by_stem.get(video_id) or _not_sidecars(other_by_stem.get(video_id))
                 or [_missing_path(root_text, f"{video_id}.webm")])
        key, key_hash = bound_key(video_id, video_id)
        candidates.append(VideoInput(input_id, key, paths[0], label, label_name, "ssv2", listing.split,
                                     key_hash))
    _dedupe(listing, candidates)
    return listing


def read_folder(root: str | Path, *, labelled: bool, split: str = "train",
                label_map: dict[str, int] | None = None) -> SourceListing:
    """A folder of class subfolders (``labelled=True``) or of unlabelled videos.

    Keys are the path relative to ``root`` without suffix, sanitized to ``[A-Za-z0-9_-]``. Files
    whose keys coincide after sanitising (``clip 1.mp4`` / ``clip_1.mp4`` / ``clip_1.webm``) each get
    a hash suffix of their relative path, so every file stays an input under a key that depends
    only on its own path. Video files directly in ``root`` of a class layout are quarantined as
    ``not in a class folder``; files with other extensions are counted in ``listing.skipped``.
    ``root`` may be a URL prefix (its objects are the files).
    """
    root = as_location(root)
    if not is_url(root) and not root.is_dir():
        raise ValueError(f"{root}: not a folder")
    listing = SourceListing("folder" if labelled else "unlabelled", split)
    videos, others, unreadable = index_files_by_stem(root, listing.sizes)
    root_text = str(root)
    files = sorted(p for paths in videos.values() for p in paths)
    loose: list[str] = []
    if labelled:
        loose = [p for p in files if os.path.dirname(p) == root_text]
        files = [p for p in files if os.path.dirname(p) != root_text]
        if label_map is None:
            classes = sorted({_relative(p, root_text).split(os.sep)[0] for p in files})
            label_map = {name: i for i, name in enumerate(classes)}
    listing.label_map = dict(label_map or {})
    listing.skipped = _skipped_summary(root, [p for paths in others.values() for p in paths], unreadable)
    for path in loose:
        rel = _relative(path, root_text)
        listing.rejected.append(RejectedInput(rel, None, path, "listing", "not in a class folder",
                                              f"{path}: a class-folder layout takes its label from the "
                                              f"subfolder; this video is directly in {root}"))
    candidates = []
    for path in files:
        rel = Path(_relative(path, root_text)).as_posix()
        if labelled:
            label_name = rel.split("/")[0]
            if label_name not in listing.label_map:
                listing.rejected.append(RejectedInput(rel, None, path, "listing", "bad annotation row",
                                                      f"class folder {label_name!r} is not in the label map"))
                continue
            label = listing.label_map[label_name]
        else:
            label_name, label = "", -1
        key, key_hash = bound_key(sanitize_key(rel[:len(rel) - len(_suffix(rel))]), rel)
        candidates.append(VideoInput(rel, key, path, label, label_name, listing.dataset, split, key_hash))
    _dedupe(listing, _disambiguate(candidates))
    return listing


def _disambiguate(candidates: list[VideoInput]) -> list[VideoInput]:
    """Every input of a group that shares a key gets ``{key}_{hash of its relative path}``."""
    count = Counter(item.key for item in candidates)
    out = []
    for item in candidates:
        if count[item.key] > 1:
            others = count[item.key] - 1
            item = VideoInput(item.input_id, hashed_key(item.key, item.input_id), item.path, item.label,
                              item.label_name, item.dataset, item.split,
                              {"of": item.input_id, "why": f"key {item.key!r} is shared by {others} other "
                                                           f"file(s) after sanitising"})
        out.append(item)
    return out
