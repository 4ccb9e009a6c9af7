"""Space-Time Swin (shapes, shifted-window locality, bias index) and analytic FLOPs vs FlopCounterMode."""
from __future__ import annotations

import itertools

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from models import DINOHead, MultiViewRunner, build_backbone
from models.flops import forward_flops, head_flops, views_flops
from models.stswin import SwinBlock3D, _relative_position_index

torch.set_num_threads(1)

SVT_VIEWS = [(8, 224, 224), (16, 224, 224)] + [(t, 96, 96) for t in (2, 4, 8, 16)]
ODD_VIEWS = [(3, 50, 70), (1, 20, 20), (64, 96, 96)]


def tiny_swin(**kw):
    torch.manual_seed(0)
    return build_backbone("stswin_tiny_test", **kw).eval()


@pytest.mark.parametrize("thw", SVT_VIEWS + ODD_VIEWS)
def test_swin_output_shape_for_every_view_size(thw):
    model = tiny_swin()
    with torch.no_grad():
        features = model.forward_features(torch.randn(1, 3, *thw))
    assert features.shape == (1, model.embed_dim) == (1, 24)
    assert torch.isfinite(features).all()


@pytest.mark.parametrize("shifted,source,window_tokens", [(False, (3, 0, 4), 18), (True, (3, 0, 4), 2),
                                                           (True, (1, 2, 2), 18)])
