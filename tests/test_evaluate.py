"""Evaluation pieces on plain tensors and a tiny real TimeSformer: kNN voting, linear probe and its
shuffled-label control, feature files, slow-fast sums, attention maps, configs, results, checkpoint
loading. The end-to-end runs over real shards and DeepSpeed checkpoints are in test_evaluate_e2e.py."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from common.typed_config import dataclass_from_dict
from evaluation.attention import last_block_cls_attention, save_attention_grid
from evaluation.checkpoints import load_backbone
from evaluation.features import FeatureSet, extract_features, group_eval_views
from evaluation.knn import KNNConfig, knn_classify, knn_predict_scores, knn_shuffled_label_control
from evaluation.linear_probe import LinearProbeConfig, shuffled_label_control, train_linear_probe
from evaluation.results import ResultRecord, append_result, load_results, render_markdown, topk_accuracy
from models import build_backbone

torch.set_num_threads(1)
TINY = {"depth": 1, "img_size": 32, "num_frames": 4}


def _blobs(n_per_class: int, dim: int, num_classes: int, seed: int, spread: float = 1.0):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(1234)) * 3
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    return centres[labels] + spread * torch.randn(len(labels), dim, generator=generator), labels


def _dino_knn_reference(train_x, train_y, test_x, k, temperature, num_classes):
    """DINO eval_knn.knn_classifier written out per test sample (the loop the vectorised code replaces)."""
    train_n, test_n = F.normalize(train_x, dim=1), F.normalize(test_x, dim=1)
    scores = torch.zeros(len(test_x), num_classes)
    for i in range(len(test_x)):
        similarity = train_n @ test_n[i]
        top = similarity.topk(k)
        for s, j in zip(top.values, top.indices):
            scores[i, train_y[j]] += torch.exp(s / temperature)
    return scores


def test_knn_matches_dino_reference_and_weights_votes_by_similarity():
    train_x, train_y = _blobs(30, 16, 4, seed=0, spread=3.0)
    test_x, test_y = _blobs(10, 16, 4, seed=1, spread=3.0)
    scores = knn_predict_scores(train_x, train_y, test_x, k=7, temperature=0.07, num_classes=4, chunk_size=9)
    torch.testing.assert_close(scores, _dino_knn_reference(train_x, train_y, test_x, 7, 0.07, 4), rtol=1e-4, atol=1e-4)

    # One very close neighbour of class 0 outvotes two far ones of class 1 at T=0.07 (weighted, not majority).
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.1, 1.0]])
    result = knn_classify(train, torch.tensor([0, 1, 1]), torch.tensor([[1.0, 0.05]]), torch.tensor([0]),
                          KNNConfig(ks=(3,)))
    assert result["k3"]["top1"] == 100.0
    # k larger than the training set is capped, not an error.
    assert knn_classify(train, torch.tensor([0, 1, 1]), train, torch.tensor([0, 1, 1]), KNNConfig(ks=(20,)))["k20"]["k_used"] == 3


def test_knn_rejects_unlabelled_training_data():
    with pytest.raises(ValueError, match="labels must lie"):
        knn_predict_scores(torch.randn(4, 3), torch.tensor([0, -1, 1, 0]), torch.randn(2, 3), k=2,
                           temperature=0.07, num_classes=2)


def test_topk_accuracy_caps_k_and_breaks_ties_deterministically():
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    acc = topk_accuracy(scores, torch.tensor([1, 0, 0]), ks=(1, 2, 5))
    assert acc["top1"] == pytest.approx(200 / 3)     # the tie picks class 0 (stable order)
    assert acc["top2"] == pytest.approx(200 / 3)
    assert acc["top5"] == 100.0                       # capped at 3 classes


def test_linear_probe_learns_and_shuffled_label_control_sits_at_chance():
    train_x, train_y = _blobs(60, 32, 2, seed=0, spread=4.0)
    val_x, val_y = _blobs(60, 32, 2, seed=1, spread=4.0)
    cfg = LinearProbeConfig(epochs=20, batch_size=32, lr=0.1)
    result = train_linear_probe(train_x, train_y, val_x, val_y, cfg)
    assert result["top1"] >= 95.0 and result["steps"] == 20 * 4
    control = shuffled_label_control(train_x, train_y, val_x, val_y, cfg, repeats=5)
    assert 30.0 <= control["top1"] <= 70.0, control
    knn_control = knn_shuffled_label_control(train_x, train_y, val_x, val_y, KNNConfig(ks=(20,)), repeats=5)
    assert 30.0 <= knn_control["k20"]["top1"] <= 70.0, knn_control
    # Same seed, same numbers.
    again = train_linear_probe(train_x, train_y, val_x, val_y, cfg)
    torch.testing.assert_close(again["head"].weight, result["head"].weight)


def test_feature_files_round_trip_and_slowfast_is_the_sum(tmp_path):
    features = FeatureSet(["a", "b", "c"], torch.tensor([0, 1, 0]), torch.randn(3, 5), torch.randn(3, 5),
                          {"label_map": {"x": 0, "y": 1}})
    torch.testing.assert_close(features.feature("slowfast"), features.slow + features.fast)
    for suffix in (".pt", ".npz"):
        loaded = FeatureSet.load(features.save(tmp_path / f"f{suffix}"))
        assert loaded.keys == features.keys and loaded.meta["label_map"] == {"x": 0, "y": 1}
        torch.testing.assert_close(loaded.feature("slowfast"), features.feature("slowfast"))
    (tmp_path / "bad.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="bad.pt"):
        FeatureSet.load(tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="line up"):
        FeatureSet(["a"], torch.tensor([0, 1]), torch.randn(1, 5), torch.randn(1, 5))
    with pytest.raises(ValueError, match="feature kind"):
        features.feature("medium")


def test_eval_view_grouping():
    assert group_eval_views(["slow_0_0", "fast_0_0", "slow_1_0", "fast_1_0"]) == {
        "slow": ["slow_0_0", "slow_1_0"], "fast": ["fast_0_0", "fast_1_0"]}
    with pytest.raises(ValueError, match="no fast"):
        group_eval_views(["slow_0_0"])
    with pytest.raises(ValueError, match="neither"):
        group_eval_views(["slow_0_0", "fast_0_0", "global_0"])


def test_extracted_slowfast_feature_is_the_sum_of_the_two_clips_cls_features():
    torch.manual_seed(0)
    model = build_backbone("timesformer_tiny_patch16", **TINY).eval()
    slow, fast = torch.randn(3, 3, 4, 32, 32), torch.randn(3, 3, 8, 16, 16)
    # A padded last batch repeats key "v1": its second copy is dropped.
    batches = [{"slow_0_1": slow[:2], "fast_0_1": fast[:2], "label": torch.tensor([0, 1]), "key": ["v0", "v1"]},
               {"slow_0_1": slow[1:], "fast_0_1": fast[1:], "label": torch.tensor([1, 0]), "key": ["v1", "v2"]}]
    features = extract_features(model, batches, ["slow_0_1", "fast_0_1"], views_per_forward=1)
    assert features.keys == ["v0", "v1", "v2"] and features.meta["duplicates"] == 1
    with torch.no_grad():
        expected = model.forward_features(slow) + model.forward_features(fast)
    torch.testing.assert_close(features.feature("slowfast"), expected, rtol=1e-5, atol=1e-5)

    # Several crops: the mean over crops of each kind, summed.
    crops = torch.randn(2, 2, 3, 4, 32, 32)
    batch = {"slow_0_0": crops[0], "slow_0_2": crops[1], "fast_0_0": fast[:2], "fast_0_2": fast[1:],
             "label": torch.tensor([0, 1]), "key": ["p", "q"]}
    features = extract_features(model, [batch], ["slow_0_0", "fast_0_0", "slow_0_2", "fast_0_2"])
    with torch.no_grad():
        expected = (model.forward_features(crops[0]) + model.forward_features(crops[1])) / 2 + \
                   (model.forward_features(fast[:2]) + model.forward_features(fast[1:])) / 2
    torch.testing.assert_close(features.feature("slowfast"), expected, rtol=1e-5, atol=1e-5)


def test_attention_maps_reproduce_the_fused_attention_and_draw(tmp_path):
    torch.manual_seed(0)
    model = build_backbone("timesformer_tiny_patch16", **TINY).eval()
    clip = torch.randn(2, 3, 4, 32, 48)
    attention = last_block_cls_attention(model, clip)
    assert attention.shape == (2, 4, 3, 2, 3)   # b t heads gh gw
    # The recomputed weights times V give the fused (SDPA) output of the CLS query.
    captured = []
    block_attn = model.blocks[-1].attn
    handle = block_attn.register_forward_hook(lambda m, args, out: captured.append((args[0], out)))
    with torch.no_grad():
        model.forward_features(clip)
    handle.remove()
    tokens, fused_out = captured[0]
    with torch.no_grad():
        q, k, v = rearrange(block_attn.qkv(tokens), "bt n (three h d) -> three bt h n d", three=3, h=3)
        weights = torch.softmax(q[:, :, :1] @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1)
        cls_out = block_attn.proj(rearrange(weights @ v, "bt h 1 d -> bt (h d)"))
    torch.testing.assert_close(cls_out, fused_out[:, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rearrange(weights[:, :, 0, 1:], "(b t) h (gh gw) -> b t h gh gw", b=2, gh=2),
                               attention)
    frames = np.random.default_rng(0).random((4, 32, 48, 3))
    path = save_attention_grid(tmp_path / "a.png", frames, attention[0], title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_configs_reject_unknown_keys_and_bad_values():
    assert dataclass_from_dict(KNNConfig, {"ks": [10, 3]}, "knn").ks == (10, 3)
    with pytest.raises(ValueError, match="knn.temprature"):
        dataclass_from_dict(KNNConfig, {"temprature": 0.1}, "knn")
    with pytest.raises(ValueError, match="temperature"):
        KNNConfig(temperature=0.0)
    with pytest.raises(ValueError, match="epochs"):
        LinearProbeConfig(epochs=0)


def test_evaluate_takes_train_py_overrides_and_extract_embeds_the_data_section(tmp_path, capsys):
    """One config route: YAML section, then flags, then trailing section.key=value overrides (train.py's
    parser); extract's loader settings are a DataConfig section, its clips the data.eval section."""
    from evaluation import cli

    config = tmp_path / "eval.yaml"
    config.write_text("extract:\n  batch_size: 2\n  data:\n    num_threads: 3\n    eval: {crops: 1, slow_size: 64}\n")
    argv = ["extract", "--checkpoint", "random", "--shards", "S", "--out", "f.pt", "--config", str(config)]
    args = cli.build_parser().parse_args([*argv, "--slow-frames", "4", "extract.data.eval.clips=2",
                                               "extract.batch_size=5", "extract.precision=bfloat16"])
    cfg = cli._extract_config(args)
    assert (cfg.data.shards, cfg.data.recipe, cfg.data.shuffle, cfg.data.num_threads) == ("S", "eval", False, 3)
    assert (cfg.data.eval.clips, cfg.data.eval.crops, cfg.data.eval.slow_frames, cfg.data.eval.slow_size) == (2, 1, 4, 64)
    assert (cfg.data.eval.fast_frames, cfg.batch_size, cfg.precision) == (64, 5, "bf16")
    assert cli._extract_config(args, clips=1).data.eval.clips == 1  # attention draws one clip

    # A key outside its section is unknown, naming the file; a section of another command is an error.
    for text, expected in (("extract:\n  clips: 2\n", f"{config}: extract.clips: unknown key"),
                           ("extract:\n  data_device: cpu\n", f"{config}: extract.data_device: unknown key"),
                           ("extract:\n  data: {mean: [0, 0, 0]}\n", "extract.data.mean: taken from the checkpoint")):
        config.write_text(text)
        assert cli.main(argv) == 2
        assert expected in capsys.readouterr().err
    config.write_text("")
    assert cli.main([*argv, "knn.ks=[5]"]) == 2
    assert "reads the extract: section" in capsys.readouterr().err
    assert cli.main([*argv, "extract.data.eval.clip=2"]) == 2
    assert "extract.data.eval.clip: unknown key" in capsys.readouterr().err
    assert cli.main(["knn", "--train", "a.pt", "--val", "b.pt", "knn.temprature=0.1"]) == 2
    assert "knn.temprature" in capsys.readouterr().err


