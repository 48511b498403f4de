"""One training per workdir (clip_jax/train/run_lock.py): a second launch while a run is alive is refused; a lock
left by a run that is gone (killed) is taken over."""

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
from etils import epath

from clip_jax import cli
from clip_jax.errors import ConfigError
from clip_jax.train import run_lock
from tests.test_end_to_end import exit_message, train_args


def write_lock(path, **fields):
    path.write_text(json.dumps({**run_lock._machine(), "started": "2026-12-05 10:00:00", "beats": 0} | fields))


@pytest.fixture()
def live_pid():
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield process.pid
    process.kill()
    process.wait()


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_live_process_on_this_host_holds_the_workdir_and_a_dead_one_does_not(tmp_path, live_pid):
    lock = tmp_path / run_lock.LOCK_NAME
    assert run_lock.find_live_holder(epath.Path(lock)) is None  # no lock
    write_lock(lock, pid=live_pid)
    assert f"process {live_pid} on {socket.gethostname()}" in run_lock.find_live_holder(epath.Path(lock))
    write_lock(lock, pid=dead_pid())  # a SIGKILL or an OOM kill left it behind
    assert run_lock.find_live_holder(epath.Path(lock)) is None


@pytest.mark.parametrize("fields", [{}, {"pid": 0}, {"pid": -1}, {"pid": "abc"}, {"pid": None}, {"pid": True}])
def test_a_lock_that_names_no_process_holds_nothing(tmp_path, fields):
    # os.kill(-1, 0) (no pid: -1 by default) signals every process one may, and "succeeds": a refusal naming pid None
    lock = tmp_path / run_lock.LOCK_NAME
    lock.write_text(json.dumps({"host": socket.gethostname(), **fields}))
    assert run_lock.find_live_holder(epath.Path(lock)) is None


def test_another_hosts_lock_counts_while_its_heartbeat_advances(tmp_path):
    lock = tmp_path / run_lock.LOCK_NAME
    write_lock(lock, host="node-7", pid=1)
    # No heartbeat within the window: that machine is gone (a preempted job requeued elsewhere takes over).
    assert run_lock.find_live_holder(epath.Path(lock), stale_s=0.3, poll_s=0.05) is None

    def beat():
        time.sleep(0.1)
        write_lock(lock, host="node-7", pid=1, beats=1)

    thread = threading.Thread(target=beat)
    thread.start()
    refusal = run_lock.find_live_holder(epath.Path(lock), stale_s=5, poll_s=0.05)
    thread.join()
    assert "process 1 on node-7" in refusal and "heartbeat advanced" in refusal


def test_the_holder_beats_lets_go_and_learns_when_it_was_taken_over(tmp_path):
    workdir = epath.Path(tmp_path / "run")
    lock = workdir / run_lock.LOCK_NAME
    with run_lock.hold_workdir(workdir, heartbeat_s=0.05, poll_s=0.01) as holding:
        first = json.loads(lock.read_text())
        assert first["pid"] == os.getpid() and first["workdir"] == os.path.realpath(workdir)
        time.sleep(0.3)
        assert json.loads(lock.read_text())["beats"] > first["beats"] and holding.lost is None
        # A launch that judged this run gone took over: the next beat sees it, stops beating and says so.
        write_lock(lock, pid=os.getppid(), token="theirs")
        time.sleep(0.3)
        assert "took" in holding.lost and json.loads(lock.read_text())["token"] == "theirs"
        with pytest.raises(ConfigError, match=f"process {os.getppid()} on .* is training this workdir"):
            run_lock.hold_workdir(workdir).__enter__()  # and another process of this machine is refused
    assert lock.exists()  # taken over: not ours to remove
    write_lock(lock, pid=dead_pid())
    with run_lock.hold_workdir(workdir, poll_s=0.01):
        pass
    assert not lock.exists()


