"""Multi-host (multi-controller) training, for real: two processes of 4 fake CPU devices each, joined through
`jax.distributed` (gloo collectives) by the same environment variables a cluster launcher sets, against one process
of 8 devices (this one, tests/conftest.py).

- 2 x 4 trains the same steps on the same global batches as 1 x 8 and ends with the same parameters and the same
  evaluation; only process 0 writes the logs; each process checkpoints its own data position.
- SIGTERM to one process only: both agree on one step, save it and exit 0; resuming from that checkpoint ends
  bit-identical to the uninterrupted two-process run.
- Both processes SIGKILLed in a train step while an asynchronous save is in flight, as a scheduler kills a job
  (tests/crash_worker.py): the relaunch resumes from the checkpoint before and ends bit-identical too.
- Without processes: the cluster detection, the per-host rows of the global batches (the same batches for any host
  count, also for a finite file source that repeats), metrics on a `gs://` workdir (an in-memory stand-in for the
  bucket), and the multi-host mode of the preemption flag.
"""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import portpicker
import pytest
from etils import epath
from fsspec.implementations.memory import MemoryFileSystem
from fsspec.registry import _registry
from PIL import Image

from clip_jax import cli, distributed
from clip_jax.config import ConfigError, default_config
from clip_jax.data.pipeline import STATS, train_dataset
from clip_jax.data.tokenizer import ClipTokenizer
from clip_jax.distributed import GlobalBatchRows, batch_rows, cluster
from clip_jax.sharding import batch_sharding, make_mesh
from clip_jax.train import checkpoint as checkpoint_lib
from clip_jax.train import loop
from clip_jax.train.checkpoint import read_state as saved_state
from clip_jax.train.metrics import MetricsWriter, read_metrics

from .conftest import xla_flags
from .test_end_to_end import DEMO, TINY, assert_same_state, checkpoint_steps

REPO = pathlib.Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "multihost_worker.py"
CRASH_WORKER = REPO / "tests" / "crash_worker.py"
STEPS, SIGTERM_AFTER, KILL_AFTER = 6, 1, 5
# TINY with more steps, a log record per step and an evaluation whose last batch is padded (40 = 16 + 16 + 8).
RUN = [*TINY, f"--config.total_steps={STEPS}", "--config.log.every_steps=1", "--config.eval.num_examples=40",
       "--config.eval.batch_size=16"]
TIMEOUT = 300  # seconds for one multi-process launch, far above its usual time


# --- multi-process launches ---------------------------------------------------------------------------------------


