"""TimeSformer against the official SVT / TimeSformer code: embedding resampling, checkpoint layouts,
float64 features at every SVT view size, and the SVT initialisation (model.pretrained)."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import resample_abs_pos_embed

from models import DINOHead, TimeSformer, build_backbone, load_pretrained, split_checkpoint
from models.pretrained import read_checkpoint
from models.timesformer import interpolate_pos_embed, interpolate_time_embed

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
# SVT's view sizes (T, H=W): global T=8, 16 at 224, local T=2, 4, 8, 16 at 96 (paper Sec. 3.1), and the
# fast clip of slow-fast inference, T=64 at 96 (Sec. 3.4).
SVT_VIEW_SIZES = [(8, 224), (16, 224), (2, 96), (4, 96), (8, 96), (16, 96), (64, 96)]
DIM, DEPTH, HEADS, PATCH = 16, 2, 2, 16


def nearest_index(stored: int, new: int) -> list[int]:
    """The source index F.interpolate(mode="nearest") reads for each output index: floor(dst * in / out)."""
    return [(dst * stored) // new for dst in range(new)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_nearest_resampling_is_the_explicit_index_mapping(dtype):
    gen = torch.Generator().manual_seed(0)
    pos_embed = torch.randn(1, 1 + 14 * 14, 5, generator=gen).to(dtype)
    grid = rearrange(pos_embed[0, 1:], "(h w) d -> h w d", h=14)
    for gh, gw in [(6, 6), (14, 14), (4, 9), (20, 7), (1, 3)]:
        rows, cols = nearest_index(14, gh), nearest_index(14, gw)
        want = torch.cat((pos_embed[:, :1], rearrange(grid[rows][:, cols], "h w d -> 1 (h w) d")), dim=1)
        got = interpolate_pos_embed(pos_embed, (gh, gw))
        assert got.dtype == dtype and torch.equal(got, want), (gh, gw)
    for stored in (8, 16):
        time_embed = torch.randn(1, stored, 5, generator=gen).to(dtype)
        for frames in (1, 2, 4, 8, 16, 64):
            got = interpolate_time_embed(time_embed, frames)
            assert got.dtype == dtype and torch.equal(got, time_embed[:, nearest_index(stored, frames)]), frames


def test_bicubic_and_linear_stay_selectable_and_bicubic_is_timms_resampler():
    pos_embed = torch.randn(1, 1 + 14 * 14, 5)
    want = resample_abs_pos_embed(pos_embed, [6, 6], num_prefix_tokens=1, interpolation="bicubic", antialias=False)
    assert torch.equal(interpolate_pos_embed(pos_embed, (6, 6), mode="bicubic"), want)
    model = TimeSformer(embed_dim=DIM, depth=1, num_heads=HEADS, img_size=64, num_frames=8,
                        space_interp="bicubic", time_interp="linear").eval()
    with torch.no_grad():
        model.time_embed.normal_()
        smooth = model.forward_features(torch.ones(1, 3, 4, 32, 32))
        model.space_interp, model.time_interp = "nearest", "nearest"
        assert not torch.allclose(smooth, model.forward_features(torch.ones(1, 3, 4, 32, 32)))


# ---- a faithful copy of the official forward (reference for the float64 comparison) -----------------------
# Official state dict names: kahnchana/svt models/timesformer.py (@1eaf35c; identical in
# facebookresearch/TimeSformer timesformer/models/vit.py): VisionTransformer.__init__ (~lines 215-263),
# Block.__init__ (~lines 92-114), Attention (~lines 55-87), Mlp (~lines 36-52).

def official_state_dict(frames: int, num_classes: int = 0, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random float64 tensors under the official TimeSformer names (every tensor non-trivial)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.3):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale)

    sd = {"cls_token": rand(1, 1, DIM, scale=1.0), "pos_embed": rand(1, 1 + 14 * 14, DIM, scale=1.0),
          "time_embed": rand(1, frames, DIM, scale=1.0),
          "patch_embed.proj.weight": rand(DIM, 3, PATCH, PATCH, scale=0.05),
          "patch_embed.proj.bias": rand(DIM), "norm.weight": 1 + rand(DIM, scale=0.1), "norm.bias": rand(DIM)}
    for i in range(DEPTH):
        b = f"blocks.{i}."
        for norm in ("norm1", "temporal_norm1", "norm2"):
            sd[f"{b}{norm}.weight"], sd[f"{b}{norm}.bias"] = 1 + rand(DIM, scale=0.1), rand(DIM, scale=0.1)
        for attn in ("attn", "temporal_attn"):
            sd[f"{b}{attn}.qkv.weight"], sd[f"{b}{attn}.qkv.bias"] = rand(3 * DIM, DIM), rand(3 * DIM)
            sd[f"{b}{attn}.proj.weight"], sd[f"{b}{attn}.proj.bias"] = rand(DIM, DIM), rand(DIM)
        sd[f"{b}temporal_fc.weight"], sd[f"{b}temporal_fc.bias"] = rand(DIM, DIM), rand(DIM)
        sd[f"{b}mlp.fc1.weight"], sd[f"{b}mlp.fc1.bias"] = rand(4 * DIM, DIM), rand(4 * DIM)
        sd[f"{b}mlp.fc2.weight"], sd[f"{b}mlp.fc2.bias"] = rand(DIM, 4 * DIM), rand(DIM)
    if num_classes:
        sd["head.weight"], sd["head.bias"] = rand(num_classes, DIM), rand(num_classes)
    return sd


def _official_attention(sd, prefix, x):
    # Attention.forward (~lines 68-87): explicit softmax(q k^T * scale) v
    B, N, C = x.shape
    qkv = F.linear(x, sd[prefix + "qkv.weight"], sd[prefix + "qkv.bias"])
    qkv = qkv.reshape(B, N, 3, HEADS, C // HEADS).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = ((q @ k.transpose(-2, -1)) * (C // HEADS) ** -0.5).softmax(dim=-1)
    x = (attn @ v).transpose(1, 2).reshape(B, N, C)
    return F.linear(x, sd[prefix + "proj.weight"], sd[prefix + "proj.bias"])


def _official_block(sd, b, x, B, T, W):
    # Block.forward, attention_type == 'divided_space_time' (~lines 116-185); tokens ordered (h w t).
    def norm(name, y):
        return F.layer_norm(y, (DIM,), sd[f"{b}{name}.weight"], sd[f"{b}{name}.bias"], eps=1e-6)

    H = (x.size(1) - 1) // T // W
    xt = rearrange(x[:, 1:, :], "b (h w t) m -> (b h w) t m", b=B, h=H, w=W, t=T)
    res_temporal = _official_attention(sd, f"{b}temporal_attn.", norm("temporal_norm1", xt))
    res_temporal = rearrange(res_temporal, "(b h w) t m -> b (h w t) m", b=B, h=H, w=W, t=T)
    res_temporal = F.linear(res_temporal, sd[f"{b}temporal_fc.weight"], sd[f"{b}temporal_fc.bias"])
    xt = x[:, 1:, :] + res_temporal
    init_cls_token = x[:, 0, :].unsqueeze(1)
    cls_token = rearrange(init_cls_token.repeat(1, T, 1), "b t m -> (b t) m", b=B, t=T).unsqueeze(1)
    xs = rearrange(xt, "b (h w t) m -> (b t) (h w) m", b=B, h=H, w=W, t=T)
    xs = torch.cat((cls_token, xs), 1)
    res_spatial = _official_attention(sd, f"{b}attn.", norm("norm1", xs))
    cls_token = torch.mean(rearrange(res_spatial[:, 0, :], "(b t) m -> b t m", b=B, t=T), 1, True)
    res_spatial = rearrange(res_spatial[:, 1:, :], "(b t) (h w) m -> b (h w t) m", b=B, h=H, w=W, t=T)
    x = torch.cat((init_cls_token, xt), 1) + torch.cat((cls_token, res_spatial), 1)
    hidden = F.gelu(F.linear(norm("norm2", x), sd[f"{b}mlp.fc1.weight"], sd[f"{b}mlp.fc1.bias"]))
    return x + F.linear(hidden, sd[f"{b}mlp.fc2.weight"], sd[f"{b}mlp.fc2.bias"])


def official_forward_features(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """VisionTransformer.forward_features of kahnchana/svt models/timesformer.py (~lines 285-345), eval mode."""
    B, T = x.shape[0], x.shape[2]
    # PatchEmbed.forward (~lines 203-209)
    x = F.conv2d(rearrange(x, "b c t h w -> (b t) c h w"), sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"],
                 stride=PATCH)
    W = x.size(-1)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat((sd["cls_token"].expand(x.size(0), -1, -1), x), dim=1)
    # "resizing the positional embeddings in case they don't match the input at inference"
    pos_embed = sd["pos_embed"]
    if x.size(1) != pos_embed.size(1):
        cls_pos_embed = pos_embed[0, 0, :].unsqueeze(0).unsqueeze(1)
        other_pos_embed = pos_embed[0, 1:, :].unsqueeze(0).transpose(1, 2)
        P = int(other_pos_embed.size(2) ** 0.5)
        H = x.size(1) // W
        other_pos_embed = other_pos_embed.reshape(1, x.size(2), P, P)
        new_pos_embed = F.interpolate(other_pos_embed, size=(H, W), mode="nearest")
        new_pos_embed = new_pos_embed.flatten(2).transpose(1, 2)
        x = x + torch.cat((cls_pos_embed, new_pos_embed), 1)
    else:
        x = x + pos_embed
    # "Time Embeddings" / "Resizing time embeddings in case they don't match"
    cls_tokens = x[:B, 0, :].unsqueeze(1)
    x = rearrange(x[:, 1:], "(b t) n m -> (b n) t m", b=B, t=T)
    time_embed = sd["time_embed"]
    if T != time_embed.size(1):
        x = x + F.interpolate(time_embed.transpose(1, 2), size=(T), mode="nearest").transpose(1, 2)
    else:
        x = x + time_embed
    x = rearrange(x, "(b n) t m -> b (n t) m", b=B, t=T)
    x = torch.cat((cls_tokens, x), dim=1)
    for i in range(DEPTH):
        x = _official_block(sd, f"blocks.{i}.", x, B, T, W)
    return F.layer_norm(x, (DIM,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)[:, 0]


def dino_head_state(seed: int = 1) -> dict[str, torch.Tensor]:
    """DINO's head names (facebookresearch/dino vision_transformer.py DINOHead, nlayers=3, weight-normed last layer)."""
    gen = torch.Generator().manual_seed(seed)
    hidden, bottleneck, out = 24, 8, 32
    shapes = {"mlp.0.weight": (hidden, DIM), "mlp.0.bias": (hidden,), "mlp.2.weight": (hidden, hidden),
              "mlp.2.bias": (hidden,), "mlp.4.weight": (bottleneck, hidden), "mlp.4.bias": (bottleneck,),
              "last_layer.weight_g": (out, 1), "last_layer.weight_v": (out, bottleneck)}
    return {k: torch.randn(*s, generator=gen, dtype=torch.float64) for k, s in shapes.items()}