def test_results_json_and_markdown(tmp_path):
    record = ResultRecord(protocol="knn", variant="k=20", feature="slowfast", checkpoint="ck", backbone="teacher",
                          train_data="tr", val_data="va", metrics={"top1": 91.25, "top5": 99.0},
                          control={"top1": 50.0})
    append_result(tmp_path / "r.json", record)
    append_result(tmp_path / "r.json", record)
    records = load_results(tmp_path / "r.json")
    assert len(records) == 2 and json.loads((tmp_path / "r.json").read_text())[0]["metrics"]["top1"] == 91.25
    assert "| knn | k=20 | slowfast | ck | teacher | tr | va | 91.2 | 99.0 | 50.0 |" in render_markdown(records)


def _export_payload(student_prefix: str = "backbone.") -> tuple[dict, torch.nn.Module]:
    torch.manual_seed(3)
    backbone = build_backbone("timesformer_tiny_patch16", **TINY)
    student = {f"{student_prefix}{k}": v for k, v in backbone.state_dict().items()}
    student["head.last_layer.weight"] = torch.randn(4, 8)
    config = {"model": {"backbone": "timesformer_tiny_patch16", "backbone_kwargs": dict(TINY)},
              "data": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}
    return {"student": student, "teacher": None, "backbone_prefix": student_prefix, "config": config, "step": 7}, backbone


