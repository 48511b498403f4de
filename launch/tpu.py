"""Cloud TPU VM pods for clip_jax: create, install, run, tail, status, stop, delete, through `gcloud`.

  python3 launch/tpu.py create  NAME --zone=ZONE --accelerator-type=v4-32 [--spot | --reserved | --best-effort]
                                     [--queued]
  python3 launch/tpu.py install NAME --zone=ZONE (--git=URL [--ref=REF] | --tarball [PATH])
  python3 launch/tpu.py run     NAME --zone=ZONE --config=configs/pretrain.py:B/16 --workdir=gs://BUCKET/runs/b16
                                     [--config.key=value ...]
  python3 launch/tpu.py tail    NAME --zone=ZONE --run-name=b16 [--worker=0] [--follow]
  python3 launch/tpu.py status  NAME --zone=ZONE [--queued] [--run-name=b16]
  python3 launch/tpu.py stop    NAME --zone=ZONE --run-name=b16 [--no-wait]
  python3 launch/tpu.py delete  NAME --zone=ZONE [--queued] [--yes]

Every subcommand takes --dry-run: the commands are printed (one per line, shell-quoted) instead of run. A TPU pod is
a multi-controller JAX program: every worker runs the same command (`--worker=all`) and `jax.distributed` finds its
peers from the TPU metadata, so nothing here assigns ranks.

On each worker the code lives in ~/clip_jax (a git clone, or the extracted tarball of this checkout's HEAD), its
Python in ~/clip_jax_venv (made by uv, because the TPU images ship Python 3.10 and clip_jax needs 3.11+), and each
run's log and pid in ~/clip_jax_logs/<run>.{log,pid}.
"""

from __future__ import annotations

import argparse
import hashlib
import pathlib
import re
import shlex
import subprocess
import sys
import tempfile
from typing import NoReturn

from trainer_args import check_recipe, trainer_overrides

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
# `run` waits this long at most for the trainer's mesh line (STARTED_MARK, clip_jax/train/loop.py), by which the
# settings, the devices, the mesh and the batch have passed the trainer's own checks on the TPU; a trainer that ends
# before is reported with its log's end.
START_CHECK_SECONDS = 120
STARTED_MARK = "clip_jax.train.loop: mesh {"
SRC = "~/clip_jax"  # remote paths stay unquoted in remote commands so that the remote shell expands `~`
VENV = "~/clip_jax_venv"
LOGS = "~/clip_jax_logs"
UV = "~/.local/bin/uv"  # where `pip install --user uv` puts it
TARBALL_REMOTE = "clip_jax_src.tar.gz"  # relative to the remote home directory

# The TPU software version for JAX, by accelerator generation (Cloud TPU docs, "TPU software versions").
RUNTIME_VERSIONS = {
    "v2": "tpu-ubuntu2204-base",
    "v3": "tpu-ubuntu2204-base",
    "v4": "tpu-ubuntu2204-base",
    "v5p": "v2-alpha-tpuv5",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v6e": "v2-alpha-tpuv6e",
}

_ACCELERATOR_TYPE = re.compile(r"^(v2|v3|v4|v5p|v5litepod|v6e)-[0-9]+$")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # run names become file names in unquoted remote paths
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def default_runtime_version(accelerator_type: str) -> str:
    if not _ACCELERATOR_TYPE.match(accelerator_type):  # (a typo more often than a generation this table lacks)
        usage_error(f"--accelerator-type {accelerator_type!r} is none of GENERATION-SIZE with GENERATION one of "
                    f"{', '.join(RUNTIME_VERSIONS)} (v5e is v5litepod), e.g. v4-32 or v5litepod-16; for another "
                    "generation pass --version too")
    return RUNTIME_VERSIONS[accelerator_type.rpartition("-")[0]]