def _float64_model(stored_frames: int, **kw) -> TimeSformer:
    return TimeSformer(img_size=224, patch_size=PATCH, embed_dim=DIM, depth=DEPTH, num_heads=HEADS,
                       num_frames=stored_frames, **kw).double().eval()


@pytest.fixture(scope="module")
def svt_release(tmp_path_factory):
    """An SVT release-layout file ({"teacher": {"backbone.*", "head.*"}}, like kinetics400_vitb_ssl.pth) of
    a small model trained with the official 8-frame time_embed; DINO's training-checkpoint extras beside it
    (``args`` is an argparse.Namespace, which a plain ``weights_only`` load refuses)."""
    backbone, head = official_state_dict(frames=8), dino_head_state()
    path = tmp_path_factory.mktemp("svt") / "kinetics400_vitb_ssl.pth"
    torch.save({"teacher": {**{f"backbone.{k}": v for k, v in backbone.items()},
                            **{f"head.{k}": v for k, v in head.items()}},
                "epoch": 20, "args": argparse.Namespace(arch="timesformer", lr=5e-4)}, path)
    return path, backbone, head


def test_svt_release_checkpoint_loads_strictly_and_keeps_every_tensor(svt_release):
    path, backbone, head = svt_release
    model = _float64_model(8)
    load_pretrained(model, str(path))  # strict inside
    state = model.state_dict()
    assert set(state) == set(backbone)
    for name, value in backbone.items():
        assert state[name].dtype == torch.float64 and torch.equal(state[name], value), name
    # The DINO head is not dropped: split_checkpoint hands it over under DINO's names.
    split_backbone, split_head = split_checkpoint(read_checkpoint(str(path)))
    assert set(split_backbone) | {f"head.{k}" for k in split_head} == set(backbone) | {f"head.{k}" for k in head}
    dino_head = DINOHead(DIM, out_dim=32, hidden_dim=24, bottleneck_dim=8).double()
    dino_head.load_state_dict(split_head, strict=True)
    for name, value in head.items():
        assert torch.equal(dino_head.state_dict()[name], value), name


