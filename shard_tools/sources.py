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
"""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

VIDEO_SUFFIXES = frozenset({".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v", ".mpg", ".mpeg",
                            ".flv", ".wmv", ".3gp", ".ogv", ".ts"})
KEY_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")
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
    """

    input_id: str
    key: str
    path: str
    label: int
    label_name: str
    dataset: str
    split: str


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

    @property
    def num_inputs(self) -> int:
        return len(self.inputs) + len(self.rejected)


def sanitize_key(text: str) -> str:
    """Map any text to the key charset: every other character (also '.' and '/') becomes '_'."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)


def index_videos_by_stem(root: Path) -> dict[str, list[Path]]:
    """All video files under ``root`` keyed by file name without suffix (one walk, sorted paths)."""
    if not Path(root).is_dir():
        raise ValueError(f"{root}: the video folder does not exist or is not a folder")
    by_stem: dict[str, list[Path]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if path.suffix.lower() in VIDEO_SUFFIXES:
                by_stem.setdefault(path.stem, []).append(path)
    return by_stem


def load_label_map(path: Path) -> dict[str, int]:
    """A label map file: JSON {name: id} or a text file with one class name per line (id = line)."""
    text = Path(path).read_text()
    if Path(path).suffix == ".json":
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


def read_kinetics_csv(csv_path: Path, video_root: Path, *, split: str | None = None,
                      label_map: dict[str, int] | None = None) -> SourceListing:
    """Read an official Kinetics annotation CSV.

    Args:
        csv_path: ``label,youtube_id,time_start,time_end,split[,is_cc]`` with a header row (the test
            CSVs without ``label`` are read as unlabelled).
        video_root: folder with the clips, flat or in class folders.
        split: keep only rows of this split; required when the CSV mixes several splits.
        label_map: fixed name -> id map (so train and val agree); default: sorted CSV labels.
    """
    csv_path, video_root = Path(csv_path), Path(video_root)
    with open(csv_path, newline="") as f:
        rows = list(csv.reader(f))
    header = [h.strip() for h in rows[0]] if rows else []
    required = ("youtube_id", "time_start", "time_end")
    if not all(name in header for name in required) or set(header) - set(KINETICS_COLUMNS) - {"is_cc"}:
        raise ValueError(f"{csv_path}: header {header} is not the Kinetics format "
                         f"{','.join(KINETICS_COLUMNS)}[,is_cc]")
    column = {name: header.index(name) for name in header}

    def cell(row: list[str], name: str) -> str:
        return row[column[name]].strip() if name in column and len(row) == len(header) else ""

    body = [(line_no, row) for line_no, row in enumerate(rows[1:], start=2) if any(c.strip() for c in row)]
    splits = sorted({cell(row, "split") for _, row in body} - {""})
    if split is None:
        if len(splits) > 1:
            raise ValueError(f"{csv_path}: rows of several splits {splits}; choose one with --split")
        split = splits[0] if splits else "train"
    if label_map is None:
        names = sorted({cell(row, "label") for _, row in body} - {""})
        label_map = {name: i for i, name in enumerate(names)}
    listing = SourceListing("kinetics", split, label_map=dict(label_map))
    by_stem = index_videos_by_stem(video_root)
    candidates = []
    for line_no, row in body:
        input_id = f"{csv_path.name}:{line_no}"
        source = f"{csv_path}:{line_no}"
        if cell(row, "split") not in ("", split):
            continue  # another split's row is not an input of this run
        try:
            if len(row) != len(header):
                raise ValueError(f"expected {len(header)} columns ({','.join(header)}), got {len(row)}")
            label_name, youtube_id = cell(row, "label"), cell(row, "youtube_id")
            start, end = _parse_seconds(cell(row, "time_start")), _parse_seconds(cell(row, "time_end"))
            if not KEY_PATTERN.match(youtube_id):
                raise ValueError(f"youtube_id {youtube_id!r} is empty or outside [A-Za-z0-9_-]")
            if end <= start:
                raise ValueError(f"time_end {end} <= time_start {start}")
            if label_name and label_name not in label_map:
                raise ValueError(f"label {label_name!r} is not in the label map")
        except ValueError as err:
            listing.rejected.append(RejectedInput(input_id, None, source, "listing",
                                                  "bad annotation row", str(err)))
            continue
        key = f"{youtube_id}_{start:06d}_{end:06d}"
        paths = by_stem.get(key) or by_stem.get(youtube_id) or []
        # Prefer the file inside the row's class folder (downloaders write either spaces or '_').
        in_class = [p for p in paths if p.parent.name in (label_name, label_name.replace(" ", "_"))]
        path = (in_class or paths or [video_root / f"{key}.mp4"])[0]
        label = label_map[label_name] if label_name else -1
        candidates.append(VideoInput(input_id, key, str(path), label, label_name, "kinetics", split))
    _dedupe(listing, candidates)
    return listing


def ssv2_template_to_label(template: str) -> str:
    """SSv2's convention: the class name is the template with '[' and ']' removed."""
    return template.replace("[", "").replace("]", "")


