"""Metrics to JSONL (always) and TensorBoard (when installed and asked for)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


class MetricsLogger:
    """Appends one JSON object per logged step to ``<dir>/metrics.jsonl``."""

    def __init__(self, directory: str | Path, tensorboard: bool = False):
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

    def log(self, stage: str, step: int, metrics: dict[str, Any]) -> None:
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