def usage_error(message: str) -> NoReturn:
    """A mistake in the command line: one line and status 2, as argparse's own (a gcloud failure keeps its status)."""
    print(f"launch/tpu.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def run_name_of(args: argparse.Namespace) -> str:
    name = args.run_name or args.workdir.rstrip("/").rpartition("/")[2]
    if not _SAFE_NAME.match(name):
        given = "--run-name" if args.run_name else "the run name (the workdir's last part; pass --run-name)"
        usage_error(f"{given} {name!r} must be letters, digits, '.', '_' or '-'")
    return name


# --- gcloud command lines --------------------------------------------------------------------------------------


def _where(args: argparse.Namespace) -> list[str]:
    return [f"--zone={args.zone}"] + ([f"--project={args.project}"] if args.project else [])


def ssh(args: argparse.Namespace, command: str, worker: str = "all") -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.name, *_where(args), f"--worker={worker}",
            f"--command={command}"]


def create(args: argparse.Namespace) -> list[list[str]]:
    version = args.version or default_runtime_version(args.accelerator_type)
    tier = ["--spot"] if args.spot else ["--reserved"] if args.reserved else []
    if args.best_effort:
        if not args.queued:
            usage_error("--best-effort is a queued-resource tier: add --queued")
        tier = ["--best-effort"]
    if not args.queued:
        return [["gcloud", "compute", "tpus", "tpu-vm", "create", args.name, *_where(args),
                 f"--accelerator-type={args.accelerator_type}", f"--version={version}", *tier]]
    # The queued resource and the TPU VM it provisions share the name, so that ssh/scp address the VM by it.
    # --best-effort exists only in the alpha track of `queued-resources create`.
    track = ["alpha"] if args.best_effort else []
    return [["gcloud", *track, "compute", "tpus", "queued-resources", "create", args.name, *_where(args),
             f"--accelerator-type={args.accelerator_type}", f"--runtime-version={version}", f"--node-id={args.name}",
             *tier]]


def head_tarball() -> pathlib.Path:
    """Where `install --tarball` writes this checkout's HEAD: a name of this checkout's own, so that two checkouts
    (or users) of one machine do not send each other's."""
    checkout = hashlib.sha256(str(REPO_ROOT).encode()).hexdigest()[:12]
    return pathlib.Path(tempfile.gettempdir()) / f"clip_jax_src_{checkout}.tar.gz"


def changes_not_committed(*paths: str) -> list[str] | None:
    """The files of this checkout (of `paths` only, where given) that differ from HEAD or are not tracked; None
    without git."""
    try:
        status = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--", *paths],
                                capture_output=True, text=True, check=False).stdout.splitlines()
    except FileNotFoundError:
        return None
    return [line[3:] for line in status]


def install(args: argparse.Namespace) -> list[list[str]]:
    commands = []
    if args.git:
        fetch = f"rm -rf {SRC} && git clone {shlex.quote(args.git)} {SRC}"
        if args.ref:
            fetch += f" && git -C {SRC} checkout {shlex.quote(args.ref)}"
    else:
        if args.tarball:  # one the user made: sent as it is
            tarball = args.tarball
            if not pathlib.Path(tarball).is_file():
                usage_error(f"--tarball {tarball}: no such file (without a PATH, --tarball sends this checkout's HEAD)")
        else:  # this checkout's committed HEAD, made afresh (uncommitted edits are not shipped: what runs is a commit)
            tarball = str(head_tarball())
            commands.append(["git", "-C", str(REPO_ROOT), "archive", "--format=tar.gz", f"--output={tarball}", "HEAD"])
            uncommitted = changes_not_committed()
            if uncommitted is None:
                usage_error("git not found: it makes the tarball of this checkout's HEAD; install git, or give "
                            "--tarball PATH of a source tarball you made")
            if uncommitted:  # a config of one's own passes `run`'s check, not on the workers
                print(f"warning: the tarball holds HEAD only; not in it: {', '.join(uncommitted[:5])}"
                      f"{', ...' if len(uncommitted) > 5 else ''} (commit what the run needs)", file=sys.stderr)
        commands.append(["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, f"{args.name}:{TARBALL_REMOTE}",
                         *_where(args), "--worker=all"])
        fetch = f"rm -rf {SRC} && mkdir -p {SRC} && tar -xzf ~/{TARBALL_REMOTE} -C {SRC}"
    # One resolver run for the repo and jax[tpu], so libtpu matches the jax that clip_jax's pins select; [gcs]: the
    # workdirs of a pod are gs:// buckets.
    setup = (
        f"python3 -m pip install --user --upgrade uv"
        f" && {UV} venv --allow-existing --python {shlex.quote(args.python_version)} {VENV}"
        f' && {UV} pip install --python {VENV}/bin/python -e {SRC}"[gcs]" "jax[tpu]"'
    )
    commands.append(ssh(args, f"{fetch} && {setup}"))
    return commands


