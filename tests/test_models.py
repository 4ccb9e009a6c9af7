"""TimeSformer, heads and the multi-view runner on tiny models (CPU, small shapes)."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn

from evaluation.features import slow_fast_features
from models import (BYOLPredictor, BYOLProjector, DINOHead, MoCoPredictor, MoCoProjector, MultiViewRunner,
                    SimSiamPredictor, SimSiamProjector, build_backbone)
from models.timesformer import checkpoint_filter_fn, interpolate_pos_embed, interpolate_time_embed, load_pretrained

torch.set_num_threads(1)

# View sizes (T, H, W) of both recipes and of evaluation (docs/design.md section 2).
SVT_VIEWS = [(8, 224, 224), (16, 224, 224)] + [(t, 96, 96) for t in (2, 2, 4, 4, 8, 8, 16, 16)]
LSTCL_VIEWS = [(8, 224, 224), (8, 224, 224)]
EVAL_VIEWS = [(8, 224, 224), (64, 96, 96)]


def tiny_timesformer(**kw) -> nn.Module:
    torch.manual_seed(0)
    args = {"embed_dim": 24, "depth": 2, "num_heads": 2, "num_frames": 8, **kw}
    return build_backbone("timesformer_tiny_patch16", **args).eval()


def test_build_backbone_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown backbone 'vit_nope'"):
        build_backbone("vit_nope")


@pytest.mark.parametrize("thw", sorted(set(SVT_VIEWS + LSTCL_VIEWS + EVAL_VIEWS)))
def test_timesformer_output_shape_for_every_view_size(thw):
    model = tiny_timesformer(embed_dim=16, depth=1)
    with torch.no_grad():
        features = model.forward_features(torch.randn(1, 3, *thw))
    assert features.shape == (1, 16)
    assert torch.isfinite(features).all()


def test_pos_embed_interpolation_is_the_stored_embedding_at_native_size():
    model = tiny_timesformer()
    assert interpolate_pos_embed(model.pos_embed, (14, 14)) is model.pos_embed
    assert interpolate_time_embed(model.time_embed, 8) is model.time_embed
    # Nearest 2x upsampling repeats each stored position; the CLS embedding is untouched.
    small = torch.randn(1, 1 + 4, 3)
    up = interpolate_pos_embed(small, (4, 4), mode="nearest")
    assert torch.equal(up[:, 0], small[:, 0])
    grid = up[0, 1:].reshape(4, 4, 3)
    assert torch.equal(grid[0, 0], small[0, 1]) and torch.equal(grid[1, 1], small[0, 1])
    assert torch.equal(grid[3, 3], small[0, 4])
    # Linear in time (selectable): 2 stored steps -> 4 at align_corners=False; nearest (default) repeats.
    two = torch.tensor([[[0.0], [1.0]]])
    torch.testing.assert_close(interpolate_time_embed(two, 4, mode="linear")[0, :, 0],
                               torch.tensor([0.0, 0.25, 0.75, 1.0]))
    assert torch.equal(interpolate_time_embed(two, 4)[0, :, 0], torch.tensor([0.0, 0.0, 1.0, 1.0]))


def test_native_size_embeddings_are_added_unchanged_and_other_sizes_use_interpolation():
    model = tiny_timesformer(img_size=64, num_frames=4)
    with torch.no_grad():
        model.time_embed.normal_()
        x = torch.randn(1, 3, 4, 64, 64)
        tokens, _ = model.embed(x)
        patches = model.patch_embed.proj(x[:, :, 2]).flatten(2).transpose(1, 2)  # frame 2, (N, D)
        expected = patches + model.pos_embed[:, 1:] + model.time_embed[:, 2]
        torch.testing.assert_close(tokens[:, 1 + 2 * 16: 1 + 3 * 16], expected)
        torch.testing.assert_close(tokens[:, 0], (model.cls_token + model.pos_embed[:, :1])[:, 0])
        for space, time in (("bicubic", "linear"), ("nearest", "nearest")):
            model.space_interp, model.time_interp = space, time
            assert model.forward_features(torch.randn(1, 3, 7, 48, 80)).shape == (1, 24)


def test_fresh_temporal_branch_is_a_no_op_and_one_frame_equals_the_image_vit():
    """Zero-initialised temporal_fc: on a 1-frame clip a timm-initialised model is exactly the image ViT."""
    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, depth=2).eval()
    model = build_backbone("timesformer_small_patch16", depth=2, num_frames=8).eval()
    model.load_state_dict(checkpoint_filter_fn(vit.state_dict(), model, temporal_init="fresh"), strict=True)
    image = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        want = vit.forward_features(image)[:, 0]
        got = model.forward_features(image.unsqueeze(2))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("timm_name,ours,temporal_init", [
    ("vit_small_patch16_224", "timesformer_small_patch16", "copy"),
    ("vit_small_patch16_224", "timesformer_small_patch16", "fresh"),
    ("vit_base_patch16_224", "timesformer_base_patch16", "copy"),  # base once: 86M params cost seconds
])
def test_timm_vit_state_dict_file_loads_strictly(tmp_path, timm_name, ours, temporal_init):
    torch.manual_seed(0)
    vit = timm.create_model(timm_name, pretrained=False)  # random weights, with a 1000-class head
    path = tmp_path / "vit.pth"
    torch.save(vit.state_dict(), path)
    torch.manual_seed(7)
    fresh = build_backbone(ours, num_frames=16).state_dict()
    torch.manual_seed(7)  # same init draws, then the file on top
    model = build_backbone(ours, num_frames=16, pretrained=str(path), temporal_init=temporal_init)
    source = vit.state_dict()
    for name, value in model.state_dict().items():
        if name in source:  # every spatial tensor is the file's, bit for bit
            assert torch.equal(value, source[name]), name
        elif name == "time_embed" or ".temporal_fc." in name:
            assert torch.equal(value, torch.zeros_like(value)), name
        elif temporal_init == "fresh":  # temporal attention / norm: the model's own fresh init
            assert torch.equal(value, fresh[name]), name
        else:  # "copy": the spatial weights of the same block
            spatial = name.replace("temporal_attn", "attn").replace("temporal_norm1", "norm1")
            assert torch.equal(value, source[spatial]), name
    assert not torch.equal(model.blocks[3].attn.qkv.weight, fresh["blocks.3.attn.qkv.weight"])  # the file was loaded
    # Documented key differences: the image head is dropped (num_classes=0); temporal keys are filled.
    filtered = checkpoint_filter_fn(source, model, temporal_init)
    assert not any(k.startswith("head.") for k in filtered)
    assert set(filtered) == set(model.state_dict())


def test_official_timesformer_checkpoint_loads(tmp_path):
    torch.manual_seed(1)
    official = tiny_timesformer(num_classes=5, num_frames=8)
    # Official files: {"model_state": {"model.<name>": ...}} around the TimeSformer names.
    state = {"model_state": {f"model.{k}": v for k, v in official.state_dict().items()}}
    path = tmp_path / "TimeSformer_divST_8x32_224_K400.pyth"
    torch.save(state, path)
    same = tiny_timesformer(num_classes=5, num_frames=8)
    load_pretrained(same, str(path))
    x = torch.randn(1, 3, 8, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(same(x), official(x))
    # A pretraining model (no classifier, longer time_embed) takes the same file: head dropped,
    # time_embed resampled to 16 frames (nearest: each stored step twice).
    # A DINO training checkpoint: {"teacher": {"backbone.<name>", "head.<DINO head>"}}; the head is dropped.
    dino = {"teacher": {**{f"backbone.{k}": v for k, v in official.state_dict().items() if not k.startswith("head")},
                        "head.mlp.0.weight": torch.zeros(3, 24), "head.last_layer.weight_g": torch.ones(3, 1)}}
    assert set(checkpoint_filter_fn(dino, tiny_timesformer())) == set(tiny_timesformer().state_dict())
    longer = tiny_timesformer(num_classes=0, num_frames=16)
    load_pretrained(longer, str(path))
    assert torch.equal(longer.time_embed, official.time_embed.detach().repeat_interleave(2, dim=1))


def test_unreadable_checkpoint_names_the_file(tmp_path):
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="broken.pth"):
        load_pretrained(tiny_timesformer(), str(bad))


def test_activation_checkpointing_gives_the_same_gradients():
    x = torch.randn(2, 3, 4, 32, 32)
    grads = []
    for enable in (False, True):
        model = tiny_timesformer(img_size=32, grad_checkpointing=enable).train()
        model.forward_features(x).square().sum().backward()
        grads.append(model.blocks[0].temporal_attn.qkv.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_slow_fast_features_sum_the_two_clips():
    model = tiny_timesformer()
    slow, fast = torch.randn(1, 3, 8, 64, 64), torch.randn(1, 3, 16, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(slow_fast_features(model, slow, fast),
                                   model.forward_features(slow) + model.forward_features(fast))


@pytest.mark.parametrize("packed", [False, True])
def test_grouped_runner_equals_per_view_loop_in_view_order(packed):
    model = tiny_timesformer(embed_dim=16, depth=1)
    head = DINOHead(16, out_dim=32, hidden_dim=24, bottleneck_dim=8)
    runner = MultiViewRunner(model, head, packed=packed).eval()
    gen = torch.Generator().manual_seed(0)
    views = [torch.randn(2, 3, t, h, w, generator=gen) for t, h, w in SVT_VIEWS]
    with torch.no_grad():
        grouped = runner(views)
        loop = [head(model.forward_features(v)) for v in views]
        features = runner.forward_features(views)
    assert len(grouped) == len(views)
    for got, want in zip(grouped, loop):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(features[5], model.forward_features(views[5]).detach(), rtol=1e-5, atol=1e-6)


def test_grouped_runner_runs_one_backbone_pass_per_shape():
    calls = []
    model = tiny_timesformer(embed_dim=16, depth=1)
    original = model.forward_features
    model.forward_features = lambda x: (calls.append(tuple(x.shape)), original(x))[1]  # count passes
    runner = MultiViewRunner(model)
    with torch.no_grad():
        runner([torch.randn(1, 3, t, h, w) for t, h, w in SVT_VIEWS])
    assert sorted(calls) == sorted([(1, 3, 8, 224, 224), (1, 3, 16, 224, 224)]
                                   + [(2, 3, t, 96, 96) for t in (2, 4, 8, 16)])


def test_dino_head_weight_norm_and_frozen_last_layer():
    head = DINOHead(16, out_dim=50, hidden_dim=32, bottleneck_dim=8, norm_last_layer=True)
    assert head.last_layer.weight_g.requires_grad is False
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(50))
    out = head(torch.randn(4, 16))
    assert out.shape == (4, 50)
    out.sum().backward()
    assert head.last_layer.weight_v.grad is not None
    head.cancel_last_layer_gradients()
    assert head.last_layer.weight_v.grad is None
    trainable_g = DINOHead(16, out_dim=50, hidden_dim=32, bottleneck_dim=8, norm_last_layer=False)
    assert trainable_g.last_layer.weight_g.requires_grad
    assert len(trainable_g.last_layer_parameters()) == 2
    # DINO's names, so DINO head checkpoints load.
    assert {"mlp.0.weight", "mlp.2.weight", "mlp.4.weight", "last_layer.weight_g", "last_layer.weight_v"} <= set(
        head.state_dict())


def test_contrastive_heads_have_the_papers_layer_structure():
    def count(module, kind):
        return sum(isinstance(m, kind) for m in module.modules())

    projector, predictor = MoCoProjector(16, mlp_dim=32, out_dim=8), MoCoPredictor(8, mlp_dim=32)
    assert (count(projector, nn.Linear), count(projector, nn.BatchNorm1d)) == (3, 3)
    assert projector[-1].affine is False
    # MoCo_ViT's predictor ends in an affine-free BN too (moco-v3 builder.py; tests/test_contrastive_heads.py)
    assert (count(predictor, nn.Linear), count(predictor, nn.BatchNorm1d)) == (2, 2)
    assert predictor[-1].affine is False
    x = torch.randn(4, 16)
    assert predictor(projector(x)).shape == (4, 8)
    assert BYOLPredictor(8, 32)(BYOLProjector(16, 32, 8)(x)).shape == (4, 8)
    assert SimSiamPredictor(12, 6)(SimSiamProjector(16, 12)(x)).shape == (4, 12)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_packed_runner_gradients_equal_the_per_view_loop(checkpointing):
    model = tiny_timesformer(embed_dim=16, depth=2, img_size=64, grad_checkpointing=checkpointing).train()
    gen = torch.Generator().manual_seed(1)
    views = [torch.randn(2, 3, t, s, s, generator=gen) for t, s in [(4, 64), (8, 64), (2, 32), (2, 32), (4, 32)]]
    weights = [torch.randn(2, 16, generator=gen) for _ in views]
    grads = []
    for packed in (True, False):
        model.zero_grad()
        features = (MultiViewRunner(model, packed=True).forward_features(views) if packed
                    else [model.forward_features(v) for v in views])
        sum((f * w).sum() for f, w in zip(features, weights)).backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_packed_runner_needs_a_packing_backbone():
    with pytest.raises(ValueError, match="forward_features takes a list of clips"):
        MultiViewRunner(nn.Linear(2, 2), packed=True)


@pytest.mark.parametrize("with_mask", [False, True])
def test_bf16_cpu_attention_matches_fp32_values_and_gradients(with_mask):
    """``attention`` takes the math backend for bf16 on a CPU (the fused kernel's backward is slow there);
    it must still be the same attention: compare with fp32 SDPA, forward and input gradients."""
    from models.layers import attention
    torch.manual_seed(0)
    q, k, v = (torch.randn(6, 3, 17, 16, requires_grad=True) for _ in range(3))
    mask = torch.randn(1, 3, 17, 17) if with_mask else None
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    want_grads = torch.autograd.grad(want.square().sum(), (q, k, v))
    q16, k16, v16 = (t.detach().bfloat16().requires_grad_() for t in (q, k, v))
    got = attention(q16, k16, v16, attn_mask=None if mask is None else mask.bfloat16())
    got_grads = torch.autograd.grad(got.float().square().sum(), (q16, k16, v16))
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.05)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g.float(), w, rtol=0.1, atol=0.1)


def test_one_forward_takes_a_tensor_or_a_list_of_clips():
    """Attention, block and model each have one forward: a tensor gives a tensor, a list gives the list of
    per-input results (computed packed: shared matmuls, attention per sequence length)."""
    from models.layers import Attention

    model = tiny_timesformer(embed_dim=16, depth=1, img_size=64)
    gen = torch.Generator().manual_seed(3)
    clips = [torch.randn(2, 3, t, s, s, generator=gen) for t, s in [(4, 64), (2, 32), (4, 32), (2, 32)]]
    with torch.no_grad():
        features = model.forward_features(clips)
        outputs = model(clips)
        for clip, feature, output in zip(clips, features, outputs):
            torch.testing.assert_close(feature, model.forward_features(clip), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(output, model(clip), rtol=1e-5, atol=1e-6)
        embedded = [model.embed(c) for c in clips]
        block = model.blocks[0]
        for got, (tokens, frames) in zip(block([e[0] for e in embedded], [e[1] for e in embedded]), embedded):
            torch.testing.assert_close(got, block(tokens, frames), rtol=1e-5, atol=1e-6)
        attn = Attention(16, num_heads=2).eval()
        xs = [torch.randn(b, n, 16, generator=gen) for b, n in [(3, 5), (2, 7), (4, 5)]]
        for got, x in zip(attn(xs), xs):
            torch.testing.assert_close(got, attn(x), rtol=1e-5, atol=1e-6)
        assert isinstance(attn(xs[0]), torch.Tensor)


def test_contrastive_encoder_groups_its_backbone_passes_as_the_runner():
    """ContrastiveEncoder is a MultiViewRunner: one backbone pass per clip shape, heads once per clip."""
    from models import ContrastiveEncoder

    calls = []
    model = tiny_timesformer(embed_dim=16, depth=1, img_size=64)
    original = model.forward_features
    model.forward_features = lambda x: (calls.append(tuple(x.shape)), original(x))[1]  # count passes
    encoder = ContrastiveEncoder(model, MoCoProjector(16, mlp_dim=16, out_dim=8), MoCoPredictor(8, 16)).eval()
    assert isinstance(encoder, MultiViewRunner)
    clips = [torch.randn(2, 3, 4, 32, 32), torch.randn(2, 3, 4, 32, 32), torch.randn(2, 3, 2, 64, 64)]
    with torch.no_grad():
        predictions, projections = encoder(clips)
        assert sorted(calls) == [(2, 3, 2, 64, 64), (4, 3, 4, 32, 32)]
        for clip, p, z in zip(clips, predictions, projections):
            torch.testing.assert_close(z, encoder.head(original(clip)), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(p, encoder.predictor(z))
    assert {k.split(".")[0] for k in encoder.state_dict()} == {"backbone", "head", "predictor"}


def test_patch_embeddings_are_timms_and_keep_the_checkpoint_names():
    from timm.layers import PatchEmbed

    from models.layers import PatchEmbed3D

    timesformer, swin = tiny_timesformer(), build_backbone("stswin_tiny_test")
    assert isinstance(timesformer.patch_embed, PatchEmbed) and isinstance(swin.patch_embed, PatchEmbed3D)
    assert {k for k in timesformer.state_dict() if k.startswith("patch_embed.")} == {
        "patch_embed.proj.weight", "patch_embed.proj.bias"}
    assert {k for k in swin.state_dict() if k.startswith("patch_embed.")} == {
        "patch_embed.proj.weight", "patch_embed.proj.bias", "patch_embed.norm.weight", "patch_embed.norm.bias"}
