"""``python -m shard_tools verify OUT``: re-read every shard and check the shard contract.

Checks (docs/design.md section 1):
- every shard and its ``.idx`` exist; the index is exactly what DALI's ``wds2idx`` format gives;
- each shard holds exactly the manifest's keys, in order, each with video + ``.json`` + ``.cls``,
  the json's key/label agreeing with the member names and ``.cls``;
- counts agree: per shard, totals, quarantine lines, samples + quarantined == inputs;
- the invariant: every input id is in exactly one shard or in the quarantine, never both, never
  neither -- against the sources themselves when they can still be listed;
- each shard's size in bytes is the manifest's ``bytes``;
- every video decodes with the frame count its json states: by default counted while PyAV decodes
  it frame by frame straight from the tar member (memory bounded per video, any codec);
  ``--decoder dali`` uses the training reader itself (DALI's CPU decoder for VP9, its GPU decoder
  for H.264), which holds one whole decoded video at a time.
Shards are checked in parallel with ``workers`` (process pool or Ray, the same :func:`check_shard`).
``OUT`` may be a URL (``s3://bucket/prefix``, ``https://host/prefix``; ``storage``): each worker then
copies one shard and its index at a time into a temporary folder (verify reads every byte of a
shard anyway), checks it there and deletes it, so local disk use is one shard per worker.
"""

from __future__ import annotations

import json
import os
import tarfile
import tempfile
from collections import Counter
from pathlib import Path

import av

from common.atomic_io import read_jsonl
from shard_tools.format import dali_index_bytes, members_by_sample, read_manifest
from shard_tools.sources import load_label_map, read_folder, read_kinetics_csv, read_ssv2
from storage import StorageAccessError, default_storage, is_url, join

MAX_LISTED_PROBLEMS = 50


def read_shard_samples(tar_path: Path, *, with_video: bool = False) -> list[dict]:
    """Samples of a shard in order: {key, members: {ext: bytes-or-size}}; video bytes only if asked."""
    with tarfile.open(tar_path, "r:") as archive:
        return [{"key": key, "members": {ext: archive.extractfile(member).read()
                                         if (ext in ("json", "cls") or with_video) else member.size
                                         for ext, member in group}}
                for key, group in members_by_sample(archive)]


def relist_input_ids(manifest: dict) -> set[str]:
    """Input ids of the original sources, listed again the way the job listed them (paths or URLs)."""
    source = manifest.get("source") or {}
    kind, videos = source.get("kind"), source.get("videos")
    label_map = manifest.get("label_map") or None
    if kind == "kinetics":
        listing = read_kinetics_csv(source["annotations"], videos, split=source.get("split"), label_map=label_map)
    elif kind == "ssv2":
        listing = read_ssv2(source["annotations"], source["labels"], videos, split=source.get("split"))
    elif kind in ("folder", "unlabelled"):
        listing = read_folder(videos, labelled=(kind == "folder"), split=source.get("split", "train"),
                              label_map=load_label_map(source["label_map"]) if source.get("label_map") else None)
    else:
        raise ValueError(f"manifest source kind {kind!r} cannot be listed again")
    return {v.input_id for v in listing.inputs} | {r.input_id for r in listing.rejected}


def _dali_frame_counts(paths: list[str], index_paths: list[str], extension: str, device: str,
                       threads: int) -> dict[str, int]:
    """key -> decoded frame count, reading the shards with DALI (reader + video decoder)."""
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=2, num_threads=threads, device_id=None if device == "cpu" else 0,
                  prefetch_queue_depth=1)
    def decode_pipeline():
        video, meta = fn.readers.webdataset(paths=paths, index_paths=index_paths, ext=[extension, "json"],
                                            missing_component_behavior="error", name="Reader")
        return fn.decoders.video(video, device=device), meta

    pipe = decode_pipeline()
    pipe.build()
    epoch_size = pipe.reader_meta("Reader")["epoch_size"]
    counts: dict[str, int] = {}
    while len(counts) < epoch_size:
        frames, metas = pipe.run()
        if device != "cpu":
            frames = frames.as_cpu()
        for i in range(len(metas)):
            key = json.loads(bytes(metas.at(i)).decode())["key"]
            counts[key] = int(frames.at(i).shape[0])
    return counts


def stream_frame_count(fileobj) -> int:
    """Frames of a video, counted while PyAV decodes it frame by frame: memory stays one frame plus
    the decoder's state, whatever the video's length (no array of the whole video)."""
    with av.open(fileobj) as container:
        stream = container.streams.video[0]
        stream.thread_count = 1  # one core per verify worker
        return sum(1 for _ in container.decode(stream))