def train_command(args: argparse.Namespace) -> list[str]:
    argv = [f"{VENV}/bin/python", "-m", "clip_jax", "train"]
    if args.config:
        argv.append(f"--config={args.config}")
    return [*argv, f"--workdir={args.workdir}", *args.overrides]


def _alive(run_name: str) -> str:
    """A shell function `alive`: whether the run's recorded pid is a live clip_jax process (a pid file outlives its
    trainer, and the system may give its number to another process since)."""
    pid = f"{LOGS}/{run_name}.pid"
    return (f'alive() {{ p=$(cat {pid} 2>/dev/null) && kill -0 "$p" 2>/dev/null && grep -qa clip_jax /proc/"$p"/cmdline'
            " 2>/dev/null; }")


def run(args: argparse.Namespace) -> list[list[str]]:
    run_name = run_name_of(args)
    if not args.workdir.startswith("gs://"):  # (a one-host VM may keep it on its disk, while the VM lasts)
        print(f"warning: --workdir {args.workdir} is no gs:// bucket: each TPU VM writes its own copy, which a deleted "
              "or preempted VM takes with it, and the hosts of a pod do not see each other's files; give "
              "gs://BUCKET/...", file=sys.stderr)
    log, pid = f"{LOGS}/{run_name}.log", f"{LOGS}/{run_name}.pid"
    env = []
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not _ENV_KEY.match(key):
            usage_error(f"--env takes KEY=VALUE, got {item!r}")
        env.append(f"{key}={shlex.quote(value)}")  # only the value is quoted: `'K=v' cmd` is no assignment
    argv = train_command(args)
    trainer = " ".join([argv[0], *map(shlex.quote, argv[1:])])  # argv[0] keeps its `~` unquoted
    # nohup + redirected stdin/stdout/stderr: the trainer outlives the SSH session. The log is appended to, so a
    # relaunch after a preemption keeps the history; `since` is where this launch's part begins. `cd` and the guard
    # run in the foreground (`a && b & c` would background the whole list and $! would not be the trainer's pid).
    # Then `run` waits for the trainer's mesh line: a trainer that ends before it (a broken install, settings the
    # TPU's devices refuse) makes `run` fail with the log's end, rather than exit 0 with the error only in the log.
    checks = max(1, round(START_CHECK_SECONDS * 2))  # (every half second)
    remote = "; ".join([
        _alive(run_name),
        f"mkdir -p {LOGS} && cd {SRC} || exit 1",
        f'if alive; then echo "$(hostname): {run_name} is already running" >&2; exit 1; fi',
        f"since=$(( $(stat -c %s {log} 2>/dev/null || echo 0) + 1 ))",
        " ".join([*env, "nohup", trainer, f">> {log} 2>&1 < /dev/null & echo $! > {pid}"]),
        f"for _ in $(seq {checks}); do"
        f' if tail -c +"$since" {log} | grep -qF {shlex.quote(STARTED_MARK)}; then'
        f' echo "$(hostname): {run_name} started"; exit 0; fi;'
        f' if ! alive; then echo "$(hostname): {run_name} ended before its start was through; the end of {log}:" >&2;'
        f" tail -n 20 {log} >&2; exit 1; fi; sleep 0.5; done",
        f'echo "$(hostname): {run_name} is running, not yet past its start after {START_CHECK_SECONDS:g} s: tail '
        'its log to watch"',
    ])
    return [ssh(args, remote)]


