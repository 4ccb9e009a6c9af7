"""Objectives against direct float64 formulas (values and gradients), schedules, and 2-rank gloo runs."""
from __future__ import annotations

import math
import os
import socket
import tempfile

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from objectives import PAIR_SETS, BYOLLoss, MoCoV3Loss, SimSiamLoss, SVTLoss, cosine_schedule
from objectives.svt import view_pairs

torch.set_num_threads(1)
F64 = torch.float64


# ---------------------------------------------------------------- direct formulas (loops, no F.*)

def _softmax(x: torch.Tensor) -> torch.Tensor:
    e = torch.exp(x - x.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


def svt_reference(student, teacher, center, student_temp, teacher_temp, pairs):
    terms = []
    for s, t in pairs:
        p_t = _softmax((teacher[t] - center) / teacher_temp)
        log_p_s = torch.log(_softmax(student[s] / student_temp))
        per_sample = [-(p_t[b] * log_p_s[b]).sum() for b in range(student[s].shape[0])]
        terms.append(sum(per_sample) / len(per_sample))
    return sum(terms) / len(terms)


def info_nce_reference(q, k, tau):
    """-log(exp(q_i.k_i/tau) / sum_j exp(q_i.k_j/tau)) averaged over i, times 2 tau."""
    qn = q / q.norm(dim=1, keepdim=True)
    kn = k / k.norm(dim=1, keepdim=True)
    losses = []
    for i in range(q.shape[0]):
        logits = torch.stack([qn[i] @ kn[j] / tau for j in range(k.shape[0])])
        losses.append(-(logits[i] - torch.log(torch.exp(logits).sum())))
    return sum(losses) / len(losses) * 2 * tau


def masked_info_nce_reference(q, k, ids, key_ids, tau, offset=0):
    """InfoNCE with the same-video keys dropped from each query's denominator (all but its positive)."""
    qn = q / q.norm(dim=1, keepdim=True)
    kn = k / k.norm(dim=1, keepdim=True)
    losses = []
    for i in range(q.shape[0]):
        pos = i + offset
        kept = [j for j in range(k.shape[0]) if j == pos or key_ids[j] != ids[i]]
        logits = torch.stack([qn[i] @ kn[j] / tau for j in kept])
        losses.append(-(qn[i] @ kn[pos] / tau - torch.log(torch.exp(logits).sum())))
    return sum(losses) / len(losses) * 2 * tau


def cos_reference(p, z):
    return torch.stack([p[i] @ z[i] / (p[i].norm() * z[i].norm()) for i in range(p.shape[0])])


# ---------------------------------------------------------------- SVT

def test_paper_pair_set_is_global_vs_other_global_and_every_local_vs_both_globals():
    pairs = view_pairs("paper", num_global=2, num_local=8)
    assert sorted(pairs) == sorted([(1, 0), (0, 1)] + [(local, g) for g in (0, 1) for local in range(2, 10)])
    assert len(view_pairs("local_to_local", 2, 3)) == 6
    with pytest.raises(ValueError, match="unknown pair set"):
        SVTLoss(8, pair_set="nope")


@pytest.mark.parametrize("pair_set", sorted(PAIR_SETS))
def test_svt_loss_matches_formula_with_gradients(pair_set):
    gen = torch.Generator().manual_seed(0)
    num_global, num_local, batch, dim = 2, 3, 4, 7
    loss_fn = SVTLoss(dim, num_global, num_local, student_temp=0.1, center_momentum=0.9, pair_set=pair_set)
    loss_fn.center.copy_(torch.randn(1, dim, generator=gen))
    center_before = loss_fn.center.clone().to(F64)
    student = [torch.randn(batch, dim, generator=gen, dtype=F64, requires_grad=True) for _ in range(5)]
    teacher = [torch.randn(batch, dim, generator=gen, dtype=F64) for _ in range(5)]
    out = loss_fn(student, teacher, teacher_temp=0.04)
    pairs = view_pairs(pair_set, num_global, num_local)
    student_ref = [s.detach().clone().requires_grad_(True) for s in student]
    ref = svt_reference(student_ref, teacher, center_before, 0.1, 0.04, pairs)
    torch.testing.assert_close(out["loss"], ref, rtol=1e-10, atol=1e-10)
    out["loss"].backward()
    ref.backward()
    for got, want in zip(student, student_ref):
        want_grad = want.grad if want.grad is not None else torch.zeros_like(want)
        torch.testing.assert_close(got.grad if got.grad is not None else torch.zeros_like(got), want_grad,
                                   rtol=1e-9, atol=1e-12)

    # Monitoring: teacher entropy and KL(teacher || student) from their definitions.
    teachers_used = sorted({t for _, t in pairs})
    probs = {t: _softmax((teacher[t] - center_before) / 0.04) for t in teachers_used}
    entropy = torch.stack([-(probs[t] * torch.log(probs[t])).sum(-1).mean() for t in teachers_used]).mean()
    torch.testing.assert_close(out["teacher_entropy"], entropy, rtol=1e-8, atol=1e-10)
    kl = sum((probs[t] * (torch.log(probs[t]) - torch.log(_softmax(student[s].detach() / 0.1)))).sum(-1).mean()
             for s, t in pairs) / len(pairs)
    torch.testing.assert_close(out["kl"], kl, rtol=1e-8, atol=1e-10)

    # Center EMA over the teacher views the pair set uses (globals, or all when teachers are local).
    used = teacher if loss_fn.teacher_needs_locals else teacher[:num_global]
    batch_center = torch.cat(used).mean(dim=0, keepdim=True)
    torch.testing.assert_close(loss_fn.center.to(F64), 0.9 * center_before + 0.1 * batch_center,
                               rtol=1e-6, atol=1e-6)


def test_svt_loss_rejects_wrong_view_counts():
    loss_fn = SVTLoss(4, 2, 2)
    with pytest.raises(ValueError, match="expected 4 student views"):
        loss_fn([torch.zeros(1, 4)] * 3, [torch.zeros(1, 4)] * 2, 0.04)


def test_svt_center_is_a_checkpointed_buffer():
    loss_fn = SVTLoss(5)
    assert "center" in loss_fn.state_dict()
    assert not any(True for _ in loss_fn.parameters())


# ---------------------------------------------------------------- LSTCL

def test_mocov3_matches_formula_with_gradients():
    gen = torch.Generator().manual_seed(1)
    tensors = [torch.randn(5, 6, generator=gen, dtype=F64, requires_grad=True) for _ in range(4)]
    refs = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = MoCoV3Loss(temperature=0.2)(*tensors)
    q1, q2, k1, k2 = refs
    ref = info_nce_reference(q1, k2, 0.2) + info_nce_reference(q2, k1, 0.2)
    torch.testing.assert_close(out["loss"], ref, rtol=1e-10, atol=1e-12)
    out["loss"].backward()
    ref.backward()
    for got, want in zip(tensors, refs):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-9, atol=1e-12)
    assert 0.0 <= out["accuracy"].item() <= 1.0


