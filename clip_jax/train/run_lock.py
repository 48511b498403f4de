"""One training at a time per workdir.

Two `clip-jax train` processes on one workdir (a job requeued while the old one still runs, a command launched twice)
would both append to metrics.jsonl, rotate the same checkpoints, and the second one's start-up clean-up would remove
the temporary folder of a save the first one is writing. So a training holds `running.json` in its workdir while it
runs: its host, process id and a heartbeat that a thread advances every HEARTBEAT_S seconds. A launch that finds it:

- on the same host, from a process that is gone (a SIGKILL, an OOM kill, a second Ctrl-C): takes over at once;
- on the same host, from a live process: is refused in one line naming the process;
- from another host: watches the heartbeat for STALE_S seconds (no clocks compared: hosts' clocks differ). If it
  advances the run is alive and the launch is refused; if not (a machine that died, a preempted job requeued
  elsewhere) the launch takes over.

Process 0 decides and holds the lock; every process gets its decision, so a multi-host launch starts or stops as one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from clip_jax.errors import ConfigError
from clip_jax.files import write_atomic

log = logging.getLogger(__name__)

LOCK_NAME = "running.json"
HEARTBEAT_S = 20.0
STALE_S = 60.0  # three heartbeats missed: the holder is gone
POLL_S = 2.0


def _read(path: epath.Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):  # gone meanwhile, or not ours: nothing holds the workdir
        return None
    return data if isinstance(data, dict) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def _holder_text(holder: dict) -> str:
    return f"process {holder.get('pid')} on {holder.get('host')} (training since {holder.get('started')})"


def find_live_holder(path: epath.Path, stale_s: float = STALE_S, poll_s: float = POLL_S) -> str | None:
    """None if nothing holds the lock at `path` (no file, or its holder is gone); else why the workdir is taken."""
    holder = _read(path)
    pid = (holder or {}).get("pid")
    if holder is None or not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        if holder is not None:  # hand-edited, or another tool's: it names no process, so nothing holds the workdir
            log.warning("%s names no process (%r); ignoring it", path, holder)
        return None
    if holder.get("host") == socket.gethostname():
        if pid == os.getpid() or not _alive(pid):
            return None
        return f"{_holder_text(holder)} is training this workdir"
    log.warning("%s: held by %s; watching its heartbeat for %.0f s to tell whether that run is alive", path,
                _holder_text(holder), stale_s)
    deadline = time.monotonic() + stale_s
    while time.monotonic() < deadline:
        time.sleep(poll_s)
        now = _read(path)
        if now is None:
            return None  # it ended and let go
        if now != holder:
            return f"{_holder_text(now)} is training this workdir (its heartbeat advanced)"
    log.warning("%s: no heartbeat for %.0f s: the run of %s is gone; taking over", path, stale_s, _holder_text(holder))
    return None


@contextlib.contextmanager
def hold_workdir(workdir: epath.Path, heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S) -> Iterator[None]:
    """Holds `workdir` for one training, or raises ConfigError (on every process) if another live one holds it."""
    path = workdir / LOCK_NAME
    primary = jax.process_index() == 0
    refusal = find_live_holder(path, stale_s) if primary else None
    if jax.process_count() > 1:
        refused = multihost_utils.broadcast_one_to_all(np.int32(refusal is not None))
        if refused and refusal is None:
            refusal = "process 0 found another training in this workdir (its log names it)"
    if refusal:
        raise ConfigError(f"--workdir {workdir}: {refusal}. Two trainings of one workdir would write over each "
                          f"other's checkpoints and metrics: stop that one first (if it is gone and this persists, "
                          f"remove {path})")
    if not primary:
        yield
        return
    token = uuid.uuid4().hex
    record = {"host": socket.gethostname(), "pid": os.getpid(), "token": token,
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "beats": 0}
    workdir.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(record))
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(heartbeat_s):
            record["beats"] += 1
            try:
                write_atomic(path, json.dumps(record))
            except OSError as e:  # a full disk or a bucket hiccup: the training goes on; the next beat retries
                log.warning("could not refresh %s: %s", path, e)

    thread = threading.Thread(target=beat, name="clip_jax-run-lock", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        if (_read(path) or {}).get("token") == token:  # ours still (not taken over by a launch that judged us gone)
            path.unlink(missing_ok=True)
