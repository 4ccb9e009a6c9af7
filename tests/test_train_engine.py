"""Trainer on real DeepSpeed engines (2 gloo ranks on CPU) against a plain-PyTorch reference loop.

Process launches are the expensive part (4-10 s each), so each launch runs several scenarios and
the tests below read what they wrote:
- one 2-rank launch trains ZeRO stages 0, 1, 2, 3 in turn (fp32, gradient accumulation 2, DINO's
  per-parameter clipping, last layer frozen for 2 of 6 steps, every ZeRO-3 parameter partitioned),
  then bf16 and global-norm clipping runs; the reference is DINO's step sequence in plain PyTorch
  (``clip_gradients``, then ``p.grad = None`` on the frozen last layer, so AdamW skips it);
- one 2-rank launch is SIGKILLed mid-epoch after a checkpoint, one resumes it (`--resume auto`);
- one 1-rank launch resumes the same ZeRO-2 checkpoint under ZeRO-3 (2 ranks -> 1, stage 2 -> 3,
  through the portable state) and runs the non-finite-loss scenarios.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.train_fixtures import subprocess_env, NUM_SAMPLES, SyntheticLoader, build_tiny_method, tiny_config

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "train_fixtures.py"
STAGES = (0, 1, 2, 3)
# fp32 on both sides; the engines reduce gradients in a different order than the reference, so
# results agree to float noise (docs/design.md section 8 measured <= 1.5e-6 on losses).
LOSS_TOL = 2e-5
WEIGHT_TOL = 2e-5


def _launch(spec: dict, workdir: Path, nproc: int, name: str) -> subprocess.Popen:
    spec_path = workdir / f"{name}.json"
    spec_path.write_text(json.dumps(spec))
    if nproc == 1:
        cmd = [sys.executable, str(WORKER), str(spec_path)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(WORKER), str(spec_path)]
    log = open(workdir / f"{name}.log", "w")
    return subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT)


def _wait(proc: subprocess.Popen, workdir: Path, name: str, timeout: float = 400) -> None:
    rc = proc.wait(timeout=timeout)
    if rc != 0:
        tail = (workdir / f"{name}.log").read_text()[-4000:]
        pytest.fail(f"worker {name} exited with {rc}:\n{tail}")


def _losses(run_dir: Path) -> dict[int, float]:
    from training.metrics import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


def _run(name: str, workdir: Path, **overrides) -> dict:
    return {"overrides": {"trainer.output_dir": str(workdir / name), **overrides}}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("train_engine")


PARTITION_CASES = [(1, "fp32"), (2, "fp32"), (3, "fp32"), (2, "bf16"), (3, "bf16")]


@pytest.fixture(scope="module")
def stage_runs(workdir) -> Path:
    """2 ranks, ZeRO 0-3 one after another, 6 optimizer steps each (2 epochs), collectives and host
    syncs counted; then one step per case of PARTITION_CASES checked against the full-tensor API."""
    spec = {"runs": [{**_run(f"stage{s}", workdir, **{"trainer.zero_stage": s}), "count_syncs": True} for s in STAGES]
            + [{**_run(f"bf16_stage{s}", workdir, **{"trainer.zero_stage": s, "trainer.precision": "bf16"}),
                "count_syncs": True} for s in (2, 3)]
            + [_run(f"global_clip_stage{s}", workdir, **{"trainer.zero_stage": s, "optim.clip_mode": "global"})
               for s in (0, 2)]
            + [{**_run(f"partitions_{p}_stage{s}", workdir, **{"trainer.zero_stage": s, "trainer.precision": p,
                                                                 "trainer.grad_accum_steps": 1}),
                "check_partitions": True} for s, p in PARTITION_CASES]}
    _wait(_launch(spec, workdir, 2, "stages"), workdir, "stages")
    return workdir


@pytest.fixture(scope="module")
def killed_and_resumed(workdir, stage_runs) -> Path:
    """A ZeRO-2 run SIGKILLed after its step-4 checkpoint, resumed in place and in another layout."""
    run_dir = workdir / "killed"
    overrides = {"trainer.zero_stage": 2, "trainer.ckpt_every_steps": 2}
    proc = _launch({"runs": [{**_run("killed", workdir, **overrides), "delay_s": 0.5}]}, workdir, 2, "killed")
    pointer = run_dir / "checkpoints" / "latest"
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        # killed once step 5 is logged after the step-4 checkpoint: the resumed run logs step 5 again
        if (pointer.is_file() and pointer.read_text().strip() >= "step_00000004" and metrics.is_file()
                and '"step": 5,' in metrics.read_text()):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed mid-epoch"
    # torchrun starts its workers in their own sessions: kill the launcher and every descendant
    import psutil

    victims = [proc.pid] + [child.pid for child in psutil.Process(proc.pid).children(recursive=True)]
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    killed_at = pointer.read_text().strip()
    assert killed_at < "step_00000006", f"the run got to {killed_at} before the kill"
    # the same checkpoint, resumed by 1 rank under ZeRO-3 with the same global batch (micro 4)
    shutil.copytree(run_dir, workdir / "relayout")
    resume = _launch({"runs": [{**_run("killed", workdir, **overrides), "resume": "auto"}]}, workdir, 2, "resume")
    _wait(resume, workdir, "resume")
    single = {"runs": [
        {**_run("relayout", workdir, **{"trainer.zero_stage": 3, "trainer.batch_size_per_gpu": 4}), "resume": "auto"},
        {**_run("nan_skip", workdir, **{"trainer.zero_stage": 1, "trainer.batch_size_per_gpu": 4}),
         "nan_batches": [2]},
        {**_run("nan_stop", workdir, **{"trainer.zero_stage": 1, "trainer.batch_size_per_gpu": 4,
                                        "trainer.on_nonfinite_loss": "stop"}), "nan_batches": [2]},
        {**_run("save_first", workdir, **{"trainer.zero_stage": 1, "trainer.batch_size_per_gpu": 4}),
         "save_first": True},
    ]}
    _wait(_launch(single, workdir, 1, "single"), workdir, "single")
    return workdir


def dino_clip_gradients(model: torch.nn.Module, clip: float) -> list[float]:
    """DINO ``utils.clip_gradients`` (facebookresearch/dino utils.py), verbatim apart from names."""
    norms = []
    for _, p in model.named_parameters():
        if p.grad is not None:
            param_norm = p.grad.data.norm(2)
            norms.append(param_norm.item())
            clip_coef = clip / (param_norm + 1e-6)
            if clip_coef < 1:
                p.grad.data.mul_(clip_coef)
    return norms


def reference_run(total_micro: int | None = None, clip_mode: str = "per_param", freeze: str = "dino") -> dict:
    """Plain PyTorch DINO steps: the same model, param groups, schedules and global batches; no DeepSpeed.

    As DINO's ``train_one_epoch``: clip (per parameter, or one global norm), then
    ``cancel_gradients_last_layer`` (``p.grad = None``, so torch AdamW skips the last layer entirely:
    no moment decay, no step count), then ``optimizer.step()``. ``freeze="lr0"`` is what a DeepSpeed
    engine does without ``LastLayerFreezer.release``: zero gradients at lr 0 (Adam counts the steps).
    """
    from training.engine import build_param_groups
    from training.trainer import Schedules

    cfg = tiny_config(**{"optim.clip_mode": clip_mode})
    t = cfg.trainer
    world = 2
    method = build_tiny_method(seed=t.seed)
    student, teacher = method.student, method.teacher
    groups, infos = build_param_groups(student)
    optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                                  weight_decay=0.0)
    loader = SyntheticLoader(NUM_SAMPLES, t.batch_size_per_gpu * world, 0, 1, seed=t.seed)
    steps_per_epoch = len(loader) / t.grad_accum_steps
    total = int(np.ceil(t.epochs * steps_per_epoch))
    sched = Schedules.build(cfg, total, steps_per_epoch, t.batch_size_per_gpu * t.grad_accum_steps * world)
    last_layer = [p for g, i in zip(groups, infos) if i.last_layer for p in g["params"]]
    losses, grad_norms, epoch, clipped = {}, [], 0, 0
    batches = iter(loader)
    for step in range(total):
        frozen = step < sched.freeze_last_layer_steps
        for group, info in zip(optimizer.param_groups, infos):
            group["lr"] = 0.0 if (freeze == "lr0" and frozen and info.last_layer) else float(sched.lr[step])
            group["weight_decay"] = float(sched.weight_decay[step]) if info.weight_decay else 0.0
        optimizer.zero_grad(set_to_none=False)
        total_loss = 0.0
        for _ in range(t.grad_accum_steps):
            try:
                batch = next(batches)
            except StopIteration:
                epoch += 1
                loader.set_epoch(epoch)
                batches = iter(loader)
                batch = next(batches)
            student_views, teacher_views = method.split_views(batch, torch.device("cpu"), False)
            with torch.no_grad():
                teacher_out = teacher(teacher_views)
            loss, _ = method.loss(student(student_views), teacher_out, teacher_temp=float(sched.teacher_temp[step]))
            (loss / t.grad_accum_steps).backward()
            total_loss += loss.item() / t.grad_accum_steps
        if frozen:  # the engine's frozen gradients are zeros: the same norms when taken before the clip
            for p in last_layer:
                if freeze == "dino":
                    p.grad = None
                else:
                    p.grad.zero_()
        if clip_mode == "per_param":
            norms = dino_clip_gradients(student, cfg.optim.clip_grad)
            clipped += sum(n > cfg.optim.clip_grad for n in norms)
            grad_norms.append(float(np.sqrt(np.sum(np.square(norms)))))
        else:
            grad_norms.append(float(torch.nn.utils.clip_grad_norm_(
                [p for p in student.parameters() if p.grad is not None], cfg.optim.clip_grad)))
        optimizer.step()
        if frozen and freeze == "dino":
            assert all(p not in optimizer.state for p in last_layer)  # DINO: AdamW has not seen it
        with torch.no_grad():
            m = float(sched.momentum[step])
            student_params = dict(student.named_parameters())
            for name, p in teacher.named_parameters():
                p.mul_(m).add_(student_params[name].detach(), alpha=1 - m)
        losses[step + 1] = total_loss
    return {"losses": losses, "teacher": teacher.state_dict(),
            "student": {n: p.detach().clone() for n, p in student.named_parameters()},
            "center": method.objective.center.clone(), "total_steps": total, "grad_norms": grad_norms,
            "clipped": clipped, "frozen_steps": sched.freeze_last_layer_steps}


@pytest.fixture(scope="module")
def reference() -> dict:
    torch.set_num_threads(1)
    return reference_run()


def _max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b), f"different parameter names: {sorted(set(a) ^ set(b))[:5]}"
    return max(float((a[k].float() - b[k].float().view_as(a[k])).abs().max()) for k in a)


@pytest.mark.parametrize("stage", STAGES)
def test_zero_stage_matches_plain_pytorch(stage_runs, reference, stage):
    run_dir = stage_runs / f"stage{stage}"
    final = torch.load(run_dir / "final.pt", weights_only=False)
    assert final["status"] == "ok"
    losses = _losses(run_dir)
    assert sorted(losses) == list(range(1, reference["total_steps"] + 1))
    for step, ref_loss in reference["losses"].items():
        assert abs(losses[step] - ref_loss) <= LOSS_TOL, (stage, step, losses[step], ref_loss)
    assert _max_diff(reference["teacher"], final["teacher"]) <= WEIGHT_TOL
    assert _max_diff(reference["student"], final["student"]) <= WEIGHT_TOL
    assert torch.allclose(final["center"], reference["center"], atol=WEIGHT_TOL)
    from training.metrics import read_metrics

    grad_norms = [r["grad_norm"] for r in read_metrics(run_dir / "metrics.jsonl")]
    assert all(np.isfinite(g) and g > 0 for g in grad_norms), grad_norms
    assert grad_norms == pytest.approx(reference["grad_norms"], rel=1e-4)
    # the run really trained: the teacher moved away from the initial weights
    init = build_tiny_method(seed=0).teacher.state_dict()
    assert _max_diff(init, final["teacher"]) > 1e-3


@pytest.mark.parametrize("stage", (2, 3))
def test_bf16_follows_the_fp32_reference(stage_runs, reference, stage):
    """bf16 engines (teacher EMA from the fp32 masters) stay near the fp32 reference: bf16 rounding only."""
    run_dir = stage_runs / f"bf16_stage{stage}"
    final = torch.load(run_dir / "final.pt", weights_only=False)
    losses = _losses(run_dir)
    for step, ref_loss in reference["losses"].items():
        assert abs(losses[step] - ref_loss) <= 0.05 * abs(ref_loss), (stage, step, losses[step], ref_loss)
    # the EMA reads fp32 masters: teacher weights follow the reference far closer than bf16's 3 digits
    # would allow if they were built from the bf16 module copies alone
    assert _max_diff(reference["teacher"], final["teacher"]) <= 2e-2
    assert all(v.dtype == torch.float32 for v in final["teacher"].values())


@pytest.mark.parametrize("stage,precision", PARTITION_CASES)
def test_clipping_and_ema_from_local_partitions_match_the_full_tensor_api(stage_runs, stage, precision):
    """DINO's per-parameter clipping from each rank's gradient pieces (one all-reduce of all norms)
    and the EMA from the fp32 master pieces (one all-gather, none where the module weights are the
    fp32 masters) against DeepSpeed's one-collective-per-parameter API on the same engine state."""
    r = torch.load(stage_runs / f"partitions_{precision}_stage{stage}" / "partitions.pt", weights_only=False)
    # a parameter on one rank gets the very norm of its full gradient; a split one agrees to rounding
    torch.testing.assert_close(r["norms"], r["ref_norms"], rtol=1e-6, atol=0)
    assert float(r["ref_norms"].max()) > 0.5  # clip_grad 0.5: the step really clips
    # the same coefficient formula: clipped gradients equal up to one rounding of their dtype (the
    # coefficient of a split parameter may differ in its last bit through its norm)
    ulp = 2 ** -7 if precision == "bf16" else 1e-6
    for got, want in zip(r["clipped"], r["ref_clipped"]):
        torch.testing.assert_close(got, want, rtol=ulp, atol=0)
    # the EMA is the same arithmetic on the same fp32 values: bit-identical
    assert set(r["teacher"]) == set(r["ref_teacher"])
    for name in r["teacher"]:
        assert torch.equal(r["teacher"][name], r["ref_teacher"][name]), name
    counts = r["counts"]
    assert counts["clip"]["collective"] == {"training.partitions:allreduce": 1}
    gathers = {} if (precision == "fp32" and stage < 3) else {"training.partitions:all_gather_single": 1}
    assert counts["ema"]["collective"] == gathers
    assert counts["clip"]["host_sync"] == {} and counts["ema"]["host_sync"] == {}