def _gpu_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def check_shard(out: str, shard: dict, extension: str, label_names: dict, decoder: str, threads: int) -> dict:
    """Every check of one shard (run on a pool worker or a Ray task; same function either way).

    Args:
        decoder: ``stream`` (PyAV, frame by frame from the tar member), ``dali-cpu`` /
            ``dali-mixed`` (the training reader + decoder on this shard; holds one whole decoded
            video at a time) or ``none``.
    Returns: {problems, input_ids, videos_decoded}.
    """
    if is_url(out):
        return _check_remote_shard(out, shard, extension, label_names, decoder, threads)
    out = Path(out)
    problems: list[str] = []
    input_ids: list[str] = []
    tar_path, idx_path = out / shard["path"], out / shard["idx_path"]
    if not tar_path.exists() or not idx_path.exists():
        return {"problems": [f"{shard['path']}: tar or index missing"], "input_ids": [], "videos_decoded": 0}
    size = tar_path.stat().st_size
    if size != shard["bytes"]:  # read_manifest guarantees every shard entry has its bytes
        problems.append(f"{shard['path']}: {size} bytes, the manifest says {shard['bytes']}")
    if dali_index_bytes(tar_path) != idx_path.read_bytes():
        problems.append(f"{shard['idx_path']}: does not index {shard['path']} correctly")
    expected_frames: dict[str, int] = {}
    decoded: dict[str, int] = {}
    keys: list[str] = []

    def check_sample(key: str, members: dict) -> None:
        if set(members) != {extension, "json", "cls"}:
            problems.append(f"{shard['path']}:{key}: components {sorted(members)}, expected "
                            f"{sorted([extension, 'json', 'cls'])}")
            return
        try:
            record = json.loads(members["json"])
        except ValueError as err:
            problems.append(f"{shard['path']}:{key}: bad json ({err})")
            return
        if record.get("key") != key:
            problems.append(f"{shard['path']}:{key}: json key {record.get('key')!r}")
        if members["cls"].decode() != str(record.get("label")):
            problems.append(f"{shard['path']}:{key}: .cls {members['cls']!r} != json label {record.get('label')}")
        if record.get("label") != -1 and label_names.get(record.get("label")) != record.get("label_name"):
            problems.append(f"{shard['path']}:{key}: label {record.get('label')} / {record.get('label_name')!r} "
                            "not in the label map")
        if record.get("width", 1) % 2 or record.get("height", 1) % 2:
            problems.append(f"{shard['path']}:{key}: odd frame size {record.get('width')}x{record.get('height')}")
        expected_frames[key] = int(record.get("num_frames", -1))
        input_ids.append(record.get("input_id"))

    with tarfile.open(tar_path, "r:") as archive:
        for key, group in members_by_sample(archive):
            keys.append(key)
            members: dict[str, bytes | int] = {}
            for ext, member in group:
                if ext in ("json", "cls"):
                    members[ext] = archive.extractfile(member).read()
                    continue
                members[ext] = member.size
                if ext == extension and decoder == "stream":
                    try:  # decoded straight from the tar member: never the whole video in memory
                        decoded[key] = stream_frame_count(archive.extractfile(member))
                    except (av.error.FFmpegError, IndexError) as err:
                        problems.append(f"{shard['path']}:{key}: PyAV cannot decode it ({err})")
            check_sample(key, members)
    if keys != shard["keys"] or len(keys) != shard["num_samples"]:
        problems.append(f"{shard['path']}: holds {len(keys)} samples {keys[:3]}..., the manifest says "
                        f"{shard['num_samples']} {shard['keys'][:3]}...")
    if decoder.startswith("dali") and expected_frames:
        try:
            decoded = _dali_frame_counts([str(tar_path)], [str(idx_path)], extension, decoder[5:], threads)
        except RuntimeError as err:
            problems.append(f"{shard['path']}: DALI failed to read/decode it: {str(err)[:500]}")
            return {"problems": problems, "input_ids": input_ids, "videos_decoded": 0}
    if decoder != "none":
        for key, frames in decoded.items():
            if frames != expected_frames.get(key):
                problems.append(f"{key}: decoded {frames} frames, its json says {expected_frames.get(key)}")
        undecoded = sorted(set(expected_frames) - set(decoded))
        if undecoded and not any("cannot decode" in p for p in problems):
            problems.append(f"{shard['path']}: decoded {len(decoded)} videos of {len(expected_frames)}")
    return {"problems": problems, "input_ids": input_ids, "videos_decoded": len(decoded)}


def _check_remote_shard(url: str, shard: dict, extension: str, label_names: dict, decoder: str,
                        threads: int) -> dict:
    """:func:`check_shard` on a local copy of one remote shard and its index, deleted afterwards."""
    store = default_storage()
    with tempfile.TemporaryDirectory(prefix="verify-shard-") as tmp:
        for rel in (shard["path"], shard["idx_path"]):
            target = Path(tmp, rel)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                store.get_file(join(url, rel), target)
            except StorageAccessError as err:
                if err.reason != "missing":
                    raise
                return {"problems": [f"{shard['path']}: tar or index missing"], "input_ids": [], "videos_decoded": 0}
        return check_shard(tmp, shard, extension, label_names, decoder, threads)


