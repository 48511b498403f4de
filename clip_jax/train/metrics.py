"""Metrics: JSON lines in `<workdir>/metrics.jsonl`, TensorBoard events and a console progress bar.
Only process 0 writes."""

from __future__ import annotations

import json
import pathlib
import time
from typing import Any

import jax
import numpy as np


class MetricsWriter:
    def __init__(self, workdir: pathlib.Path, total_steps: int, start_step: int, tensorboard: bool = True,
                 progress_bar: bool = True):
        self.enabled = jax.process_index() == 0
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        self._tb = None
        self._bar = None
        if not self.enabled:
            return
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"))
        if progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def write(self, step: int, metrics: dict[str, Any], prefix: str = "train") -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if np.ndim(v) == 0 else np.asarray(v).tolist()) for k, v in metrics.items()}
        record = {"step": step, "time": time.time(), "split": prefix, **clean}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in clean.items():
                if isinstance(v, float):
                    self._tb.add_scalar(f"{prefix}/{k}", v, step)
            self._tb.flush()
        if self._bar is not None and prefix == "train":
            shown = {k: clean[k] for k in ("loss", "lr", "samples_per_s", "mfu") if k in clean}
            self._bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()}, refresh=False)

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: pathlib.Path) -> list[dict]:
    """The records of a metrics.jsonl; a line cut short by a crash is skipped."""
    records = []
    for line in pathlib.Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