@pytest.mark.parametrize("precision", ("fp32", "bf16"))
def test_teacher_forward_runs_under_the_students_autocast(stage_runs, precision):
    """bf16: the teacher's forward runs under bf16 autocast (bf16 outputs) with fp32 EMA weights."""
    r = torch.load(stage_runs / f"partitions_{precision}_stage2" / "partitions.pt", weights_only=False)
    want = "torch.bfloat16" if precision == "bf16" else "torch.float32"
    assert set(r["teacher_out_dtypes"]) == {want}
    assert r["teacher_param_dtypes"] == ["torch.float32"]


def test_teacher_autocast_on_cpu():
    """The teacher's autocast on the CPU: every Linear of the teacher computes in bf16 (outputs bf16)
    while its weights stay fp32; outside bf16 nothing changes."""
    from training.teacher import teacher_autocast

    teacher = build_tiny_method(seed=0).teacher
    views = [torch.randn(2, *shape) for shape in [(3, 4, 8, 8), (3, 4, 8, 8)]]
    dtypes = []
    hooks = [m.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype)) for m in teacher.modules()
             if isinstance(m, torch.nn.Linear)]
    with torch.no_grad(), teacher_autocast(torch.device("cpu"), bf16=True):
        out = teacher(views)
    assert dtypes and set(dtypes) == {torch.bfloat16} and out[0].dtype == torch.bfloat16
    assert {p.dtype for p in teacher.parameters()} == {torch.float32}
    dtypes.clear()
    with torch.no_grad(), teacher_autocast(torch.device("cpu"), bf16=False):
        out = teacher(views)
    assert set(dtypes) == {torch.float32} and out[0].dtype == torch.float32
    for h in hooks:
        h.remove()