def _no_run_here(run_name: str) -> str:
    """Shell: on a worker without the run's log, a line naming the runs it has, and status 1."""
    return (f'if [ ! -f {LOGS}/{run_name}.log ]; then echo "$(hostname): no run {run_name} here (runs: $(ls {LOGS} '
            '2>/dev/null | sed -n "s/\\.log$//p" | tr "\\n" " "))" >&2; exit 1; fi')


def tail(args: argparse.Namespace) -> list[list[str]]:
    follow = " -F" if args.follow else ""
    return [ssh(args, f"{_no_run_here(args.run_name)}; tail -n {args.lines}{follow} {LOGS}/{args.run_name}.log",
                worker=args.worker)]


def status(args: argparse.Namespace) -> list[list[str]]:
    kind = ["queued-resources"] if args.queued else ["tpu-vm"]
    commands = [["gcloud", "compute", "tpus", *kind, "describe", args.name, *_where(args)]]
    if args.run_name:
        log = f"{LOGS}/{args.run_name}.log"
        commands.append(ssh(args, "; ".join([
            _alive(args.run_name), _no_run_here(args.run_name),
            f'if alive; then echo "$(hostname): {args.run_name} running"; else echo "$(hostname): {args.run_name} not '
            'running"; fi',
            # the log's last lines, a progress bar's redraws (carriage returns) cut to the latest
            f"tail -n 2 {log} | sed 's/.*\\r//'",
        ])))
    return commands


def stop(args: argparse.Namespace) -> list[list[str]]:
    # SIGTERM: the trainer saves a checkpoint and exits 0; `run` with the same arguments resumes from it. Waiting for
    # that exit (unless --no-wait) lets a `delete` that follows keep the checkpoint: the hosts agree on a step a few
    # steps on, then save, which takes a while on a pod.
    name = args.run_name
    commands = [_alive(name), _no_run_here(name),
                f'if ! alive; then echo "$(hostname): {name} is not running"; exit 0; fi',
                'kill -TERM "$p"']
    if args.no_wait:
        commands.append(f'echo "$(hostname): {name}: SIGTERM sent; it saves a checkpoint, then exits"')
    else:
        commands += [f'echo "$(hostname): {name}: SIGTERM sent, waiting for its checkpoint and exit"',
                     "while alive; do sleep 2; done",
                     f'echo "$(hostname): {name} stopped; its log ends:"; tail -n 2 {LOGS}/{name}.log']
    return [ssh(args, "; ".join(commands))]


def delete(args: argparse.Namespace) -> list[list[str]]:
    quiet = ["--quiet"] if args.yes else []  # otherwise gcloud asks for confirmation
    if args.queued:  # --force also deletes the TPU VM the queued resource provisioned
        return [["gcloud", "compute", "tpus", "queued-resources", "delete", args.name, *_where(args), "--force",
                 *quiet]]
    return [["gcloud", "compute", "tpus", "tpu-vm", "delete", args.name, *_where(args), *quiet]]