def test_load_backbone_from_an_export_file(tmp_path):
    payload, backbone = _export_payload("runner.backbone.")   # LSTCL methods nest the backbone in a runner
    torch.save(payload, tmp_path / "export.pt")
    loaded = load_backbone(str(tmp_path / "export.pt"), which="student")
    assert loaded.step == 7 and loaded.data_config["mean"] == [0.5, 0.5, 0.5]
    for name, value in backbone.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[name], value)
    with pytest.raises(ValueError, match="no teacher"):
        load_backbone(str(tmp_path / "export.pt"), which="teacher")
    with pytest.raises(ValueError, match="do not fit"):
        load_backbone(str(tmp_path / "export.pt"), which="student", model_kwargs={"depth": 2})
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_backbone(str(tmp_path / "missing.pt"))
    (tmp_path / "junk.pt").write_text("junk")
    with pytest.raises(ValueError, match="junk.pt"):
        load_backbone(str(tmp_path / "junk.pt"))


def test_the_backbone_prefix_is_read_from_the_export_not_guessed(tmp_path):
    payload, backbone = _export_payload("runner.backbone.")
    # a key outside the backbone that also contains "backbone." comes first: a guess would take its prefix
    payload["student"] = {"aux.backbone.scale": torch.ones(1), **payload["student"]}
    torch.save(payload, tmp_path / "export.pt")
    loaded = load_backbone(str(tmp_path / "export.pt"), which="student")
    for name, value in backbone.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[name], value)
    del payload["backbone_prefix"]
    torch.save(payload, tmp_path / "old.pt")
    with pytest.raises(ValueError, match="old.pt: the export records no backbone_prefix"):
        load_backbone(str(tmp_path / "old.pt"), which="student")


def test_a_checkpoint_file_without_a_key_the_trainer_writes_names_the_file_and_the_key(tmp_path):
    folder = tmp_path / "checkpoints" / "step_00000001"
    folder.mkdir(parents=True)
    torch.save({"step": 1, "epoch": 0}, folder / "trainer.pt")
    torch.save({}, folder / "portable.pt")
    with pytest.raises(ValueError, match=r"step_00000001/trainer\.pt: no 'nonfinite_skipped'; not a checkpoint file"):
        load_backbone(str(folder))
