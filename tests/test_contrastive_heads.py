"""MoCo v3 / BYOL / SimSiam heads as their papers build them, per-clip BatchNorm, SyncBatchNorm on CPU/gloo."""
from __future__ import annotations

import os
import socket
import tempfile

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn

from models.heads import MoCoPredictor, MoCoProjector, SyncBatchNorm, convert_sync_batchnorm

torch.set_num_threads(1)
F64 = torch.float64


def moco_v3_build_mlp(num_layers, input_dim, mlp_dim, output_dim, last_bn=True):
    """facebookresearch/moco-v3 moco/builder.py ``MoCo._build_mlp``, as written there."""
    mlp = []
    for l in range(num_layers):  # noqa: E741
        dim1 = input_dim if l == 0 else mlp_dim
        dim2 = output_dim if l == num_layers - 1 else mlp_dim
        mlp.append(nn.Linear(dim1, dim2, bias=False))
        if l < num_layers - 1:
            mlp.append(nn.BatchNorm1d(dim2))
            mlp.append(nn.ReLU(inplace=True))
        elif last_bn:
            mlp.append(nn.BatchNorm1d(dim2, affine=False))
    return nn.Sequential(*mlp)


def _layout(module: nn.Module) -> list[tuple]:
    out = []
    for m in module:
        if isinstance(m, nn.Linear):
            out.append(("linear", m.in_features, m.out_features, m.bias is not None))
        elif isinstance(m, nn.BatchNorm1d):
            out.append(("bn", m.num_features, m.affine))
        else:
            out.append((type(m).__name__,))
    return out


def test_mocov3_vit_projector_and_predictor_end_in_affine_free_batchnorm():
    # MoCo_ViT: projector _build_mlp(3, hidden, mlp, dim), predictor _build_mlp(2, dim, mlp, dim) (last_bn=True)
    assert _layout(MoCoProjector(12, mlp_dim=16, out_dim=8)) == _layout(moco_v3_build_mlp(3, 12, 16, 8))
    predictor = MoCoPredictor(8, mlp_dim=16)
    assert _layout(predictor) == _layout(moco_v3_build_mlp(2, 8, 16, 8))
    assert isinstance(predictor[-1], nn.BatchNorm1d) and not predictor[-1].affine
    # MoCo_ResNet's predictor (last_bn=False) stays selectable
    assert _layout(MoCoPredictor(8, mlp_dim=16, last_bn=False)) == _layout(moco_v3_build_mlp(2, 8, 16, 8, False))


def _tiny_encoder(seed: int = 0):
    from tests.train_fixtures import TinyBackbone
    from models import ContrastiveEncoder
    from training.methods import _teacher_from_student

    torch.manual_seed(seed)
    student = ContrastiveEncoder(TinyBackbone(), MoCoProjector(12, mlp_dim=16, out_dim=8), MoCoPredictor(8, 16))
    teacher = _teacher_from_student(ContrastiveEncoder(TinyBackbone(), MoCoProjector(12, mlp_dim=16, out_dim=8)),
                                    student)
    return student, teacher


def _clips(seed: int = 1, batch: int = 8):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, 4, 4, 4, generator=gen) for _ in range(2)]


def test_short_and_long_clips_do_not_share_a_batchnorm_batch():
    """Each clip's head output depends on that clip's batch only (MoCo v3 forwards each crop separately)."""
    student, _ = _tiny_encoder()
    short, long = _clips()
    (p_short, _), (z_short, _) = student([short, long])
    (p_other, _), (z_other, _) = student([short, 5.0 * long + 1.0])
    torch.testing.assert_close(z_other, z_short)
    torch.testing.assert_close(p_other, p_short)
    alone = student.head(student.backbone.forward_features(short))
    torch.testing.assert_close(z_short, alone)
    torch.testing.assert_close(p_short, student.predictor(alone))


