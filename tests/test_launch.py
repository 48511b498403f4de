"""Launch tooling: the exact commands of every dry run, the remote shell snippets run for real against a fake
worker home, the SLURM batch script run for real against fake scontrol/srun/scancel (signals included), and the
computed performance tables of docs/launch.md."""

import importlib.util
import os
import pathlib
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import types

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _load(name):
    sys.path.insert(0, str(ROOT / "launch"))  # where a launcher run as a script finds its sibling modules
    spec = importlib.util.spec_from_file_location(f"launch_{name}", ROOT / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tpu = _load("tpu")
gpu = _load("gpu")
expected_perf = _load("expected_perf")

ZONE = "us-central2-b"
RUN = ("run", "clip-v4", f"--zone={ZONE}", "--config=configs/pretrain.py:B/16", "--workdir=gs://bucket/runs/b16",
       "--config.batch_size=4096")


def dry_run(module, capsys, *argv):
    assert module.main([*argv, "--dry-run"]) == 0
    return capsys.readouterr().out.splitlines()


def remote_command(line):
    """The shell snippet that `gcloud ... ssh --command=...` runs on the workers."""
    (command,) = [a.removeprefix("--command=") for a in shlex.split(line) if a.startswith("--command=")]
    return command


# --- launch/tpu.py: exact gcloud commands -------------------------------------------------------------------------


@pytest.mark.parametrize("flags, tier", [([], []), (["--spot"], ["--spot"]), (["--reserved"], ["--reserved"])])
def test_create_tpu_vm(capsys, flags, tier):
    assert dry_run(tpu, capsys, "create", "clip-v4", f"--zone={ZONE}", "--accelerator-type=v4-32", *flags) == [
        shlex.join(["gcloud", "compute", "tpus", "tpu-vm", "create", "clip-v4", f"--zone={ZONE}",
                    "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base", *tier])
    ]


def test_create_queued_resource(capsys):
    assert dry_run(tpu, capsys, "create", "clip-v5p", "--zone=europe-west4-b", "--project=my-proj",
                   "--accelerator-type=v5p-64", "--queued", "--spot") == [
        "gcloud compute tpus queued-resources create clip-v5p --zone=europe-west4-b --project=my-proj "
        "--accelerator-type=v5p-64 --runtime-version=v2-alpha-tpuv5 --node-id=clip-v5p --spot"
    ]


def test_create_best_effort_uses_the_alpha_track(capsys):
    assert dry_run(tpu, capsys, "create", "clip-v5e", f"--zone={ZONE}", "--accelerator-type=v5litepod-16",
                   "--queued", "--best-effort", "--version=my-version") == [
        f"gcloud alpha compute tpus queued-resources create clip-v5e --zone={ZONE} --accelerator-type=v5litepod-16 "
        "--runtime-version=my-version --node-id=clip-v5e --best-effort"
    ]
    with pytest.raises(SystemExit, match="^2$"):  # not a tier of direct creation: a usage error, status 2
        tpu.main(["create", "clip-v5e", f"--zone={ZONE}", "--accelerator-type=v5litepod-16", "--best-effort"])
    assert "launch/tpu.py: error: --best-effort is a queued-resource tier: add --queued" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # one tier at a time
        tpu.main(["create", "x", f"--zone={ZONE}", "--accelerator-type=v4-8", "--spot", "--reserved"])


@pytest.mark.parametrize("accelerator, version", [
    ("v4-32", "tpu-ubuntu2204-base"), ("v5p-64", "v2-alpha-tpuv5"), ("v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v6e-8", "v2-alpha-tpuv6e"),
])
def test_default_runtime_versions(accelerator, version, capsys):
    assert tpu.default_runtime_version(accelerator) == version
    with pytest.raises(SystemExit, match="^2$"):
        tpu.default_runtime_version("v9x-8")
    assert "--accelerator-type 'v9x-8' is none of GENERATION-SIZE" in capsys.readouterr().err


SETUP = ("python3 -m pip install --user --upgrade uv && ~/.local/bin/uv venv --allow-existing --python 3.11 "
         "~/clip_jax_venv && ~/.local/bin/uv pip install --python ~/clip_jax_venv/bin/python -e ~/clip_jax"
         '"[gcs]" "jax[tpu]"')  # [gcs]: gcsfs, which etils needs for the pod's gs:// workdirs


def test_install_from_git(capsys):
    lines = dry_run(tpu, capsys, "install", "clip-v4", f"--zone={ZONE}", "--git=https://github.com/org/clip_jax.git",
                    "--ref=v1.0")
    assert lines == [shlex.join([
        "gcloud", "compute", "tpus", "tpu-vm", "ssh", "clip-v4", f"--zone={ZONE}", "--worker=all",
        "--command=rm -rf ~/clip_jax && git clone https://github.com/org/clip_jax.git ~/clip_jax"
        f" && git -C ~/clip_jax checkout v1.0 && {SETUP}",
    ])]


def test_install_from_a_tarball(capsys, tmp_path, monkeypatch):
    def send(tarball):
        return [shlex.join(["gcloud", "compute", "tpus", "tpu-vm", "scp", str(tarball), "clip-v4:clip_jax_src.tar.gz",
                            f"--zone={ZONE}", "--worker=all"]),
                shlex.join(["gcloud", "compute", "tpus", "tpu-vm", "ssh", "clip-v4", f"--zone={ZONE}", "--worker=all",
                            "--command=rm -rf ~/clip_jax && mkdir -p ~/clip_jax && tar -xzf ~/clip_jax_src.tar.gz -C "
                            f"~/clip_jax && {SETUP}"])]

    # --tarball: this checkout's HEAD, made afresh every time (a tarball left from an earlier install was sent as
    # it was: the workers ran the old code), under a name of this checkout's own
    head = tpu.head_tarball()
    archive = shlex.join(["git", "-C", str(ROOT), "archive", "--format=tar.gz", f"--output={head}", "HEAD"])
    monkeypatch.setattr(tpu.subprocess, "run", lambda *a, **k: types.SimpleNamespace(stdout=""))  # a clean tree
    for _ in range(2):
        assert dry_run(tpu, capsys, "install", "clip-v4", f"--zone={ZONE}", "--tarball") == [archive, *send(head)]
    assert head.name.startswith("clip_jax_src_") and head.name != tpu.TARBALL_REMOTE
    # --tarball PATH: one of the user's own, sent as it is; a PATH that is not there is refused (it became the
    # place to write HEAD to, and then was never written again)
    tarball = tmp_path / "src.tar.gz"
    with pytest.raises(SystemExit, match="^2$"):
        tpu.main(["install", "clip-v4", f"--zone={ZONE}", f"--tarball={tarball}", "--dry-run"])
    assert f"--tarball {tarball}: no such file" in capsys.readouterr().err
    tarball.write_bytes(b"")
    assert dry_run(tpu, capsys, "install", "clip-v4", f"--zone={ZONE}", f"--tarball={tarball}") == send(tarball)
    # A config of one's own, not committed, passed run's local check and was not on the workers: said
    monkeypatch.setattr(tpu.subprocess, "run", lambda *args, **kwargs: types.SimpleNamespace(
        stdout="?? configs/mine.py\n M clip_jax/cli.py\n"))
    assert tpu.main(["install", "clip-v4", f"--zone={ZONE}", "--tarball", "--dry-run"]) == 0
    assert "warning: the tarball holds HEAD only; not in it: configs/mine.py, clip_jax/cli.py (commit what the run " \
           "needs)" in capsys.readouterr().err

    def no_git(command, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", command[0])

    monkeypatch.setattr(tpu.subprocess, "run", no_git)  # a traceback, even with --dry-run
    with pytest.raises(SystemExit, match="^2$"):
        tpu.main(["install", "clip-v4", f"--zone={ZONE}", "--tarball", "--dry-run"])
    assert "launch/tpu.py: error: git not found: it makes the tarball" in capsys.readouterr().err
    assert tpu.main([*RUN, "--dry-run"]) == 0  # run's check of the recipe's commit is a warning: skipped without git


def test_run_starts_the_trainer_on_every_worker_with_a_kept_log(capsys):
    (line,) = dry_run(tpu, capsys, *RUN, "--env=XLA_FLAGS=--xla_dump_to=/tmp/x y")
    assert shlex.split(line)[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "clip-v4", f"--zone={ZONE}",
                                     "--worker=all"]
    assert remote_command(line) == (
        'alive() { p=$(cat ~/clip_jax_logs/b16.pid 2>/dev/null) && kill -0 "$p" 2>/dev/null && grep -qa clip_jax '
        '/proc/"$p"/cmdline 2>/dev/null; }; '
        "mkdir -p ~/clip_jax_logs && cd ~/clip_jax || exit 1; "
        'if alive; then echo "$(hostname): b16 is already running" >&2; exit 1; fi; '
        "since=$(( $(stat -c %s ~/clip_jax_logs/b16.log 2>/dev/null || echo 0) + 1 )); "
        "XLA_FLAGS='--xla_dump_to=/tmp/x y' nohup ~/clip_jax_venv/bin/python -m clip_jax train "
        "--config=configs/pretrain.py:B/16 --workdir=gs://bucket/runs/b16 --config.batch_size=4096 "
        ">> ~/clip_jax_logs/b16.log 2>&1 < /dev/null & echo $! > ~/clip_jax_logs/b16.pid; "
        f"for _ in $(seq {tpu.START_CHECK_SECONDS * 2}); do "
        "if tail -c +\"$since\" ~/clip_jax_logs/b16.log | grep -qF 'clip_jax.train.loop: mesh {'; then "
        'echo "$(hostname): b16 started"; exit 0; fi; '
        'if ! alive; then echo "$(hostname): b16 ended before its start was through; the end of '
        '~/clip_jax_logs/b16.log:" >&2; tail -n 20 ~/clip_jax_logs/b16.log >&2; exit 1; fi; sleep 0.5; done; '
        f'echo "$(hostname): b16 is running, not yet past its start after {tpu.START_CHECK_SECONDS} s: tail its log '
        'to watch"'
    )


def test_run_passes_debug_on_and_warns_of_a_workdir_off_the_bucket(capsys):
    assert tpu.main([*RUN, "--debug", "--dry-run"]) == 0  # --debug: the trainer's full tracebacks
    out, err = capsys.readouterr()
    assert remote_command(out.strip()).split(" >> ")[0].endswith("--config.batch_size=4096 --debug") and not err
    assert tpu.main(["run", "clip-v4", f"--zone={ZONE}", "--workdir=runs/b16", "--dry-run"]) == 0
    assert "warning: --workdir runs/b16 is no gs:// bucket" in capsys.readouterr().err
    assert dry_run(gpu, capsys, "local", "--workdir=runs/b16", "--debug") == [
        "python3 -m clip_jax train --workdir=runs/b16 --debug"]


def test_run_resumes_from_the_workdir_config_and_takes_a_run_name(capsys):
    (line,) = dry_run(tpu, capsys, "run", "clip-v4", f"--zone={ZONE}", "--workdir=gs://b/runs/x", "--run-name=x2")
    assert "nohup ~/clip_jax_venv/bin/python -m clip_jax train --workdir=gs://b/runs/x >> ~/clip_jax_logs/x2.log" in (
        remote_command(line))


def test_tail_status_stop_delete(capsys):
    where = ("clip-v4", f"--zone={ZONE}")
    ssh = f"gcloud compute tpus tpu-vm ssh clip-v4 --zone={ZONE}"
    (tail,) = dry_run(tpu, capsys, "tail", *where, "--run-name=b16")
    assert tail.startswith(f"{ssh} --worker=0 ")
    assert remote_command(tail).endswith("; tail -n 100 ~/clip_jax_logs/b16.log")
    (tail,) = dry_run(tpu, capsys, "tail", *where, "--run-name=b16", "--worker=3", "--lines=20", "--follow")
    assert tail.startswith(f"{ssh} --worker=3 ") and remote_command(tail).endswith("; tail -n 20 -F "
                                                                                   "~/clip_jax_logs/b16.log")
    assert dry_run(tpu, capsys, "status", *where) == [f"gcloud compute tpus tpu-vm describe clip-v4 --zone={ZONE}"]
    status = dry_run(tpu, capsys, "status", *where, "--queued", "--run-name=b16")
    assert status[0] == f"gcloud compute tpus queued-resources describe clip-v4 --zone={ZONE}"
    assert status[1].startswith(f"{ssh} --worker=all ")
    for wait in ([], ["--no-wait"]):
        (stop,) = dry_run(tpu, capsys, "stop", *where, "--run-name=b16", *wait)
        assert stop.startswith(f"{ssh} --worker=all ") and 'kill -TERM "$p"' in remote_command(stop)
        assert ("while alive; do sleep 2; done" in remote_command(stop)) == (not wait)
    assert dry_run(tpu, capsys, "delete", *where) == [f"gcloud compute tpus tpu-vm delete clip-v4 --zone={ZONE}"]
    assert dry_run(tpu, capsys, "delete", *where, "--queued", "--yes") == [
        f"gcloud compute tpus queued-resources delete clip-v4 --zone={ZONE} --force --quiet"]


def test_bad_arguments_are_refused(capsys):
    for argv in (
        ["stop", "clip-v4", f"--zone={ZONE}", "--run-name=b16; rm -rf ~"],  # run names reach remote shells
        ["run", "clip-v4", f"--zone={ZONE}", "--workdir=gs://b/runs/x", "--env=1BAD=x"],
        ["run", "clip-v4", f"--zone={ZONE}", "--workdir=gs://b/runs/x", "--confg.batch_size=8"],  # typo
        ["status", "clip-v4", f"--zone={ZONE}", "--config.batch_size=8"],  # overrides only go to `run`
        ["install", "clip-v4", f"--zone={ZONE}", "--tarball", "--ref=main"],
        ["run", "clip-v4", "--workdir=gs://b/runs/x"],  # no zone
        ["create", "clip-v4", f"--zone={ZONE}", "--accelerator-type=v5e-16"],  # v5litepod-16
    ):
        with pytest.raises(SystemExit) as e:
            tpu.main([*argv, "--dry-run"])
        assert e.value.code == 2, argv  # a usage error, as argparse's (they exited 1, a failure's status)
    capsys.readouterr()
    with pytest.raises(SystemExit, match="^2$"):  # it said "(pass --run-name)" to one who had
        tpu.main(["tail", "clip-v4", f"--zone={ZONE}", "--run-name=my run", "--dry-run"])
    assert "launch/tpu.py: error: --run-name 'my run' must be letters" in capsys.readouterr().err


def test_commands_run_without_a_shell(monkeypatch, capsys):
    calls = []

    def fake_run(command, **kwargs):
        calls.append((command, kwargs))
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(tpu.subprocess, "run", fake_run)
    assert tpu.main(["delete", "clip-v4", f"--zone={ZONE}", "--yes"]) == 0
    assert calls == [(["gcloud", "compute", "tpus", "tpu-vm", "delete", "clip-v4", f"--zone={ZONE}", "--quiet"], {})]
    assert capsys.readouterr().out == f"gcloud compute tpus tpu-vm delete clip-v4 --zone={ZONE} --quiet\n"


# --- launch/tpu.py: the remote snippets, run against a fake worker --------------------------------------------------

ALL_REMOTE = [
    ("install", "clip-v4", f"--zone={ZONE}", "--git=https://github.com/org/clip_jax.git", "--ref=main"),
    ("install", "clip-v4", f"--zone={ZONE}", "--tarball"),
    RUN,
    ("tail", "clip-v4", f"--zone={ZONE}", "--run-name=b16", "--follow"),
    ("status", "clip-v4", f"--zone={ZONE}", "--run-name=b16"),
    ("stop", "clip-v4", f"--zone={ZONE}", "--run-name=b16"),
]


@pytest.mark.parametrize("argv", ALL_REMOTE, ids=lambda a: a[0])
def test_remote_commands_are_valid_bash(capsys, argv):
    line = [ln for ln in dry_run(tpu, capsys, *argv) if "--command=" in ln][-1]
    subprocess.run(["bash", "-n", "-c", remote_command(line)], check=True)


FAKE_TRAINER = """#!/bin/bash
echo "started in $PWD with CLIP_TEST_ENV=${CLIP_TEST_ENV:-}: $*"
[[ -n ${FAKE_SLOW_START:-} ]] && sleep 5  # a TPU's start takes longer than `run` waits
echo "2026-12-07 12:00:00,000 INFO clip_jax.train.loop: mesh {'data': 1, 'fsdp': 4, 'tensor': 1} over 4 devices"
trap 'sleep 0.5; echo "SIGTERM: checkpoint saved"; exit 0' TERM  # (a save takes a while)
while :; do sleep 0.05; done
"""


def _wait_for(predicate, what, timeout=10.0):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_run_status_stop_on_a_fake_worker(capsys, tmp_path, monkeypatch):
    """The snippets that `run`, `status`, `tail` and `stop` send to the workers, run by bash in a fake home."""
    monkeypatch.setattr(tpu, "START_CHECK_SECONDS", 2)
    home = tmp_path / "home"
    (home / "clip_jax").mkdir(parents=True)
    python = home / "clip_jax_venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(FAKE_TRAINER)
    python.chmod(0o755)
    env = {"HOME": str(home), "PATH": os.environ["PATH"]}

    def remote(*argv, **extra_env):
        (line,) = [ln for ln in dry_run(tpu, capsys, *argv) if "--command=" in ln]
        return subprocess.run(["bash", "-c", remote_command(line)], env={**env, **extra_env}, capture_output=True,
                              text=True, timeout=30)

    def alive(pid):  # (an exited trainer may wait a while as a zombie for whoever adopted it to reap it)
        stat = pathlib.Path(f"/proc/{pid}/stat")
        return stat.exists() and stat.read_text().rpartition(")")[2].split()[0] != "Z"

    log, pid_file = home / "clip_jax_logs" / "b16.log", home / "clip_jax_logs" / "b16.pid"
    where = ("clip-v4", f"--zone={ZONE}")
    started = remote(*RUN, "--env=CLIP_TEST_ENV=a b")  # returns once the trainer's mesh line is in its log
    assert started.returncode == 0 and started.stdout.endswith(": b16 started\n"), started.stderr
    pid = int(pid_file.read_text())
    pids = {pid}
    try:
        assert log.read_text().splitlines()[0] == (
            f"started in {home}/clip_jax with CLIP_TEST_ENV=a b: -m clip_jax train --config=configs/pretrain.py:B/16 "
            "--workdir=gs://bucket/runs/b16 --config.batch_size=4096")
        again = remote(*RUN)
        assert again.returncode == 1 and "b16 is already running" in again.stderr
        assert int(pid_file.read_text()) == pid
        assert remote("status", *where, "--run-name=b16").stdout.splitlines()[0].endswith(": b16 running")
        assert "clip_jax.train.loop: mesh" in remote("tail", *where, "--run-name=b16", "--lines=1").stdout
        stopped = remote("stop", *where, "--run-name=b16")  # returns once the trainer has saved and exited
        assert stopped.returncode == 0 and "b16 stopped; its log ends:" in stopped.stdout, stopped.stderr
        assert not alive(pid) and log.read_text().endswith("SIGTERM: checkpoint saved\n")
        assert remote("status", *where, "--run-name=b16").stdout.splitlines()[0].endswith(": b16 not running")
        assert remote("stop", *where, "--run-name=b16").stdout.endswith(": b16 is not running\n")
        # A pid file outlives its trainer, and the number may go to another process: not the run
        stranger = subprocess.Popen(["sleep", "30"])
        pids.add(stranger.pid)
        pid_file.write_text(f"{stranger.pid}\n")
        assert remote("status", *where, "--run-name=b16").stdout.splitlines()[0].endswith(": b16 not running")
        assert remote("stop", *where, "--run-name=b16").returncode == 0 and alive(stranger.pid)
        relaunch = remote(*RUN, FAKE_SLOW_START="1")  # a relaunch appends to the same log
        pids.add(int(pid_file.read_text()))
        assert relaunch.returncode == 0 and "b16 is running, not yet past its start after 2 s" in relaunch.stdout
        _wait_for(lambda: log.read_text().count("mesh {") == 2, "the relaunch")
        assert remote("stop", *where, "--run-name=b16", "--no-wait").returncode == 0
        # A run name that is not there: said, with the runs there (tail -F waited for the file forever)
        for command in ("tail", "status", "stop"):
            missing = remote(command, *where, "--run-name=b61", *(["--follow"] if command == "tail" else []))
            assert missing.returncode == 1 and "no run b61 here (runs: b16 )" in missing.stderr, missing.stderr
    finally:
        for p in pids:
            subprocess.run(["kill", "-9", str(p)], capture_output=True)
    # A trainer that cannot start: `run` fails and shows why (it exited 0, the error only in the log).
    python.unlink()
    failed = remote(*RUN, "--run-name=broken")
    assert failed.returncode == 1 and "broken ended before its start was through; the end of" in failed.stderr
    assert "clip_jax_venv/bin/python" in failed.stderr  # nohup's own message, from the log


@pytest.mark.skipif(shutil.which("gcloud") is None, reason="gcloud is not installed")
def test_gcloud_parses_every_command(capsys, tmp_path):
    """gcloud's own argument parser accepts each command: it gets as far as asking for credentials. Offline: a
    fresh config dir with no account, and the on-GCE probe of the metadata server switched off."""
    config = tmp_path / "gcloud"
    config.mkdir()
    (config / "gce").write_text("False")  # gcloud's cache of "am I on GCE": no metadata-server probe
    env = {**os.environ, "CLOUDSDK_CONFIG": str(config), "CLOUDSDK_CORE_CHECK_GCE_METADATA": "false",
           "CLOUDSDK_CORE_DISABLE_PROMPTS": "1", "CLOUDSDK_CORE_DISABLE_USAGE_REPORTING": "true",
           "CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK": "true", "CLOUDSDK_CORE_PROJECT": "fake-project"}
    (tmp_path / "src.tar.gz").write_bytes(b"")
    commands = []
    for argv in [  # one of each shape of command (about 1 s of CPU each)
        ("create", "t", f"--zone={ZONE}", "--accelerator-type=v4-32", "--spot"),
        ("create", "t", f"--zone={ZONE}", "--accelerator-type=v4-32", "--queued", "--reserved"),
        ("create", "t", f"--zone={ZONE}", "--accelerator-type=v4-32", "--queued", "--best-effort"),
        ("install", "t", f"--zone={ZONE}", f"--tarball={tmp_path / 'src.tar.gz'}"),  # scp, ssh --worker=all
        ("status", "t", f"--zone={ZONE}", "--queued"),
        ("delete", "t", f"--zone={ZONE}", "--queued", "--yes"),
    ]:
        commands += [shlex.split(line) for line in dry_run(tpu, capsys, *argv)]
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in commands]
    for command, proc in zip(commands, procs, strict=True):
        _, err = proc.communicate(timeout=120)
        assert proc.returncode != 0 and "active account" in err, f"{shlex.join(command)}\n{err}"


# --- launch/gpu.py and launch/slurm/train.sbatch --------------------------------------------------------------------

SUBMIT = ("submit", "--nodes=2", "--gpus-per-node=8", "--config=configs/pretrain.py:L/14",
          "--workdir=/shared/runs/longclip", "--config.model.text.context_length=248",
          "--config.data.crop_scale=(0.5, 1.0)")


def test_a_recipe_mistake_is_found_before_the_job_is_submitted(monkeypatch, capsys):
    """The trainer reads the recipe only once the job has waited in the queue (SLURM) or started on every worker
    (TPU): the launchers read it first, as it will be read."""
    monkeypatch.chdir(ROOT)  # where the SLURM job starts: --config is relative to it
    for module, argv, said in (
            (gpu, SUBMIT, r"launch/gpu.py submit: error: unknown config key 'batchsize' .*\(did you"),
            (tpu, RUN, "launch/tpu.py run: error: unknown config key 'batchsize'")):
        with pytest.raises(SystemExit, match="^2$"):  # the trainer's status for a configuration mistake
            module.main([*argv, "--config.batchsize=3", "--dry-run"])
        assert re.search(said, capsys.readouterr().err)
    for module, argv in ((gpu, SUBMIT), (tpu, RUN)):  # "unrecognized arguments: 4096" said nothing of the key
        with pytest.raises(SystemExit):
            module.main([*argv, "--config.batch_size", "4096", "--dry-run"])
    said = "--config.batch_size needs its value after '=': --config.batch_size=VALUE"
    assert capsys.readouterr().err.count(said) == 2
    monkeypatch.chdir("/")  # submitted from elsewhere: the job would not find the recipe either
    with pytest.raises(SystemExit, match="^2$"):
        gpu.main([*SUBMIT, "--dry-run"])
    assert "launch/gpu.py submit: error: config file /configs/pretrain.py not found" in capsys.readouterr().err


def test_a_mesh_or_batch_that_does_not_fit_the_gpus_is_refused_before_the_job_is_submitted(monkeypatch, capsys):
    """The GPUs asked for are known before the job waits in the queue: a mesh or batch the trainer would refuse on
    them is refused here, with the trainer's words and its status (2)."""
    monkeypatch.chdir(ROOT)
    three_nodes = [SUBMIT[0], "--nodes=3", *SUBMIT[2:]]  # 24 GPUs; the recipe's batch, 32,768, is 2^15
    for argv, words in [
        (three_nodes, "batch_size 32768 must be a multiple of 24 (batch shards 24 x accum_steps 1, on 24 devices)"),
        ([*SUBMIT, "--config.mesh.tensor=3"], "config.mesh: mesh {'data': 1, 'fsdp': -1, 'tensor': 3}: 16 devices "
                                              "do not divide by the fixed axes' product 3"),
        (["local", "--gpus=0,1,2", *SUBMIT[3:]], "must be a multiple of 3 (batch shards 3 x accum_steps 1, on 3"),
        # Long-CLIP's PCA per device: 1,024 over 32 GPUs leaves 32 rows, one too few for 32 components
        (["submit", "--nodes=4", "--gpus-per-node=8", "--config=configs/longclip_l14.py", "--workdir=/shared/l14",
          "--config.batch_size=1024"], "method.pca_components 32 must be below the local batch the PCA runs over "
                                       "minus one (32: batch_size 1024, 32 batch shards)"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            gpu.main([*argv, "--dry-run"])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(f"launch/gpu.py {argv[0]}: error: ") and words in err and err.count("\n") == 1, err
        if "must be a multiple" in words:  # fewer devices, as this command gives them (CUDA_VISIBLE_DEVICES was said)
            assert err.endswith("(--nodes or --gpus-per-node)\n" if argv[0] == "submit" else
                                "(--gpus, e.g. --gpus=0 for one)\n"), err
    assert dry_run(gpu, capsys, *three_nodes, "--config.batch_size=24576")[0].startswith("sbatch ")  # 1,024 per GPU


@pytest.mark.parametrize("gpus", ["a", "0, 1", "0,,1"])
def test_gpus_that_cuda_cannot_read_are_refused(gpus, capsys):
    """They became CUDA_VISIBLE_DEVICES as given, where CUDA reads the indices up to the first bad one."""
    with pytest.raises(SystemExit, match="^2$"):
        gpu.main(["local", f"--gpus={gpus}", "--workdir=runs/b16", "--dry-run"])
    assert f"expected comma-separated GPU indices without spaces (0,1), got {gpus!r}" in capsys.readouterr().err


def test_a_resume_is_checked_against_the_workdirs_own_settings(tmp_path, capsys):
    """Without --config the job resumes from the workdir's config.json (a converted model's first run too): where
    this machine sees it, the overrides and the batch are checked against it before the queue."""
    from clip_jax.config import default_config, save_config

    workdir = tmp_path / "run"
    workdir.mkdir()
    save_config(default_config(), workdir / "config.json")
    for argv, words in [
        (["local", "--gpus=0,1,2", f"--workdir={workdir}", "--config.batch_size=16"],
         "batch_size 16 must be a multiple of 3 (batch shards 3 x accum_steps 1, on 3 devices)"),
        (["submit", "--nodes=1", "--gpus-per-node=8", f"--workdir={workdir}", "--config.optimizr.lr=1"],
         "unknown config key 'optimizr' in override '--config.optimizr.lr=1' (did you mean 'optimizer'?)"),
    ]:
        with pytest.raises(SystemExit, match="^2$"):
            gpu.main([*argv, "--dry-run"])
        assert words in capsys.readouterr().err
    assert dry_run(gpu, capsys, "local", "--gpus=0,1,2,3", f"--workdir={workdir}", "--config.batch_size=16")
    # a workdir this machine does not see (the cluster's file system): the job's own start checks it
    assert dry_run(gpu, capsys, "local", "--gpus=0,1,2", f"--workdir={tmp_path / 'elsewhere'}")


@pytest.mark.parametrize("limit, seconds", [("90", 5400), ("90:30", 5430), ("1:00:00", 3600), ("2-0", 172800),
                                            ("2-12:30", 217800), ("1-00:00:10", 86410), ("infinite", None)])
def test_slurm_time_limits(limit, seconds):
    assert gpu.slurm_seconds(limit) == seconds


@pytest.mark.parametrize("argv, words", [
    (["--nodes=0"], "argument --nodes: must be 1 or more, got 0"),
    (["--time=1:00", "--grace-seconds=7200"], "--grace-seconds 7200 is not below the --time limit 1:00 (60 s)"),
    (["--job-name=my run"], "--job-name 'my run' has white space"),
])
def test_submit_refuses_resources_slurm_would_misread(capsys, argv, words):
    with pytest.raises(SystemExit):
        gpu.main([*SUBMIT, *argv, "--dry-run"])
    assert words in capsys.readouterr().err


def test_a_workdir_with_a_space_names_a_job_without_one(capsys):
    lines = dry_run(gpu, capsys, *SUBMIT[:-3], "--workdir=/shared/my run", "--config.model.text.context_length=248")
    assert "#SBATCH --job-name=clip_jax-my_run" in lines


def test_submit_dry_run_prints_the_sbatch_command_and_the_script(capsys):
    lines = dry_run(gpu, capsys, *SUBMIT, "--partition=gpu", "--account=proj", "--time=4:00:00", "--grace-seconds=300")
    assert lines[0] == "sbatch clip_jax-longclip.sbatch"
    script = "\n".join(lines[1:]) + "\n"
    template = (ROOT / "launch" / "slurm" / "train.sbatch").read_text()
    expected = template.replace(
        "#!/bin/bash\n", "#!/bin/bash\n# Rendered by launch/gpu.py from launch/slurm/train.sbatch.\n"
    ).replace(
        "#SBATCH --job-name=clip_jax\n",
        "#SBATCH --job-name=clip_jax-longclip\n#SBATCH --partition=gpu\n#SBATCH --account=proj\n",
    ).replace("#SBATCH --time=24:00:00\n", "#SBATCH --time=4:00:00\n").replace(
        "#SBATCH --signal=B:USR1@120\n", "#SBATCH --signal=B:USR1@300\n"
    ).replace(
        'TRAIN_ARGS=("$@")\n',
        "TRAIN_ARGS=(--config=configs/pretrain.py:L/14 --workdir=/shared/runs/longclip "
        "--config.model.text.context_length=248 '--config.data.crop_scale=(0.5, 1.0)')\n",
    )
    assert script == expected
    for directive in ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8", "--requeue", "--open-mode=append"):
        assert f"#SBATCH {directive}\n" in script


def test_submit_writes_the_script_and_runs_sbatch(monkeypatch, capsys, tmp_path):
    calls = []
    monkeypatch.setattr(gpu.subprocess, "run", lambda c, **k: calls.append(c) or subprocess.CompletedProcess(c, 0))
    script = tmp_path / "job.sbatch"
    assert gpu.main([*SUBMIT, f"--script={script}", "--nodes=4", "--job-name=lc", "--cpus-per-task=32"]) == 0
    assert calls == [["sbatch", str(script)]]
    assert capsys.readouterr().out == f"sbatch {script}\n"
    text = script.read_text()
    assert "#SBATCH --nodes=4\n" in text and "#SBATCH --job-name=lc\n" in text
    assert "#SBATCH --cpus-per-task=32\n" in text


def test_a_missing_sbatch_or_gcloud_is_one_line(monkeypatch, tmp_path):
    def missing(command, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", command[0])

    monkeypatch.setattr(gpu.subprocess, "run", missing)
    script = tmp_path / "job.sbatch"
    with pytest.raises(SystemExit, match=f"sbatch not found: the job script is {script}; submit it from a SLURM"):
        gpu.main([*SUBMIT, f"--script={script}"])
    assert script.exists()  # kept: the job script to carry to a login node
    with pytest.raises(SystemExit, match=f"cannot write the job script {tmp_path}/no/job.sbatch \\(No such file"):
        gpu.main([*SUBMIT, f"--script={tmp_path}/no/job.sbatch"])  # (a traceback)
    monkeypatch.setattr(tpu.subprocess, "run", missing)
    with pytest.raises(SystemExit, match="launch/tpu.py delete: error: gcloud not found"):
        tpu.main(["delete", "clip-v4", f"--zone={ZONE}", "--yes"])


def test_local_command(capsys):
    assert dry_run(gpu, capsys, "local", "--gpus=0,1,2,3", "--config=configs/pretrain.py:B/16",
                   "--workdir=runs/b16", "--config.batch_size=4096") == [
        "env CUDA_VISIBLE_DEVICES=0,1,2,3 python3 -m clip_jax train --config=configs/pretrain.py:B/16 "
        "--workdir=runs/b16 --config.batch_size=4096"]
    assert dry_run(gpu, capsys, "local", "--workdir=/shared/runs/longclip-l14", "--python=/venv/bin/python") == [
        "/venv/bin/python -m clip_jax train --workdir=/shared/runs/longclip-l14"]


def test_local_becomes_the_trainer(tmp_path):
    """The trainer replaces the launcher process (exec): a SIGTERM for the launcher reaches it and it saves a
    checkpoint. As a child it was left training, reparented, and killed later without one."""
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\necho "$$ $CUDA_VISIBLE_DEVICES $*"\n')
    fake.chmod(0o755)
    launcher = subprocess.Popen([sys.executable, str(ROOT / "launch" / "gpu.py"), "local", "--gpus=0,1",
                                 f"--python={fake}", "--workdir=runs/x"], stdout=subprocess.PIPE, text=True)
    out, _ = launcher.communicate(timeout=60)
    pid, devices, *argv = out.splitlines()[-1].split()
    assert int(pid) == launcher.pid and devices == "0,1"
    assert argv == ["-m", "clip_jax", "train", "--workdir=runs/x"]


def test_batch_scripts_pass_bash_n(capsys, tmp_path):
    rendered = tmp_path / "job.sbatch"
    rendered.write_text("\n".join(dry_run(gpu, capsys, *SUBMIT)[1:]) + "\n")
    for script in (ROOT / "launch" / "slurm" / "train.sbatch", rendered):
        subprocess.run(["bash", "-n", str(script)], check=True)
        if shutil.which("shellcheck"):
            subprocess.run(["shellcheck", str(script)], check=True)


# Stand-ins for the SLURM commands and the trainer, enough to run the batch script for real.
FAKE_SLURM = {
    "scontrol": """#!/bin/bash
echo "scontrol $*" >> "$FAKE_DIR/calls"
if [[ $1 == show && $2 == hostnames ]]; then printf 'gpu-node-07\\ngpu-node-08\\n'; fi
""",
    "scancel": """#!/bin/bash
echo "scancel $*" >> "$FAKE_DIR/calls"
for f in "$FAKE_DIR"/task.*.pid; do kill -s "${1#--signal=}" "$(cat "$f")"; done
""",
    "srun": """#!/bin/bash
echo "srun $*" >> "$FAKE_DIR/calls"
while [[ $1 == -* ]]; do shift; done
for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_PROCID=$i "$@" & done
status=0
for job in $(jobs -p); do wait "$job" || status=$?; done
exit "$status"
""",
    "python": """#!/bin/bash
out="$FAKE_DIR/task.$JAX_PROCESS_ID"
echo "$JAX_COORDINATOR_ADDRESS $JAX_NUM_PROCESSES $JAX_PROCESS_ID $SRUN_CPUS_PER_TASK | $*" > "$out.out"
echo $$ > "$out.pid"
if [[ -n ${FAKE_HOLD:-} ]]; then  # train until SIGTERM, then "checkpoint" and exit with FAKE_HOLD's status
  trap 'echo TERM >> "$out.out"; exit "$FAKE_HOLD"' TERM
  while :; do sleep 0.05; done
fi
""",
}


@pytest.fixture()
def slurm(capsys, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in FAKE_SLURM.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    script = tmp_path / "job.sbatch"
    script.write_text("\n".join(dry_run(gpu, capsys, *SUBMIT, f"--python={bin_dir / 'python'}")[1:]) + "\n")
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_DIR": str(tmp_path), "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "gpu-node-[07-08]", "SLURM_NNODES": "2", "SLURM_CPUS_PER_TASK": "16"}

    def start(**extra):
        return subprocess.Popen(["bash", str(script)], env={**env, **extra}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    def calls():
        return (tmp_path / "calls").read_text().splitlines()

    yield start, calls, tmp_path
    for pid_file in tmp_path.glob("task.*.pid"):  # no fake trainer outlives a failed test
        subprocess.run(["kill", "-9", pid_file.read_text().strip()], capture_output=True)


def test_batch_script_sets_the_rendezvous_for_each_task(slurm):
    start, calls, fake_dir = slurm
    job = start()
    out, _ = job.communicate(timeout=30)
    assert job.returncode == 0, out
    args = ("-m clip_jax train --config=configs/pretrain.py:L/14 --workdir=/shared/runs/longclip "
            "--config.model.text.context_length=248 --config.data.crop_scale=(0.5, 1.0)")
    for rank in (0, 1):  # coordinator on the first node, port 20000 + 4242, one process per node
        assert (fake_dir / f"task.{rank}.out").read_text() == f"gpu-node-07:24242 2 {rank} 16 | {args}\n"
    assert calls()[0] == "scontrol show hostnames gpu-node-[07-08]"
    assert calls()[1].startswith("srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c ")
    assert len(calls()) == 2  # no scancel, no requeue


@pytest.mark.parametrize("sig, trainer_status, requeued", [
    (signal.SIGUSR1, 0, True),  # time limit near: checkpoint, then requeue
    (signal.SIGUSR1, 3, False),  # ... but a trainer that failed is not requeued
    (signal.SIGTERM, 0, False),  # preemption or scancel: checkpoint, and leave the decision to SLURM
])
def test_batch_script_checkpoints_on_signals(slurm, sig, trainer_status, requeued):
    start, calls, fake_dir = slurm
    job = start(FAKE_HOLD=str(trainer_status))
    try:
        _wait_for(lambda: all((fake_dir / f"task.{r}.pid").exists() for r in (0, 1)), "both tasks to start")
        job.send_signal(sig)
        out, _ = job.communicate(timeout=30)
    finally:
        job.kill()
    assert job.returncode == trainer_status, out
    assert all((fake_dir / f"task.{r}.out").read_text().endswith("TERM\n") for r in (0, 1))
    assert "scancel --signal=TERM 4242" in calls()
    assert ("scontrol requeue 4242" in calls()) == requeued


@pytest.mark.parametrize("first, second", [(signal.SIGTERM, signal.SIGUSR1), (signal.SIGUSR1, signal.SIGTERM)])
def test_a_stop_is_never_requeued_whatever_the_time_limit_says(slurm, first, second):
    """A graceful stop (`scancel --batch --signal=TERM`) while the time limit's USR1 comes, before or after it: the
    trainers checkpoint once, and the job ends (the USR1 after a stop requeued it: the stop was undone)."""
    start, calls, fake_dir = slurm
    job = start(FAKE_HOLD="0")
    try:
        _wait_for(lambda: all((fake_dir / f"task.{r}.pid").exists() for r in (0, 1)), "both tasks to start")
        job.send_signal(first)
        _wait_for(lambda: "scancel --signal=TERM 4242" in calls(), "the forward")
        job.send_signal(second)
        out, _ = job.communicate(timeout=30)
    finally:
        job.kill()
    assert job.returncode == 0, out
    assert calls().count("scancel --signal=TERM 4242") == 1 and "scontrol requeue 4242" not in calls(), out


# --- docs/launch.md -------------------------------------------------------------------------------------------------


def test_long_clip_counts_both_of_its_text_passes():
    """Long-CLIP trains on a 248-token long caption and a 77-token short one: the table counted the long one alone,
    6% fewer FLOPs than the trainer's logged MFU divides by."""
    from clip_jax.models.clip import CLIPConfig
    from clip_jax.models.flops import text_forward_flops, train_flops_per_sample
    from clip_jax.models.presets import model_preset

    cfg = CLIPConfig.from_dict(model_preset("L/14", context_length=248))
    by_hand = train_flops_per_sample(cfg) + 3 * text_forward_flops(cfg, 77)
    assert expected_perf.flops_per_sample("configs/longclip_l14.py") == pytest.approx(by_hand, rel=1e-9)
    assert expected_perf.flops_per_sample("configs/pretrain.py:B/16") == pytest.approx(
        train_flops_per_sample(CLIPConfig.from_dict(model_preset("B/16"))), rel=1e-9)


def test_docs_tables_are_the_computed_ones():
    """The expected-performance tables in the docs are exactly what launch/expected_perf.py computes."""
    assert expected_perf.markdown() in (ROOT / "docs" / "launch.md").read_text()


def test_expected_throughput_arithmetic():
    # B/16: 3 x 41.09 GFLOP per sample; v4-32 = 16 chips x 275 TFLOP/s; at 40% MFU about 14.3k samples/s.
    row = [ln for ln in expected_perf.table("configs/pretrain.py:B/16", 32768, 1, expected_perf.TPUS)
           if ln.startswith("| v4-32")]
    assert row[0].startswith("| v4-32 | 16 (4) | 4.40 | 14,279 / 19,633 |")