def read_ssv2(annotation_path: Path, labels_path: Path, video_root: Path, *,
              split: str | None = None) -> SourceListing:
    """Read Something-Something v2 annotations.

    Args:
        annotation_path: ``train.json`` / ``validation.json`` (rows with template) or ``test.json``.
        labels_path: ``labels.json`` mapping class name -> id (ids may be strings).
        video_root: folder with ``{id}.webm``.
        split: split name; default from the annotation file name (``train``, ``validation``...).
    """
    annotation_path, video_root = Path(annotation_path), Path(video_root)
    label_map = load_label_map(Path(labels_path))
    rows = json.loads(annotation_path.read_text())
    if not isinstance(rows, list):
        raise ValueError(f"{annotation_path}: expected a JSON list of {{id, label, template, placeholders}}")
    listing = SourceListing("ssv2", split or annotation_path.stem, label_map=label_map)
    by_stem = index_videos_by_stem(video_root)
    candidates = []
    for index, row in enumerate(rows):
        input_id = f"{annotation_path.name}:{index}"
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
        paths = by_stem.get(video_id) or [video_root / f"{video_id}.webm"]
        candidates.append(VideoInput(input_id, video_id, str(paths[0]), label, label_name, "ssv2",
                                     listing.split))
    _dedupe(listing, candidates)
    return listing


def read_folder(root: Path, *, labelled: bool, split: str = "train",
                label_map: dict[str, int] | None = None) -> SourceListing:
    """A folder of class subfolders (``labelled=True``) or of unlabelled videos.

    Keys are the path relative to ``root`` without suffix, sanitized to ``[A-Za-z0-9_-]``; two
    files that sanitize to the same key are a ``duplicate key``.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: not a folder")
    files = sorted(p for stem_paths in index_videos_by_stem(root).values() for p in stem_paths)
    if labelled:
        files = [p for p in files if p.parent != root]  # loose files have no class
        if label_map is None:
            classes = sorted({p.relative_to(root).parts[0] for p in files})
            label_map = {name: i for i, name in enumerate(classes)}
    listing = SourceListing("folder" if labelled else "unlabelled", split,
                            label_map=dict(label_map or {}))
    candidates = []
    for path in files:
        rel = path.relative_to(root)
        if labelled:
            label_name = rel.parts[0]
            if label_name not in listing.label_map:
                listing.rejected.append(RejectedInput(str(rel), None, str(path), "listing",
                                                      "bad annotation row",
                                                      f"class folder {label_name!r} is not in the label map"))
                continue
            label = listing.label_map[label_name]
        else:
            label_name, label = "", -1
        key = sanitize_key(str(rel.with_suffix("")))
        candidates.append(VideoInput(str(rel), key, str(path), label, label_name, listing.dataset, split))
    _dedupe(listing, candidates)
    return listing