def test_mocov3_temperature_changes_loss_and_positive_pairs_score_perfectly():
    x = torch.eye(4, dtype=F64)
    out = MoCoV3Loss(temperature=0.1)(x, x, x, x)
    assert out["accuracy"].item() == 1.0
    # Orthonormal keys: logits are 1/tau on the diagonal, 0 elsewhere.
    expected = 2 * (-(10.0 - math.log(math.exp(10.0) + 3))) * 0.2
    assert out["loss"].item() == pytest.approx(expected)


def test_mocov3_same_video_mask_equals_dropping_those_negatives_by_hand():
    # 3 videos x 2 view-sets (data.repeats=2, video-major rows) and 1 video x 1: 7 rows
    ids = torch.tensor([4, 4, 9, 9, 2, 2, 7])
    gen = torch.Generator().manual_seed(5)
    tensors = [torch.randn(7, 6, generator=gen, dtype=F64, requires_grad=True) for _ in range(4)]
    refs = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = MoCoV3Loss(temperature=0.2)(*tensors, video_ids=ids)
    q1, q2, k1, k2 = refs
    ref = masked_info_nce_reference(q1, k2, ids, ids, 0.2) + masked_info_nce_reference(q2, k1, ids, ids, 0.2)
    torch.testing.assert_close(out["loss"], ref, rtol=1e-10, atol=1e-12)
    out["loss"].backward()
    ref.backward()
    for got, want in zip(tensors, refs):
        assert torch.isfinite(got.grad).all()
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-9, atol=1e-12)
    # the mask matters: the unmasked loss counts the copies as negatives
    unmasked = MoCoV3Loss(temperature=0.2)(*[t.detach() for t in tensors])["loss"]
    assert not torch.isclose(unmasked, out["loss"].detach())