def test_mocov3_method_masks_a_videos_view_sets_only_with_repeats_and_the_mask_setting():
    """build_method: MoCo v3 with data.repeats > 1 passes the batch's video ids to the loss (same-video
    view-sets out of the negatives); R = 1, objective.mask_same_video=false, BYOL and SimSiam do not."""
    from tests.train_fixtures import tiny_config
    from training.config import apply_overrides, config_from_dict, config_to_dict
    from training.methods import build_method

    def method(**overrides):
        raw = config_to_dict(tiny_config())
        raw["objective"]["name"] = overrides.pop("name", "mocov3")
        raw["data"].update(shards="unused", recipe="lstcl")
        raw["model"] = {"backbone": "timesformer_tiny_patch16", "proj_dim": 8, "proj_hidden_dim": 16,
                        "pred_hidden_dim": 16, "backbone_kwargs": {"depth": 1, "img_size": 16, "num_frames": 2}}
        apply_overrides(raw, [f"{k}={v}" for k, v in overrides.items()])
        return build_method(config_from_dict(raw), ["short", "long"])

    assert method(**{"data.repeats": 2}).mask_same_video
    assert not method().mask_same_video
    assert not method(**{"data.repeats": 2, "objective.mask_same_video": "false"}).mask_same_video
    assert not method(name="byol", **{"data.repeats": 2}).mask_same_video
    moco = method(**{"data.repeats": 2})
    gen = torch.Generator().manual_seed(3)
    p1, p2, z1, z2, k1, k2 = [torch.randn(4, 8, generator=gen) for _ in range(6)]
    ids = torch.tensor([7, 7, 2, 2])
    loss, _ = moco.loss(((p1, p2), (z1, z2)), (None, (k1, k2)), teacher_temp=0.0, video_ids=ids)
    torch.testing.assert_close(loss, moco.objective(p1, p2, k1, k2, video_ids=ids)["loss"])
    assert not torch.isclose(loss, moco.objective(p1, p2, k1, k2)["loss"])
    with pytest.raises(ValueError, match="video ids"):
        moco.loss(((p1, p2), (z1, z2)), (None, (k1, k2)), teacher_temp=0.0)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 4),
                         nn.BatchNorm1d(4, affine=False)).to(F64)


def _bn_batch() -> torch.Tensor:
    return torch.randn(10, 5, generator=torch.Generator().manual_seed(4), dtype=F64)


def _rank_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    from training.engine import build_engine, init_distributed

    init_distributed("gloo", timeout_s=60, torch_threads=1)
    try:
        # 1. the module alone, float64: this rank's half of the batch through SyncBatchNorm
        net = convert_sync_batchnorm(_bn_net())
        x = _bn_batch().chunk(world)[rank].clone().requires_grad_(True)
        y = net(x)
        (y.square().sum() * torch.arange(1, 5, dtype=F64)).sum().backward()
        result = {"y": y.detach(), "x_grad": x.grad, "param_grads": [p.grad for p in net.parameters()],
                  "buffers": [b.clone() for b in net.buffers()]}
        # 2. a real DeepSpeed engine at world size 2: every head BatchNorm converted, student and teacher
        from objectives import MoCoV3Loss
        from tests.train_fixtures import tiny_config

        student, teacher = _tiny_encoder()
        cfg = tiny_config(**{"trainer.zero_stage": 0, "trainer.grad_accum_steps": 1, "trainer.batch_size_per_gpu": 4,
                             "optim.clip_grad": 0.0})
        engine, _, _ = build_engine(student, cfg, world, teacher=teacher)
        result["sync_student"] = sum(isinstance(m, SyncBatchNorm) for m in engine.module.modules())
        result["plain_student"] = sum(type(m) is nn.BatchNorm1d for m in engine.module.modules())
        result["sync_teacher"] = sum(isinstance(m, SyncBatchNorm) for m in teacher.modules())
        clips = [c.chunk(world)[rank] for c in _clips()]
        with torch.no_grad():
            _, keys = teacher(clips)
        preds, projs = engine(clips)
        loss = MoCoV3Loss(0.2)(*preds, *keys)["loss"]
        engine.backward(loss)
        result.update(preds=[p.detach() for p in preds], keys=keys,
                      grads={n: p.grad.clone() for n, p in engine.module.named_parameters() if p.grad is not None})
        # 3. DINO's per-parameter clipping on bf16 engines (the SVT recipe's precision), ZeRO 2 and 3:
        # every parameter's full gradient norm is at most clip_grad afterwards
        from deepspeed.utils import safe_get_full_grad

        from tests.train_fixtures import SyntheticLoader, build_tiny_method
        from training.partitions import LocalPartitions, clip_gradients_per_parameter

        batch = next(iter(SyntheticLoader(16, 4, rank, world)))
        result["clip"] = {}
        for stage in (2, 3):
            method = build_tiny_method(0)
            cfg = tiny_config(**{"trainer.zero_stage": stage, "trainer.precision": "bf16",
                                 "trainer.grad_accum_steps": 1, "trainer.batch_size_per_gpu": 4})
            engine, _, _ = build_engine(method.student, cfg, world)
            student_views, teacher_views = method.split_views(batch, torch.device("cpu"), True)
            with torch.no_grad():
                teacher_out = method.teacher([v.float() for v in teacher_views])
            loss, _ = method.loss(engine(student_views), teacher_out, teacher_temp=0.07)
            engine.backward(loss)
            partitions = LocalPartitions(engine, [p for p in engine.module.parameters() if p.requires_grad])
            before = clip_gradients_per_parameter(partitions, 0.01)
            after = torch.stack([safe_get_full_grad(p).float().norm() for p in engine.module.parameters()
                                 if p.requires_grad])
            result["clip"][stage] = (before, after)
            engine.step()
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks():
    world = 2
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_rank_worker, args=(world, _free_port(), out_dir), nprocs=world, join=True)
        yield [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world)]


