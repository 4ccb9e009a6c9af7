"""The papers' evaluation protocols (``evaluate.py probe`` / ``finetune --protocol``): their settings as the
optimizer sees them in real short runs over real shards, and LSTCL's 5-clip stride-8 centre-crop test plan
decoded by the real DALI loader. The frozen-feature kNN / ``linear-frozen`` runs are in test_evaluate_e2e.py.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from evaluation.checkpoints import load_backbone
from evaluation.protocols import PROTOCOLS, FinetuneConfig, resolve_protocol
from models import build_backbone
from pipelines import DataConfig, build_loader
from pipelines.config import EvalConfig
from pipelines.frame_plans import strided_eval_frame_plan, uniform_clip_starts
from pipelines.views import eval_crop_box, plan_sample, recipe_views, view_params

from tests.test_evaluate_e2e import MODEL, make_eval_shards
from tests.train_fixtures import subprocess_env

from pipeline_fixtures import frame_indices, index_videos, meta_of, write_shards

ROOT = Path(__file__).resolve().parents[1]
# Small clips for a CPU test: the clip shapes are data, not optimizer settings, and are overridden;
# every optimizer setting (lr, schedule, momentum, weight decay, batch, epochs) is the protocol's own.
SMALL_CLIPS = ["--clip-frames", "4", "--clip-size", "32", "--fast-frames", "8", "--fast-size", "32"]
SHAPE_CHANGES = {"eval.slow_frames": 4, "eval.slow_size": 32, "eval.fast_frames": 8, "eval.fast_size": 32}


@pytest.fixture(scope="module")
def batch32_shards(tmp_path_factory) -> dict[str, Path]:
    """32 training videos: one full batch of the papers' 32 per optimizer step (one step per epoch)."""
    return make_eval_shards(tmp_path_factory.mktemp("protocols"), train_per_class=16, val_per_class=2)


def _run_protocol(command: str, protocol: str, shards: dict[str, Path], out: Path, *extra: str) -> tuple[list, dict]:
    """A real 2-step run through ``evaluate.py``: the per-step optimizer records and the results record."""
    results = out / "results.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "evaluate.py"), command, "--protocol", protocol, "--checkpoint", "random", *MODEL,
         "--train-shards", str(shards["train"]), "--val-shards", str(shards["val"]), "--out", str(out),
         "--results", str(results), "--max-steps", "2", "--num-threads", "1", "--torch-threads", "1", *extra],
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"protocol {protocol}:" in result.stdout
    steps = [json.loads(line) for line in (out / "finetune_steps.jsonl").read_text().splitlines()]
    (record,) = json.loads(results.read_text())
    return steps, record


def _assert_settings_reached_the_optimizer(steps: list, protocol: str) -> None:
    preset = resolve_protocol({}, protocol)
    assert [s["epoch"] for s in steps] == [0, 1]          # 32 videos, batch 32: one step per epoch
    for s in steps:
        assert s["optimizer"] == "SGD" and s["batch"] == preset.batch_size == 32
        for group in s["param_groups"]:
            assert group["momentum"] == preset.momentum == 0.9
            assert group["lr"] == pytest.approx(preset.lr_at(s["epoch"]), rel=1e-12)
        # Decay on weights only (biases and norms none), at the protocol's value.
        assert {g["weight_decay"] for g in s["param_groups"]} == ({preset.weight_decay, 0.0} if preset.weight_decay
                                                                  else {0.0})


@pytest.mark.slow
def test_svt_linear_probe_trains_only_the_head_with_the_papers_settings(batch32_shards, tmp_path):
    steps, record = _run_protocol("probe", "svt-linear", batch32_shards, tmp_path / "probe", *SMALL_CLIPS)
    _assert_settings_reached_the_optimizer(steps, "svt-linear")
    # SVT Sec. 4.1: lr 8e-3 with a cosine decay over 20 epochs; epoch 1 is one twentieth down the cosine.
    assert steps[0]["param_groups"][0]["lr"] == pytest.approx(8e-3, rel=1e-12)
    assert steps[1]["param_groups"][0]["lr"] == pytest.approx(8e-3 * 0.5 * (1 + math.cos(math.pi / 20)), rel=1e-12)
    # Only the linear layer is in the optimizer: embed_dim x 2 classes + 2 biases.
    assert sum(g["params"] for g in steps[0]["param_groups"]) == 192 * 2 + 2

    # The backbone left the run unchanged; the head moved.
    module = torch.load(tmp_path / "probe" / "checkpoints" / "step_00000002" / "mp_rank_00_model_states.pt",
                        map_location="cpu", weights_only=False)["module"]
    initial = load_backbone("random", model_name=MODEL[1], model_kwargs=json.loads(MODEL[3])).model.state_dict()
    for name, value in initial.items():
        torch.testing.assert_close(module[f"backbone.{name}"], value, rtol=0, atol=0)

    assert record["protocol"] == "svt-linear" and record["feature"] == "slow+fast CLS"
    assert record["variant"] == "frozen backbone, slow-fast (4x32 + 8x32); test 1 clip(s) x 3 crops"
    assert record["changes"] == {**SHAPE_CHANGES, "max_steps": 2}
    assert record["settings"]["epochs"] == 20 and record["settings"]["schedule"] == "cosine"
    assert record["metrics"]["num_val"] == 4