def test_mocov3_with_distinct_videos_is_bit_identical_to_no_ids():
    gen = torch.Generator().manual_seed(6)
    for dtype in (torch.float32, torch.bfloat16):
        tensors = [torch.randn(8, 16, generator=gen).to(dtype).requires_grad_(True) for _ in range(4)]
        refs = [t.detach().clone().requires_grad_(True) for t in tensors]
        with_ids = MoCoV3Loss(0.2)(*tensors, video_ids=torch.arange(8) * 3)
        without = MoCoV3Loss(0.2)(*refs)
        assert torch.equal(with_ids["loss"], without["loss"]) and torch.equal(with_ids["accuracy"], without["accuracy"])
        with_ids["loss"].backward()
        without["loss"].backward()
        for got, want in zip(tensors, refs):
            assert torch.equal(got.grad, want.grad)


@pytest.mark.parametrize("loss_cls", [BYOLLoss, SimSiamLoss])
def test_byol_and_simsiam_match_formula_and_stop_gradient(loss_cls):
    gen = torch.Generator().manual_seed(2)
    p1, p2, z1, z2 = [torch.randn(6, 5, generator=gen, dtype=F64, requires_grad=True) for _ in range(4)]
    refs = [t.detach().clone().requires_grad_(True) for t in (p1, p2)]
    out = loss_cls()(p1, p2, z1, z2)
    if loss_cls is BYOLLoss:
        ref = (2 - 2 * cos_reference(refs[0], z2.detach())).mean() + (2 - 2 * cos_reference(refs[1], z1.detach())).mean()
    else:
        ref = -0.5 * (cos_reference(refs[0], z2.detach()).mean() + cos_reference(refs[1], z1.detach()).mean())
    torch.testing.assert_close(out["loss"], ref, rtol=1e-10, atol=1e-12)
    out["loss"].backward()
    ref.backward()
    torch.testing.assert_close(p1.grad, refs[0].grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(p2.grad, refs[1].grad, rtol=1e-9, atol=1e-12)
    assert z1.grad is None and z2.grad is None  # targets get no gradient


# ---------------------------------------------------------------- schedules

def test_cosine_schedule_warmup_then_cosine_to_final():
    sched = cosine_schedule(1.0, 0.1, total_steps=20, warmup_steps=5, warmup_start=0.0)
    assert sched.shape == (20,) and sched.dtype == np.float64
    np.testing.assert_allclose(sched[:5], [0.0, 0.2, 0.4, 0.6, 0.8])
    assert sched[5] == pytest.approx(1.0) and sched[-1] == pytest.approx(0.1)
    assert np.all(np.diff(sched[5:]) <= 0)
    mid = 5 + 7  # halfway through the 15 cosine steps (progress 0.5)
    assert sched[mid] == pytest.approx(0.55)


def test_momentum_schedule_reaches_one_and_teacher_temperature_warmup_is_constant_after():
    momentum = cosine_schedule(0.996, 1.0, total_steps=100)
    assert momentum[0] == pytest.approx(0.996) and momentum[-1] == 1.0
    assert np.all(np.diff(momentum) >= 0)
    temp = cosine_schedule(0.04, 0.04, total_steps=10, warmup_steps=4, warmup_start=0.01)
    np.testing.assert_allclose(temp, [0.01, 0.0175, 0.025, 0.0325] + [0.04] * 6)
    with pytest.raises(ValueError, match="warmup_steps"):
        cosine_schedule(1.0, 0.0, total_steps=3, warmup_steps=4)


# ---------------------------------------------------------------- 2 gloo ranks vs 1 rank

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _make_batch(seed: int = 3, batch: int = 6, dim: int = 5):
    gen = torch.Generator().manual_seed(seed)
    moco = [torch.randn(batch, dim, generator=gen, dtype=F64) for _ in range(4)]
    svt_student = [torch.randn(batch, dim, generator=gen, dtype=F64) for _ in range(4)]
    svt_teacher = [torch.randn(batch, dim, generator=gen, dtype=F64) for _ in range(2)]
    return moco, svt_student, svt_teacher


# video ids of _make_batch's 6 rows, 2 view-sets per video: video 11 has one on each rank (3 rows each)
MOCO_IDS = torch.tensor([5, 5, 11, 8, 11, 8])


def _losses_and_grads(moco, svt_student, svt_teacher, ids=MOCO_IDS):
    masked = [t.clone().requires_grad_(True) for t in moco]
    masked_loss = MoCoV3Loss(0.2)(*masked, video_ids=ids)["loss"]
    masked_loss.backward()
    moco = [t.clone().requires_grad_(True) for t in moco]
    moco_loss = MoCoV3Loss(0.2)(*moco)["loss"]
    moco_loss.backward()
    svt_student = [t.clone().requires_grad_(True) for t in svt_student]
    svt = SVTLoss(5, num_global=2, num_local=2)
    svt.center.fill_(0.3)
    svt_loss = svt(svt_student, svt_teacher, teacher_temp=0.07)["loss"]
    svt_loss.backward()
    return {"masked_loss": masked_loss.detach(), "masked_grads": [t.grad for t in masked],
            "moco_loss": moco_loss.detach(), "moco_grads": [t.grad for t in moco],
            "svt_loss": svt_loss.detach(), "svt_grads": [t.grad for t in svt_student], "center": svt.center.clone()}


def _rank_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        moco, student, teacher = _make_batch()
        half = lambda ts: [t.chunk(world)[rank] for t in ts]  # noqa: E731
        result = _losses_and_grads(half(moco), half(student), half(teacher), MOCO_IDS.chunk(world)[rank])
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_two_gloo_ranks_equal_one_rank_with_the_whole_batch():
    world = 2
    whole = _losses_and_grads(*_make_batch())
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_rank_worker, args=(world, _free_port(), out_dir), nprocs=world, join=True)
        ranks = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(world)]
    # Each rank's loss is the mean over its half; data-parallel training averages them (and grads).
    # masked_*: the same-video mask across ranks (the gathered keys carry their video ids) equals the
    # whole batch's, where rows 2 and 3 (video 11) sit on different ranks
    for name in ("moco_loss", "masked_loss", "svt_loss"):
        torch.testing.assert_close(sum(r[name] for r in ranks) / world, whole[name], rtol=1e-10, atol=1e-12)
    assert not torch.isclose(whole["masked_loss"], whole["moco_loss"])
    for name in ("moco_grads", "masked_grads", "svt_grads"):
        for view, whole_grad in enumerate(whole[name]):
            # The all_gather backward already summed every rank's loss into the keys' owner, so the
            # per-rank grads divided by the world size are the whole-batch grads (DDP averaging).
            stitched = torch.cat([r[name][view] for r in ranks]) / world
            torch.testing.assert_close(stitched, whole_grad, rtol=1e-9, atol=1e-12)
    for r in ranks:
        torch.testing.assert_close(r["center"], whole["center"], rtol=1e-6, atol=1e-7)
    # The MoCo keys receive gradient from the other rank's queries: without the gradient-correct
    # gather the key grads would miss those terms and differ from the whole-batch ones (checked above).
    assert whole["moco_grads"][2].abs().sum() > 0
