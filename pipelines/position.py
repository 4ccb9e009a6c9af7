"""A loader's position in the global order, and its record of bad samples and replacements.

Both loaders hold one ``Position`` and expose it through ``PositionedLoader``. Its state is ``(epoch, data step)``, the order's definition and
the keys found bad so far: the same value on every rank, so a run saved on W ranks resumes on any
W' that divides the global batch, at the next data step, with the same samples (``order``). Bad
keys are part of it so that a resume replaces a bad sample without decoding it again.

With repeated sampling (``data.repeats: R``) the order counts videos and a batch holds R view-sets of
each; the state's ``global_batch`` stays in view-sets (what the configuration says) beside ``repeats``,
so a position resumes at any world size whose per-rank batch is a multiple of R.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

from .member_reads import open_storage
from .order import GlobalOrder, build_order
from .shard_index import read_shard_set

if TYPE_CHECKING:
    from .config import DataConfig

log = logging.getLogger(__name__)


class Position:
    """Where a loader is: the next data step of its epoch, and what it found bad on the way.

    Args:
        order: the global order (its seed is part of the position: a resume takes the saved one).
        batch_size: view-sets per step on this rank.
        num_shards: the world size.
        repeats: view-sets per video (``data.repeats``); the order's global batch counts videos.

    ``stats`` counts ``decode_failures`` and lists ``skipped_keys`` and ``replacements``; a loader
    may add counters of its own to the same dict.
    """

    def __init__(self, order: GlobalOrder, batch_size: int, num_shards: int, repeats: int = 1) -> None:
        self.order = order
        self.batch_size, self.num_shards, self.repeats = batch_size, num_shards, repeats
        self.epoch = 0
        self.step = 0                        # next data step of self.epoch
        self.bad_keys: dict[str, str] = {}   # key -> shard, found bad on any rank so far
        self.stats: dict[str, Any] = {"decode_failures": 0, "skipped_keys": [], "replacements": []}
        # A restored position is kept by the next set_epoch of its own epoch: trainers call set_epoch
        # at every epoch start, also right after a resume inside that epoch.
        self._restored = False

    @property
    def seed(self) -> int:
        return self.order.seed

    @property
    def replaced(self) -> int:
        """Samples replaced by spares so far."""
        return len(self.stats["replacements"])

    # ----------------------------------------------------------------- moving
    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` on the next iteration (a new permutation, new plans)."""
        if self._restored and epoch == self.epoch:
            return
        self._restored = False
        self.epoch, self.step = epoch, 0

    def start(self) -> tuple[int, int]:
        """An iteration begins: its epoch and first data step."""
        self._restored = False
        return self.epoch, self.step

    def delivered(self, step: int) -> None:
        """Data step ``step`` reached the caller; the position is the step after it."""
        self.step = step + 1

    def finish(self, epoch: int) -> None:
        """A completed epoch moves the position to the start of the next one."""
        self.epoch, self.step = epoch + 1, 0

    # ----------------------------------------------------------------- bad samples
    def record_bad(self, key: str, shard: str, reason: str) -> None:
        """One sample found bad: remembered (part of the position), counted and logged, once (a
        sample already in flight when it was found bad, e.g. a spare read ahead, is found again)."""
        if key in self.bad_keys:
            return
        self.bad_keys[key] = shard
        self.stats["decode_failures"] += 1
        self.stats["skipped_keys"].append({"key": key, "shard": shard})
        log.warning("bad sample %s of %s: %s", key, shard, reason)

    def record_replacement(self, epoch: int, step: int, position: int, key: str, shard: str, spare: str) -> None:
        """One sample replaced by a spare: logged and counted with the same fields by both loaders."""
        record = {"epoch": epoch, "step": step, "position": position, "key": key, "shard": shard, "spare": spare}
        self.stats["replacements"].append(record)
        log.warning("data step %d (epoch %d): sample %s of %s replaced by spare %s", step, epoch, key, shard, spare)

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The portable position: ``(epoch, data step)``, the order's definition, bad keys."""
        o = self.order
        return {"epoch": self.epoch, "step": self.step, "global_batch": o.global_batch * self.repeats,
                "repeats": self.repeats, "seed": o.seed,
                "num_samples": o.num_samples, "shuffle": o.shuffle, "drop_last": o.drop_last,
                "block_shards": o.block_shards, "bad_keys": dict(sorted(self.bad_keys.items()))}

    @staticmethod
    def merge_states(states: list[dict[str, Any]]) -> dict[str, Any]:
        """One position from every rank's (same epoch and step; bad keys found on any rank)."""
        merged = dict(states[0])
        merged["bad_keys"] = dict(sorted({k: v for s in states for k, v in s["bad_keys"].items()}.items()))
        return merged

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at ``state``'s position; refuses a position from another order or global batch."""
        o = self.order
        if "global_batch" not in state:
            raise ValueError("the checkpoint's data position has no global_batch: it is not a position of "
                             "the global sample order and cannot continue this loader")
        repeats = state.get("repeats", 1)
        if repeats != self.repeats:
            raise ValueError(f"the checkpoint's data position has {repeats} view-sets per video (data.repeats="
                             f"{repeats}); this run has data.repeats={self.repeats}: set data.repeats={repeats} to "
                             f"continue it")
        if state["global_batch"] != o.global_batch * self.repeats:
            w, saved = self.num_shards, state["global_batch"]
            hint = (f"set trainer.batch_size_per_gpu={saved // w}" if saved % (w * repeats) == 0
                    else f"the global batch of {saved} does not divide over {w} ranks"
                    + (f" in whole videos of {repeats} view-sets" if repeats > 1 else ""))
            raise ValueError(f"the checkpoint's data position counts global steps of {saved} samples; this run's "
                             f"global batch is {self.batch_size} x {w} ranks = {self.batch_size * w}: {hint}")
        mine = {"num_samples": o.num_samples, "shuffle": o.shuffle, "drop_last": o.drop_last,
                "block_shards": o.block_shards}
        theirs = {k: state[k] for k in mine}
        if mine != theirs:
            raise ValueError(f"the checkpoint's data order {theirs} differs from this run's {mine} "
                             f"(data.shards, data.shuffle, data.drop_last, data.block_shards)")
        self.order = dataclasses.replace(o, seed=state["seed"])
        self.epoch, self.step = state["epoch"], state["step"]
        self.bad_keys = dict(state.get("bad_keys", {}))
        self._restored = True