class Launch:
    """`python <argv>` as processes 0 and 1 of one JAX cluster (4 CPU devices each), started at once, so that other
    work can go on meanwhile. A process that fails, or outlives TIMEOUT, gets the other killed: a test never hangs in
    a collective."""

    def __init__(self, tmp: pathlib.Path, name: str, argv: list[str], env: list[dict] | None = None):
        port = portpicker.pick_unused_port()
        base = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
        base.update({
            # Compiled as this process compiles (tests/conftest.py): most of a launch is compiling.
            "XLA_FLAGS": xla_flags(4),
            "JAX_PLATFORMS": "cpu",
            "JAX_DEFAULT_MATMUL_PRECISION": "float32",  # as tests/conftest.py sets for this process
            "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
            # The launches compile the same programs: a shared persistent cache compiles them once.
            "JAX_COMPILATION_CACHE_DIR": str(tmp / "jax_cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
            # A script's own folder comes first on its path, not the checkout's: put this checkout there.
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        })
        self.logs = [tmp / f"{name}.{i}.log" for i in range(2)]
        self.procs: list[subprocess.Popen] = []
        self.deadline = time.monotonic() + TIMEOUT
        self.results: list[tuple[int, str]] | None = None
        try:
            for i, log in enumerate(self.logs):
                with log.open("w") as out:
                    self.procs.append(subprocess.Popen(
                        [sys.executable, *argv], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                        env={**base, "JAX_PROCESS_ID": str(i), **(env[i] if env else {})},
                    ))
        except BaseException:
            self.close()
            raise

    def wait(self) -> list[tuple[int, str]]:
        """(exit code, output) of each process."""
        if self.results is None:
            try:
                while any(p.poll() is None for p in self.procs):
                    if time.monotonic() > self.deadline or any(p.poll() not in (None, 0) for p in self.procs):
                        break
                    time.sleep(0.2)
            finally:
                self.close()
            self.results = [(p.returncode, log.read_text()) for p, log in zip(self.procs, self.logs, strict=True)]
        return self.results

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()


def assert_succeeded(results: list[tuple[int, str]]) -> None:
    for i, (code, out) in enumerate(results):
        assert code == 0, f"process {i} exited with {code}:\n{out[-3000:]}"


def train_argv(workdir: pathlib.Path, tokenizer: pathlib.Path) -> list[str]:
    # One tokenizer file for every run: the runs differ only in their process layout.
    return ["train", "--config", DEMO, "--workdir", str(workdir), *RUN, f"--config.data.tokenizer={tokenizer}"]


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("multihost")


@pytest.fixture(scope="module")
def tokenizer_file(tmp):
    path = tmp / "tokenizer.json"
    ClipTokenizer.train([c for i in range(200) for c in _captions(i)], 600).save(path)
    return path


def _captions(i):
    from clip_jax.data.shapes import ShapesConfig, ShapesDataset

    item = ShapesDataset(ShapesConfig(image_size=32), "train")[i]
    return [item["short_caption"], item["long_caption"], item["partial_caption"]]


@pytest.fixture(scope="module")
def one_process(tmp, tokenizer_file, launched):
    """1 process x 8 devices: this process, while the 2-process launch runs."""
    workdir = tmp / "one"
    cli.main(train_argv(workdir, tokenizer_file))
    return workdir


@pytest.fixture(scope="module")
def encode_inputs(tmp):
    """5 texts and 3 images: neither fills a batch of the encoder."""
    from clip_jax.data.shapes import ShapesConfig, ShapesDataset

    folder = tmp / "encode_inputs"
    (folder / "images").mkdir(parents=True)
    source = ShapesDataset(ShapesConfig(image_size=32), "test")
    for i in range(3):
        Image.fromarray(source[i]["image"]).save(folder / "images" / f"{i}.png")
    (folder / "texts.txt").write_text("".join(f"{source[i]['short_caption']}\n" for i in range(5)))
    return folder


def encode_argv(workdir: pathlib.Path, inputs: pathlib.Path, out: pathlib.Path) -> list[str]:
    return ["encode", "--workdir", str(workdir), "--texts", str(inputs / "texts.txt"), "--images",
            str(inputs / "images"), "--out", str(out), "--batch-size", "16"]


@pytest.fixture(scope="module")
def warm_start_checkpoint(tmp):
    """A step-0 checkpoint written by this process on its 8 devices, as `convert` or `stretch` would."""
    workdir = tmp / "warm"
    mesh = make_mesh({"data": -1})
    w = jax.device_put(np.arange(8 * 3, dtype=np.float32).reshape(8, 3), batch_sharding(mesh))
    checkpointer = checkpoint_lib.Checkpointer(workdir, default_config().checkpoint)
    checkpointer.save(0, {"params": {"w": w}, "opt_state": {"mu": w * 0}}, force=True)
    checkpointer.wait()
    checkpointer.close()
    return workdir


@pytest.fixture(scope="module")
def launched(tmp, tokenizer_file, encode_inputs, warm_start_checkpoint):
    """One launch of 2 processes x 4 devices (one start-up and compilation for all of it): a launch with other
    settings on process 1 (refused), the rows check, the warm-start check, the uninterrupted run, `encode` with its
    checkpoint, and the run again with SIGTERM sent to process 1 only, after its step SIGTERM_AFTER."""
    runs = [["differing", *train_argv(tmp / "differing", tokenizer_file)], ["rows"],
            ["params", str(warm_start_checkpoint)], train_argv(tmp / "two", tokenizer_file),
            encode_argv(tmp / "two", encode_inputs, tmp / "enc2"), train_argv(tmp / "preempted", tokenizer_file)]
    env = [{}, {"SIGTERM_AFTER_STEP": str(SIGTERM_AFTER)}]
    launch = Launch(tmp, "launch", [str(WORKER), json.dumps(runs)], env=env)
    yield launch
    launch.close()


@pytest.fixture(scope="module")
def killed(tmp, tokenizer_file, launched):
    """The uninterrupted run's command killed as a scheduler kills a job: process 0 SIGKILLs itself in train step
    KILL_AFTER, the launch then SIGKILLs process 1. The asynchronous save of the step before is in flight, all its
    files written but held back from its commit, so the relaunch must resume from the checkpoint before it (and
    metrics.jsonl holds records of steps it trains again). Started once the first launch has ended, its programs
    compiled into the shared cache."""
    launched.wait()
    launch = Launch(tmp, "killed", [str(CRASH_WORKER), "--hold-commit", str(KILL_AFTER - 1), "--kill-after-step",
                                    str(KILL_AFTER), "--", *train_argv(tmp / "killed", tokenizer_file)])
    yield launch
    launch.close()


@pytest.fixture(scope="module")
def killed_left(tmp, killed):
    """(exit codes, names in checkpoints/, steps of the metrics records) as the killed launch left them."""
    codes = [code for code, _ in killed.wait()]
    workdir = tmp / "killed"
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return codes, sorted(p.name for p in (workdir / "checkpoints").iterdir()), [json.loads(x)["step"] for x in lines]


@pytest.fixture(scope="module")
def relaunch(tmp, launched, killed_left):
    """The preempted and the killed runs relaunched: the same command (`clip-jax train`, the workdir's own
    config), in new processes, started as soon as the first launches have ended."""
    if any(code for code, _ in launched.wait()):
        yield None  # two_processes reports the failure
        return
    runs = [["train", "--workdir", str(tmp / name)] for name in ("preempted", "killed")]
    launch = Launch(tmp, "resumed", [str(WORKER), json.dumps(runs)])
    yield launch
    launch.close()


@pytest.fixture(scope="module")
def two_processes(tmp, launched, relaunch):
    results = launched.wait()
    assert_succeeded(results)
    return tmp / "two", results


@pytest.fixture(scope="module")
def resumed(tmp, two_processes, relaunch):
    assert_succeeded(relaunch.wait())
    return tmp / "preempted"


def train_records(workdir):
    return [r for r in read_metrics(workdir / "metrics.jsonl") if r["split"] == "train"]


def data_positions(workdir, step):
    folder = workdir / "checkpoints" / str(step) / "data"
    return {p.name: json.loads(p.read_text()) for p in sorted(folder.glob("process_*.json"))}


# Float32 over 6 steps of Adam: the 2-process all-reduce adds the per-device gradients in another order than the
# 1-process one, a difference of a few float32 ulps that the updates carry along.
RTOL, ATOL = 2e-5, 2e-6


def test_two_processes_train_like_one(one_process, two_processes):
    workdir, _ = two_processes
    want, got = saved_state(one_process, STEPS), saved_state(workdir, STEPS)
    assert int(got["step"]) == STEPS
    want_leaves, want_def = jax.tree.flatten_with_path(want)
    got_leaves, got_def = jax.tree.flatten_with_path(got)
    assert want_def == got_def
    for (path, w), (_, g) in zip(want_leaves, got_leaves, strict=True):
        np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL, err_msg=jax.tree_util.keystr(path))
    # The last two steps alone moved the parameters far more than the tolerance: these are two trained models.
    before = jax.tree.leaves(saved_state(one_process, STEPS - 2)["params"])
    assert max(np.abs(a - b).max() for a, b in zip(before, jax.tree.leaves(got["params"]), strict=True)) > 100 * ATOL
    # Every step saw the same global batch: the same loss, step by step (a different batch moves it by ~1e-1).
    one, two = train_records(one_process), train_records(workdir)
    assert [r["step"] for r in two] == list(range(1, STEPS + 1))
    np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one], rtol=1e-5)
    np.testing.assert_allclose([r["i2t_acc"] for r in two], [r["i2t_acc"] for r in one], rtol=0, atol=0)
    # Each host counts its own rows; process 0 logs the sum over both: the counts of the one-process run.
    data_keys = [k for k in one[0] if k.startswith("data_")]
    assert "data_truncated_caption" in data_keys and sum(r["data_truncated_caption"] for r in one) > 0
    assert [[r[k] for k in data_keys] for r in two] == [[r[k] for k in data_keys] for r in one]


