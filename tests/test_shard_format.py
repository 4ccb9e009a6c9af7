"""The shard format module (shard_tools/format.py): the manifest schema pinned by a golden file from a
real job, strict reading with errors that name the file and field, member names as webdataset splits
them, the DALI index, and the readers that go through it (no path guessing, no DALI for the baseline)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from footage import write_synthetic_video
from pipeline_fixtures import index_videos, write_shards
from shard_tools import __version__
from shard_tools.__main__ import main
from shard_tools.format import (MANIFEST_NAME, Manifest, ManifestError, index_file_name, read_dali_index,
                                read_manifest, shard_file_name, split_member_name, write_dali_index,
                                write_manifest)

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).resolve().parent / "data" / "manifest_golden.json"
# Values that depend on the machine, the temp folder or the encoder library build, not on the schema.
VOLATILE = "<volatile>"


@pytest.fixture(scope="module")
def small_job(tmp_path_factory):
    """A real job (``python -m shard_tools``) over a labelled folder: 3 clips in 2 classes, a zero-byte
    clip (quarantined) and a text file (not an input: ``source.skipped_files``)."""
    root = tmp_path_factory.mktemp("format")
    videos = root / "videos"
    for i, (label, pattern) in enumerate([("left", "moving_left"), ("left", "moving_left"), ("right", "moving_right")]):
        write_synthetic_video(videos / label / f"clip{i}.webm", num_frames=16, width=64, height=48, fps=25.0,
                              codec="vp9", pattern=pattern, seed=i)
    (videos / "right" / "empty.webm").write_bytes(b"")
    (videos / "right" / "notes.txt").write_text("not a video\n")
    out = root / "out"
    assert main(["shard", "--videos", str(videos), "--out", str(out), "--shard-size", "2", "--seed", "1",
                 "--workers", "1", "--no-progress"]) == 0
    return root, out


def _normalise(manifest: dict, root: Path) -> dict:
    """Paths under the temp folder become ``<root>/...``; sizes, the fingerprint (it hashes input
    paths) and the tool version become placeholders once their form is checked."""
    text = json.dumps(manifest).replace(str(root), "<root>")
    data = json.loads(text)
    assert data["tool_version"] == __version__
    assert re.fullmatch(r"[0-9a-f]{64}", data["job_fingerprint"])
    assert all(isinstance(s["bytes"], int) and s["bytes"] > 0 for s in data["shards"])
    assert data["totals"]["bytes"] == sum(s["bytes"] for s in data["shards"])
    data["tool_version"] = data["job_fingerprint"] = data["totals"]["bytes"] = VOLATILE
    for shard in data["shards"]:
        shard["bytes"] = VOLATILE
    return data


def _differences(got, want, where: str = "") -> list[str]:
    """Key-by-key comparison: every missing, extra or different value by its dotted path."""
    if isinstance(got, dict) and isinstance(want, dict):
        out = [f"{where}{k}: missing" for k in want if k not in got]
        out += [f"{where}{k}: not in the golden file" for k in got if k not in want]
        for k in want:
            if k in got:
                out += _differences(got[k], want[k], f"{where}{k}.")
        if list(got) != list(want) and not out:
            out.append(f"{where or 'top level'}: key order {list(got)} != {list(want)}")
        return out
    if isinstance(got, list) and isinstance(want, list) and len(got) == len(want):
        return [d for i, (g, w) in enumerate(zip(got, want)) for d in _differences(g, w, f"{where}{i}.")]
    return [] if got == want else [f"{where.rstrip('.')}: {got!r} != golden {want!r}"]


def test_a_real_jobs_manifest_matches_the_golden_file(small_job):
    """Pins the schema: a key added, dropped, renamed or reordered, or a value of another form, shows
    up here by its dotted path (to accept a deliberate change, rewrite tests/data/manifest_golden.json)."""
    root, out = small_job
    got = _normalise(json.loads((out / MANIFEST_NAME).read_text()), root)
    want = json.loads(GOLDEN.read_text())
    assert _differences(got, want) == []
    # The dataclass is the schema: the golden keys are exactly its fields, in order.
    assert list(want) == list(Manifest.__dataclass_fields__)
    # Reading gives the typed manifest, writing it back gives the same bytes.
    manifest = read_manifest(out)
    assert manifest.totals.samples == 3 and manifest.quarantine.by_reason == {"zero bytes": 1}
    assert manifest.source["skipped_files"]["count"] == 1
    copy = root / "copy"
    copy.mkdir()
    write_manifest(copy, manifest, sync=False)
    assert (copy / MANIFEST_NAME).read_bytes() == (out / MANIFEST_NAME).read_bytes()


def test_shard_and_member_names():
    assert shard_file_name("k400", "train", 7) == "k400-train-000007.tar"
    assert index_file_name("k400-train-000007.tar") == "k400-train-000007.idx"
    with pytest.raises(ValueError, match="ends in .tar"):
        index_file_name("k400-train-000007.idx")
    # Without importing webdataset (it imports torch), the split is webdataset's own.
    from webdataset.tariterators import base_plus_ext
    for name in ("abc_1.webm", "abc.seg.json", "dir/abc.cls", "a.b/c.d.e", "a/.hidden", "noext", "x.", ".json",
                 "a/b/c", "YouTube-id_000010_000020.mp4"):
        assert split_member_name(name) == base_plus_ext(name), name


def _bad(tmp_path: Path, data) -> str:
    (tmp_path / MANIFEST_NAME).write_text(data if isinstance(data, str) else json.dumps(data))
    with pytest.raises(ValueError) as info:
        read_manifest(tmp_path)
    message = str(info.value)
    assert message.startswith(str(tmp_path / MANIFEST_NAME)), message
    return message


def test_reading_a_bad_manifest_names_the_file_and_the_field(small_job, tmp_path):
    _, out = small_job
    good = json.loads((out / MANIFEST_NAME).read_text())
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / MANIFEST_NAME))):
        read_manifest(tmp_path)
    assert "not valid JSON" in _bad(tmp_path, "{")
    assert "the manifest must be a JSON object" in _bad(tmp_path, [1])
    assert "colour: unknown key" in _bad(tmp_path, {**good, "colour": "red"})
    assert "label_map: missing" in _bad(tmp_path, {k: v for k, v in good.items() if k != "label_map"})
    assert "seed: expected an integer" in _bad(tmp_path, {**good, "seed": "1"})
    assert "totals.samples: expected an integer" in _bad(tmp_path, {**good, "totals": {**good["totals"], "samples": 2.5}})
    shards = [dict(s) for s in good["shards"]]
    del shards[1]["num_frames"]
    assert "shards[1].num_frames: missing" in _bad(tmp_path, {**good, "shards": shards})
    shards = [{**s, "path": str(out / s["path"])} for s in good["shards"]]
    assert "must be a path relative to the manifest's folder" in _bad(tmp_path, {**good, "shards": shards})
    shards = [{**s, "keys": s["keys"][:1]} if i == 0 else s for i, s in enumerate(good["shards"])]
    assert "must agree" in _bad(tmp_path, {**good, "shards": shards})
    assert "codec 'av1'" in _bad(tmp_path, {**good, "codec": "av1"})
    # A manifest whose shard files are gone: the error names the manifest and the file.
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(good))
    with pytest.raises(FileNotFoundError, match=r"manifest\.json: lists .*-000000\.tar, which does not exist"):
        read_manifest(tmp_path).shard_files(tmp_path)


def test_dali_index_round_trip_and_bad_index(small_job, tmp_path):
    _, out = small_job
    manifest = read_manifest(out)
    (tar, idx), *_ = manifest.shard_files(out)
    samples = read_dali_index(idx)
    assert [split_member_name(s[0].name)[0] for s in samples] == manifest.shards[0].keys
    assert [m.ext for m in samples[0]] == ["cls", "json", "webm"]
    data = tar.read_bytes()
    member = samples[0][1]
    assert json.loads(data[member.offset:member.offset + member.size])["key"] == manifest.shards[0].keys[0]
    again = tmp_path / "again.idx"
    write_dali_index(tar, again, sync=False)
    assert again.read_bytes() == idx.read_bytes()
    (tmp_path / "bad.idx").write_text("not an index\n")
    with pytest.raises(ManifestError, match=r"bad\.idx: not a DALI webdataset index"):
        read_dali_index(tmp_path / "bad.idx")
    (tmp_path / "short.idx").write_text("v1.2 2\njson 512 10 a.json\n")
    with pytest.raises(ManifestError, match=r"short\.idx: the header announces 2 samples, 1 lines follow"):
        read_dali_index(tmp_path / "short.idx")


def test_the_loader_takes_paths_from_the_manifest_only(tmp_path, monkeypatch):
    """A folder-prefixed shard path (valid only relative to the working directory) is an error naming the
    manifest, never guessed into place."""
    from pipelines.shard_index import read_shard_set

    shards = write_shards(tmp_path / "shards", index_videos(tmp_path / "media", [6, 6]), per_shard=2)
    assert read_shard_set(shards).paths == [str(shards / "test-train-000000.tar")]
    data = json.loads((shards / MANIFEST_NAME).read_text())
    data["shards"][0]["path"] = "shards/test-train-000000.tar"
    (shards / MANIFEST_NAME).write_text(json.dumps(data))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"shards/manifest\.json: lists shards/shards/test-train-000000\.tar"):
        read_shard_set("shards")


def test_the_format_and_the_baseline_loader_import_no_dali_or_torch_where_they_must_not():
    code = ("import sys; import shard_tools.format, shard_tools.writer, shard_tools.job; "
            "assert 'torch' not in sys.modules and 'nvidia.dali' not in sys.modules, 'shard_tools'; "
            "import pipelines.baseline; "
            "assert not [m for m in sys.modules if m.startswith('nvidia.dali')], 'baseline'")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-2000:]
