"""Subprocess entry point of tests/test_multihost.py: one process of a multi-process run.

    python tests/multihost_worker.py RUNS

RUNS is a JSON list of commands run in order in this process: `["rows"]` checks batch_rows and global_batch on a
mesh whose devices alternate between the processes; `["params", WORKDIR]` checks that the parameters of WORKDIR's
step-0 checkpoint (written by one process: a warm start) restore onto this cluster's mesh; `["differing", ...]` runs
the `clip-jax` command line after it with another learning rate on process 1, which every process must refuse (exit
status 2); anything else is a `clip-jax` command line. With
SIGTERM_AFTER_STEP=K in the environment, the last command is preempted: this process sends itself SIGTERM after
its step K (a preemption that reaches one host, at a known step), so its exit status is that command's.

The process joins the others through JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, which the test
sets as a cluster launcher would; XLA_FLAGS gives it its fake CPU devices.
"""

import json
import os
import signal
import sys
import time

import numpy as np


def send_sigterm_after(step: int) -> None:
    from clip_jax.train import loop

    real = loop.PreemptionFlag.is_set

    def is_set(self, done: int) -> bool:
        if done == step:
            os.kill(os.getpid(), signal.SIGTERM)
        elif done > step:
            # JAX's notifier thread reports the SIGTERM to the coordination service, which then sets the step both
            # processes stop at. On a loaded machine (the suite's other workers) that took longer than the tiny run's
            # few remaining steps, and the run ended before it: the later steps are slowed down to leave it time
            # (4 s in all, where 1 s had been enough on a quiet machine; a machine slower still could end the run
            # first again: nothing in-process says when the service has the notice).
            time.sleep(1.0)
        return real(self, done)

    loop.PreemptionFlag.is_set = is_set


def check_rows() -> None:
    """Each process feeds the rows batch_rows names; the global array must then be the global batch, row for row."""
    import jax

    from clip_jax.distributed import batch_rows, maybe_initialize
    from clip_jax.sharding import batch_sharding, global_batch

    maybe_initialize()
    devices = jax.devices()  # ordered by process: 0-3 on process 0, 4-7 on process 1
    half = len(devices) // 2
    interleaved = [d for pair in zip(devices[:half], devices[half:], strict=True) for d in pair]
    mesh = jax.sharding.Mesh(np.array(interleaved).reshape(len(devices), 1, 1), ("data", "fsdp", "tensor"))
    batch = np.arange(32 * 3, dtype=np.int32).reshape(32, 3)  # every process knows the whole batch here
    rows = batch_rows(len(batch), batch_sharding(mesh))
    array = global_batch({"x": batch[rows]}, mesh)["x"]
    assert array.shape == batch.shape, array.shape
    for shard in array.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), batch[shard.index])
    gathered = jax.jit(lambda x: x, out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))(array)
    np.testing.assert_array_equal(np.asarray(gathered.addressable_data(0)), batch)
    print(f"rows ok: process {jax.process_index()} fed rows {rows}", flush=True)


def check_restore_params(workdir: str) -> None:
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from clip_jax.config import default_config
    from clip_jax.distributed import maybe_initialize
    from clip_jax.sharding import make_mesh
    from clip_jax.train.checkpoint import Checkpointer

    maybe_initialize()
    want = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)  # what the test saved
    sharding = NamedSharding(make_mesh({"data": -1}), PartitionSpec("data"))
    abstract = {"w": jax.ShapeDtypeStruct(want.shape, want.dtype, sharding=sharding)}
    checkpointer = Checkpointer(workdir, default_config().checkpoint)
    params = checkpointer.restore_params(0, abstract)
    checkpointer.close()
    for shard in params["w"].addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), want[shard.index])
    print(f"params ok: process {jax.process_index()}", flush=True)


if __name__ == "__main__":
    from clip_jax import cli

    runs = json.loads(sys.argv[1])
    for i, argv in enumerate(runs):
        if argv == ["rows"]:
            check_rows()
            continue
        if argv[0] == "params":
            check_restore_params(argv[1])
            continue
        if argv[0] == "differing":
            other = ["--config.optimizer.lr=0.005"] if os.environ["JAX_PROCESS_ID"] == "1" else []
            try:
                cli.main(argv[1:] + other)
            except SystemExit as e:
                assert e.code == 2, e.code
                print("differing settings refused", flush=True)
                continue
            raise AssertionError("a launch with other settings on process 1 was not refused")
        if i == len(runs) - 1 and "SIGTERM_AFTER_STEP" in os.environ:
            send_sigterm_after(int(os.environ["SIGTERM_AFTER_STEP"]))
        cli.main(argv)