def test_tf32_matmuls_on_cuda_only():
    """trainer.tf32 sets fp32 matmuls to TF32 ("high") on CUDA devices and leaves CPU runs alone."""
    from training.engine import configure_matmul_precision

    before = torch.get_float32_matmul_precision()
    try:
        configure_matmul_precision(torch.device("cpu"), True)
        assert torch.get_float32_matmul_precision() == before
        configure_matmul_precision(torch.device("cuda", 0), True)
        assert torch.get_float32_matmul_precision() == "high"
        configure_matmul_precision(torch.device("cuda", 0), False)
        assert torch.get_float32_matmul_precision() == "highest"
    finally:
        torch.set_float32_matmul_precision(before)
    assert tiny_config().trainer.tf32 is True  # on by default


@pytest.mark.parametrize("run", [f"stage{s}" for s in STAGES] + ["bf16_stage2", "bf16_stage3"])
def test_no_host_sync_in_the_micro_batch_path(stage_runs, run):
    """Counted on every step of a real run (training.sync_counter): after ZeRO-3's first step (its
    parameter-trace recording), no micro-batch waits for the device, and the trainer's own
    collectives are one all-reduce per micro-batch (loss terms + non-finite flag) plus, per step, at
    most one all-reduce (clipping norms) and one all-gather (EMA); the step reads device values once."""
    syncs = torch.load(stage_runs / run / "final.pt", weights_only=False)["syncs"]
    micro, step = syncs["micro"], syncs["step"]
    assert micro["host_sync"]["steps"][1:] == [0] * (len(micro["host_sync"]["steps"]) - 1), micro["host_sync"]
    if not run.endswith("stage3"):
        assert micro["host_sync"]["steps"][0] == 0, micro["host_sync"]
    ours = {k: v for k, v in micro["collective"]["by_origin"].items() if k.startswith("training.")}
    assert ours == {"training.trainer:allreduce": 2.0}  # grad_accum_steps 2
    ours = {k: v for k, v in step["collective"]["by_origin"].items() if k.startswith("training.")}
    gathers = 0.0 if run in ("stage0", "stage1", "stage2") else 1.0
    expected = {"training.partitions:allreduce": 1.0} if run != "stage0" else {}
    if gathers:
        expected["training.partitions:all_gather_single"] = gathers
    assert ours == expected
    ours = {k: v for k, v in step["host_sync"]["by_origin"].items() if k.startswith("training.")}
    assert ours == {"training.trainer:tolist": 1.0}
    # DeepSpeed's own per step (overflow check, the weights' all-gather per param group) stays a
    # handful; torch.optim's are AdamW reading its step counters, CPU tensors when not capturable
    # (free on a GPU), one per flat partition under ZeRO and one per parameter without
    others = {k: v for k, v in step["host_sync"]["by_origin"].items() if not k.startswith(("training.", "torch.optim."))}
    assert sum(others.values()) <= 4 and step["collective"]["per_step"] <= 12, step