def test_official_timesformer_checkpoint_loads_strictly_and_keeps_every_tensor(tmp_path):
    # TimeSformer_divST_8x32_224_K400.pyth layout: {"model_state": {"model.<name>"}} with a classifier.
    source = official_state_dict(frames=8, num_classes=5)
    path = tmp_path / "TimeSformer_divST_8x32_224_K400.pyth"
    torch.save({"model_state": {f"model.{k}": v for k, v in source.items()}}, path)
    model = _float64_model(8, num_classes=5)
    load_pretrained(model, str(path))
    state = model.state_dict()
    assert set(state) == set(source) and all(torch.equal(state[k], v) for k, v in source.items())


@pytest.mark.parametrize("stored_frames", [8, 16])
def test_float64_features_equal_the_official_forward_at_every_svt_view_size(svt_release, stored_frames):
    """The release checkpoint in our model (default resampling) gives the official model's features to float64
    round-off at every SVT view size, for the official 8-frame time_embed and for the recipe's 16 (loaded by
    nearest repetition, which composes exactly with the per-input nearest resampling)."""
    path, backbone, _ = svt_release
    model = _float64_model(stored_frames)
    load_pretrained(model, str(path))
    gen = torch.Generator().manual_seed(2)
    clips = [torch.randn(2, 3, t, s, s, generator=gen, dtype=torch.float64) for t, s in SVT_VIEW_SIZES]
    with torch.no_grad():
        want = [official_forward_features(backbone, clip) for clip in clips]
        got = [model.forward_features(clip) for clip in clips]
        packed = model.forward_features(clips)  # a list of clips: the packed multi-view path of training
    for (t, s), w, g, p in zip(SVT_VIEW_SIZES, want, got, packed):
        assert g.dtype == torch.float64
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10, msg=f"T={t} @ {s}")
        torch.testing.assert_close(p, w, rtol=1e-10, atol=1e-10, msg=f"packed T={t} @ {s}")
    # The comparison is sharp: the smooth resamplers give other features off the native size.
    smooth = _float64_model(stored_frames, space_interp="bicubic", time_interp="linear")
    load_pretrained(smooth, str(path))
    with torch.no_grad():
        assert not torch.allclose(smooth.forward_features(clips[5]), want[5], rtol=1e-4, atol=1e-4)


