"""Crash safety, for real: `clip-jax train` in subprocesses (1 process x 8 CPU devices, as tests/conftest.py sets
up this one) that die at the moments that can hurt, and the same workdir relaunched with `train --workdir W` (no
--config) until a launch finishes. The end is bit-identical to an uninterrupted run of the same config, and
metrics.jsonl holds one record per logged step. The launches of the chain, each dying as tests/crash_worker.py
makes it (the library has no test hooks):

  1. inside the write of tokenizer.json      2. inside the rewrite of config.json (every launch rewrites it)
  3. inside the append of the step-2 record to metrics.jsonl
  4. in train step 3, while the asynchronous save of step 2 is in flight (it never commits)
  5. when the save of step 4 is about to commit: its files written, its folder not yet renamed
  6. inside the write of results.json       7. runs to the end

Kills 1-3 and 6 stop the process inside the write (a file-size limit and SIGXFSZ), so the file is cut wherever it
is written; 4 and 5 are SIGKILL. Also: a disk that fills up at checkpoint time stops the run with one line and
leaves the previous checkpoint readable; the workdir files on a gs:// workdir; metrics of a relaunch.
"""

import errno
import json
import os
import pathlib
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from etils import epath

from clip_jax.config import default_config, read_config, save_config
from clip_jax.data.tokenizer import ClipTokenizer
from clip_jax.files import CheckpointWriteError, os_error, write_atomic
from clip_jax.plots import plot_training_curves
from clip_jax.train.checkpoint import Checkpointer
from clip_jax.train.metrics import MetricsWriter, read_metrics

from .conftest import xla_flags
from .test_end_to_end import DEMO, STEPS, TINY, assert_same_state, saved_state
from .test_multihost import bucket  # noqa: F401

REPO = pathlib.Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "crash_worker.py"
TIMEOUT = 300  # seconds for one launch, far above its usual time
TMP = ".orbax-checkpoint-tmp"
# TensorBoard off: tensorboardX imports torch, 2-3 s of every launch.
ARGS = ["train", "--config", DEMO, *TINY, "--config.log.tensorboard=False"]


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("crash")


