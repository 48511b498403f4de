"""Metrics: JSON lines in `<workdir>/metrics.jsonl`, TensorBoard events and a console progress bar.
Only process 0 writes.

The workdir may be a bucket (`gs://...`, through etils.epath). Object stores cannot append, so there metrics.jsonl
is rewritten whole at every write, from the records kept in memory (an earlier run's are read back at the
start): an object write is atomic, so a crash leaves the previous complete file, never a torn line, and the file
stays small (one record per log interval). A local file is appended to. TensorBoard events go through tensorboardX,
which writes gs:// (with google-cloud-storage installed) and s3:// (with boto3) itself; on any other remote path,
or without that client, a warning says so and the run goes on without TensorBoard.

A relaunch resumes from its latest checkpoint, which may be older than the last record a killed launch wrote: the
records it writes again are dropped from metrics.jsonl first, with a line that a crash cut short, so the file holds
one record per step and split. TensorBoard is told to hide the events of those steps (tensorboardX's purge_step).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import sys
import time
from typing import Any

import jax
import numpy as np
from etils import epath

from clip_jax.files import is_remote, write_atomic
from clip_jax.host_memory import dispatch_depth

log = logging.getLogger(__name__)


def _summary_writer(logdir: epath.Path, purge_step: int):
    """A tensorboardX SummaryWriter on `logdir`, or None (with a warning) where tensorboardX cannot write."""
    # tensorboardX imports torch where it is installed, for torch tensors this module never passes: 2-3 s of every
    # run's start on a 2-core machine. A None in sys.modules makes that import fail, as if torch were absent.
    hide_torch = "torch" not in sys.modules
    if hide_torch:
        sys.modules["torch"] = None
    try:
        from tensorboardX import SummaryWriter, record_writer
    finally:
        if hide_torch:
            del sys.modules["torch"]

    if is_remote(logdir):
        # tensorboardX writes gs:// with google-cloud-storage installed and s3:// with boto3; any other URI it would
        # take for a local folder named "<scheme>:".
        writable = {"gs": record_writer.GCS_ENABLED, "s3": record_writer.S3_ENABLED}
        if not writable.get(os.fspath(logdir).partition("://")[0], False):
            log.warning("no TensorBoard events: tensorboardX cannot write to %s (gs:// needs google-cloud-storage, "
                        "s3:// needs boto3)", logdir)
            return None
    return SummaryWriter(os.fspath(logdir), purge_step=purge_step)


def _records(data: bytes) -> list[tuple[str, dict]]:
    """(line, record) of each whole record in the bytes of a metrics.jsonl. Skipped: a line that a crash cut short,
    and one that is not UTF-8 JSON (a damaged disk block, an edit by hand), which would otherwise stop every
    relaunch."""
    out = []
    for raw in data.splitlines():
        try:
            line = raw.decode("utf-8")
            record = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(record, dict):
            out.append((line, record))
    return out


def _kept(record: dict, start_step: int, total_steps: int) -> bool:
    """Whether a record of an earlier launch stays when this launch resumes from checkpoint `start_step`: not one
    this launch writes again (every step after `start_step`, and the final evaluation when it resumes from the last
    step)."""
    step = record.get("step", 0)
    if record.get("split") == "eval" and step == start_step == total_steps:
        return False
    return step <= start_step


class _BarAwareHandler(logging.StreamHandler):
    """A console handler that writes through tqdm.write: its line goes above the progress bar, not into it."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging's own rule: a failing handler reports, never raises
            self.handleError(record)


class _LogLinesAboveBar:
    """While a progress bar shows: the root logger's console handlers replaced by `_BarAwareHandler`s with their
    stream, level, format and filters (the CLI's traceback filter); `restore` puts back exactly those it replaced,
    whatever else changed meanwhile."""

    def __init__(self) -> None:
        root = logging.getLogger()
        self._swapped: list[tuple[logging.Handler, logging.Handler]] = []
        for i, handler in enumerate(root.handlers):
            if type(handler) is logging.StreamHandler and handler.stream in (sys.stdout, sys.stderr):
                above = _BarAwareHandler(handler.stream)
                above.setLevel(handler.level)
                above.setFormatter(handler.formatter)
                for log_filter in handler.filters:
                    above.addFilter(log_filter)
                root.handlers[i] = above
                self._swapped.append((above, handler))

    def restore(self) -> None:
        root = logging.getLogger()
        for above, handler in self._swapped:
            if above in root.handlers:
                root.handlers[root.handlers.index(above)] = handler
        self._swapped = []