# ---- SVT initialisation: model.pretrained ---------------------------------------------------------------------

def _offline_hub(monkeypatch, cache: Path) -> None:
    """timm's cache is the Hugging Face Hub cache; point it at ``cache`` and switch the hub client offline
    (its own HF_HUB_OFFLINE switch, read at import, so set on the module) so no test touches the network."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))


def test_timm_tag_loads_through_timm_from_its_hugging_face_cache(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    _offline_hub(monkeypatch, tmp_path)
    tag = "vit_tiny_patch16_224.augreg_in21k"
    repo = timm.models.get_pretrained_cfg(tag).hf_hub_id
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)  # random weights
    snapshot = tmp_path / f"models--{repo.replace('/', '--')}" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    save_file(vit.state_dict(), str(snapshot / "model.safetensors"))  # the layout hf_hub_download writes
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    model = build_backbone("timesformer_tiny_patch16", num_frames=4, img_size=224, pretrained=tag)
    for name, value in vit.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name


@pytest.mark.parametrize("pretrained", ["default", "missing_file"])
def test_unreachable_pretrained_weights_stop_train_py_with_one_line(tmp_path, monkeypatch, capsys, pretrained):
    """configs/svt_vitb16.yaml names DINO ViT-B/16 by its timm tag; with the tag neither cached nor
    downloadable (offline) or a missing file, train.py stops before any loader with one line, exit 2."""
    from training.cli import main

    _offline_hub(monkeypatch, tmp_path / "empty_cache")
    missing = tmp_path / "dino_vitbase16_pretrain.pth"
    overrides = [] if pretrained == "default" else [f"model.pretrained={missing}"]
    assert main(["--config", str(ROOT / "configs" / "svt_vitb16.yaml"), *overrides]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: model.pretrained: ") and "model.pretrained=none" in lines[0]
    assert "dino_vitbase16_pretrain.pth" in lines[0]  # where to get the file
    if pretrained == "default":
        assert "timm.create_model('vit_base_patch16_224.dino', pretrained=True)" in lines[0]
    else:
        assert f"{missing}: no such file" in lines[0]


def test_recipes_name_their_initialisation():
    from training.config import load_config

    svt = load_config(ROOT / "configs" / "svt_vitb16.yaml")
    assert (svt.model.pretrained, svt.model.temporal_init) == ("vit_base_patch16_224.dino", "fresh")
    assert svt.model.backbone_kwargs["num_frames"] == 16
    assert load_config(ROOT / "configs" / "demo_cpu.yaml").model.pretrained == "none"  # the demo trains from scratch


def test_train_py_student_starts_from_the_file_and_the_teacher_copies_it(tmp_path):
    from training.config import config_from_dict
    from training.methods import build_method

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, depth=2, img_size=32)
    path = tmp_path / "vit.pth"
    torch.save(vit.state_dict(), path)
    cfg = config_from_dict({"model": {"backbone": "timesformer_tiny_patch16", "pretrained": str(path),
                                      "backbone_kwargs": {"depth": 2, "img_size": 32, "num_frames": 4},
                                      "out_dim": 16, "hidden_dim": 16, "bottleneck_dim": 8}})
    method = build_method(cfg, ["global_0", "global_1", "local_0"])
    for runner in (method.student, method.teacher):
        state = runner.backbone.state_dict()
        assert all(torch.equal(state[k], v) for k, v in vit.state_dict().items())
