"""This rank's piece of the student's reduced gradients and fp32 master weights, at every ZeRO stage.

DINO's per-parameter clipping and the EMA teacher need, per optimizer step, every parameter's gradient
norm and every parameter's fp32 value. DeepSpeed's ``safe_get_full_grad`` / ``safe_get_full_fp32_param``
assemble one full tensor per call (one all-reduce or all-gather per parameter, and ZeRO-3's calls each
wait for the reduce stream on the host): ~400 collectives per ViT-B step. This module reads the pieces
each rank already owns instead, so a step needs one all-reduce of all norms and one all-gather of all
masters, whatever the parameter count (docs/design.md section 8).

Where the pieces live (DeepSpeed 0.19.8, read from its ``tensor_fragment.py`` / ``stage3.py`` and
checked against the full-tensor API by tests/test_train_engine.py at ZeRO 1, 2 and 3 on 2 ranks):
- no ZeRO: every rank holds the whole all-reduced ``param.grad`` and the fp32 parameter itself;
- ZeRO 1/2: a parameter intersects this rank's contiguous flat partition in at most one contiguous
  run, ``param._hp_mapping.lp_fragment_address`` (start, numel) in the flattened parameter; its
  reduced gradient is ``_hp_mapping.get_lp_grad_fragment(param._index_in_param_group)`` and its fp32
  master ``_hp_mapping.get_hp_fragment()`` (views into DeepSpeed's buffers: writing them writes the
  gradient the optimizer steps on);
- ZeRO-3: every parameter is split into ``world`` padded partitions of ``ds_tensor.numel()`` values;
  this rank's gradient partition is the optimizer's per-parameter gradient view and its master the
  slice ``grad_position`` names in ``fp32_partitioned_groups_flat`` (padding beyond ``ds_numel`` is
  dropped here).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = ["LocalPartitions", "clip_gradients_per_parameter"]


def _zero3_optimizer(params: list[nn.Parameter]):
    for p in params:
        if hasattr(p, "ds_id"):
            return p._z3_optimizer
    return None


class LocalPartitions:
    """The pieces of ``params`` (trainable parameters of ``engine.module``, in a fixed order) on this rank.

    ``pieces[i]`` is ``(start, numel)`` of this rank's piece of the flattened parameter ``i`` (numel 0:
    none). Built once (one all-gather of every rank's piece table, at construction): ZeRO's layout is
    fixed for the engine's lifetime.
    """

    def __init__(self, engine, params: list[nn.Parameter]) -> None:
        self.engine = engine
        self.params = list(params)
        self.numels = [p.ds_numel if hasattr(p, "ds_id") else p.numel() for p in self.params]
        self._z3 = _zero3_optimizer(self.params)
        if self._z3 is not None:
            self.kind = "zero3"
        elif any(hasattr(p, "_hp_mapping") for p in self.params):
            self.kind = "zero12"
        else:
            self.kind = "replicated"  # no ZeRO: every rank holds every full tensor
        self.group = None
        self.world = 1
        if self.kind != "replicated" and dist.is_initialized():
            self.group = getattr(engine.optimizer, "dp_process_group", None)
            self.world = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group) if self.world > 1 else 0
        self.pieces = [self._piece(p, n) for p, n in zip(self.params, self.numels)]
        self._gather_plan = self._plan_gather() if self.kind != "replicated" else None

    # ------------------------------------------------------------------ layout
    def _piece(self, param: nn.Parameter, numel: int) -> tuple[int, int]:
        if self.kind == "zero3":
            size = param.ds_tensor.numel()
            start = self.rank * size
            return start, max(0, min(size, numel - start))
        if self.kind == "zero12":
            mapping = getattr(param, "_hp_mapping", None)
            if mapping is None:
                return 0, 0
            address = mapping.lp_fragment_address
            return int(address.start), int(address.numel)
        return 0, numel

    def _plan_gather(self) -> dict:
        """Where every rank's pieces land in the concatenated full parameters (one all-gather, once)."""
        table = torch.tensor(self.pieces, dtype=torch.int64).reshape(-1, 2)
        device = self._device()
        if self.world > 1:
            tables = torch.empty(self.world * table.numel(), dtype=torch.int64, device=device)
            dist.all_gather_into_tensor(tables, table.view(-1).to(device), group=self.group)
            tables = tables.cpu().view(self.world, *table.shape)
        else:
            tables = table[None]
        offsets = [0]
        for n in self.numels:
            offsets.append(offsets[-1] + n)
        if self.kind == "zero3":
            # every rank sends one fixed-size slot per parameter (its padded partition size), so rank
            # r's slot of parameter i sits at the same place in every rank's send buffer
            slots = [p.ds_tensor.numel() for p in self.params]
            slot_offsets = [0]
            for s in slots:
                slot_offsets.append(slot_offsets[-1] + s)
            return {"send": slot_offsets[-1], "slots": slots, "slot_offsets": slot_offsets[:-1], "offsets": offsets}
        # ZeRO 1/2: every rank sends its pieces back to back; copies from the gathered buffer into the
        # full parameters, adjacent runs merged (O(params + world) copies)
        sends = tables[:, :, 1].sum(dim=1)
        width = int(sends.max()) if sends.numel() else 0
        runs: list[list[int]] = []
        for r in range(self.world):
            src = r * width
            for i, (start, numel) in enumerate(tables[r].tolist()):
                if numel == 0:
                    continue
                dst = offsets[i] + start
                if runs and runs[-1][0] + runs[-1][2] == src and runs[-1][1] + runs[-1][2] == dst:
                    runs[-1][2] += numel
                else:
                    runs.append([src, dst, numel])
                src += numel
        return {"send": width, "runs": runs, "offsets": offsets}

    def _device(self) -> torch.device:
        for p in self.params:
            return p.device
        return torch.device("cpu")

    # ------------------------------------------------------------------ gradients
    def grads(self) -> list[torch.Tensor]:
        """This rank's piece of every parameter's reduced (data-parallel averaged) gradient, flattened:
        views into DeepSpeed's gradient buffers (in-place writes change what ``engine.step`` applies);
        empty where this rank owns none. Valid between the boundary ``backward`` and ``step``."""
        if self.kind == "replicated":
            return [p.grad.view(-1) if p.grad is not None else p.new_empty(0) for p in self.params]
        if self.kind == "zero3":
            return self._zero3_grads()
        out = []
        for param, (start, numel) in zip(self.params, self.pieces):
            if numel == 0:
                out.append(param.new_empty(0))
                continue
            if getattr(param, "_hp_grad", None) is not None:
                raise RuntimeError("LocalPartitions: DeepSpeed's BF16_Optimizer (bf16 without ZeRO) is not supported")
            fragment = param._hp_mapping.get_lp_grad_fragment(param._index_in_param_group).view(-1)
            if fragment.numel() == param.numel() and numel != param.numel():
                # a full-size accumulation buffer: this rank's piece is the fragment's address in it
                # (the same narrowing as DeepSpeed's get_full_hp_grad)
                fragment = fragment.narrow(0, start, numel)
            out.append(fragment)
        return out

    def _zero3_grads(self) -> list[torch.Tensor]:
        opt = self._z3
        _wait_for_reduce_stream(opt)
        partitions = getattr(opt, "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition")
        out = []
        for param, (_, numel) in zip(self.params, self.pieces):
            if opt.offload_optimizer:
                group, offset, size = opt.grad_position[opt.get_param_id(param)]
                grad = opt.fp32_partitioned_groups_flat[group].grad.narrow(0, offset, size)
            else:
                grad = partitions[param.ds_id]
            out.append(grad.view(-1).narrow(0, 0, numel))
        return out

    # ------------------------------------------------------------------ fp32 masters
    def masters(self) -> list[torch.Tensor]:
        """This rank's piece of every parameter's fp32 master weight (views), flattened."""
        if self.kind == "replicated":
            return [p.detach().view(-1) for p in self.params]
        out = []
        if self.kind == "zero3":
            opt = self._z3
            for param, (_, numel) in zip(self.params, self.pieces):
                group, offset, size = opt.grad_position[opt.get_param_id(param)]
                out.append(opt.fp32_partitioned_groups_flat[group].narrow(0, offset, size).narrow(0, 0, numel))
            return out
        for param, (_, numel) in zip(self.params, self.pieces):
            out.append(param._hp_mapping.get_hp_fragment().view(-1) if numel else param.new_empty(0, dtype=torch.float32))
        return out

    def gather_masters(self) -> list[torch.Tensor]:
        """Every parameter's full fp32 master, contiguous, on every rank: one all-gather (collective)."""
        if self.kind == "replicated":
            return [p.detach().float() for p in self.params]
        plan = self._gather_plan
        masters = self.masters()
        device = self._device()
        send = torch.zeros(plan["send"], dtype=torch.float32, device=device)
        if self.kind == "zero3":
            for piece, offset in zip(masters, plan["slot_offsets"]):
                send.narrow(0, offset, piece.numel()).copy_(piece)
        else:
            filled = [m for m in masters if m.numel()]
            if filled:
                torch.cat(filled, out=send.narrow(0, 0, sum(m.numel() for m in filled)))
        received = torch.empty(self.world * send.numel(), dtype=torch.float32, device=device)
        if self.world > 1:
            dist.all_gather_into_tensor(received, send, group=self.group)
        else:
            received.copy_(send)
        if self.kind == "zero3":
            rows = received.view(self.world, -1)
            out = []
            for param, numel, slot, offset in zip(self.params, self.numels, plan["slots"], plan["slot_offsets"]):
                # (world, slot) columns of this parameter -> its padded flat value -> drop the padding
                out.append(rows[:, offset:offset + slot].reshape(-1)[:numel].view(param.ds_shape))
            return out
        full = torch.empty(plan["offsets"][-1], dtype=torch.float32, device=device)
        for src, dst, numel in plan["runs"]:
            full.narrow(0, dst, numel).copy_(received.narrow(0, src, numel))
        offsets = plan["offsets"]
        return [full.narrow(0, offsets[i], n).view_as(p) for i, (p, n) in enumerate(zip(self.params, self.numels))]


def _wait_for_reduce_stream(optimizer) -> None:
    """ZeRO-3 reduces gradients on its own stream: order the reads after it on the device, without
    the host wait (``stream.synchronize()``) DeepSpeed's per-parameter getters do."""
    from deepspeed.accelerator import get_accelerator  # local: importing deepspeed reads DS_ACCELERATOR

    accelerator = get_accelerator()
    stream = getattr(optimizer, "reduce_and_partition_stream", None)
    if stream is not None and not accelerator.resolves_data_dependency():
        accelerator.current_stream().wait_stream(stream)


@torch.no_grad()
def clip_gradients_per_parameter(partitions: LocalPartitions, clip: float) -> torch.Tensor:
    """DINO's ``utils.clip_gradients`` on the engine's reduced gradients; returns the pre-clip norms.

    Each trainable parameter's full gradient is scaled by ``clip / (norm + 1e-6)`` when that is below 1.
    Norms come from the local pieces: squared piece norms (float64), one all-reduce over the
    data-parallel group, square root. A parameter held by one rank gets the very norm of its full
    gradient (``sqrt(x^2) == x``); a split one agrees to float rounding. The coefficient is formed in
    float64 as ``clip / (float(norm) + 1e-6)`` was, and the scaling multiplies in place by it, so no
    host sync: call after the boundary ``engine.backward`` and before ``engine.step`` on every rank.
    """
    grads = partitions.grads()
    if not grads:
        return torch.zeros(0)
    squares = torch.stack([g.float().norm(2).double() for g in grads]).square()  # an empty piece: 0
    if partitions.kind != "replicated" and partitions.world > 1:
        dist.all_reduce(squares, group=partitions.group)
    norms = squares.sqrt().float()
    coef = clip / (norms.double() + 1e-6)
    coef = torch.where(coef < 1, coef, torch.ones_like(coef)).float()
    for grad, c in zip(grads, coef.unbind()):
        if grad.numel():
            grad.mul_(c)
    return norms
