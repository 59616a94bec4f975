"""Metrics to JSONL (always) and TensorBoard (when installed and asked for)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


class MetricsLogger:
    """Appends one JSON object per logged step to ``<dir>/metrics.jsonl``.

    With ``every_steps = N > 1`` (``output.log_every_steps``) a stage's steps are written one row per
    N steps: the mean of each number over those steps, except seconds (``time_*``) and counters
    (``judge/*``, ``score/*``, ``entropy_control/steps``), which are summed so that a phase's totals add up (a
    mean covers the steps that logged its key), and ``steps_in_row``
    says how many steps the row holds. A
    row is also written at ``flush`` (the last step of a stage, a checkpoint).
    """

    def __init__(self, directory: str | Path, tensorboard: bool = False, every_steps: int = 1):
        if every_steps < 1:
            raise ValueError(f"every_steps: expected >= 1, got {every_steps}")
        self.every_steps = every_steps
        self._pending: dict[str, list[tuple[int, dict[str, Any]]]] = {}
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / "metrics.jsonl"
        self._writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                SummaryWriter = None
            if SummaryWriter is not None:
                self._writer = SummaryWriter(str(self.directory / "tensorboard"))

    def log(self, stage: str, step: int, metrics: dict[str, Any], flush: bool = False) -> None:
        """Record ``metrics`` of ``step``; written now, or with the row of the next ``every_steps`` boundary."""
        pending = self._pending.setdefault(stage, [])
        pending.append((step, metrics))
        if flush or self.every_steps == 1 or step % self.every_steps == 0:
            self.flush(stage)

    def flush(self, stage: str) -> None:
        """Write ``stage``'s pending steps as one row (nothing when none are pending)."""
        pending = self._pending.pop(stage, [])
        if not pending:
            return
        step, metrics = pending[-1]
        if len(pending) > 1:
            metrics = _combine([m for _, m in pending])
        self._write(stage, step, metrics)

    def _write(self, stage: str, step: int, metrics: dict[str, Any]) -> None:
        record = {"stage": stage, "step": step, "time": time.time(), **metrics}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self._writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self._writer.add_scalar(f"{stage}/{key}", value, step)

    def records(self, stage: str | None = None) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        rows = [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return [r for r in rows if stage is None or r["stage"] == stage]

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


# seconds and event counts add up over a row's steps; entropy_control/steps counts the steps that updated (a
# step without groups logs no entropy_control/* means)
SUMMED = ("time_", "judge/", "score/", "entropy_control/steps")


def _combine(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One row for several steps: seconds and counters summed, other numbers averaged over the steps that
    have them, anything else the last value; every key any step has."""
    out: dict[str, Any] = {}
    for key in dict.fromkeys(k for row in rows for k in row):
        values = [row[key] for row in rows if key in row]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            out[key] = sum(values) if key.startswith(SUMMED) else sum(values) / len(values)
        else:
            out[key] = values[-1]
    out["steps_in_row"] = len(rows)
    return out