def test_two_processes_evaluate_like_one(two_processes):
    """The final evaluation of the 2-process run equals `clip-jax eval` of its parameters here, on 1 x 8: every
    example counted once (a lost or doubled one moves a metric by 1/40)."""
    workdir, _ = two_processes
    cli.main(["eval", "--workdir", str(workdir)])
    want = json.loads((workdir / f"eval_{STEPS}.json").read_text())
    want.pop("settings")
    got = json.loads((workdir / "results.json").read_text())
    assert got == want and got["step"] == STEPS


def test_two_processes_encode_like_one(tmp, two_processes, encode_inputs):
    cli.main(encode_argv(tmp / "two", encode_inputs, tmp / "enc1"))
    for name, rows in (("text_embeddings.npy", 5), ("image_embeddings.npy", 3)):
        want, got = np.load(tmp / "enc1" / name), np.load(tmp / "enc2" / name)
        assert got.shape == (rows, 16)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6, err_msg=name)
    assert (tmp / "enc2" / "image_files.txt").read_text() == (tmp / "enc1" / "image_files.txt").read_text()


def test_processes_launched_with_other_settings_are_refused(tmp, two_processes):
    """Process 1 with another learning rate trained its gradients into the same parameters, without a word (and one
    with another model ended in gloo's collective-mismatch abort): refused on every process, before any file."""
    _, results = two_processes
    for _, out in results:
        assert ("the processes of this training were launched with other settings than process 0's (process 1: "
                "config.optimizer.lr: 0.001 -> 0.005): launch every process with the same command") in out, out[-2000:]
        assert "differing settings refused" in out
    assert not (tmp / "differing").exists()