# --- command line ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="launch/tpu.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.add_argument("name", help="TPU VM (and queued resource) name")
        p.add_argument("--zone", required=True, help="e.g. us-central2-b")
        p.add_argument("--project", help="GCP project (default: gcloud's configured project)")
        p.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
        return p

    p = add("create", "create a TPU VM slice, directly or as a queued resource")
    p.add_argument("--accelerator-type", required=True, help="e.g. v4-32, v5p-64, v5litepod-16")
    p.add_argument("--version", help="TPU software version (default: by generation, e.g. tpu-ubuntu2204-base)")
    tier = p.add_mutually_exclusive_group()
    tier.add_argument("--spot", action="store_true", help="Spot VMs: cheaper, preemptible")
    tier.add_argument("--reserved", action="store_true", help="use the project's reserved capacity")
    tier.add_argument("--best-effort", action="store_true", help="best-effort tier (queued resources, gcloud alpha)")
    p.add_argument("--queued", action="store_true", help="request through a queued resource (waits for capacity)")

    p = add("install", "put clip_jax and jax[tpu] on every worker")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--git", metavar="URL", help="clone this repository URL on every worker")
    src.add_argument("--tarball", nargs="?", const="", metavar="PATH",
                     help="copy a source tarball to every worker (default: `git archive HEAD` of this checkout)")
    p.add_argument("--ref", help="with --git: branch, tag or commit to check out")
    p.add_argument("--python-version", default="3.11", help="Python for the workers' venv (uv fetches it)")

    p = add("run", "start the trainer on every worker, in the background, logging to ~/clip_jax_logs/RUN.log")
    p.add_argument("--config", help="e.g. configs/pretrain.py:B/16 (omit to resume from the workdir's config.json)")
    p.add_argument("--workdir", required=True, help="shared by all workers: a gs:// path")
    p.add_argument("--run-name", help="log/pid file name (default: the workdir's last component)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment for the trainer")

    p = add("tail", "print (or follow) the end of one worker's log")
    p.add_argument("--run-name", required=True)
    p.add_argument("--worker", default="0", help="worker index (default 0, the one that writes metrics)")
    p.add_argument("--lines", type=int, default=100)
    p.add_argument("--follow", action="store_true", help="keep printing new lines (Ctrl-C to stop)")

    p = add("status", "describe the TPU (or queued resource) and, with --run-name, the run on each worker")
    p.add_argument("--queued", action="store_true", help="NAME is a queued resource")
    p.add_argument("--run-name")

    p = add("stop", "SIGTERM the run on every worker: it checkpoints and exits; waits for that (delete can follow)")
    p.add_argument("--run-name", required=True)
    p.add_argument("--no-wait", action="store_true", help="return once the signal is sent, before the checkpoint")

    p = add("delete", "delete the TPU VM (with --queued: the queued resource and its VM)")
    p.add_argument("--queued", action="store_true", help="NAME is a queued resource")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation (gcloud --quiet)")
    return parser


COMMANDS = {"create": create, "install": install, "run": run, "tail": tail, "status": status, "stop": stop,
            "delete": delete}


def parse(argv: list[str]) -> argparse.Namespace:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    args.overrides = trainer_overrides(parser, rest, accepted=args.command == "run")
    if args.command == "install" and args.ref and not args.git:
        parser.error("--ref goes with --git")
    if getattr(args, "run_name", None):
        run_name_of(args)
    if args.command == "run":  # the workers start in their copy of this checkout; without --config they resume
        # from the workdir's config.json, read here where this machine sees it (not a gs:// bucket)
        check_recipe(f"launch/tpu.py {args.command}", args.config, args.overrides, REPO_ROOT, workdir=args.workdir)
        if args.config:
            warn_if_not_on_the_workers(args.config.partition(":")[0])
    return args


def warn_if_not_on_the_workers(recipe: str) -> None:
    """A recipe the workers' copy of this checkout lacks (outside it, or not committed, which `install` does not
    ship) passes the check above here and is not there: said before the job starts."""
    path = pathlib.Path(recipe)
    absolute = path if path.is_absolute() else REPO_ROOT / path
    try:
        inside = absolute.resolve().relative_to(REPO_ROOT)
    except ValueError:
        print(f"warning: --config {recipe} is outside this checkout: each worker reads that path on its own disk",
              file=sys.stderr)
        return
    if changes_not_committed(str(inside)):
        print(f"warning: --config {recipe} is not committed: a worker installed from a commit (--tarball or --git) "
              "has another version of it or none (commit it, then install again)", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parse(list(sys.argv[1:] if argv is None else argv))
    for command in COMMANDS[args.command](args):
        print(shlex.join(command), flush=True)
        if not args.dry_run:
            try:
                result = subprocess.run(command)  # an argument list: no shell on this side
            except FileNotFoundError:
                what = "git" if command[0] == "git" else "the Google Cloud SDK (gcloud)"
                sys.exit(f"launch/tpu.py {args.command}: error: {command[0]} not found: install {what} on this "
                         "machine, or print the commands with --dry-run")
            if result.returncode:
                return result.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
