"""Where metrics go: a JSONL file (every train step, every eval), TensorBoard, stdout.

Only process 0 writes; on other processes every method is a no-op.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import numpy as np

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


def _parse_lines(lines: list[str]) -> list[dict]:
    """The JSON records of metrics lines; a line that does not parse (the half-written last
    line of a killed process) is skipped."""
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def read_metrics(workdir: str, split: str | None = None) -> list[dict]:
    """Records of `workdir`'s metrics file, optionally only one split ('train' / 'eval')."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        records = _parse_lines([line for line in f if line.strip()])
    return [r for r in records if split is None or r.get("split") == split]


class MetricsWriter:
    """Appends records to `<workdir>/metrics.jsonl` and scalars to TensorBoard event files."""

    def __init__(self, workdir: str, *, enabled: bool = True, resume_step: int | None = None):
        """`resume_step`: the step the run restarts from; records after it (and, for a run that
        starts from scratch, `resume_step=-1`, every record) are dropped, so that no step is
        logged twice. None appends to whatever is there."""
        self.enabled = enabled
        self.path = os.path.join(workdir, METRICS_FILE)
        self._tb = None
        if not enabled:
            return
        if resume_step is not None:
            self._truncate_after(resume_step)
        self._file = open(self.path, "a", buffering=1)  # line-buffered: survives a crash
        from tensorboardX import SummaryWriter  # lazily: it is only needed on process 0

        self._tb = SummaryWriter(logdir=os.path.join(workdir, TENSORBOARD_DIR), flush_secs=30)

    def _truncate_after(self, step: int) -> None:
        """Drop records of steps after `step` (written by a run that died before saving them)
        and any line that does not parse (a half-written last line)."""
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            lines = [line for line in f if line.strip()]
        kept = [json.dumps(r) + "\n" for r in _parse_lines(lines) if r.get("step", 0) <= step]
        if len(kept) != len(lines):
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(kept)
            os.replace(tmp, self.path)

    def write_record(self, record: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        for name, value in scalars.items():
            value = float(value)
            if math.isfinite(value):
                self._tb.add_scalar(name, value, step)

    def write_moe_stats(self, step: int, stats: Mapping[str, np.ndarray], prefix: str = "moe") -> None:
        """Per-layer router statistics: [L] arrays as one scalar per layer, [L, E] per expert."""
        if not self.enabled:
            return
        for name, value in stats.items():
            value = np.asarray(value)
            if value.ndim == 0:
                self._tb.add_scalar(f"{prefix}/{name}", float(value), step)
            elif value.ndim == 1:
                for layer, v in enumerate(value):
                    self._tb.add_scalar(f"{prefix}/{name}/layer{layer:02d}", float(v), step)
            elif value.ndim == 2:
                for layer, row in enumerate(value):
                    for expert, v in enumerate(row):
                        self._tb.add_scalar(f"{prefix}/{name}/layer{layer:02d}/expert{expert:02d}",
                                            float(v), step)

    def flush(self) -> None:
        if not self.enabled:
            return
        self._file.flush()
        self._tb.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        self._tb.close()
        self.enabled = False
