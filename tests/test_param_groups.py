"""Weight-decay groups: one rule (timm's param_groups_weight_decay), DINO's for SVT, model lists for Video Swin."""
from __future__ import annotations

import torch

import models
from training.engine import build_param_groups, model_no_weight_decay, param_groups_weight_decay

torch.set_num_threads(1)


def _names(module, params) -> set[str]:
    ids = {id(p) for p in params}
    return {n for n, p in module.named_parameters() if id(p) in ids}


def _timm_no_decay(module, no_weight_decay_list) -> set[str]:
    from timm.optim._param_groups import param_groups_weight_decay as timm_groups

    groups = timm_groups(module, weight_decay=0.05, no_weight_decay_list=no_weight_decay_list)
    return _names(module, [p for g in groups if g["weight_decay"] == 0.0 for p in g["params"]])


def _svt_student():
    backbone = models.build_backbone("timesformer_tiny_patch16", depth=1, img_size=32, num_frames=2)
    return models.MultiViewRunner(backbone, models.DINOHead(backbone.embed_dim, out_dim=32, hidden_dim=16,
                                                            bottleneck_dim=8))


def test_svt_groups_are_dinos_biases_and_1d_only():
    """DINO's get_params_groups: no decay for biases and 1-D parameters; pos/time embeddings and the
    CLS token (3-D) are decayed even though TimeSformer's no_weight_decay() lists them."""
    student = _svt_student()
    decay, no_decay = param_groups_weight_decay(student)
    dino_no_decay = {n for n, p in student.named_parameters()
                     if p.requires_grad and (n.endswith(".bias") or len(p.shape) == 1)}
    assert _names(student, no_decay) == dino_no_decay
    assert {"backbone.pos_embed", "backbone.time_embed", "backbone.cls_token"} <= _names(student, decay)
    assert _names(student, no_decay) == _timm_no_decay(student, ())


def test_model_no_weight_decay_lists_are_honoured_with_prefixes():
    student = _svt_student()
    listed = model_no_weight_decay(student)
    assert {"backbone.pos_embed", "backbone.time_embed", "backbone.cls_token"} <= listed
    _, no_decay = param_groups_weight_decay(student, listed)
    assert _names(student, no_decay) == _timm_no_decay(student, listed)


def test_video_swin_relative_position_tables_get_no_weight_decay():
    """Video Swin (no_weight_decay_keywords: relative_position_bias_table): every table is excluded."""
    backbone = models.build_backbone("stswin_tiny_test")
    runner = models.MultiViewRunner(backbone, models.MoCoProjector(backbone.embed_dim, mlp_dim=16, out_dim=8))
    tables = {n for n, _ in runner.named_parameters() if "relative_position_bias_table" in n}
    assert tables and all(runner.get_parameter(n).ndim == 2 for n in tables)  # 2-D: the 1-D rule misses them
    listed = model_no_weight_decay(runner)
    assert tables <= listed
    groups, infos = build_param_groups(runner, no_weight_decay_list=listed)
    no_decay = {n for g, i in zip(groups, infos) if not i.weight_decay for n in _names(runner, g["params"])}
    assert tables <= no_decay
    assert no_decay == _timm_no_decay(runner, listed)
    # without the model's list (the DINO rule) the tables are decayed
    _, dino_no_decay = param_groups_weight_decay(runner)
    assert not tables & _names(runner, dino_no_decay)


def test_last_layer_groups_split_out():
    student = _svt_student()
    groups, infos = build_param_groups(student)
    last = {n for g, i in zip(groups, infos) if i.last_layer for n in _names(student, g["params"])}
    assert last == {"head.last_layer.weight_v"}  # weight_g is fixed (norm_last_layer)