def test_only_process_zero_writes_logs_and_results(two_processes):
    workdir, results = two_processes
    records = read_metrics(workdir / "metrics.jsonl")
    assert [r["step"] for r in records if r["split"] == "train"] == list(range(1, STEPS + 1))  # once each
    assert [r["step"] for r in records if r["split"] == "eval"] == [STEPS]
    assert len(list((workdir / "tensorboard").glob("events.out.tfevents.*"))) == 1
    for name in ("config.json", "tokenizer.json", "results.json", "curves.png"):
        assert (workdir / name).is_file(), name
    (_, out0), (_, out1) = results
    assert "zero_shot_top1" in out0 and "zero_shot_top1" not in out1  # process 0 prints the results table


def test_each_process_checkpoints_its_data_position(two_processes):
    workdir, _ = two_processes
    positions = data_positions(workdir, STEPS)
    assert list(positions) == ["process_0-of-2.json", "process_1-of-2.json"]
    # Both hosts read one batch per step: the same position.
    first, second = positions.values()
    assert first == second and first["next_index"] == STEPS


def test_sigterm_to_one_process_stops_both_at_one_step(tmp, two_processes):
    workdir, (_, results) = tmp / "preempted", two_processes  # both processes exited 0
    steps = [re.findall(r"preempted: saved the checkpoint of step (\d+)", out) for _, out in results]
    assert steps[0] and steps[0] == steps[1], steps
    saved = int(steps[0][0])
    assert SIGTERM_AFTER < saved < STEPS
    assert checkpoint_steps(workdir)[-1] == saved
    assert list(data_positions(workdir, saved)) == ["process_0-of-2.json", "process_1-of-2.json"]
    assert not (workdir / "results.json").exists()


