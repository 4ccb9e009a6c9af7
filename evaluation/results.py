"""Accuracy and the results table: every protocol run appends one record to a JSON file, and the
markdown table is rendered from that file, so the table never holds a number the JSON lacks.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from common.atomic_io import atomic_write_json

__all__ = ["ResultRecord", "topk_accuracy", "append_result", "load_results", "render_markdown", "write_report"]


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Top-k accuracies in percent, ``k`` capped at the number of classes (top-5 of 2 classes is top-2)."""
    if scores.ndim != 2 or scores.shape[0] != labels.shape[0] or scores.shape[0] == 0:
        raise ValueError(f"accuracy: {tuple(scores.shape)} scores for {tuple(labels.shape)} labels")
    # Stable descending order so ties are broken by class index, the same on every run.
    ranked = torch.sort(scores, dim=1, descending=True, stable=True).indices
    hits = ranked.eq(labels.view(-1, 1).to(ranked.device))
    return {f"top{k}": 100.0 * hits[:, : min(k, scores.shape[1])].any(dim=1).double().mean().item() for k in ks}


@dataclass
class ResultRecord:
    """One evaluated number set.

    Args:
        protocol: the protocol's name: ``knn``, ``linear-frozen`` (probe on saved features), or a clip
            protocol of ``evaluation.finetune.PROTOCOLS`` (``svt-linear``, ``svt-finetune``, ``lstcl-finetune``).
        variant: what inside the protocol (``k=20``, ``k=5``, ``seed 0``, ``5-clip centre crop``).
        feature: ``slowfast`` (slow + fast CLS summed, SVT Fig. 3) | ``slow`` | ``fast`` | ``end-to-end``.
        checkpoint: the weights evaluated, and which backbone of them (``teacher`` / ``student``).
        train_data, val_data: shard folders (or feature files) the numbers come from.
        metrics: ``top1`` / ``top5`` in percent, and sample counts.
        control: the same protocol with shuffled training labels (should sit at chance).
        settings: every hyper-parameter of the run.
        changes: the settings that differ from the named protocol's (empty: the protocol as specified).
    """

    protocol: str
    variant: str
    feature: str
    checkpoint: str
    backbone: str
    train_data: str
    val_data: str
    metrics: dict[str, Any]
    control: dict[str, Any] | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    changes: dict[str, Any] = field(default_factory=dict)

    def protocol_label(self) -> str:
        """The protocol's name, with the settings changed from it (a modified run is not the protocol)."""
        if not self.changes:
            return self.protocol
        return f"{self.protocol} (changed: {', '.join(f'{k}={v}' for k, v in sorted(self.changes.items()))})"


def load_results(path: str | os.PathLike) -> list[ResultRecord]:
    path = Path(path)
    if not path.exists():
        return []
    try:
        rows = json.loads(path.read_text())
        return [ResultRecord(**row) for row in rows]
    except (json.JSONDecodeError, TypeError) as error:
        raise ValueError(f"{path}: not a results file written by evaluate.py ({error})") from error


def append_result(path: str | os.PathLike, record: ResultRecord) -> None:
    """Append ``record`` to the JSON list at ``path`` (rewritten whole: ``atomic_write_json``)."""
    path = Path(path)
    rows = [asdict(r) for r in load_results(path)] + [asdict(record)]
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, rows, sort_keys=True)


def _fmt(value: Any) -> str:
    return f"{value:.1f}" if isinstance(value, float) else ("-" if value is None else str(value))


def render_markdown(records: list[ResultRecord]) -> str:
    """One table row per record: protocol, variant, feature, checkpoint, data, top-1/top-5, control."""
    lines = ["| protocol | variant | feature | checkpoint | backbone | train data | val data | top-1 | top-5 "
             "| shuffled-label top-1 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        control = r.control.get("top1") if r.control else None
        lines.append(f"| {r.protocol_label()} | {r.variant} | {r.feature} | {r.checkpoint} | {r.backbone} | {r.train_data} "
                     f"| {r.val_data} | {_fmt(r.metrics.get('top1'))} | {_fmt(r.metrics.get('top5'))} "
                     f"| {_fmt(control)} |")
    return "\n".join(lines) + "\n"


def write_report(results_path: str | os.PathLike, markdown_path: str | os.PathLike) -> str:
    """Render the records of ``results_path`` as markdown into ``markdown_path``; returns the text."""
    records = load_results(results_path)
    if not records:
        raise ValueError(f"{results_path}: no results recorded (run evaluate.py knn / linear / finetune first)")
    text = "# Evaluation results\n\n" + render_markdown(records)
    Path(markdown_path).parent.mkdir(parents=True, exist_ok=True)
    Path(markdown_path).write_text(text)
    return text
