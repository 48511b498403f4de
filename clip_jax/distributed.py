"""Multi-host (multi-controller) runs: when to start `jax.distributed`, which rows of every global batch a process
loads, and the barrier that orders the workdir files process 0 writes before the others read them.

Every host runs the same command. `maybe_initialize` starts `jax.distributed` only where there is a cluster:

- explicit: `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` (what launch/slurm/train.sbatch
  sets); more than one process initialises with exactly these values;
- a TPU slice: `TPU_WORKER_HOSTNAMES` / `TPU_PROCESS_ADDRESSES` naming more than one host (GKE), `MEGASCALE_*`
  (multislice), or a Cloud TPU VM (what launch/tpu.py creates), whose slice is described by its metadata server
  rather than the environment: `jax.distributed.initialize()` reads it, and on a one-host VM makes a harmless
  one-process cluster;
- SLURM: an `srun` step with several tasks (`SLURM_STEP_NUM_TASKS` > 1, which srun sets, and `SLURM_PROCID`):
  `jax.distributed.initialize()` detects the rest. Not the batch script itself, which has `SLURM_PROCID` 0 and the
  job's `SLURM_NTASKS` but is no task of a step: it would wait forever for tasks that never start;
- anything else is one process and never initialises.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np
from jax.experimental import multihost_utils

from clip_jax.errors import ConfigError
from clip_jax.files import diff_settings

log = logging.getLogger(__name__)

EXPLICIT_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ConfigError(f"environment variable {name}={env[name]!r} must be an integer") from None


def _hosts(value: str) -> int:
    return len([h for h in value.split(",") if h.strip()])


def _tpu_chips() -> int:
    """TPU chips on this machine's PCI bus (0 off Cloud TPU VMs), read from /sys without starting any runtime."""
    try:
        from jax._src.hardware_utils import num_available_tpu_chips_and_device_id
    except ImportError:  # a private helper: if it moves, TPU VMs still have the env-based detection
        return 0
    return num_available_tpu_chips_and_device_id()[0]


def cluster(env: Mapping[str, str]) -> str | None:
    """The kind of multi-process launch `env` describes ("explicit", "tpu" or "slurm"), or None for one process."""
    given = [v for v in EXPLICIT_VARS if env.get(v)]
    if given:
        if len(given) < len(EXPLICIT_VARS):
            missing = [v for v in EXPLICIT_VARS if v not in given]
            raise ConfigError(f"{', '.join(given)} set without {', '.join(missing)}: set all three or none")
        count, index = _int(env, "JAX_NUM_PROCESSES"), _int(env, "JAX_PROCESS_ID")
        if count < 1:
            raise ConfigError(f"JAX_NUM_PROCESSES={count}: give the number of processes, 1 or more")
        host, _, port = env["JAX_COORDINATOR_ADDRESS"].rpartition(":")
        if count > 1 and (not host or not port.isdigit()):
            raise ConfigError(f"JAX_COORDINATOR_ADDRESS={env['JAX_COORDINATOR_ADDRESS']!r} must be host:port (process "
                              "0's address and a free port, the same on every process)")
        if not 0 <= index < count:
            raise ConfigError(f"JAX_PROCESS_ID={index} is not one of the JAX_NUM_PROCESSES={count} processes (0 to "
                              f"{count - 1})")
        return "explicit" if count > 1 else None
    workers = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES")
    slices = _int(env, "MEGASCALE_NUM_SLICES") if env.get("MEGASCALE_NUM_SLICES") else 1
    if slices > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "tpu"
    if workers is not None:  # GKE states the slice's hosts outright
        return "tpu" if _hosts(workers) > 1 else None
    if _tpu_chips():
        return "tpu"
    steps = env.get("SLURM_STEP_NUM_TASKS")  # an srun step's; the batch script has only the job's SLURM_NTASKS
    if env.get("SLURM_PROCID") is not None and steps and _int(env, "SLURM_STEP_NUM_TASKS") > 1:
        return "slurm"
    return None