@pytest.fixture(scope="module")
def env(tmp):
    """The environment of every launch: this process's devices and matmul precision, a shared compilation cache
    (every launch compiles the same programs) and this checkout first on the path (a script's own folder is).
    The launches are compared with each other only, so they compile as the test session does (tests/conftest.py):
    compiling is most of the time of a launch."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    return {
        **base, "XLA_FLAGS": xla_flags(8),
        "JAX_PLATFORMS": "cpu",
        "JAX_DEFAULT_MATMUL_PRECISION": "float32", "JAX_COMPILATION_CACHE_DIR": str(tmp / "jax_cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }


def command(argv: list[str], hooks: list[str] = ()) -> list[str]:
    return [sys.executable, str(WORKER), *hooks, "--", *argv]


def run(env: dict, log: pathlib.Path, argv: list[str], hooks: list[str] = ()) -> tuple[int, str]:
    """(exit code, output) of one launch."""
    with log.open("w") as out:
        code = subprocess.run(command(argv, hooks), cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                              timeout=TIMEOUT).returncode
    return code, log.read_text()


# Each launch of the chain: (name, hooks, how it ends). A relaunch has no --config: the workdir's config.json.
CHAIN = [
    ("tokenizer", ["--cut-write", "tokenizer.json"], -signal.SIGXFSZ),
    ("config", ["--cut-write", "config.json"], -signal.SIGXFSZ),
    ("metrics", ["--cut-write", "metrics.jsonl"], -signal.SIGXFSZ),
    ("step", ["--hold-commit", "2", "--kill-after-step", "3"], -signal.SIGKILL),
    ("commit", ["--kill-in-commit", str(STEPS)], -signal.SIGKILL),
    ("results", ["--cut-write", "results.json"], -signal.SIGXFSZ),
    ("end", [], 0),
]
SNAPSHOT = ("config.json", "tokenizer.json", "metrics.jsonl", "results.json")


@pytest.fixture(scope="module")
def runs(tmp, env):
    """The chain, and the uninterrupted reference run beside it. The chain: its workdir and {launch name: (exit
    code, output, {file: its bytes or None}, names in checkpoints/)} after each launch of CHAIN; it stops at the
    first launch that did not end as planned. The reference starts once the chain's launch "metrics" has compiled
    the train step into the shared cache: compiling it twice at once would double the cost of the slowest part."""
    workdir, reference = tmp / "chain", tmp / "reference"
    after, started = {}, None
    with (tmp / "reference.log").open("w") as log:
        try:
            for i, (name, hooks, planned) in enumerate(CHAIN):
                argv = [*ARGS, "--workdir", str(workdir)] if i == 0 else ["train", "--workdir", str(workdir)]
                code, out = run(env, tmp / f"chain_{name}.log", argv, hooks)
                files = {f: (workdir / f).read_bytes() if (workdir / f).exists() else None for f in SNAPSHOT}
                folder = workdir / "checkpoints"
                after[name] = (code, out, files, sorted(p.name for p in folder.iterdir()) if folder.exists() else [])
                if started is None and (name == "metrics" or code != planned):
                    started = subprocess.Popen(command([*ARGS, "--workdir", str(reference)]), cwd=REPO, env=env,
                                               stdout=log, stderr=subprocess.STDOUT)
                if code != planned:
                    break
            reference_code = started.wait(timeout=TIMEOUT)
        finally:
            if started is not None and started.poll() is None:
                started.kill()
    return (workdir, after), (reference, reference_code, (tmp / "reference.log").read_text())


@pytest.fixture(scope="module")
def chain(runs):
    return runs[0]


@pytest.fixture(scope="module")
def reference(runs):
    workdir, code, out = runs[1]
    assert code == 0, out[-3000:]
    return workdir


def launched(chain, name):
    """What launch `name` left, once every launch up to it has ended as planned."""
    _, after = chain
    for planned, _, code in CHAIN:
        assert planned in after, f"the chain stopped before launch '{planned}'"
        got, out, files, checkpoints = after[planned]
        assert got == code, f"launch '{planned}' exited with {got}, planned {code}:\n{out[-3000:]}"
        if planned == name:
            return files, checkpoints
    raise KeyError(name)


def test_every_launch_ends_as_planned(chain):
    launched(chain, "end")


def test_a_write_cut_short_leaves_the_previous_file(chain):
    workdir, _ = chain
    # 1: no tokenizer.json yet, and no torn one (a relaunch would fail to read it) ...
    files, _ = launched(chain, "tokenizer")
    assert files["tokenizer.json"] is None and files["config.json"] is not None
    # 2: ... the config.json of launch 1, whole (launch 2's relaunch reads it back: `train --workdir`) ...
    before = files["config.json"]
    files, _ = launched(chain, "config")
    assert files["config.json"] == before
    # 6: ... and no results.json rather than a torn one.
    files, _ = launched(chain, "results")
    assert files["results.json"] is None
    # The writes were cut indeed: launch 7 rewrote what launch 6 left beside the file, and nothing else is left.
    assert not list(workdir.glob(".*.tmp"))


def test_a_killed_save_leaves_only_a_temporary_folder(chain):
    # 4: killed in step 3, the save of step 2 not committed: no checkpoint to resume from.
    _, checkpoints = launched(chain, "step")
    assert checkpoints == [f"2{TMP}"]
    # 5: launch 5 started again from step 0, wrote the same step-2 folder anew and committed it; the save of the
    # last step was killed before its rename.
    _, checkpoints = launched(chain, "commit")
    assert checkpoints == ["2", f"{STEPS}{TMP}"]
    # 6 resumed from step 2 and saved the last step again, over the folder that 5 left.
    _, checkpoints = launched(chain, "results")
    assert checkpoints == ["2", str(STEPS)]


def test_resumed_run_equals_uninterrupted_run(chain, reference):
    workdir, _ = chain
    launched(chain, "end")
    want, got = saved_state(reference, STEPS), saved_state(workdir, STEPS)
    assert_same_state(want, got)
    data = lambda w: sorted(p.read_text() for p in (w / "checkpoints" / str(STEPS) / "data").glob("*.json"))
    assert data(workdir) == data(reference)
    assert json.loads((workdir / "results.json").read_text()) == json.loads((reference / "results.json").read_text())


def test_a_run_logs_the_line_that_launch_tpu_run_waits_for(runs):
    """`launch/tpu.py run` takes a trainer as started once its log has this line (its mesh: the settings, devices,
    mesh and batch passed the trainer's checks): a trainer's real output has it."""
    _, _, output = runs[1]
    line = re.search(r"^.*mesh \{.*$", output, re.M)
    mark = re.search(r'^STARTED_MARK = "(.*)"$', (REPO / "launch" / "tpu.py").read_text(), re.M).group(1)
    assert line and mark in line.group(0), (mark, output[:2000])


def test_metrics_hold_one_record_per_logged_step(chain, reference):
    workdir, _ = chain
    files, _ = launched(chain, "metrics")
    assert not files["metrics.jsonl"].endswith(b"\n")  # launch 3 did leave a cut line
    launched(chain, "end")
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line whole
    want = read_metrics(reference / "metrics.jsonl")
    assert [(r["step"], r["split"]) for r in records] == [(r["step"], r["split"]) for r in want]
    assert [(r["step"], r["split"]) for r in want] == [(2, "train"), (4, "train"), (4, "eval")]
    for got, ref in zip(records, want, strict=True):  # the same numbers, but for the timings
        assert {k: v for k, v in got.items() if k not in ("time", "samples_per_s", "tflops_per_s_per_device")} == {
            k: v for k, v in ref.items() if k not in ("time", "samples_per_s", "tflops_per_s_per_device")}


# --- a full disk at checkpoint time -------------------------------------------------------------------------------


def can_mount_in_a_namespace(tmp: pathlib.Path) -> bool:
    """Whether a tmpfs can be mounted in a mount namespace of a launch's own (root, util-linux's unshare)."""
    if shutil.which("unshare") is None:
        return False
    (tmp / "probe").mkdir(exist_ok=True)
    probe = ["unshare", "--mount", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {shlex.quote(str(tmp / 'probe'))}"]
    return subprocess.run(probe, capture_output=True).returncode == 0


def test_a_full_disk_at_checkpoint_time_stops_the_run_and_keeps_the_previous_checkpoint(tmp, env, reference):
    """The checkpoints folder is a small tmpfs, mounted for this launch only (a private mount namespace), which the
    worker fills just before the save of the last step: a real ENOSPC, in TensorStore's writes of the arrays.
    max_to_keep=1: had the failed save counted as written, Orbax would delete step 2."""
    if not can_mount_in_a_namespace(tmp):
        pytest.skip("mounting a tmpfs in a mount namespace needs root and unshare")
    workdir, kept = tmp / "full", tmp / "full_kept" / "checkpoints"
    (workdir / "checkpoints").mkdir(parents=True)
    kept.mkdir(parents=True)
    launch = shlex.join(command([*ARGS, "--workdir", str(workdir), "--config.checkpoint.max_to_keep=1"],
                                ["--fill-disk-at-save", str(STEPS)]))
    folder = shlex.quote(str(workdir / "checkpoints"))
    # What the tmpfs holds is copied out before the namespace, and the tmpfs, end with the launch.
    script = (f"mount -t tmpfs -o size=8m tmpfs {folder} && "
              f"{{ {launch}; code=$?; cp -a {folder}/. {kept}; exit $code; }}")
    result = subprocess.run(["unshare", "--mount", "sh", "-c", script], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=TIMEOUT)
    out = result.stdout + result.stderr
    assert result.returncode == 2, out[-3000:]
    assert (f"clip-jax train: error: could not write checkpoint {workdir}/checkpoints/{STEPS}: ENOSPC: No space left "
            "on device; free space or fix permissions, then relaunch the same command to resume from step 2"
            ) in result.stderr.splitlines()
    assert f'File "{REPO / "clip_jax"}' not in out  # no traceback through our code
    assert sorted(p.name for p in kept.iterdir()) == ["2", f"{STEPS}{TMP}", "filler"]
    # The previous checkpoint is whole: the state of the uninterrupted run at step 2.
    want, got = saved_state(reference, 2), saved_state(kept.parent, 2)
    for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(g, w)
    assert int(got["step"]) == 2


def test_a_failed_asynchronous_save_stops_the_next_save(tmp_path, monkeypatch):
    """The error of a save that fails in Orbax's background thread raises at the next save, named as its step."""
    from orbax.checkpoint._src.path import atomicity

    async def full_disk(tmp_dir, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(atomicity, "on_commit_callback", full_disk)
    checkpointer = Checkpointer(tmp_path, default_config().checkpoint, owner=True)
    state = {"w": jax.numpy.arange(8.0)}
    checkpointer.save(1, state)
    with pytest.raises(CheckpointWriteError) as info:
        checkpointer.save(2, state)
    assert str(info.value) == (
        f"could not write checkpoint {tmp_path}/checkpoints/1: ENOSPC: No space left on device; free space or fix "
        "permissions, then relaunch the same command to start again (no checkpoint was written)")
    monkeypatch.undo()
    checkpointer.close()


def test_a_failed_save_keeps_the_previous_checkpoint_usable(tmp_path, monkeypatch):
    """Without root (the tmpfs test above skips), the same promise with the failure injected where Orbax commits:
    the error names the failed step and the step to resume from, and that checkpoint restores whole."""
    from orbax.checkpoint._src.path import atomicity

    async def full_disk(tmp_dir, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    checkpointer = Checkpointer(tmp_path, default_config().checkpoint, owner=True)
    first, second = {"w": jax.numpy.arange(8.0)}, {"w": jax.numpy.arange(8.0) + 1}
    checkpointer.save(1, first)
    checkpointer.wait()
    monkeypatch.setattr(atomicity, "on_commit_callback", full_disk)
    checkpointer.save(2, second)
    with pytest.raises(CheckpointWriteError) as info:
        checkpointer.wait()
    assert "checkpoints/2: ENOSPC" in str(info.value) and str(info.value).endswith("to resume from step 1")
    monkeypatch.undo()
    assert checkpointer.latest_step() == 1
    restored = checkpointer.restore({"w": jax.ShapeDtypeStruct((8,), jax.numpy.float32)})
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.asarray(first["w"]))
    checkpointer.close()


@pytest.mark.parametrize("error, reason", [
    (OSError(errno.EROFS, "Read-only file system"), "EROFS: Read-only file system"),
    (ValueError('PERMISSION_DENIED: Error writing local file "/w/checkpoints/4/d/0": Failed to open: Permission '
                "denied [os_error_code='13']"), "EACCES: Permission denied"),
    (ValueError("shape mismatch"), None),
])
def test_os_error(error, reason):
    try:
        try:
            raise error
        except Exception as e:
            raise RuntimeError("in the background save thread") from e
    except RuntimeError as chained:
        assert os_error(chained) == reason


def test_the_training_removes_the_temporary_folders_of_killed_saves_and_readers_do_not(tmp_path):
    config = default_config().checkpoint
    killed = tmp_path / "checkpoints" / f"3{TMP}"
    (killed / "state").mkdir(parents=True)
    Checkpointer(tmp_path, config).close()  # as `clip-jax eval` beside a training whose save is in progress
    assert killed.exists()
    checkpointer = Checkpointer(tmp_path, config, owner=True)
    checkpointer.save(1, {"w": jax.numpy.arange(8.0)})
    checkpointer.close()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1"]


# --- workdir files ------------------------------------------------------------------------------------------------


def test_write_atomic_cut_short_leaves_the_previous_file(tmp_path):
    path = tmp_path / "results.json"
    path.write_text("previous\n")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64, hard))  # Python ignores SIGXFSZ: the write raises EFBIG
    try:
        with pytest.raises(OSError) as info:
            write_atomic(path, "x" * 1000)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert info.value.errno == errno.EFBIG
    assert path.read_text() == "previous\n" and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
    write_atomic(path, "new\n")
    assert path.read_text() == "new\n"