def test_zero3_really_partitions(stage_runs):
    """With persistence thresholds 0, every ZeRO-3 rank saved only a shard of the parameters."""
    ckpt = stage_runs / "stage3" / "checkpoints"
    latest = (ckpt / "latest").read_text().strip()
    shard = torch.load(ckpt / latest / "zero_pp_rank_0_mp_rank_00_optim_states.pt", map_location="cpu",
                       weights_only=False)
    numel = sum(p.numel() for p in build_tiny_method().student.parameters() if p.requires_grad)
    flat = shard["optimizer_state_dict"]["fp32_flat_groups"]
    assert 0 < sum(t.numel() for t in flat) < numel


def test_last_layer_frozen_then_trained(stage_runs):
    """The first steps leave the last layer untouched (gradient hook + lr 0), later steps move it."""
    from training.metrics import read_metrics

    records = read_metrics(stage_runs / "stage2" / "metrics.jsonl")
    assert [r["last_layer_frozen"] for r in records] == [True, True, False, False, False, False]
    assert records[0]["lr"] < records[1]["lr"] or records[0]["lr"] == 0.0  # linear warmup from 0


@pytest.fixture(scope="module")
def lr0_reference() -> dict:
    torch.set_num_threads(1)
    return reference_run(freeze="lr0")