def test_a_lock_copied_with_its_workdir_holds_the_copy_not(tmp_path, live_pid):
    # `cp -r run run2` while run trains: run2's copy names run, whose training does not touch run2
    lock = tmp_path / run_lock.LOCK_NAME
    write_lock(lock, pid=live_pid, workdir=str(tmp_path / "elsewhere"))
    assert run_lock.find_live_holder(epath.Path(lock)) is None
    write_lock(lock, pid=live_pid, workdir=os.path.realpath(tmp_path))
    assert run_lock.find_live_holder(epath.Path(lock)) is not None


def test_another_pid_namespace_is_watched_not_trusted(tmp_path):
    # A container sharing the host name: its pid 1 is not this namespace's pid 1. Its lock is judged by heartbeat.
    lock = tmp_path / run_lock.LOCK_NAME
    write_lock(lock, pid=os.getpid(), pid_namespace="4026531836-elsewhere")
    assert run_lock.find_live_holder(epath.Path(lock), stale_s=0.2, poll_s=0.05) is None  # silent: gone


def test_two_launches_at_the_same_moment_one_holds(tmp_path):
    script = (
        "import sys, time\n"
        "from etils import epath\n"
        "from clip_jax.errors import ConfigError\n"
        "from clip_jax.train import run_lock\n"
        "try:\n"
        "    with run_lock.hold_workdir(epath.Path(sys.argv[1]), poll_s=2.0):\n"
        "        print('HELD', flush=True)\n"
        "        time.sleep(3)\n"
        "except ConfigError as e:\n"
        "    print('REFUSED', e)\n"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    launches = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "run")], stdout=subprocess.PIPE,
                                 text=True, env=env) for _ in range(2)]
    outs = sorted(p.communicate(timeout=120)[0] for p in launches)
    assert [o.split()[0] for o in outs] == ["HELD", "REFUSED"], outs


def test_train_is_refused_while_another_training_holds_the_workdir(tmp_path, capsys, live_pid):
    workdir = tmp_path / "run"
    workdir.mkdir()
    write_lock(workdir / run_lock.LOCK_NAME, pid=live_pid)
    message = exit_message(train_args(workdir), capsys)
    assert f"--workdir {workdir}: process {live_pid} on" in message and "stop that one first" in message, message
    assert sorted(p.name for p in workdir.iterdir()) == [run_lock.LOCK_NAME]  # nothing written


def test_a_training_leaves_no_lock_behind(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    write_lock(workdir / run_lock.LOCK_NAME, pid=dead_pid())  # a killed run's
    cli.main(train_args(workdir))
    assert (workdir / "results.json").exists() and not (workdir / run_lock.LOCK_NAME).exists()


@pytest.mark.parametrize("shared", [True, False])
def test_a_workdir_that_is_a_folder_per_host_is_refused(tmp_path, monkeypatch, shared):
    """Process 1 of two, whose --workdir is (or is not) the folder process 0 wrote its lock record into: a local
    folder per host failed later with "tokenizer file not found", or at the first checkpoint save in a 5-minute hang.
    The collectives are stood in for: process 0's token broadcast, and each process's answer gathered."""
    import jax
    import numpy as np

    workdir = epath.Path(tmp_path / "run")
    workdir.mkdir()
    token = "ab" * 16
    if shared:  # process 0's record, as it wrote it
        write_lock(workdir / run_lock.LOCK_NAME, pid=1, token=token)
    answers = []
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    monkeypatch.setattr(run_lock.multihost_utils, "broadcast_one_to_all",
                        lambda x: np.frombuffer(bytes.fromhex(token), np.uint8))
    monkeypatch.setattr(run_lock.multihost_utils, "process_allgather",
                        lambda x: answers.append(int(x)) or np.asarray([1, int(x)]))
    if shared:
        run_lock._refuse_a_folder_per_host(workdir, workdir / run_lock.LOCK_NAME, "cd" * 16, 0.2, 0.05)
        assert answers == [1]
        return
    with pytest.raises(ConfigError) as error:
        run_lock._refuse_a_folder_per_host(workdir, workdir / run_lock.LOCK_NAME, "cd" * 16, 0.2, 0.05)
    assert answers == [0]
    assert str(error.value).startswith(f"--workdir {workdir} is not one folder that every process reaches: process 1 "
                                       "did not see the record process 0 wrote there (running.json) within 0 s")