def test_resumed_run_equals_uninterrupted_run(two_processes, resumed):
    workdir, _ = two_processes
    want, got = saved_state(workdir, STEPS), saved_state(resumed, STEPS)
    assert_same_state(want, got)
    assert data_positions(resumed, STEPS) == data_positions(workdir, STEPS)
    assert json.loads((resumed / "results.json").read_text()) == json.loads((workdir / "results.json").read_text())
    # The same losses at every step (logged every step; the preempted step's record written before it stopped).
    want_loss, got_loss = ({r["step"]: r["loss"] for r in train_records(w)} for w in (workdir, resumed))
    assert len(got_loss) == STEPS and got_loss == want_loss


def test_killed_run_resumes_bit_identical(tmp, two_processes, killed_left, resumed):
    codes, checkpoints, logged = killed_left
    # Process 1 dies of the SIGKILL the launch sends, or first by JAX's own hand once it sees process 0 gone.
    assert codes[0] == -signal.SIGKILL and codes[1] in (-signal.SIGKILL, -signal.SIGABRT), codes
    # Step 2 committed, the save of step 4 not (its folder never renamed), records up to step 4 logged.
    assert KILL_AFTER == 5 and checkpoints == ["2", "4.orbax-checkpoint-tmp"]
    assert logged == list(range(1, KILL_AFTER))
    workdir, killed = two_processes[0], tmp / "killed"
    want, got = saved_state(workdir, STEPS), saved_state(killed, STEPS)
    assert_same_state(want, got)
    assert data_positions(killed, STEPS) == data_positions(workdir, STEPS)
    assert json.loads((killed / "results.json").read_text()) == json.loads((workdir / "results.json").read_text())
    # One record per step, the relaunch's where it trained the step again: the same losses.
    want_loss, got_loss = ([(r["step"], r["loss"]) for r in train_records(w)] for w in (workdir, killed))
    assert got_loss == want_loss
    assert checkpoint_steps(killed) == checkpoint_steps(workdir)


def test_batch_rows_and_global_batch_on_a_mesh_that_interleaves_the_processes(two_processes):
    """A TPU mesh need not group its devices by host: each process then feeds non-contiguous rows."""
    _, results = two_processes
    assert "process 0 fed rows [0, 1, 2, 3, 8, 9" in results[0][1]
    assert "process 1 fed rows [4, 5, 6, 7, 12, 13" in results[1][1]


def test_parameters_of_a_one_process_checkpoint_restore_on_two_processes(two_processes):
    """A warm start (a workdir from `convert` or `stretch`, written on one machine) trained on a cluster."""
    _, results = two_processes
    assert "params ok: process 0" in results[0][1] and "params ok: process 1" in results[1][1]


def test_parameters_of_another_model_are_refused(warm_start_checkpoint):
    checkpointer = checkpoint_lib.Checkpointer(warm_start_checkpoint, default_config().checkpoint)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with pytest.raises(ValueError, match=r"another model \(it lacks \[\"\['v'\]\"\]\)"):
        checkpointer.restore_params(0, {"v": jax.ShapeDtypeStruct((8, 3), np.float32, sharding=device)})
    with pytest.raises(ValueError, match=r"another model \(.*shape"):
        checkpointer.restore_params(0, {"w": jax.ShapeDtypeStruct((8, 4), np.float32, sharding=device)})
    checkpointer.close()


