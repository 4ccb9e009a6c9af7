"""What the trainer and evaluation rely on from a loader (``DALILoader`` and ``BaselineLoader`` both are one)."""

from __future__ import annotations

from typing import Any, Iterator, Protocol, runtime_checkable


@runtime_checkable
class Loader(Protocol):
    """An epoch-wise iterable of per-step batches with a portable position.

    ``view_names`` names the view tensors of each batch (the method is built from them); ``stats``
    holds ``decode_failures`` and the list of ``replacements`` (the trainer's metrics and lineage).
    """

    view_names: list[str]
    stats: dict[str, Any]

    def __len__(self) -> int:
        """Data steps per epoch (the same on every rank)."""

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """This rank's batches from the current position to the end of the epoch:
        ``{view_name: (B, C, T, H, W), "label": (B,), "key": [str], "data_step": (epoch, step)}``."""

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` on the next iteration (a restored position inside it is kept)."""

    def state_dict(self) -> dict[str, Any]:
        """The position after the last delivered batch: picklable, the same on every rank."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at ``state``'s position, at any world size that divides its global batch."""

    def merge_states(self, states: list[dict[str, Any]]) -> dict[str, Any]:
        """One position from every rank's ``state_dict`` (what one rank found bad counts for all)."""
