"""`clip-jax data convert --runner R`: the conversion of convert.py as an Apache Beam pipeline, for data sets that
outgrow one machine (DirectRunner here; DataflowRunner, SparkRunner, FlinkRunner, ... elsewhere).

The pipeline runs convert.py's own pieces, so its shards, reports and summary are those of `convert.convert`:

  Create(the planned shards) -> Reshuffle (spread over the workers) -> ParDo(ConvertShard: `convert_shard`, which
  skips a shard whose report exists with the same input fingerprint) -> the failed shards, gathered -> `summarize`

Bad samples and shards converted, resumed or failed are counted in Beam metrics (namespace `NAMESPACE`), which the
runner's UI shows while the job runs; `convert` returns them with the summary. A shard that fails as a whole is
listed in the summary's `failed` rather than failing the job, as in `convert.convert`: the others still finish, and
a re-run retries it.

Only this module imports Beam (the `[beam]` extra), so the package works without it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import socket
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.runner import PipelineResult, PipelineState
from etils import epath

from clip_jax.data import convert as local
from clip_jax.data.captions import Row
from clip_jax.data.images import DEFAULT_MAX_IMAGE_BYTES
from clip_jax.errors import sigterm_raises

NAMESPACE = "clip_jax.data.convert"
# Runners whose job runs in the launching process (and ends with it): Beam's local ones, by the names Beam reads
# (case aside, "Runner" optional).
IN_PROCESS_RUNNERS = ("direct", "fnapi", "bundlebaseddirect", "switchingdirect")
SKIPPED = "skipped_"  # counter name prefix of a bad-sample reason: skipped_truncated_image, ...
# (path, offset, length) of a shard's rows, as JSON, in the staging file
RowsRef = tuple[str, int, int]

log = logging.getLogger(__name__)


class PipelineNotDone(RuntimeError):
    """The pipeline ended in a state other than DONE (cancelled, or stopped by the runner)."""


def _counter(name: str, n: int = 1) -> None:
    if n:
        Metrics.counter(NAMESPACE, name).inc(n)


class ConvertShard(beam.DoFn):
    """Converts one shard with `convert.convert_shard` (which resumes a finished one) and counts what it did."""

    def __init__(self, opts: local.Options):
        super().__init__()
        self.opts = opts

    def process(self, element: tuple[local.Task, RowsRef | None]) -> Iterator[dict[str, Any]]:
        task, rows = element
        try:
            if rows is not None:
                task = dataclasses.replace(task, rows=_load_rows(rows))
            report = local.convert_shard(task, self.opts)
        except Exception as e:  # noqa: BLE001 - listed in the summary like convert.convert's failures; re-runs retry
            report = local.failure(task, self.opts, e)
        # a worker's log (the runner's UI shows it); the launcher prints the totals and the failures
        log.info(local.progress_line(report))
        if "error" in report:
            _counter("shards_failed")
        elif report.get("resumed"):
            # its samples were counted by the run that converted it: the counters cover this run's work only
            _counter("shards_resumed")
        else:
            _counter("shards_converted")
            _counter("samples_read", report["samples"])
            _counter("samples_written", report["written"])
            _counter("samples_skipped", sum(report["skipped"].values()))
            for reason, n in report["skipped"].items():
                _counter(SKIPPED + reason, n)
        yield report


def _failed(report: dict[str, Any]) -> bool:
    return "error" in report


def _summarize(failed: list[dict[str, Any]], opts: local.Options) -> None:
    local.summarize(opts.out, opts.prefix, opts.count, sorted(failed, key=lambda r: r["shard"]))


def _stage_rows(tasks: Sequence[local.Task], path: epath.Path) -> list[tuple[local.Task, RowsRef | None]]:
    """The pipeline's elements: tasks without their rows, which go to one file at `path` instead (a reference per
    task). Create embeds its elements in the job's description, which Dataflow caps at 10 MB: a table of a million
    rows would not fit. Tars have no rows and stage nothing."""
    if all(t.rows is None for t in tasks):
        return [(t, None) for t in tasks]
    elements: list[tuple[local.Task, RowsRef | None]] = []
    offset = 0
    with path.open("wb") as f:
        for task in tasks:
            # JSON, not pickle: workers load it from a bucket. Rows hold what JSON or CSV gave (a caption's bad bytes
            # as lone surrogates, which JSON's ASCII escapes keep).
            data = json.dumps([dataclasses.asdict(r) for r in task.rows]).encode()
            f.write(data)
            elements.append((dataclasses.replace(task, rows=None), (os.fspath(path), offset, len(data))))
            offset += len(data)
    return elements


def _load_rows(ref: RowsRef) -> list[Row]:
    path, offset, length = ref
    with epath.Path(path).open("rb") as f:
        f.seek(offset)
        return [Row(**r) for r in json.loads(f.read(length))]


def build(pipeline: beam.Pipeline, elements: Sequence[tuple[local.Task, RowsRef | None]],
          opts: local.Options) -> None:
    """Adds the conversion of `elements` (from `_stage_rows`) to `pipeline`."""
    reports = (
        pipeline
        | "Shards" >> beam.Create(elements, reshuffle=False)
        # Create's elements come from one worker: spread them, so every worker converts shards
        | "Spread" >> beam.Reshuffle()
        | "Convert" >> beam.ParDo(ConvertShard(opts))
    )
    # The summary is written by the pipeline, not the launcher, so a job whose launcher went away still writes it.
    # Only the failures travel: the summary reads the reports from `out`, as convert.convert's does.
    _ = (
        reports
        | "Failures" >> beam.Filter(_failed)
        | "Gather" >> beam.combiners.ToList()
        | "Summarize" >> beam.Map(_summarize, opts)
    )


def _remove_stale_staging(out: str, prefix: str) -> None:
    """Removes the staged rows (`_stage_rows`) that a DirectRunner conversion on this host left when it was killed:
    those of a process id that runs no process here."""
    staged = re.compile(rf"^\.{re.escape(prefix)}-rows-{re.escape(socket.gethostname())}-(\d+)\.json$")
    for path in epath.Path(out).iterdir():
        if (m := staged.match(path.name)) and not local.process_running(int(m[1])):
            path.unlink(missing_ok=True)


def read_counters(result: PipelineResult) -> dict[str, int]:
    """This module's Beam counters of a finished pipeline, by name (committed values where the runner has them)."""
    totals: Counter[str] = Counter()
    for metric in result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))["counters"]:
        totals[metric.key.metric.name] += metric.result
    return dict(sorted(totals.items()))