def read_quarantine(out: str | os.PathLike, rel: str) -> list[dict]:
    """The quarantine lines of a shard folder, local or at a URL (none if the file is absent)."""
    if not is_url(out):
        return read_jsonl(Path(out) / rel)
    try:
        raw = default_storage().read_bytes(join(out, rel))
    except StorageAccessError as err:
        if err.reason != "missing":
            raise
        return []
    return [json.loads(line) for line in raw.decode().splitlines() if line.strip()]


def verify_shards(out: str | os.PathLike, *, decoder: str = "auto", threads: int = 2, workers: int = 0,
                  executor: str = "process", ray_address: str | None = None) -> dict:
    """Check a shard folder; return a report with ``ok`` and the list of problems.

    Args:
        decoder: ``auto``/``stream``/``pyav`` (PyAV, frame by frame: bounded memory per video, any
            codec), ``dali`` (DALI's CPU decoder for VP9, its GPU decoder for H.264), ``none``.
        workers: shards checked in parallel (0: in this process); ``executor`` ``process`` or
            ``ray`` (``ray_address``), the same :func:`check_shard` either way.
    """
    from shard_tools.executors import map_unordered

    out = os.fspath(out) if is_url(out) else Path(out)
    manifest = read_manifest(out).to_dict()  # checked against the format, then read as plain data
    problems: list[str] = []
    extension = manifest["extension"]
    label_names = {v: k for k, v in manifest["label_map"].items()}
    if decoder in ("auto", "stream", "pyav"):
        shard_decoder, decoded_with = "stream", "pyav (streamed, frame by frame)"
    elif decoder == "dali":
        device = "cpu" if manifest["codec"] == "vp9" else "mixed"
        if device == "mixed" and not _gpu_available():
            raise ValueError(f"{out}: H.264 shards need a GPU for DALI (use --decoder stream)")
        shard_decoder, decoded_with = f"dali-{device}", f"dali ({device})"
    elif decoder == "none":
        shard_decoder, decoded_with = "none", "none"
    else:
        raise ValueError(f"--decoder {decoder!r}: choose auto, stream, pyav, dali or none")
    tasks = ((str(out), shard, extension, label_names, shard_decoder, threads) for shard in manifest["shards"])
    sample_input_ids: list[str] = []
    videos_decoded = 0
    for result in map_unordered(check_shard, tasks, executor=executor, workers=workers, ray_address=ray_address):
        problems += result["problems"]
        sample_input_ids += result["input_ids"]
        videos_decoded += result["videos_decoded"]
    problems.sort()  # workers finish in any order: the report does not depend on it

    quarantine = read_quarantine(out, manifest["quarantine"]["path"])
    quarantine_ids = [q["input_id"] for q in quarantine]
    totals = manifest["totals"]
    if len(sample_input_ids) != totals["samples"]:
        problems.append(f"{len(sample_input_ids)} samples in shards, manifest totals say {totals['samples']}")
    if len(quarantine) != totals["quarantined"]:
        problems.append(f"{len(quarantine)} quarantine lines, manifest totals say {totals['quarantined']}")
    if totals["samples"] + totals["quarantined"] != totals["inputs"]:
        problems.append(f"totals: samples {totals['samples']} + quarantined {totals['quarantined']} "
                        f"!= inputs {totals['inputs']}")
    counted = Counter(sample_input_ids) + Counter(quarantine_ids)
    repeated = sorted(i for i, n in counted.items() if n > 1)
    if repeated:
        problems.append(f"inputs in more than one place (shards/quarantine): {repeated[:10]}")
    if len(counted) != totals["inputs"]:
        problems.append(f"{len(counted)} distinct inputs in shards + quarantine, manifest says {totals['inputs']}")
    relisted = None
    try:
        relisted = relist_input_ids(manifest)
    except (OSError, ValueError, KeyError, TypeError) as err:
        relist_note = f"sources not listed again ({err})"
    else:
        relist_note = f"sources listed again: {len(relisted)} inputs"
        missing, unknown = sorted(relisted - set(counted)), sorted(set(counted) - relisted)
        if missing:
            problems.append(f"inputs in neither shards nor quarantine: {missing[:10]}")
        if unknown:
            problems.append(f"shards/quarantine hold inputs the sources do not list: {unknown[:10]}")

    return {"ok": not problems, "out": str(out), "shards": len(manifest["shards"]),
            "samples": len(sample_input_ids), "quarantined": len(quarantine), "inputs": totals["inputs"],
            "invariant": relist_note, "decoded_with": decoded_with if manifest["shards"] else "none",
            "videos_decoded": videos_decoded,
            "num_problems": len(problems), "problems": problems[:MAX_LISTED_PROBLEMS]}