@pytest.mark.slow
def test_svt_finetune_trains_the_whole_network_on_slow_fast_clips(batch32_shards, tmp_path):
    steps, record = _run_protocol("finetune", "svt-finetune", batch32_shards, tmp_path / "ft", *SMALL_CLIPS)
    _assert_settings_reached_the_optimizer(steps, "svt-finetune")
    assert all(g["lr"] == 5e-3 for s in steps for g in s["param_groups"])  # decays only at epochs 11 and 14
    backbone = sum(p.numel() for p in build_backbone(MODEL[1], **json.loads(MODEL[3])).parameters())
    assert sum(g["params"] for g in steps[0]["param_groups"]) == backbone + 192 * 2 + 2
    assert record["protocol"] == "svt-finetune" and record["feature"] == "slow+fast CLS"
    assert record["variant"] == "slow-fast (4x32 + 8x32); test 1 clip(s) x 3 crops"
    assert record["changes"] == {**SHAPE_CHANGES, "max_steps": 2}
    assert record["settings"]["milestones"] == [11, 14] and record["settings"]["epochs"] == 15


@pytest.mark.slow
def test_lstcl_finetune_uses_stride_8_clips_and_the_5_clip_centre_crop_test(batch32_shards, tmp_path):
    steps, record = _run_protocol("finetune", "lstcl-finetune", batch32_shards, tmp_path / "lstcl",
                                  "--clip-frames", "4", "--clip-size", "32")
    _assert_settings_reached_the_optimizer(steps, "lstcl-finetune")
    assert record["protocol"] == "lstcl-finetune" and record["feature"] == "CLS"
    assert record["variant"] == "4x32 clip; test 5 clip(s) stride 8 x centre crop"
    assert record["changes"] == {"eval.slow_frames": 4, "eval.slow_size": 32, "max_steps": 2}
    assert {k: record["settings"][k] for k in ("epochs", "train_stride")} == {"epochs": 200, "train_stride": 8}
    assert {k: record["settings"]["eval"][k] for k in ("clips", "crops", "stride")} == {"clips": 5, "crops": 1, "stride": 8}


def test_protocol_presets_and_schedules():
    svt_ft = resolve_protocol({}, "svt-finetune")
    assert svt_ft == FinetuneConfig()  # the dataclass defaults are SVT's fine-tuning protocol
    assert [svt_ft.lr_at(e) for e in (0, 10, 11, 13, 14)] == pytest.approx([5e-3, 5e-3, 5e-4, 5e-4, 5e-5])
    linear = resolve_protocol({"protocol": "svt-linear"}, "svt-finetune")
    assert (linear.lr, linear.batch_size, linear.epochs, linear.momentum, linear.weight_decay, linear.freeze_backbone) \
        == (8e-3, 32, 20, 0.9, 0.0, True)
    assert linear.lr_at(10) == pytest.approx(4e-3) and linear.lr_at(19) < 1e-4
    changed = resolve_protocol({"epochs": 3, "lr": 0.1}, "svt-linear")
    assert changed.changes() == {"epochs": 3, "lr": 0.1} and linear.changes() == {}
    with pytest.raises(ValueError, match="not one of svt-finetune, lstcl-finetune"):
        resolve_protocol({"protocol": "svt-linear"}, "svt-finetune", ("svt-finetune", "lstcl-finetune"))
    with pytest.raises(ValueError, match="finetune.epoch"):
        resolve_protocol({"epoch": 3}, "svt-finetune")
    # the clips are an EvalConfig section: a nested key overlays the protocol's section key by key
    lstcl = resolve_protocol({"eval": {"slow_size": 32}}, "lstcl-finetune")
    assert (lstcl.eval.slow_size, lstcl.eval.clips, lstcl.eval.crops, lstcl.eval.stride) == (32, 5, 1, 8)
    assert lstcl.changes() == {"eval.slow_size": 32}
    with pytest.raises(ValueError, match=r"^finetune\.test_clips: unknown key \(valid keys of finetune: .*\beval\b"):
        resolve_protocol({"test_clips": 2}, "svt-finetune")
    with pytest.raises(ValueError, match=r"probe\.eval\.clips must be >= 1 and eval\.crops 1 or 3"):
        resolve_protocol({"eval": {"crops": 2}}, "svt-linear", section="probe")
    assert set(PROTOCOLS) == {"svt-finetune", "svt-linear", "lstcl-finetune"}