def convert(fmt: str, inputs: Sequence[str], out: str, *, runner: str, pipeline_options: Sequence[str] = (),
            image_root: str | None = None, shard_size: int = 10_000, min_size: int = 32,
            max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES, prefix: str = "train",
            fields: Sequence[str | None] = local.TABLE_FIELDS) -> dict[str, Any]:
    """Converts every shard on Beam's `runner` (`pipeline_options`: Beam's flags, e.g. ["--project=p"]) and waits for
    the job. Returns what `convert.convert` returns, with `this_run` over all shards (Beam takes them all), plus
    `counters`: this module's Beam counters."""
    if any(o == "--runner" or o.startswith("--runner=") for o in pipeline_options):
        raise ValueError("give the runner as --runner, not as a pipeline option")
    tasks, opts = local.prepare(fmt, inputs, out, image_root=image_root, shard_size=shard_size, min_size=min_size,
                                max_image_bytes=max_image_bytes, prefix=prefix, fields=fields)
    local.check_same_set(tasks, opts)
    pipeline = beam.Pipeline(options=PipelineOptions(flags=list(pipeline_options), runner=runner))
    epath.Path(out).mkdir(parents=True, exist_ok=True)
    # What a conversion killed at once left on this host: its shards' temporary files, and with the DirectRunner
    # (whose job ends with its process) its staged rows; a cluster's job may outlive its launcher and read them.
    in_process = runner.lower().removesuffix("runner") in IN_PROCESS_RUNNERS
    local.remove_stale_temporaries(out)
    if in_process:
        _remove_stale_staging(out, prefix)
    # in `out`, which every worker can read (a local folder for the DirectRunner, a bucket for a cluster)
    staging = epath.Path(out) / f".{prefix}-rows-{socket.gethostname()}-{os.getpid()}.json"
    build(pipeline, _stage_rows(tasks, staging), opts)
    try:
        with sigterm_raises(KeyboardInterrupt):  # stopped as a Ctrl-C stops it: "interrupted", not killed at once
            result = pipeline.run()
            state = result.wait_until_finish()
    except KeyboardInterrupt:
        if in_process:
            staging.unlink(missing_ok=True)
        raise  # a job on a cluster may still be running and reading the staged rows: keep them
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    staging.unlink(missing_ok=True)
    if state != PipelineState.DONE:
        raise PipelineNotDone(f"the Beam pipeline ended {state}, not DONE: the shards it finished are kept; run the "
                              "command again to convert the others")
    summary = json.loads((epath.Path(out) / "reports" / f"{prefix}-summary.json").read_text())
    this_run = local.run_totals(local.read_reports(out, prefix, opts.count))
    return summary | {"this_run": this_run, "counters": read_counters(result)}