# --- cluster detection --------------------------------------------------------------------------------------------


@pytest.fixture()
def no_tpu(monkeypatch):
    monkeypatch.setattr(distributed, "_tpu_chips", lambda: 0)


@pytest.mark.parametrize("env, kind", [
    ({}, None),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "2"}, "explicit"),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "1", "JAX_PROCESS_ID": "0"}, None),
    ({"TPU_WORKER_HOSTNAMES": "t1v-0,t1v-1,t1v-2,t1v-3", "TPU_WORKER_ID": "1"}, "tpu"),
    ({"TPU_WORKER_HOSTNAMES": "localhost", "TPU_WORKER_ID": "0"}, None),
    ({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.1", "MEGASCALE_NUM_SLICES": "2"}, "tpu"),
    ({"SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8", "SLURM_PROCID": "3", "SLURM_JOB_ID": "42"}, "slurm"),
    ({"SLURM_NTASKS": "1", "SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0", "SLURM_JOB_ID": "42"}, None),
    # The batch script of a 4-node job: the job's task count and PROCID 0, but no step (it waited forever).
    ({"SLURM_NTASKS": "4", "SLURM_PROCID": "0", "SLURM_JOB_ID": "42"}, None),
    ({"SLURM_JOB_ID": "42"}, None),  # an allocation, outside of srun
    # The batch script sets the rendezvous itself: it wins over SLURM's own variables.
    ({"SLURM_NTASKS": "2", "SLURM_PROCID": "1", "JAX_COORDINATOR_ADDRESS": "n1:2", "JAX_NUM_PROCESSES": "2",
      "JAX_PROCESS_ID": "1"}, "explicit"),
])
def test_cluster_kind(env, kind, no_tpu):
    assert cluster(env) == kind


def test_a_cloud_tpu_vm_is_left_to_jax(monkeypatch):
    """launch/tpu.py's VMs export no worker list: their slice is in the metadata server, which jax reads."""
    monkeypatch.setattr(distributed, "_tpu_chips", lambda: 4)
    assert cluster({}) == "tpu"
    assert cluster({"TPU_WORKER_HOSTNAMES": "localhost"}) is None  # a worker list of one host says otherwise