def test_lstcl_test_plan_places_5_stride_8_clips_uniformly():
    cfg = EvalConfig(slow_frames=8, clips=5, crops=1, stride=8, fast_frames=4)
    for num_frames in range(57, 400, 7):
        plan = strided_eval_frame_plan(num_frames, 30.0, None, cfg)
        starts = [int(plan[f"slow_{k}"][0]) for k in range(5)]
        for k in range(5):
            assert (np.diff(plan[f"slow_{k}"]) == 8).all() and plan[f"slow_{k}"][-1] < num_frames
        # Equal spacing from frame 0; the last clip ends less than one spacing step per clip from the end.
        assert starts[0] == 0 and len(set(np.diff(starts))) == 1
        assert num_frames - (starts[-1] + 57) < 4
    np.testing.assert_array_equal(uniform_clip_starts(200, 57, 5), [0, 35, 70, 105, 140])  # PySlowFast use_offset
    np.testing.assert_array_equal(uniform_clip_starts(200, 57, 1), [71])                   # one clip: the centre
    # Shorter than one clip's extent: the step shrinks to fit (frame plans' short-video rule), every
    # clip spreads evenly over the whole video.
    short = strided_eval_frame_plan(30, 30.0, None, cfg)
    assert all(list(short[f"slow_{k}"]) == [0, 4, 8, 12, 17, 21, 25, 29] for k in range(5))
    # The stride is in time (8 frames at 30 fps): a 15 fps video steps 4 of its own frames.
    half_rate = strided_eval_frame_plan(200, 15.0, None, cfg)
    assert all((np.diff(half_rate[f"slow_{k}"]) == 4).all() for k in range(5))


def test_lstcl_test_views_decode_the_planned_frames_from_the_centre_crop(tmp_path):
    lengths = [200, 90, 40]
    shards = write_shards(tmp_path / "shards", index_videos(tmp_path / "media", lengths), per_shard=4)
    cfg = DataConfig(shards=str(shards), recipe="eval", num_threads=1, shuffle=False,
                     eval=EvalConfig(slow_frames=8, slow_size=32, fast_frames=2, fast_size=16, clips=5, crops=1,
                                     stride=8))
    views = recipe_views(cfg)
    assert [v.name for v in views if v.group == "eval" and v.name.startswith("slow")] == \
        [f"slow_{k}_0" for k in range(5)]
    metas = meta_of(shards)
    for view in views:   # crops=1: the centre crop, the full short side
        assert view.crop == "eval_1"
        np.testing.assert_array_equal(view_params(np.random.default_rng(0), view, cfg.augment, 64, 48)[:4],
                                      eval_crop_box(1, 64, 48))
    np.testing.assert_allclose(eval_crop_box(1, 64, 48), [0.0, 0.125, 1.0, 0.875])
    (batch,) = list(build_loader(cfg, batch_size=4))
    for row, key in enumerate(batch["key"]):
        n = metas[key]["num_frames"]
        plan = plan_sample(cfg, views, seed=0, epoch=0, key=key, num_frames=n, fps=metas[key]["fps"],
                           width=64, height=48)
        for k in range(5):
            expected = plan.view_frames(views[2 * k])
            assert frame_indices(batch[f"slow_{k}_0"][row: row + 1], cfg)[0] == expected.tolist()
            step = 8 * metas[key]["fps"] / 30      # stride 8 at 30 fps, in this video's frames
            extent = int(np.floor(7 * step + 0.5)) + 1
            if n >= extent:
                start = k * ((n - extent) // 4)
                assert expected.tolist() == [start + int(np.floor(step * i + 0.5)) for i in range(8)]


def test_a_protocol_of_the_wrong_command_is_one_clear_error(tmp_path, capsys):
    from evaluation import cli

    config = tmp_path / "eval.yaml"
    config.write_text("probe:\n  protocol: svt-finetune\n")
    argv = ["probe", "--checkpoint", "random", *MODEL, "--train-shards", "t", "--val-shards", "v", "--out", "o"]
    assert cli.main([*argv, "--config", str(config)]) == 2
    assert "protocol 'svt-finetune' is not one of svt-linear" in capsys.readouterr().err
    config.write_text("probe:\n  lr: 0.1\n  shedule: cosine\n")
    assert cli.main([*argv, "--config", str(config)]) == 2
    assert "probe.shedule" in capsys.readouterr().err