@pytest.mark.parametrize("stage", STAGES)
def test_last_layer_update_after_freeze_is_dinos(stage_runs, reference, lr0_reference, stage):
    """2 frozen + 4 trained steps: the last layer ends where DINO's (AdamW skipping it) ends, not where
    zero gradients at lr 0 would leave it (Adam's step count and moment decay running during the freeze)."""
    final = torch.load(stage_runs / f"stage{stage}" / "final.pt", weights_only=False)
    last = [n for n in final["student"] if "last_layer" in n]
    assert last
    got = {n: final["student"][n] for n in last}
    assert _max_diff({n: reference["student"][n] for n in last}, got) <= WEIGHT_TOL
    # the test can tell the two apart: the lr-0 sequence differs by far more than the tolerance
    assert _max_diff({n: lr0_reference["student"][n] for n in last}, got) > 100 * WEIGHT_TOL


@pytest.mark.parametrize("stage", (0, 2))
def test_global_norm_clipping_matches_plain_pytorch(stage_runs, stage):
    """optim.clip_mode=global: DeepSpeed's one-norm clipping against torch's clip_grad_norm_."""
    from training.metrics import read_metrics

    ref = reference_run(clip_mode="global")
    run_dir = stage_runs / f"global_clip_stage{stage}"
    final = torch.load(run_dir / "final.pt", weights_only=False)
    losses = _losses(run_dir)
    for step, ref_loss in ref["losses"].items():
        assert abs(losses[step] - ref_loss) <= LOSS_TOL, (stage, step, losses[step], ref_loss)
    assert _max_diff(ref["student"], final["student"]) <= WEIGHT_TOL
    assert [r["grad_norm"] for r in read_metrics(run_dir / "metrics.jsonl")] == pytest.approx(ref["grad_norms"], rel=1e-4)


