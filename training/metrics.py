"""Per-step metrics: a JSONL file, TensorBoard scalars, a tqdm bar with ETA, and a final summary.

Only rank 0 writes; every rank calls the same methods so call sites need no rank checks.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from common.atomic_io import atomic_write_text, read_jsonl

__all__ = ["MetricsWriter", "summarize", "read_metrics", "format_summary", "truncate_jsonl"]


class MetricsWriter:
    """Writes one JSON object per logged step to ``<run_dir>/metrics.jsonl`` and to TensorBoard.

    Args:
        run_dir: the run's output folder.
        enabled: False on ranks other than 0.
        total_steps / start_step: for the progress bar.
        tensorboard, progress_bar: switch those outputs.
        append: continue an existing metrics file (resume from a checkpoint at ``start_step``)
            instead of starting it again.
    """

    def __init__(self, run_dir: Path, *, enabled: bool, total_steps: int, start_step: int = 0,
                 tensorboard: bool = True, progress_bar: bool = True, append: bool = False) -> None:
        self.enabled = enabled
        self.jsonl_path = Path(run_dir) / "metrics.jsonl"
        self.tb_dir = Path(run_dir) / "tensorboard"
        self._tb = None
        self._bar = None
        self._file = None
        if not enabled:
            return
        self.jsonl_path.parent.mkdir(parents=True, exist_ok=True)
        # a resumed run continues the same file from its checkpoint's step: rows the interrupted run
        # logged after that step are dropped, since the resumed run logs those steps again (each step
        # once); a fresh run in an old folder starts the file again
        if append:
            truncate_jsonl(self.jsonl_path, start_step)
        self._file = open(self.jsonl_path, "a" if append else "w", buffering=1)
        if tensorboard:
            # purge_step: TensorBoard hides the old run's events from this step on (same reason)
            self._tb = SummaryWriter(log_dir=str(self.tb_dir), purge_step=start_step + 1 if append else None)
        if progress_bar:
            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {k: (float(v) if isinstance(v, float) else v) for k, v in record.items()}
        record["time"] = time.time()
        self._file.write(json.dumps(record, allow_nan=True) + "\n")
        step = record["step"]
        if self._tb is not None:
            for key, value in record.items():
                if key not in ("step", "time", "epoch") and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix(loss=f"{record.get('loss', float('nan')):.4f}",
                                  vps=f"{record.get('videos_per_s', 0.0):.1f}", refresh=False)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._file is not None:
            self._file.close()


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Keeps the records of steps <= ``last_step`` (rewritten whole: ``atomic_write_text``)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut off when the interrupted run was killed
            continue
        if record.get("step", 0) <= last_step:
            kept.append(line + "\n")
    atomic_write_text(path, "".join(kept))


def read_metrics(path: Path) -> list[dict]:
    """Records of a metrics file, keeping only the last record of each step."""
    by_step = {record["step"]: record for record in read_jsonl(path) if "step" in record}
    return [by_step[s] for s in sorted(by_step)]


def _mean(values: list[float]) -> float:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else float("nan")


def summarize(records: list[dict], window: int = 10) -> dict:
    """First/last-window means of the loss and collapse monitors, mean throughput, data-wait share."""
    if not records:
        return {"steps": 0}
    head, tail = records[:window], records[-window:]
    out = {
        "steps": records[-1]["step"],
        "loss_first": _mean([r.get("loss") for r in head]),
        "loss_last": _mean([r.get("loss") for r in tail]),
        "videos_per_s": _mean([r.get("videos_per_s") for r in records[1:] or records]),
        "step_ms": _mean([r.get("step_ms") for r in records[1:] or records]),
        "data_wait_share": (sum(r.get("data_wait_ms", 0.0) for r in records)
                            / max(sum(r.get("step_ms", 0.0) for r in records), 1e-9)),
        "nonfinite_skipped": records[-1].get("nonfinite_skipped", 0),
        "decode_failures": records[-1].get("decode_failures", 0),
    }
    for key in ("teacher_entropy", "student_teacher_kl", "mfu", "tokens_per_s"):
        if any(key in r for r in records):
            out[f"{key}_first"] = _mean([r.get(key) for r in head])
            out[f"{key}_last"] = _mean([r.get(key) for r in tail])
    return out


def format_summary(summary: dict) -> str:
    """The end-of-run table printed by train.py."""
    lines = ["", "=== training summary ==="]
    for key, value in summary.items():
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        lines.append(f"{key:>26}  {text}")
    return "\n".join(lines)