def maybe_initialize() -> str | None:
    """Starts `jax.distributed` when this process is one of several (see the module docstring); returns the kind of
    cluster it joined, or None when it did nothing. Call it before anything touches a JAX device."""
    kind = cluster(os.environ)
    if kind is None or jax.distributed.is_initialized():
        return None
    # Said first: jax.distributed waits (5 minutes) for every process to join, silent until it aborts, and a
    # process given the wrong id or address waits so too.
    if kind == "explicit":
        log.info("joining a run of %s processes as process %s (coordinator %s); JAX waits up to 5 minutes for all "
                 "of them", os.environ["JAX_NUM_PROCESSES"], os.environ["JAX_PROCESS_ID"],
                 os.environ["JAX_COORDINATOR_ADDRESS"])
        jax.distributed.initialize(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=_int(os.environ, "JAX_NUM_PROCESSES"),
            process_id=_int(os.environ, "JAX_PROCESS_ID"),
        )
    else:
        log.info("joining the %s cluster's processes (jax.distributed.initialize); JAX waits up to 5 minutes for all "
                 "of them", kind)
        jax.distributed.initialize()
    log.info("jax.distributed (%s): process %d of %d, %d local devices of %d", kind, jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return kind


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (nothing to wait for on one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def gather_texts(text: str) -> list[str]:
    """Every process's `text`, in process order; every process calls it at the same point."""
    data = np.frombuffer(text.encode("utf-8"), np.uint8)
    length = max(int(np.asarray(multihost_utils.process_allgather(np.int32(len(data)))).max()), 1)
    padded = np.zeros(length, np.uint8)
    padded[:len(data)] = data
    return [bytes(row).rstrip(b"\0").decode("utf-8")
            for row in np.asarray(multihost_utils.process_allgather(padded)).reshape(-1, length)]


def refuse_different_launches(command: str, settings: Mapping[str, Any]) -> None:
    """Every process of a run runs one command: a process launched with another learning rate (or seed, or data)
    trained its gradients into the same parameters without a word, and one with another model or step count ended in
    gloo's "collective mismatch" abort. The settings (JSON trees) of all processes are compared, and a difference is
    one ConfigError, the same on every process, naming the processes and settings."""
    if jax.process_count() == 1:
        return
    texts = gather_texts(json.dumps(settings, sort_keys=True, default=str))
    if all(text == texts[0] for text in texts):
        return
    first = json.loads(texts[0])
    differ = [(i, diff_settings(first, json.loads(text), "")) for i, text in enumerate(texts) if text != texts[0]]
    shown = "; ".join(f"process {i}: {', '.join(d.removeprefix('.') for d in keys[:3])}"
                      + (f" and {len(keys) - 3} more" if len(keys) > 3 else "") for i, keys in differ[:3])
    raise ConfigError(f"the processes of this {command} were launched with other settings than process 0's "
                      f"({shown}): launch every process with the same command")


def refuse_different_inputs(what: str, names: Sequence[str]) -> None:
    """Every process of a multi-process command reads the same inputs, in order (their embeddings are computed
    together): a host that lists other files (a folder synced late) would run other batches than the rest and hang
    in their collectives. A ConfigError on every process where one lists others."""
    if jax.process_count() == 1:
        return
    texts = gather_texts("\n".join(names))
    if any(text != texts[0] for text in texts):
        counts = ", ".join(f"process {i}: {len(text.splitlines())}" for i, text in enumerate(texts))
        raise ConfigError(f"the processes of this command list other {what} ({counts}): every host must see the same "
                          "files (a folder every host reaches, the same on each)")


def kept_by_all(kept: np.ndarray) -> np.ndarray:
    """`kept` (bool, one per input of a chunk: whether this process could read it) and-ed over the processes: an
    input one host cannot read (a file damaged in its copy) is left out on every host, which then run the same
    batches; on one process, `kept` itself."""
    if jax.process_count() == 1:
        return kept
    gathered = multihost_utils.process_allgather(np.asarray(kept, np.uint8))  # (bytes: a collective of bools may not)
    return np.asarray(gathered).reshape(-1, len(kept)).all(axis=0)


def sum_over_processes(values: np.ndarray) -> np.ndarray:
    """`values` (a small vector) summed elementwise over all processes; every process calls it at the same point."""
    return np.asarray(multihost_utils.process_allgather(np.asarray(values))).sum(axis=0)


def batch_rows(batch_size: int, sharding: jax.sharding.Sharding | None = None) -> list[int]:
    """The rows of every [batch_size, ...] global batch that this process loads, ascending.

    With `sharding` (the batch's), the rows its devices hold: `jax.make_array_from_process_local_data` places a
    process's local rows on them in this order, whatever the mesh's device order (on TPU slices it need not group
    devices by host). Without, its contiguous block (process p of P loads rows p*B/P ... (p+1)*B/P - 1), which is
    what a mesh whose devices are ordered by process holds."""
    if sharding is not None:
        rows: set[int] = set()
        for index in sharding.addressable_devices_indices_map((batch_size,)).values():
            rows.update(range(*index[0].indices(batch_size)))
        return sorted(rows)
    p, count = jax.process_index(), jax.process_count()
    if batch_size % count:
        raise ConfigError(f"batch_size {batch_size} does not divide over {count} hosts")
    size = batch_size // count
    return list(range(p * size, (p + 1) * size))


class GlobalBatchRows(grain.MapDataset):
    """This process's share of every global batch of `parent`: element j is element `(j // n) * batch_size +
    rows[j % n]` (n = len(rows)), so batching by n gives the rows `rows` of global batch j // n.

    Every process walks the same global order of examples and takes only its own rows of each batch, so global
    batch k holds the same examples in the same order on any number of processes (and a host's data position is
    the number of batches it has read, the same on every host)."""

    def __init__(self, parent: grain.MapDataset, rows: Sequence[int], batch_size: int):
        super().__init__(parent)
        rows = tuple(int(r) for r in rows)
        if not rows or list(rows) != sorted(set(rows)) or rows[0] < 0 or rows[-1] >= batch_size:
            raise ValueError(f"rows must be distinct, ascending and in [0, {batch_size}), got {rows}")
        self._rows = rows
        self._batch_size = batch_size
        self._length = len(parent) // batch_size * len(rows)

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        batch, row = divmod(index, len(self._rows))
        return self._parent[batch * self._batch_size + self._rows[row]]

    def __str__(self) -> str:
        return f"GlobalBatchRows({len(self._rows)} of {self._batch_size} rows)"