class MetricsWriter:
    def __init__(self, workdir: epath.PathLike, total_steps: int, start_step: int, tensorboard: bool = True,
                 progress_bar: bool = True):
        self.enabled = jax.process_index() == 0
        workdir = epath.Path(workdir)
        self.path = workdir / "metrics.jsonl"
        self._lines: list[str] | None = None  # on a remote workdir: the whole file, rewritten at each write
        self._tb = None
        self._bar = None
        self._logging_to_bar = None
        self._in_flight: collections.deque = collections.deque()
        self._ahead = dispatch_depth()
        self._total_steps = total_steps
        if not self.enabled:
            return
        previous = self.path.read_bytes() if self.path.exists() else b""
        kept = [line + "\n" for line, record in _records(previous) if _kept(record, start_step, total_steps)]
        if "".join(kept).encode("utf-8") != previous:
            write_atomic(self.path, "".join(kept))
        if is_remote(workdir):
            self._lines = kept
        if tensorboard:
            # The events of the steps after the checkpoint, from a killed launch, are hidden: this launch logs them
            # again. (A finished run relaunched evaluates its last step again, which this cannot hide: the loop
            # leaves that evaluation out of TensorBoard.)
            self._tb = _summary_writer(workdir / "tensorboard", start_step + 1)
        if progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
            self._logging_to_bar = _LogLinesAboveBar()

    def write(self, step: int, metrics: dict[str, Any], prefix: str = "train", tensorboard: bool = True) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if np.ndim(v) == 0 else np.asarray(v).tolist()) for k, v in metrics.items()}
        line = json.dumps({"step": step, "time": time.time(), "split": prefix, **clean}) + "\n"
        if self._lines is None:
            with self.path.open("a") as f:
                f.write(line)
        else:
            self._lines.append(line)
            write_atomic(self.path, "".join(self._lines))
        if self._tb is not None and tensorboard:
            for k, v in clean.items():
                if isinstance(v, float):
                    # (TensorBoard's names have no spaces: tensorboardX logged a line per class name with one)
                    self._tb.add_scalar(f"{prefix}/{k}".replace(" ", "_"), v, step)
            self._tb.flush()
        if prefix == "train":
            shown = {k: f"{clean[k]:.3g}" for k in ("loss", "lr", "samples_per_s", "mfu") if k in clean}
            if clean.get("nonfinite"):  # updates skipped in the window (the loss is the mean of the others)
                shown["skipped"] = f"{clean['nonfinite']:g}"
            if self._bar is not None:
                self._bar.set_postfix(shown, refresh=False)
            else:  # a line per record: a run's log (a batch job's) said nothing between the compile and the end
                log.info("step %d/%d: %s", step, self._total_steps, ", ".join(f"{k} {v}" for k, v in shown.items()))
        elif prefix == "eval" and step != self._total_steps:  # during the run (the final one prints its table)
            figures = [(k, v) for k, v in clean.items() if isinstance(v, float)]
            log.info("evaluation at step %d: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in figures[:8])
                     + (f" and {len(figures) - 8} more (metrics.jsonl)" if len(figures) > 8 else ""))

    def dispatched(self, outputs: Any) -> None:
        """Counts a dispatched step by its outputs. The host then waits for the step `dispatch_depth()` back to
        finish (on an accelerator the device still has a queued step, so it does not idle) and the bar advances by
        finished steps: without the wait the host dispatches tens of steps ahead, and the bar's rate jumps between
        the dispatch rate and the stall at every metrics fetch."""
        self._in_flight.append(outputs)
        while len(self._in_flight) > self._ahead:
            jax.block_until_ready(self._in_flight.popleft())
            self._advance(1)

    def close_bar(self) -> None:
        """Ends the progress bar's line and gives log lines back to the console (also where the run fails)."""
        if self._bar is not None:
            self._bar.close()  # (again: harmless)
        if self._logging_to_bar is not None:
            self._logging_to_bar.restore()
            self._logging_to_bar = None

    def synced(self) -> None:
        """Every dispatched step has finished (its metrics were fetched): the bar catches up."""
        self._advance(len(self._in_flight))
        self._in_flight.clear()

    def _advance(self, steps: int) -> None:
        if self._bar is not None and steps:
            self._bar.update(steps)

    def close(self) -> None:
        jax.block_until_ready(list(self._in_flight))
        self.synced()
        self.close_bar()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: epath.PathLike) -> list[dict]:
    """The records of a metrics.jsonl; a line cut short by a crash, or damaged, is skipped."""
    return [record for _, record in _records(epath.Path(path).read_bytes())]