def test_window_attention_mixes_exactly_the_tokens_of_one_shifted_window(shifted, source, window_tokens):
    """Perturb one token: exactly the tokens of its (shifted) window change, nothing across the roll seam."""
    torch.manual_seed(0)
    window, shift = (2, 3, 3), ((1, 1, 1) if shifted else (0, 0, 0))
    block = SwinBlock3D(8, 2, window, shift).double().eval()
    with torch.no_grad():  # large weights so that attention visibly mixes tokens
        for param in block.attn.parameters():
            param.normal_(std=0.5)
    size = (4, 6, 6)
    x = torch.randn(1, *size, 8, dtype=torch.float64)
    moved = x.clone()
    moved[0, source[0], source[1], source[2]] += torch.randn(8, dtype=torch.float64)  # not constant: LayerNorm
    with torch.no_grad():
        changed = (block(moved) - block(x)).abs().amax(dim=-1)[0] > 1e-9

    def window_of(position):  # shifted partition without wrap-around: floor((p - s) / w) per axis
        return tuple((p - s) // w for p, s, w in zip(position, shift, window))

    expected = torch.zeros(size, dtype=torch.bool)
    for position in itertools.product(*[range(n) for n in size]):
        expected[position] = window_of(position) == window_of(source)
    assert torch.equal(changed, expected)
    # (3, 0, 4) in the shifted grid sits at the roll seam, so its window is cut to 2 tokens.
    assert int(expected.sum()) == window_tokens


def test_relative_position_index_reads_one_entry_per_offset():
    index = _relative_position_index((2, 3, 3), (2, 3, 3))
    assert index.shape == (18, 18)
    assert index.unique().numel() == 3 * 5 * 5
    assert int(index.diagonal().unique().item()) == (3 * 5 * 5) // 2  # zero offset sits in the middle
    # A shrunk window (input smaller than the window) reads the same entries for the same offsets.
    small = _relative_position_index((1, 2, 2), (2, 3, 3))
    assert int(small[0, 3]) == int(index[0, 4])  # offset (0, 1, 1) in both


def test_swin_grouped_runner_equals_loop_and_checkpointing_keeps_gradients():
    model = tiny_swin()
    views = [torch.randn(2, 3, *thw) for thw in [(4, 32, 32), (2, 24, 24), (4, 32, 32)]]
    runner = MultiViewRunner(model)
    with torch.no_grad():
        for got, view in zip(runner(views), views):
            torch.testing.assert_close(got, model.forward_features(view), rtol=1e-5, atol=1e-6)
    grads = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        model.forward_features(views[0]).square().sum().backward()
        grads.append(model.layers[0].blocks[1].attn.relative_position_bias_table.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("name,expected_millions", [("stswin_t", 27.85), ("stswin_s", 49.51), ("stswin_b", 87.64)])
def test_swin_named_variants_have_video_swin_sizes(name, expected_millions):
    # Video Swin T/S/B report 28.2M / 49.8M / 88.1M with a 400-class head (0.3M / 0.3M / 0.4M).
    with torch.device("meta"):
        model = build_backbone(name)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(expected_millions, abs=0.02)


def _profiled_flops_per_sample(module, x):
    # The math SDPA backend decomposes into bmm, which FlopCounterMode counts (fused CPU kernels are not).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        module(x)
    return counter.get_total_flops() // x.shape[0]


@pytest.mark.parametrize("shape", [(3, 4, 64, 64), (3, 2, 32, 48), (3, 1, 16, 16)])
def test_timesformer_flops_match_the_profiler(shape):
    torch.manual_seed(0)
    model = build_backbone("timesformer_tiny_patch16", embed_dim=24, depth=2, num_heads=2, img_size=64).eval()
    assert forward_flops(model, shape) == _profiled_flops_per_sample(model.forward_features, torch.randn(2, *shape))


@pytest.mark.parametrize("shape", [(3, 4, 32, 32), (3, 8, 40, 56), (3, 3, 50, 70), (3, 2, 12, 12)])
def test_swin_flops_match_the_profiler(shape):
    model = tiny_swin()
    assert forward_flops(model, shape) == _profiled_flops_per_sample(model.forward_features, torch.randn(2, *shape))


def test_head_and_runner_flops_match_the_profiler():
    torch.manual_seed(0)
    head = DINOHead(24, out_dim=40, hidden_dim=32, bottleneck_dim=8).eval()
    assert forward_flops(head, (24,)) == head_flops(head)
    # weight-norm arithmetic is elementwise (not counted); the profiler sees the 4 matmuls.
    assert head_flops(head) == _profiled_flops_per_sample(head, torch.randn(3, 24))
    model = build_backbone("timesformer_tiny_patch16", embed_dim=24, depth=1, num_heads=2, img_size=64).eval()
    runner = MultiViewRunner(model, head)
    shapes = [(3, 4, 64, 64), (3, 2, 32, 32), (3, 2, 32, 32)]
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        runner([torch.randn(1, *s) for s in shapes])
    assert views_flops(model, head, shapes) == counter.get_total_flops()
    assert forward_flops(runner, shapes[0]) == forward_flops(model, shapes[0]) + head_flops(head)


def test_flops_count_a_backbone_without_a_formula_and_leave_it_alone():
    """Any backbone is counted (on a hook-free meta copy): the engine's hooks do not run, the weights stay put."""
    from tests.train_fixtures import TinyBackbone

    torch.manual_seed(0)
    model = TinyBackbone()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def refuse(module, args):
        raise AssertionError("the counted model itself must not run")

    handle = model.register_forward_pre_hook(refuse)
    shape = (3, 4, 8, 8)
    count = forward_flops(model, shape)
    handle.remove()
    assert count == _profiled_flops_per_sample(model.forward_features, torch.randn(2, *shape)) > 0
    assert all(torch.equal(v, before[k]) and v.device.type == "cpu" for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="TinyBackbone does not run on the meta device"):
        forward_flops(model, (5, 4, 8, 8))  # wrong channel count: one line naming the model and the input


@pytest.mark.parametrize("name,shape,paper_gmacs", [
    # LSTCL Table 4: TimeSformer 8x224^2, 0.59 TFLOPs for its 3 test views (196 G multiply-adds each).
    ("timesformer_base_patch16", (3, 8, 224, 224), 196),
    # Video Swin (Liu et al. 2022) Table 1, per 32x224^2 view: Swin-T 88G, Swin-S 166G, Swin-B 282G.
    ("stswin_t", (3, 32, 224, 224), 88),
    ("stswin_s", (3, 32, 224, 224), 166),
    ("stswin_b", (3, 32, 224, 224), 282),
])
def test_full_size_flops_match_the_papers(name, shape, paper_gmacs):
    """Papers count multiply-adds (fvcore); FlopCounterMode counts 2 per multiply-add."""
    with torch.device("meta"):
        model = build_backbone(name, num_frames=8) if name.startswith("timesformer") else build_backbone(name)
    assert forward_flops(model, shape) / 2e9 == pytest.approx(paper_gmacs, rel=0.005)