def test_workdir_files_on_a_bucket(bucket):  # noqa: F811
    workdir = epath.Path("gs://bucket/runs/a")
    config = default_config()
    config.total_steps = 7
    save_config(config, workdir / "config.json")
    assert read_config(workdir / "config.json").to_dict() == read_config_dict(config)
    tokenizer = ClipTokenizer.train(["a red circle", "a blue square", "a red square", "a blue circle"] * 3, 520)
    tokenizer.save(workdir / "tokenizer.json")
    loaded = ClipTokenizer.load(workdir / "tokenizer.json")
    np.testing.assert_array_equal(loaded(["a red square"], 8), tokenizer(["a red square"], 8))
    writer = MetricsWriter(workdir, 4, 0, tensorboard=False, progress_bar=False)
    for step in (1, 2):
        writer.write(step, {"loss": 3.0 / step, "i2t_acc": 0.1 * step})
    writer.close()
    plot_training_curves(workdir / "metrics.jsonl", workdir / "curves.png")
    assert (workdir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(bucket) == {f"gs://bucket/runs/a/{f}" for f in ("config.json", "tokenizer.json", "metrics.jsonl",
                                                                 "curves.png")}
    assert not pathlib.Path("gs:").exists()


def read_config_dict(config):
    """What a config reads back as from JSON: tuples as lists."""
    return json.loads(json.dumps(config.to_dict(), default=list))


# --- metrics of a relaunch ----------------------------------------------------------------------------------------

# What a launch killed after step 4 left: records up to step 4 and a line cut short.
KILLED = "".join(json.dumps(r) + "\n" for r in (
    {"step": 1, "split": "train", "loss": 4.0}, {"step": 2, "split": "train", "loss": 3.0},
    {"step": 2, "split": "eval", "top1": 0.1}, {"step": 3, "split": "train", "loss": 2.0},
    {"step": 4, "split": "train", "loss": 1.0},
)) + '{"step": 5, "split": "tr'


@pytest.mark.parametrize("where", ["local", "bucket"])
def test_a_relaunch_drops_the_records_it_writes_again(where, tmp_path, bucket):  # noqa: F811
    workdir = epath.Path("gs://bucket/run" if where == "bucket" else tmp_path)
    (workdir / "metrics.jsonl").write_text(KILLED)
    writer = MetricsWriter(workdir, 6, 2, tensorboard=False, progress_bar=False)  # resumed from checkpoint 2
    writer.write(3, {"loss": 2.5})
    writer.close()
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["split"]) for r in records] == [(1, "train"), (2, "train"), (2, "eval"), (3, "train")]
    assert records[-1]["loss"] == 2.5
    # Resumed from the last checkpoint (twice: the first relaunch died before results.json), only the final
    # evaluation runs again.
    for top1 in (0.5, 0.7):
        writer = MetricsWriter(workdir, 3, 3, tensorboard=False, progress_bar=False)
        writer.write(3, {"top1": top1}, prefix="eval")
        writer.close()
    records = read_metrics(workdir / "metrics.jsonl")
    assert [(r["step"], r["split"], r.get("top1")) for r in records][-2:] == [(3, "train", None), (3, "eval", 0.7)]


