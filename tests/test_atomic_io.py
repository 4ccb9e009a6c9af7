"""Whole-or-nothing writes and JSON lines (``common.atomic_io``), on the real file system."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from common.atomic_io import atomic_write_json, atomic_write_text, atomic_writer, read_jsonl, write_jsonl


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "results.json"
    atomic_write_json(path, {"a": 1})
    with pytest.raises(RuntimeError, match="half-way"):
        with atomic_writer(path) as f:
            f.write(b'{"a": ')
            raise RuntimeError("half-way")
    assert json.loads(path.read_text()) == {"a": 1} and os.listdir(tmp_path) == ["results.json"]


def test_the_temporary_is_a_tmp_file_beside_the_target_with_the_umask_mode(tmp_path):
    path = tmp_path / "manifest.json"
    with atomic_writer(path) as f:
        seen = os.listdir(tmp_path)
        f.write(b"x")
    assert len(seen) == 1 and seen[0].startswith("manifest.json.") and seen[0].endswith(".tmp")
    umask = os.umask(0)
    os.umask(umask)
    assert path.read_bytes() == b"x" and path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_file_objects_of_torch_and_numpy_writers(tmp_path):
    with atomic_writer(tmp_path / "f.npz") as f:
        np.savez(f, a=np.arange(3))
    with atomic_writer(tmp_path / "f.pt") as f:
        torch.save({"a": torch.arange(3)}, f)
    assert sorted(os.listdir(tmp_path)) == ["f.npz", "f.pt"]  # np.savez appends no second .npz to a file object
    assert np.load(tmp_path / "f.npz")["a"].tolist() == torch.load(tmp_path / "f.pt")["a"].tolist() == [0, 1, 2]


def test_json_lines_round_trip_and_a_bad_line_names_the_file_and_line(tmp_path):
    path = tmp_path / "quarantine.jsonl"
    assert read_jsonl(path) == []  # not written yet: no records
    write_jsonl(path, [{"b": 2, "a": 1}, {"c": 3}])
    assert path.read_text() == '{"a": 1, "b": 2}\n{"c": 3}\n' and read_jsonl(path) == [{"a": 1, "b": 2}, {"c": 3}]
    atomic_write_text(path, '{"a": 1}\n\n{"a": \n')
    with pytest.raises(ValueError, match=r"quarantine\.jsonl: line 3 is not JSON"):
        read_jsonl(path)