def test_incomplete_rendezvous_is_a_config_error(no_tpu):
    with pytest.raises(ConfigError, match="JAX_COORDINATOR_ADDRESS set without JAX_NUM_PROCESSES, JAX_PROCESS_ID"):
        cluster({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
    with pytest.raises(ConfigError, match="JAX_NUM_PROCESSES='four' must be an integer"):
        cluster({"JAX_COORDINATOR_ADDRESS": "a:1", "JAX_NUM_PROCESSES": "four", "JAX_PROCESS_ID": "0"})
    with pytest.raises(ConfigError, match="JAX_COORDINATOR_ADDRESS='127.0.0.1' must be host:port"):  # an IndexError
        cluster({"JAX_COORDINATOR_ADDRESS": "127.0.0.1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"})
    with pytest.raises(ConfigError, match="JAX_PROCESS_ID=2 is not one of the JAX_NUM_PROCESSES=2 processes"):
        cluster({"JAX_COORDINATOR_ADDRESS": "a:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"})
    with pytest.raises(ConfigError, match="JAX_NUM_PROCESSES=0: give the number of processes, 1 or more"):
        cluster({"JAX_COORDINATOR_ADDRESS": "a:1", "JAX_NUM_PROCESSES": "0", "JAX_PROCESS_ID": "0"})
    # One process uses no coordinator: its address is not checked.
    assert cluster({"JAX_COORDINATOR_ADDRESS": "localhost", "JAX_NUM_PROCESSES": "1", "JAX_PROCESS_ID": "0"}) is None


@pytest.mark.parametrize("env, call", [
    ({}, None),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "2"},
     {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 2}),
    ({"SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8", "SLURM_PROCID": "3"}, {}),  # jax detects the rest itself
])
def test_maybe_initialize_calls_jax_distributed_only_on_a_cluster(env, call, monkeypatch, no_tpu):
    for name in [*os.environ]:
        if name.startswith(("JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "TPU_", "MEGASCALE_", "SLURM_")):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    kind = distributed.maybe_initialize()
    assert calls == ([] if call is None else [call])
    assert kind == cluster(env)


# --- the rows of each global batch --------------------------------------------------------------------------------


def pipeline_config(source="shapes", path=""):
    config = default_config()
    config.batch_size = 8
    config.model.vision.image_size = 32
    config.model.text.context_length = 16
    config.data.source = source
    config.data.path = path
    return config


def global_batches(config, tokenizer, hosts: int, n: int) -> list[dict]:
    """n global batches assembled from `hosts` simulated hosts, each reading its contiguous block of rows."""
    size = config.batch_size // hosts
    iterators = [iter(train_dataset(config, tokenizer, range(h * size, (h + 1) * size))) for h in range(hosts)]
    out = []
    for _ in range(n):
        parts = [next(it) for it in iterators]
        for part in parts:
            del part[STATS]  # host-side: each host numbers the examples of its own stream
        out.append({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
    return out


@pytest.fixture(scope="module")
def caption_file(tmp):
    """A finite file source of 5 records: 5 batches of 8 run through it 8 times."""
    folder = tmp / "captions"
    folder.mkdir()
    rows = []
    for i in range(5):
        Image.new("RGB", (40, 36), (50 * i, 255 - 50 * i, 30 * i)).save(folder / f"{i}.png")
        rows.append({"image": f"{i}.png", "caption": f"picture number {i}. it is a test image"})
    (folder / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder / "c.jsonl"


@pytest.mark.parametrize("source", ["shapes", "captions"])
def test_global_batches_do_not_depend_on_the_host_count(source, caption_file, tokenizer_file):
    config = pipeline_config(source, str(caption_file) if source == "captions" else "")
    tokenizer = ClipTokenizer.load(tokenizer_file)
    want = global_batches(config, tokenizer, 1, 5)
    for hosts in (2, 4, 8):
        for k, (w, g) in enumerate(zip(want, global_batches(config, tokenizer, hosts, 5), strict=True)):
            for key in w:
                np.testing.assert_array_equal(g[key], w[key], err_msg=f"{hosts} hosts, batch {k}, {key}")
    # Consecutive batches differ (the comparison is not of one batch repeated).
    assert not np.array_equal(want[0]["image"], want[1]["image"])


def test_batch_rows():
    mesh = make_mesh({"data": 4, "fsdp": 2})
    assert batch_rows(16, batch_sharding(mesh)) == list(range(16))  # one process holds every device
    assert batch_rows(16) == list(range(16))


@pytest.mark.parametrize("process, count, rows", [(0, 2, [0, 1, 2, 3]), (1, 2, [4, 5, 6, 7]), (3, 4, [6, 7])])
def test_batch_rows_without_a_sharding_is_the_process_block(process, count, rows, monkeypatch):
    monkeypatch.setattr(jax, "process_index", lambda: process)
    monkeypatch.setattr(jax, "process_count", lambda: count)
    assert batch_rows(8) == rows
    with pytest.raises(ConfigError, match=f"batch_size 9 does not divide over {count} hosts"):
        batch_rows(9)


def test_global_batch_rows_dataset():
    import grain

    ds = GlobalBatchRows(grain.MapDataset.range(40), [1, 2, 5], 8)
    assert len(ds) == 5 * 3
    assert list(ds[:6]) == [1, 2, 5, 9, 10, 13]
    assert list(ds.batch(3)[2]) == [17, 18, 21]
    for bad in ([], [2, 1], [1, 1], [8], [-1]):
        with pytest.raises(ValueError, match="rows must be distinct, ascending"):
            GlobalBatchRows(grain.MapDataset.range(40), bad, 8)


# --- preemption flag ----------------------------------------------------------------------------------------------


def test_preemption_flag_on_several_hosts_asks_jax_and_leaves_sigterm_to_it(monkeypatch):
    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    asked = []
    monkeypatch.setattr(loop.multihost_utils, "reached_preemption_sync_point", lambda s: asked.append(s) or s == 7)
    flag = loop.PreemptionFlag()
    assert signal.getsignal(signal.SIGTERM) is before  # JAX's own handler stays in place
    assert [flag.is_set(s) for s in (5, 6, 7)] == [False, False, True]
    assert asked == [5, 6, 7]


# --- gs:// workdirs -----------------------------------------------------------------------------------------------


class FakeBucket(MemoryFileSystem):
    """gs:// in memory, like a bucket without append."""

    protocol = ("gs", "gcs")
    root_marker = ""

    def __init__(self, *args, finalize_on_close=None, **kwargs):  # epath passes gcsfs's option
        super().__init__(*args, **kwargs)

    def _open(self, path, mode="rb", **kwargs):
        if "a" in mode:
            raise OSError("objects cannot be appended to")
        return super()._open(path, mode, **kwargs)


@pytest.fixture()
def bucket(monkeypatch):
    from etils.epath import backend

    for protocol in FakeBucket.protocol:
        monkeypatch.setitem(_registry, protocol, FakeBucket)
    backend.fsspec_backend._get_filesystem.cache_clear()
    monkeypatch.setattr(FakeBucket, "store", {})
    monkeypatch.setattr(FakeBucket, "pseudo_dirs", [""])
    yield FakeBucket.store
    backend.fsspec_backend._get_filesystem.cache_clear()


def test_metrics_on_a_bucket_rewrite_the_object(bucket, caplog):
    workdir = "gs://bucket/runs/a"
    writer = MetricsWriter(workdir, 10, 0, tensorboard=True, progress_bar=False)
    writer.write(1, {"loss": 2.5})
    writer.write(2, {"loss": 2.0, "acc": np.float32(0.5)})
    writer.close()
    # A relaunch keeps the earlier records and adds its own.
    writer = MetricsWriter(workdir, 10, 2, tensorboard=False, progress_bar=False)
    writer.write(3, {"loss": 1.5}, prefix="eval")
    writer.close()
    assert set(bucket) == {"gs://bucket/runs/a/metrics.jsonl"}  # no TensorBoard folder, no local "gs:" folder
    records = read_metrics(epath.Path(workdir) / "metrics.jsonl")
    assert [(r["step"], r["split"], r["loss"]) for r in records] == [(1, "train", 2.5), (2, "train", 2.0),
                                                                     (3, "eval", 1.5)]
    assert records[1]["acc"] == 0.5
    assert "no TensorBoard events" in caplog.text and "gs://bucket/runs/a/tensorboard" in caplog.text
    assert not pathlib.Path("gs:").exists()


def test_local_metrics_append(tmp_path):
    for step in (1, 2):  # two runs of the workdir, through epath
        writer = MetricsWriter(epath.Path(tmp_path), 10, step - 1, tensorboard=False, progress_bar=False)
        writer.write(step, {"loss": 1.0 / step})
        writer.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == [(1, 1.0), (2, 0.5)]


def test_checkpoints_of_a_bucket_workdir_stay_in_the_bucket(monkeypatch):
    seen = []
    monkeypatch.setattr(checkpoint_lib.ocp, "CheckpointManager", lambda directory, **kwargs: seen.append(directory))
    checkpoint_lib.Checkpointer("gs://bucket/runs/a", default_config().checkpoint)
    checkpoint_lib.Checkpointer("relative/run", default_config().checkpoint)
    assert str(seen[0]) == "gs://bucket/runs/a/checkpoints"
    assert str(seen[1]) == str(pathlib.Path("relative/run/checkpoints").absolute())
