"""Counts the collectives and host syncs a training step issues, and where they come from.

A GPU step runs at the device's pace only while the host never waits for the device (``.item()``,
``.tolist()``, ``.cpu()``, ``bool(tensor)``, ``torch.cuda.synchronize``) and collectives stay few and
large. Neither shows on a CPU, so ``SyncCounter`` records them on any device: while one of its phases
is active it wraps every ``ProcessGroup`` collective (the one funnel of ``torch.distributed`` and of
DeepSpeed's comm layer), the object collectives (``all_gather_object`` ...: one pickle exchange each,
a collective and a host sync), the ``Tensor`` methods that read device values on the host, and the
device synchronisations. On a CPU run a counted ``.item()`` costs nothing, but it names a call that
would stall a GPU; that is the point (tests/test_train_engine.py fails when one enters the
micro-batch path; ``bench.py e2e`` reports the counts per optimizer step).

Each call is attributed to its origin: the innermost caller outside ``torch.distributed`` and this
file, named by package (``deepspeed``, ``torch.optim``, ``training.trainer``, ...). Nested calls (the
collectives inside ``all_gather_object``) are not counted again. Counting is off outside a phase:
no wrapper stays installed.
"""
from __future__ import annotations

import collections
import contextlib
import sys
import threading
from pathlib import Path

import torch
import torch.distributed as dist

__all__ = ["SyncCounter"]

_COLLECTIVES = ("allreduce", "allreduce_coalesced", "allgather", "allgather_coalesced", "all_gather_single",
                "all_gather_single_coalesced", "allgather_into_tensor_coalesced", "_allgather_base",
                "reduce_scatter", "reduce_scatter_single", "reduce_scatter_single_coalesced",
                "reduce_scatter_tensor_coalesced", "_reduce_scatter_base", "broadcast", "reduce", "gather",
                "gather_single", "scatter", "alltoall", "alltoall_base", "all_to_all_single", "barrier", "send",
                "recv", "recv_anysource")
_OBJECT_COLLECTIVES = ("all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list")
_TENSOR_SYNCS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")

_TORCH_DIR = Path(torch.__file__).resolve().parent
# torch's deprecation wrappers (typing_extensions.deprecated) sit between a caller and c10d
_SKIP = tuple(f for f in (str(_TORCH_DIR / "distributed"), str(_TORCH_DIR / "_tensor.py"), str(Path(__file__).resolve()),
                          contextlib.__file__, getattr(sys.modules.get("typing_extensions"), "__file__", None)) if f)


def _origin() -> str:
    """The module of the innermost caller outside torch.distributed, torch's Tensor wrappers and this
    file (``deepspeed.runtime.zero.stage_1_and_2``, ``torch.optim.adamw``, ``training.trainer``)."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith(_SKIP):
        frame = frame.f_back
    if frame is None:
        return "unknown"
    return frame.f_globals.get("__name__", "unknown")


class SyncCounter:
    """``with counter.phase("micro"): ...`` counts what the block issues under that phase name.

    ``counts[phase][(kind, origin, name)]`` with kind ``collective`` or ``host_sync``; ``steps``
    counts optimizer steps seen (``step_done()``), for per-step figures (``per_step()``).
    """

    def __init__(self) -> None:
        self.counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.steps = 0
        self.history: list[dict[str, int]] = []  # per finished step: {"phase/kind": count}
        self._step_counts: collections.Counter = collections.Counter()
        self._phase: list[str] = []
        self._saved: dict = {}
        self._local = threading.local()

    # ------------------------------------------------------------------ phases
    @contextlib.contextmanager
    def phase(self, name: str):
        if not self._phase:
            self._install()
        self._phase.append(name)
        try:
            yield self
        finally:
            self._phase.pop()
            if not self._phase:
                self._uninstall()

    @contextlib.contextmanager
    def paused(self):
        """Nothing in the block is counted (the data loader's own work, for instance)."""
        depth = getattr(self._local, "depth", 0)
        self._local.depth = depth + 1
        try:
            yield
        finally:
            self._local.depth = depth

    def step_done(self) -> None:
        self.steps += 1
        self.history.append(dict(self._step_counts))
        self._step_counts.clear()

    def record(self, kind: str, name: str) -> None:
        if self._phase and threading.current_thread() is threading.main_thread():
            self.counts[self._phase[-1]][(kind, _origin(), name)] += 1
            self._step_counts[f"{self._phase[-1]}/{kind}"] += 1

    # ------------------------------------------------------------------ reports
    def totals(self, phase: str, kind: str) -> int:
        return sum(n for (k, _, _), n in self.counts[phase].items() if k == kind)

    def by_origin(self, phase: str, kind: str) -> dict[str, int]:
        out: collections.Counter = collections.Counter()
        for (k, origin, name), n in self.counts[phase].items():
            if k == kind:
                out[f"{origin}:{name}"] += n
        return dict(sorted(out.items()))

    def per_step(self) -> dict:
        """Per optimizer step, by phase: collectives and host syncs (mean, each step's count, and the
        mean by ``origin:call``)."""
        steps = max(self.steps, 1)
        return {phase: {kind: {"per_step": self.totals(phase, kind) / steps,
                               "steps": [h.get(f"{phase}/{kind}", 0) for h in self.history],
                               "by_origin": {k: v / steps for k, v in self.by_origin(phase, kind).items()}}
                        for kind in ("collective", "host_sync")}
                for phase in sorted(self.counts)}

    # ------------------------------------------------------------------ patching
    def _counting(self) -> bool:
        return getattr(self._local, "depth", 0) == 0

    def _wrap(self, fn, kind: str, name: str, also: str | None = None):
        counter = self

        def wrapper(*args, **kwargs):
            if not counter._counting():
                return fn(*args, **kwargs)
            counter.record(kind, name)
            if also:
                counter.record(also, name)
            counter._local.depth = 1  # nested calls belong to this one
            try:
                return fn(*args, **kwargs)
            finally:
                counter._local.depth = 0

        wrapper.__wrapped__ = fn
        return wrapper

    def _patch(self, owner, attr: str, kind: str, also: str | None = None) -> None:
        if not hasattr(owner, attr):
            return
        # restore exactly what was there: an own attribute, or nothing (then the inherited one shows)
        owned = attr in vars(owner)
        self._saved[(owner, attr)] = (owned, vars(owner)[attr] if owned else None)
        setattr(owner, attr, self._wrap(getattr(owner, attr), kind, attr, also))

    def _install(self) -> None:
        for name in _COLLECTIVES:
            if hasattr(dist.ProcessGroup, name):
                self._patch(dist.ProcessGroup, name, "collective")
        for name in _OBJECT_COLLECTIVES:
            self._patch(dist, name, "collective", also="host_sync")
        for name in _TENSOR_SYNCS:
            self._patch(torch.Tensor, name, "host_sync")
        self._patch(torch.cuda, "synchronize", "host_sync")
        self._patch(torch.cuda.Stream, "synchronize", "host_sync")
        self._patch(torch.cuda.Event, "synchronize", "host_sync")
        if "deepspeed.accelerator" in sys.modules:
            from deepspeed.accelerator import get_accelerator

            self._patch(get_accelerator(), "synchronize", "host_sync")

    def _uninstall(self) -> None:
        for (owner, attr), (owned, original) in self._saved.items():
            if owned:
                setattr(owner, attr, original)
            else:
                delattr(owner, attr)
        self._saved.clear()
