"""One training at a time per workdir.

Two `clip-jax train` processes on one workdir (a job requeued while the old one still runs, a command launched twice)
would both append to metrics.jsonl, rotate the same checkpoints, and the second one's start-up clean-up would remove
the temporary folder of a save the first one is writing. So a training holds `running.json` in its workdir while it
runs: where it runs (host name, boot id and process-id namespace: containers may share a host name and a pid), its
process id, the workdir it was written for, and a heartbeat that a thread advances every HEARTBEAT_S seconds. A
launch that finds it:

- written for another folder (a workdir copied while it trained): ignores it;
- from a process of this machine and namespace that is gone (a SIGKILL, an OOM kill, a second Ctrl-C): takes over;
- from a live process of this machine and namespace: is refused in one line naming the process;
- from anywhere else: watches the heartbeat for STALE_S seconds (no clocks compared: hosts' clocks differ). If it
  advances the run is alive and the launch is refused; if not (a machine that died, a preempted job requeued
  elsewhere) the launch takes over.

Taking the lock is write-then-verify: two launches at the same moment both write, and the one whose record is not
there POLL_S later is refused. A holder whose record was replaced by another launch (which judged it gone) finds out
at its next beat, stops beating and is told through `Holding.lost`: the step loop stops it.

Process 0 decides and holds the lock; every process gets its decision, so a multi-host launch starts or stops as one.
"""

from __future__ import annotations

import contextlib
import dataclasses
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
from clip_jax.files import canonical_path, is_remote

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


def _write(path: epath.Path, record: dict) -> None:
    """The record, whole: under a name of this process's own, then renamed (locally; a bucket's upload is atomic)."""
    if is_remote(path):
        path.write_text(json.dumps(record))
        return
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record))
    tmp.replace(path)


def _machine() -> dict[str, str]:
    """What tells one machine and process-id namespace from another: two containers may share a host name and a pid
    (often 1), never a boot id and namespace together."""
    found = {"host": socket.gethostname()}
    with contextlib.suppress(OSError), open("/proc/sys/kernel/random/boot_id") as f:
        found["boot_id"] = f.read().strip()
    with contextlib.suppress(OSError):
        found["pid_namespace"] = str(os.stat("/proc/self/ns/pid").st_ino)
    return found


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
    here = canonical_path(path.parent)
    if holder.get("workdir", here) != here:
        return None  # copied along with a workdir: the run it names trains the original
    if {k: holder.get(k) for k in _machine()} == _machine():
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


@dataclasses.dataclass
class Holding:
    """The lock as held: `lost` says why it is no longer this run's (another launch took the workdir over)."""

    lost: str | None = None


def _refuse(workdir: epath.Path, path: epath.Path, reason: str) -> ConfigError:
    return ConfigError(f"--workdir {workdir}: {reason}. Two trainings of one workdir would write over each other's "
                       f"checkpoints and metrics: stop that one first (if it is gone and this persists, remove {path})")


def _refuse_a_folder_per_host(workdir: epath.Path, path: epath.Path, token: str, wait_s: float, poll_s: float
                              ) -> None:
    """Every process must reach process 0's workdir (a shared file system, a bucket): a local folder of one path on
    each host failed later with another host's "tokenizer file not found", or at the first checkpoint save, after
    its steps, in a 5-minute hang. Each process looks for the lock record process 0 has just written (waiting a while:
    a network file system may show a new file late); a ConfigError on every process if one does not see it."""
    token = bytes(np.asarray(multihost_utils.broadcast_one_to_all(
        np.frombuffer(bytes.fromhex(token), np.uint8)), np.uint8)).hex()
    seen = jax.process_index() == 0
    deadline = time.monotonic() + wait_s
    while not seen:
        seen = (_read(path) or {}).get("token") == token
        if seen or time.monotonic() > deadline:
            break
        time.sleep(poll_s)
    blind = [i for i, s in enumerate(np.asarray(multihost_utils.process_allgather(np.int32(seen))).ravel()) if not s]
    if blind:
        if jax.process_index() == 0:
            path.unlink(missing_ok=True)  # not held: nothing trains
        raise ConfigError(f"--workdir {workdir} is not one folder that every process reaches: process "
                          f"{', '.join(map(str, blind))} did not see the record process 0 wrote there ({LOCK_NAME}) "
                          f"within {wait_s:.0f} s, as a folder local to each host would not; give a folder every host "
                          "reaches (a shared file system, a gs:// bucket): the run's files and every process's "
                          "checkpoint shards meet there")


@contextlib.contextmanager
def hold_workdir(workdir: epath.Path, heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S,
                 poll_s: float = POLL_S) -> Iterator[Holding]:
    """Holds `workdir` for one training, or raises ConfigError (on every process) if another live one holds it."""
    path = workdir / LOCK_NAME
    primary = jax.process_index() == 0
    holding = Holding()
    token = uuid.uuid4().hex
    record = {**_machine(), "pid": os.getpid(), "workdir": canonical_path(workdir), "token": token,
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "beats": 0}
    refusal = None
    if primary:
        refusal = find_live_holder(path, stale_s, poll_s)
        if refusal is None:
            workdir.mkdir(parents=True, exist_ok=True)
            _write(path, record)
            time.sleep(poll_s / 4)  # a launch at the same moment writes too: the record still there wins
            now = _read(path) or {}
            if now.get("token") != token:
                refusal = f"{_holder_text(now)} took this workdir at the same moment"
    if jax.process_count() > 1:
        refused = multihost_utils.broadcast_one_to_all(np.int32(refusal is not None))
        if refused and refusal is None:
            refusal = "process 0 found another training in this workdir (its log names it)"
    if refusal:
        raise _refuse(workdir, path, refusal)
    if jax.process_count() > 1:
        _refuse_a_folder_per_host(workdir, path, token, stale_s, poll_s)
    if not primary:
        yield holding
        return
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(heartbeat_s):
            try:
                now = _read(path)
                if now is not None and now.get("token") != token:
                    holding.lost = (f"another launch ({_holder_text(now)}) took {workdir} over, judging this run "
                                    "gone; this one stops without saving")
                    log.error("%s", holding.lost)
                    return
                record["beats"] += 1
                _write(path, record)
            except Exception as e:  # noqa: BLE001 - a bucket's hiccup: the training goes on; the next beat retries
                log.warning("could not refresh %s: %s", path, e)

    thread = threading.Thread(target=beat, name="clip_jax-run-lock", daemon=True)
    thread.start()
    try:
        yield holding
    finally:
        stop.set()
        thread.join()
        if (_read(path) or {}).get("token") == token:  # ours still (not taken over by a launch that judged us gone)
            path.unlink(missing_ok=True)