def test_per_parameter_clipping_is_active(reference):
    """The per-parameter reference really clips (so the stage tests compare DINO's clipping)."""
    assert reference["clipped"] > 0 and reference["frozen_steps"] == 2


def test_sigkill_resume_gives_same_losses(killed_and_resumed):
    reference_losses = _losses(killed_and_resumed / "stage2")
    resumed = _losses(killed_and_resumed / "killed")
    assert sorted(resumed) == sorted(reference_losses)
    for step, loss in reference_losses.items():
        assert abs(resumed[step] - loss) <= 1e-6, (step, resumed[step], loss)
    log = (killed_and_resumed / "resume.log").read_text()
    assert "resumed from" in log and "step_00000004" in log
    # each step once in the file itself (not only through read_metrics's last-record rule)
    rows = [json.loads(line) for line in (killed_and_resumed / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == sorted(reference_losses)


def test_resume_into_other_world_size_and_stage(killed_and_resumed):
    reference_losses = _losses(killed_and_resumed / "stage2")
    relayout = _losses(killed_and_resumed / "relayout")
    log = (killed_and_resumed / "single.log").read_text()
    assert "rank layout changed" in log
    for step in range(5, max(reference_losses) + 1):
        assert abs(relayout[step] - reference_losses[step]) <= LOSS_TOL, (step, relayout[step], reference_losses[step])
    final = torch.load(killed_and_resumed / "relayout" / "final.pt", weights_only=False)
    reference_final = torch.load(killed_and_resumed / "stage2" / "final.pt", weights_only=False)
    assert _max_diff(reference_final["teacher"], final["teacher"]) <= WEIGHT_TOL
    assert _max_diff(reference_final["student"], final["student"]) <= WEIGHT_TOL


def test_nonfinite_loss_skipped_or_stops(killed_and_resumed):
    from training.metrics import read_metrics

    skip = torch.load(killed_and_resumed / "nan_skip" / "final.pt", weights_only=False)
    assert skip["status"] == "ok" and skip["summary"]["nonfinite_skipped"] == 1
    records = read_metrics(killed_and_resumed / "nan_skip" / "metrics.jsonl")
    assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)
    assert all(torch.isfinite(v).all() for v in skip["student"].values())
    log = (killed_and_resumed / "single.log").read_text()
    assert "non-finite loss at step 1" in log  # global batch 2 = step 1's first micro-batch
    stop = torch.load(killed_and_resumed / "nan_stop" / "final.pt", weights_only=False)
    assert stop["status"].startswith("stopped: [train] non-finite loss at step 1")


def test_save_before_fit(killed_and_resumed, reference):
    """A checkpoint taken before the first step is complete, and a run resumed from it trains as one
    that never stopped (same losses as the plain PyTorch reference)."""
    run_dir = killed_and_resumed / "save_first"
    assert (run_dir / "checkpoints" / "step_00000000" / "trainer.pt").is_file()
    trainer_state = torch.load(run_dir / "checkpoints" / "step_00000000" / "trainer.pt", weights_only=False)
    assert trainer_state["step"] == 0 and trainer_state["epoch"] == 0
    assert trainer_state["data_position"]["next_batch"] == 0
    assert "resumed from" in (killed_and_resumed / "single.log").read_text()
    losses = _losses(run_dir)
    assert sorted(losses) == list(range(1, reference["total_steps"] + 1))
    for step, ref_loss in reference["losses"].items():
        assert abs(losses[step] - ref_loss) <= LOSS_TOL, (step, losses[step], ref_loss)


def test_checkpoint_visible_only_when_complete(killed_and_resumed, tmp_path):
    from training.checkpoint import export_weights, find_latest

    root = tmp_path / "checkpoints"
    shutil.copytree(killed_and_resumed / "killed" / "checkpoints", root)
    latest = find_latest(root)
    assert latest is not None and latest.name == "step_00000006"
    # a half-written checkpoint (killed while saving) is never picked, even without the pointer
    (root / "tmp-step_00000008").mkdir()
    (root / "latest").unlink()
    assert find_latest(root).name == "step_00000006"
    exported = torch.load(export_weights(latest, tmp_path / "export.pt"), weights_only=False)
    from tests.train_fixtures import TinyBackbone

    backbone = TinyBackbone()
    backbone.load_state_dict(exported["backbone"], strict=True)
    final = torch.load(killed_and_resumed / "killed" / "final.pt", weights_only=False)
    assert _max_diff(exported["teacher"], final["teacher"]) == 0.0


def test_per_epoch_schedules_and_optimizer_settings():
    """The fine-tuning protocols' lr, set once per epoch (multistep / cosine over epochs), and strict
    optimizer settings."""
    from training.config import ConfigError
    from training.trainer import Schedules

    base = {"optim.optimizer": "sgd", "optim.lr": 0.1, "optim.lr_reference_batch": 0, "optim.warmup_epochs": 0}
    multistep = tiny_config(**base, **{"optim.schedule": "multistep", "optim.milestones": [1], "optim.gamma": 0.1})
    assert Schedules.build(multistep, 6, 3, 8).lr.tolist() == pytest.approx([0.1] * 3 + [0.01] * 3, rel=1e-12)
    cosine = tiny_config(**base, **{"optim.schedule": "cosine_epochs"})  # 2 epochs: 0.1, then 0.1 (1 + cos(pi/2)) / 2
    assert Schedules.build(cosine, 6, 3, 8).lr.tolist() == pytest.approx([0.1] * 3 + [0.05] * 3, rel=1e-12)
    for key, value in (("optim.optimizer", "adam"), ("optim.schedule", "step"), ("optim.momentum", 1.0),
                       ("optim.milestones", [3, 1])):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            tiny_config(**{**base, key: value})
