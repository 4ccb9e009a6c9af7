"""Metrics files of a resumed run: every step appears once in ``metrics.jsonl`` and in TensorBoard.

A run killed after its step-4 checkpoint has already logged step 5; the resumed run restarts at step 4
and logs step 5 again, so the writer must drop what the interrupted run wrote after its checkpoint.
"""
from __future__ import annotations

import json

from training.metrics import MetricsWriter


def _log_steps(run_dir, steps, *, start_step=0, append=False, loss_offset=0.0):
    writer = MetricsWriter(run_dir, enabled=True, total_steps=8, start_step=start_step, progress_bar=False,
                           append=append)
    for step in steps:
        writer.log({"step": step, "loss": float(step) + loss_offset})
    writer.close()


def test_resume_keeps_each_step_once(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _log_steps(tmp_path, [1, 2, 3, 4, 5])  # interrupted after step 5; newest checkpoint is step 4
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # a line cut off by the kill
    _log_steps(tmp_path, [5, 6, 7, 8], start_step=4, append=True, loss_offset=0.5)

    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [r["loss"] for r in rows] == [1.0, 2.0, 3.0, 4.0, 5.5, 6.5, 7.5, 8.5]  # steps 5+ from the resumed run

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    scalars = events.Scalars("loss")
    assert [e.step for e in scalars] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [e.value for e in scalars][4:] == [5.5, 6.5, 7.5, 8.5]


def test_fresh_run_in_an_old_folder_starts_the_file_again(tmp_path):
    _log_steps(tmp_path, [1, 2, 3])
    _log_steps(tmp_path, [1, 2])
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]


def test_lineage_resume_drops_later_steps_and_a_cut_off_line(tmp_path):
    from training.lineage import LineageWriter, read_lineage

    writer = LineageWriter(tmp_path, rank=0, world_size=1, resume_step=None)
    for step in (1, 2, 3):
        writer.write(step, {"key": [f"k{step}"]}, [])
    writer.close()
    with open(tmp_path / "lineage.jsonl", "a") as f:
        f.write('{"step":4,"ke')  # a line cut off by the kill
    LineageWriter(tmp_path, rank=0, world_size=1, resume_step=2).close()  # resumed from the step-2 checkpoint

    assert [(r["step"], r["keys"]) for r in read_lineage(tmp_path / "lineage.jsonl")] == [(1, ["k1"]), (2, ["k2"])]
