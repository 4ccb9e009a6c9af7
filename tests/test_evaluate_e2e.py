"""``evaluate.py`` end to end: synthetic videos -> ``shard_tools`` shards -> DALI eval views -> features
-> kNN / linear probe / attention maps / report, and DeepSpeed checkpoints of ``train.py``.

Classes: ``moving_left`` (a bar sweeping over a gradient) against ``index`` (uniformly coloured
frames). Not moving_left against moving_right: those differ only in the direction of motion, and a
randomly initialised TimeSformer cannot see direction (its ``temporal_fc`` starts at zero, so the
fresh model is blind to frame order; measured 1-NN accuracy 31%, i.e. chance). Within a class the
videos differ in length, so train and validation clips are not copies of each other.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.typed_config import dataclass_from_dict
from evaluation import cli
from evaluation.checkpoints import load_backbone
from evaluation.features import ExtractConfig, FeatureSet, group_eval_views, mean_view_features

from tests.train_fixtures import subprocess_env

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("moving_left", "index")
MODEL = ["--model", "timesformer_tiny_patch16", "--model-kwargs", '{"depth": 2, "img_size": 32, "num_frames": 8}']
VIEWS = ["--slow-frames", "4", "--slow-size", "32", "--fast-frames", "8", "--fast-size", "32", "--batch-size", "4",
         "--num-threads", "1"]


def make_eval_shards(root: Path, train_per_class: int = 8, val_per_class: int = 4) -> dict[str, Path]:
    """Train and val shards of the two classes, 64x48 VP9, 24-32 frames, one label map."""
    from shard_tools.__main__ import main as shard_main
    from footage import write_synthetic_video

    torch.set_num_threads(1)
    label_map = root / "labels.json"
    label_map.write_text(json.dumps({name: i for i, name in enumerate(CLASSES)}))
    shards = {}
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for pattern in CLASSES:
            for i in range(per_class):
                num_frames = 24 + (3 * i + (split == "val")) % 9
                write_synthetic_video(root / "videos" / split / pattern / f"{split}{i}.webm", num_frames=num_frames,
                                      width=64, height=48, fps=25.0, codec="vp9", pattern=pattern, seed=i)
        shards[split] = root / "shards" / split
        rc = shard_main(["shard", "--source", "folder", "--videos", str(root / "videos" / split), "--split", split,
                         "--label-map", str(label_map), "--out", str(shards[split]), "--name", "syn",
                         "--short-side", "48", "--min-frames", "8", "--workers", "0", "--no-progress"])
        assert rc == 0
    return shards


@pytest.fixture(scope="module")
def eval_shards(tmp_path_factory) -> dict[str, Path]:
    """Train (8 per class) and val (4 per class) shards."""
    return make_eval_shards(tmp_path_factory.mktemp("eval_e2e"))


def _run(argv: list[str], capsys) -> str:
    assert cli.main(argv) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def test_frozen_protocols_separate_the_classes_and_shuffled_labels_stay_at_chance(eval_shards, tmp_path, capsys):
    feats = {split: tmp_path / f"{split}.pt" for split in ("train", "val")}
    for split, path in feats.items():
        out = _run(["extract", "--checkpoint", "random", *MODEL, "--shards", str(eval_shards[split]),
                    "--out", str(path), *VIEWS], capsys)
        assert "per-label counts [8, 8]" in out if split == "train" else "per-label counts [4, 4]" in out
    train = FeatureSet.load(feats["train"])
    assert len(train) == 16 and train.meta["label_map"] == {"moving_left": 0, "index": 1}
    assert train.meta["views"] == {"slow": ["slow_0_0", "slow_0_1", "slow_0_2"],
                                   "fast": ["fast_0_0", "fast_0_1", "fast_0_2"]}

    # The saved slow-fast feature is the mean slow CLS feature plus the mean fast one, per video.
    model = load_backbone("random", model_name=MODEL[1], model_kwargs=json.loads(MODEL[3])).model
    loader = cli._eval_loader(
        dataclass_from_dict(ExtractConfig, {"data": {"shards": str(eval_shards["train"]), "num_threads": 1,
                                                  "eval": {"slow_frames": 4, "slow_size": 32, "fast_frames": 8,
                                                           "fast_size": 32}},
                                         "batch_size": 4}, "extract"),
        train.meta["mean"], train.meta["std"])
    batch = next(iter(loader))
    groups = group_eval_views(loader.view_names)
    expected = sum(mean_view_features(model, [batch[v] for v in groups[g]]) for g in ("slow", "fast"))
    rows = [train.keys.index(key) for key in batch["key"]]
    torch.testing.assert_close(train.feature("slowfast")[rows], expected, rtol=1e-4, atol=1e-4)

    results = tmp_path / "results.json"
    out = _run(["knn", "--train", str(feats["train"]), "--val", str(feats["val"]), "--results", str(results),
                "--control-repeats", "5"], capsys)
    assert "knn slowfast k= 20" in out
    out = _run(["linear", "--train", str(feats["train"]), "--val", str(feats["val"]), "--results", str(results),
                "--control-repeats", "5"], capsys)
    records = json.loads(results.read_text())
    assert [(r["protocol"], r["variant"], r["feature"]) for r in records] == [
        ("knn", "k=20", "slowfast"), ("knn", "k=5", "slowfast"), ("knn", "k=20", "slow"), ("knn", "k=5", "slow"),
        ("linear-frozen", "20 epochs", "slowfast"), ("linear-frozen", "20 epochs", "slow")]
    for record in records:
        # 8 validation videos, chance = 50%: the real labels are learned, shuffled ones are not.
        assert record["metrics"]["top1"] >= 87.5, record
        assert record["control"]["top1"] <= 75.0, record
        assert record["metrics"]["num_val"] == 8 and record["checkpoint"] == "random"

    # Attention maps of two chosen keys, and the markdown report through the real script.
    keys = train.keys[:2]  # two keys, fewer than --num-keys (4): exactly these are drawn
    out = _run(["attention", "--checkpoint", "random", *MODEL, "--shards", str(eval_shards["train"]),
                "--keys", *keys, "--out", str(tmp_path / "attention"), *VIEWS], capsys)
    assert sorted(p.stem for p in (tmp_path / "attention").iterdir()) == sorted(keys)
    for key in keys:
        assert (tmp_path / "attention" / f"{key}.png").read_bytes()[:4] == b"\x89PNG"
    assert cli.main(["attention", "--checkpoint", "random", *MODEL, "--shards", str(eval_shards["train"]),
                          "--keys", "no_such_key", "--out", str(tmp_path / "a2"), *VIEWS]) != 0
    report = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "report", "--results", str(results),
                             "--out", str(tmp_path / "results.md")], cwd=ROOT, env=subprocess_env(), capture_output=True,
                            text=True, timeout=120)
    assert report.returncode == 0, report.stderr[-2000:]
    table = (tmp_path / "results.md").read_text()
    assert table.count("| knn |") == 4 and table.count("| linear-frozen |") == 2


def test_bad_inputs_give_one_clear_error(eval_shards, tmp_path, capsys):
    assert cli.main(["knn", "--train", str(tmp_path / "nope.pt"), "--val", str(tmp_path / "nope.pt")]) == 2
    assert "nope.pt: feature file does not exist" in capsys.readouterr().err
    assert cli.main(["extract", "--checkpoint", str(tmp_path / "none"), "--shards", str(eval_shards["val"]),
                          "--out", str(tmp_path / "f.pt")]) == 2
    assert "none: checkpoint does not exist" in capsys.readouterr().err
    config = tmp_path / "eval.yaml"
    config.write_text("linear:\n  epoch: 3\n")
    assert cli.main(["linear", "--train", str(tmp_path / "x.pt"), "--val", "b.pt", "--config", str(config)]) == 2
    assert "linear.epoch" in capsys.readouterr().err


TRAIN_TINY = ["trainer.max_steps=1", "model.backbone_kwargs={depth: 1, img_size: 32, num_frames: 4}",
              "model.drop_path_rate=0.0", "trainer.ckpt_every_steps=1", "trainer.progress_bar=false",
              "trainer.torch_threads=1", "trainer.tensorboard=false", "trainer.batch_size_per_gpu=4",
              "data.svt.global_frames=[4, 2]", "data.svt.global_size=32", "data.svt.local_frames=[2, 2]",
              "data.svt.local_size=16", "model.out_dim=64", "model.hidden_dim=32", "model.bottleneck_dim=16",
              "data.num_threads=1", "optim.warmup_epochs=0", "optim.lr_reference_batch=0",
              "optim.lr=0.01"]


@pytest.mark.slow
def test_zero3_checkpoint_gives_the_features_of_the_zero0_checkpoint(eval_shards, tmp_path, capsys):
    """One SVT step at ZeRO-0 and at ZeRO-3 (partitioned: persistence thresholds 0) from the same seed and data
    reach the same weights (docs/design.md section 8); features read from either checkpoint folder (ZeRO-3
    consolidated from DeepSpeed's partitioned files) and from the ``--export`` file must agree."""
    runs = {}
    for stage in (0, 3):
        runs[stage] = tmp_path / f"zero{stage}"
        extra = (["trainer.deepspeed={zero_optimization: {stage3_param_persistence_threshold: 0, "
                  "stage3_model_persistence_threshold: 0}}"] if stage == 3 else [])
        cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "demo_cpu.yaml"),
               f"data.shards={eval_shards['train']}", f"trainer.output_dir={runs[stage]}",
               f"trainer.zero_stage={stage}", *TRAIN_TINY, *extra]
        result = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=400)
        assert result.returncode == 0, result.stderr[-4000:]
    assert any(p.name.startswith("zero_pp_rank_0") for p in (runs[3] / "checkpoints").glob("step_*/*"))

    from training.checkpoint import export_weights, find_latest

    export = export_weights(find_latest(runs[3] / "checkpoints"), tmp_path / "zero3_export.pt")
    sources = {"zero0": runs[0] / "checkpoints", "zero3": runs[3] / "checkpoints", "export": export}
    for which in ("student", "teacher"):
        features = {}
        for name, source in sources.items():
            out = tmp_path / f"{name}_{which}.pt"
            _run(["extract", "--checkpoint", str(source), "--backbone", which, "--shards", str(eval_shards["val"]),
                  "--out", str(out), *VIEWS], capsys)
            features[name] = FeatureSet.load(out)
        assert features["zero0"].keys == features["zero3"].keys == features["export"].keys
        for name in ("zero3", "export"):
            torch.testing.assert_close(features[name].slow, features["zero0"].slow, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(features[name].fast, features["zero0"].fast, rtol=1e-4, atol=1e-4)
    # The step moved the student: its features differ from the teacher's (EMA, momentum < 1).
    student, teacher = FeatureSet.load(tmp_path / "zero3_student.pt"), FeatureSet.load(tmp_path / "zero3_teacher.pt")
    assert (student.slow - teacher.slow).abs().max() > 1e-3


@pytest.mark.slow
def test_finetune_learns_and_resumes_exactly_after_a_stop(eval_shards, tmp_path):
    """Fine-tuning through DeepSpeed: an uninterrupted 2-epoch run and a run stopped after 3 steps then
    resumed end with identical weights; the 2-clip test classifies the held-out videos. The stopped run
    resumed under ZeRO-1 ends with the same weights too, and the fine-tuned backbone loads for evaluation."""
    common = [sys.executable, str(ROOT / "evaluate.py"), "finetune", "--checkpoint", "random", *MODEL,
              "--train-shards", str(eval_shards["train"]), "--val-shards", str(eval_shards["val"]), "--epochs", "2",
              "--milestones", "1", "--lr", "0.05", "--batch-size", "4", "--inputs", "single", "--clip-frames", "4",
              "--clip-size", "32", "--test-clips", "2", "--test-crops", "1", "--num-threads", "1",
              "--torch-threads", "1"]

    def finetune(out: Path, *extra: str) -> str:
        result = subprocess.run([*common, "--out", str(out), *extra], cwd=ROOT, env=subprocess_env(), capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-4000:]
        return result.stdout

    results = tmp_path / "results.json"
    finetune(tmp_path / "whole", "--results", str(results))
    finetune(tmp_path / "split", "--max-steps", "3")
    shutil.copytree(tmp_path / "split", tmp_path / "relayout")  # resumed under ZeRO-1 below
    assert "continuing at epoch 0, step 3" in finetune(tmp_path / "split")

    def final_weights(run: Path) -> dict:
        return torch.load(run / "checkpoints" / "step_00000008" / "mp_rank_00_model_states.pt", map_location="cpu",
                          weights_only=False)["module"]

    whole, split = final_weights(tmp_path / "whole"), final_weights(tmp_path / "split")
    assert whole.keys() == split.keys() and "head.weight" in whole
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], rtol=0, atol=0)
    record = json.loads(results.read_text())[0]
    assert record["protocol"] == "svt-finetune" and record["variant"] == "4x32 clip; test 2 clip(s) x centre crop"
    assert record["changes"] == {"epochs": 2, "milestones": [1], "lr": 0.05, "batch_size": 4, "inputs": "single",
                                 "eval.slow_frames": 4, "eval.slow_size": 32, "eval.clips": 2, "eval.crops": 1}
    assert record["metrics"]["num_val"] == 8 and record["metrics"]["top1"] >= 87.5

    # The trainer's checkpoint: SGD momentum by parameter name in portable.pt, so the stopped run also
    # resumes in another layout (ZeRO-1) and reaches the same weights (reduction order: float noise only).
    portable = torch.load(tmp_path / "whole" / "checkpoints" / "step_00000008" / "portable.pt", weights_only=False)
    assert set(portable["moments"]) == set(portable["params"]) and "head.weight" in portable["moments"]
    assert all(set(m) == {"momentum_buffer"} for m in portable["moments"].values())
    assert "rank layout changed" in finetune(tmp_path / "relayout", "finetune.zero_stage=1")
    relayout = torch.load(tmp_path / "relayout" / "checkpoints" / "step_00000008" / "portable.pt", weights_only=False)
    for name, value in portable["params"].items():
        torch.testing.assert_close(relayout["params"][name], value, rtol=1e-4, atol=1e-5)

    # Evaluation reads the fine-tuned backbone from the checkpoint folder by its recorded backbone_prefix.
    loaded = load_backbone(str(tmp_path / "whole" / "checkpoints"), which="student")
    assert loaded.step == 8
    for name, value in loaded.model.state_dict().items():
        torch.testing.assert_close(value, whole[f"backbone.{name}"].float(), rtol=0, atol=0)