def test_sync_batchnorm_two_gloo_ranks_equal_one_rank_on_the_whole_batch(two_ranks):
    """torch's SyncBatchNorm refuses CPU tensors; ours normalises 2 gloo ranks as one rank the whole batch."""
    net = _bn_net()
    x = _bn_batch().requires_grad_(True)
    y = net(x)
    (y.square().sum() * torch.arange(1, 5, dtype=F64)).sum().backward()
    torch.testing.assert_close(torch.cat([r["y"] for r in two_ranks]), y.detach(), rtol=1e-12, atol=1e-12)
    # each rank's loss covers its half; their sum is the whole-batch loss, and the all-reduce backward
    # gives each rank d(sum of losses)/d(its inputs)
    torch.testing.assert_close(torch.cat([r["x_grad"] for r in two_ranks]), x.grad, rtol=1e-10, atol=1e-12)
    for i, p in enumerate(net.parameters()):
        torch.testing.assert_close(sum(r["param_grads"][i] for r in two_ranks), p.grad, rtol=1e-10, atol=1e-12)
    for i, b in enumerate(net.buffers()):
        for r in two_ranks:
            torch.testing.assert_close(r["buffers"][i], b, rtol=1e-12, atol=1e-12)


def test_engine_at_world_size_two_converts_every_head_batchnorm(two_ranks):
    from objectives import MoCoV3Loss

    for r in two_ranks:
        # projector 3 BNs + predictor 2 BNs in the student, projector 3 in the teacher
        assert r["sync_student"] == 5 and r["plain_student"] == 0 and r["sync_teacher"] == 3
    student, teacher = _tiny_encoder()
    clips = _clips()
    with torch.no_grad():
        _, keys = teacher(clips)
    preds, _ = student(clips)
    MoCoV3Loss(0.2)(*preds, *keys)["loss"].backward()
    for view in range(2):
        torch.testing.assert_close(torch.cat([r["preds"][view] for r in two_ranks]), preds[view].detach(),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.cat([r["keys"][view] for r in two_ranks]), keys[view], rtol=1e-5, atol=1e-5)
    # the engine averages the ranks' gradients: the whole-batch gradients of the same loss
    for name, p in student.named_parameters():
        torch.testing.assert_close(two_ranks[0]["grads"][name], p.grad, rtol=1e-3, atol=1e-5)  # fp32 noise


def test_per_parameter_clipping_on_bf16_engines(two_ranks):
    """DINO's clip_gradients on the reduced gradients of bf16 ZeRO-2 / ZeRO-3 engines (2 ranks)."""
    for stage in (2, 3):
        before, after = two_ranks[0]["clip"][stage]
        assert float(before.max()) > 0.1  # the test clips something
        assert float(after.max()) <= 0.01 * (1 + 2 ** -7)  # at most clip_grad, up to bf16 rounding
        torch.testing.assert_close(after, torch.minimum(before, torch.full_like(before, 0.01)), rtol=1e-2, atol=1e-4)
        torch.testing.assert_close(two_ranks[1]["clip"][stage][1], after)  # every rank sees the same