def test_tensorboard_hides_the_steps_a_relaunch_logs_again(tmp_path):
    """tensorboardX's purge_step: the first event of the relaunch's file is a SessionLog START at the step after
    the checkpoint, which makes TensorBoard drop the events of that step and later from the earlier files."""
    from tensorboardX.proto import event_pb2

    MetricsWriter(tmp_path, 6, 2, tensorboard=True, progress_bar=False).close()
    (events,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
    data, records = events.read_bytes(), []
    while data:  # TFRecord framing: length (8 bytes), its CRC (4), the record, its CRC (4)
        length = int.from_bytes(data[:8], "little")
        records.append(event_pb2.Event.FromString(data[12:12 + length]))
        data = data[16 + length:]
    starts = [(e.step, e.session_log.status) for e in records if e.HasField("session_log")]
    assert starts == [(3, event_pb2.SessionLog.START)]


@pytest.mark.parametrize("backend", ["gpu", "cpu"])
def test_the_progress_bar_counts_finished_steps_and_the_host_stays_ahead_on_accelerators(tmp_path, monkeypatch,
                                                                                         backend):
    """Two steps ahead on an accelerator; none on the CPU, where an overlapping step only competes for the cores."""
    waited = []

    class StepOutputs:  # stands for a dispatched step's metrics: records when the host waits for it
        def __init__(self, step):
            self.step = step

        def block_until_ready(self):
            waited.append(self.step)
            return self

    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    writer = MetricsWriter(tmp_path, 10, 0, tensorboard=False, progress_bar=True)
    for step in range(1, 6):
        writer.dispatched(StepOutputs(step))
    finished = [1, 2, 3] if backend == "gpu" else [1, 2, 3, 4, 5]  # on a GPU steps 4 and 5 may still run
    assert waited == finished and writer._bar.n == len(finished)
    writer.synced()  # the loop fetched the metrics of every step so far
    assert writer._bar.n == 5
    writer.dispatched(StepOutputs(6))
    writer.close()
    assert waited == [*finished, 6] and writer._bar.n == 6


@pytest.mark.parametrize("keep_period, kept", [(0, [0, 5]), (2, [0, 2, 4, 5])])
def test_the_rotation_keeps_a_warm_starts_step_0(tmp_path, keep_period, kept):
    """Step 0 is a converted or stretched model (WiSE-FT needs it later): max_to_keep 1 removed it at the next save."""
    config = default_config().checkpoint
    config.max_to_keep, config.keep_period = 1, keep_period
    checkpointer = Checkpointer(tmp_path, config, owner=True)
    for step in range(6):
        checkpointer.save(step, {"w": jax.numpy.arange(4.0) + step})
        checkpointer.wait()
    checkpointer.close()
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == kept


def test_a_run_without_progress_bar_logs_a_line_per_record_and_its_evaluations(tmp_path, caplog):
    """With log.progress_bar False (a batch job's log) nothing was said between the compile report and the results;
    an evaluation during the run showed in metrics.jsonl and TensorBoard only. The final one prints its own table."""
    writer = MetricsWriter(tmp_path, 10, 0, tensorboard=False, progress_bar=False)
    with caplog.at_level("INFO", logger="clip_jax.train.metrics"):
        writer.write(5, {"loss": 2.5, "lr": 1e-3, "samples_per_s": 612.0, "i2t_acc": 0.5})
        writer.write(5, {"zero_shot_top1": 0.8125, "i2t_r1": 0.25}, prefix="eval")
        writer.write(10, {"zero_shot_top1": 0.9}, prefix="eval")
    writer.close()
    assert caplog.messages == ["step 5/10: loss 2.5, lr 0.001, samples_per_s 612",
                               "evaluation at step 5: zero_shot_top1 0.8125, i2t_r1 0.25"]