class PositionedLoader:
    """The position half of ``protocol.Loader`` for a loader that keeps its place in ``self.position``.

    Both loaders inherit it, so their length, epochs, state and ``stats`` are one implementation.
    """

    position: Position

    def _open(self, cfg: DataConfig, *, batch_size: int, shard_id: int, num_shards: int, seed: int) -> None:
        """The shards ``cfg`` names and this rank's place in their global order: the start of epoch 0."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= shard_id < num_shards:
            raise ValueError(f"shard_id must be in [0, {num_shards}), got {shard_id}")
        self.cfg = cfg
        self.batch_size, self.shard_id, self.num_shards = batch_size, shard_id, num_shards
        self.store = open_storage(cfg)
        self.shards = read_shard_set(cfg.shards, self.store)
        self.position = Position(build_order(cfg, self.shards, batch_size, num_shards, seed), batch_size,
                                 num_shards, cfg.repeats)

    @property
    def stats(self) -> dict[str, Any]:
        return self.position.stats

    def __len__(self) -> int:
        return self.position.order.steps

    def set_epoch(self, epoch: int) -> None:
        self.position.set_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        """The position after the last delivered batch: picklable, the same on every rank."""
        return self.position.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position.load_state_dict(state)

    merge_states = staticmethod(Position.merge_states)
