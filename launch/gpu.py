"""clip_jax on GPUs: a multi-node SLURM job, or one process on one multi-GPU machine.

  python3 launch/gpu.py submit --nodes=4 --gpus-per-node=8 --config=configs/pretrain.py:B/16 --workdir=/shared/runs/b16
                               [--time=24:00:00] [--partition=P] [--account=A] [--config.key=value ...] [--dry-run]
  python3 launch/gpu.py local  [--gpus=0,1,2,3] --config=configs/pretrain.py:B/16 --workdir=runs/b16 [--dry-run]

`submit` fills launch/slurm/train.sbatch in (resources, trainer arguments), writes the result to --script
(default: JOB_NAME.sbatch in the current directory) and runs `sbatch` on it. SLURM keeps a copy of the script, so a
requeued job (time limit, preemption) reruns exactly what was submitted. With --dry-run the first line printed is
the sbatch command and the rest is the script; nothing is written or submitted.

`local` runs the trainer in the foreground as one JAX process that drives every visible GPU of the machine (no
SLURM, no jax.distributed); --gpus restricts it through CUDA_VISIBLE_DEVICES.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import shlex
import subprocess
import sys

from trainer_args import check_recipe, trainer_overrides

TEMPLATE = pathlib.Path(__file__).resolve().parent / "slurm" / "train.sbatch"


def train_args(args: argparse.Namespace) -> list[str]:
    return ([f"--config={args.config}"] if args.config else []) + [f"--workdir={args.workdir}", *args.overrides]


def job_name_of(args: argparse.Namespace) -> str:
    # An #SBATCH line splits at white space, as a shell would: a workdir "my run" named the job "my".
    return args.job_name or "clip_jax-" + re.sub(r"\s+", "_", args.workdir.rstrip("/").rpartition("/")[2] or "run")


def slurm_seconds(limit: str) -> int | None:
    """Seconds of a SLURM time limit (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS), None for another form
    (sbatch judges it)."""
    days, _, rest = limit.partition("-") if "-" in limit else ("0", "", limit)
    parts = rest.split(":")
    if not days.isdigit() or len(parts) > 3 or not all(part.isdigit() for part in parts):
        return None
    values = list(map(int, parts))
    if "-" in limit or len(values) == 3:  # the hours come first
        hours, minutes, seconds = (values + [0, 0])[:3]
    else:  # MM or MM:SS
        hours, minutes, seconds = 0, values[0], (values[1:] or [0])[0]
    return ((int(days) * 24 + hours) * 60 + minutes) * 60 + seconds


def gpu_indices(text: str) -> str:
    """--gpus as CUDA_VISIBLE_DEVICES takes it: comma-separated indices (or GPU UUIDs), no spaces."""
    items = text.split(",")
    if not all(re.fullmatch(r"\d+|GPU-[0-9a-fA-F-]+|MIG-[0-9a-fA-F-/]+", item) for item in items):
        raise argparse.ArgumentTypeError(f"expected comma-separated GPU indices without spaces (0,1), got {text!r}")
    return text


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def _replace(text: str, pattern: str, new: str) -> str:
    text, n = re.subn(pattern, lambda _: new, text, count=1, flags=re.M)
    if n != 1:  # the template changed: fail loudly rather than submit an unfilled script
        raise SystemExit(f"{TEMPLATE}: no line matches {pattern!r}")
    return text


def render(args: argparse.Namespace) -> str:
    """The batch script: the template with this job's #SBATCH values and the trainer's arguments written in."""
    text = TEMPLATE.read_text()
    directives = {
        "job-name": job_name_of(args),
        "nodes": args.nodes,
        "gpus-per-node": args.gpus_per_node,
        "cpus-per-task": args.cpus_per_task,
        "time": args.time,
        "signal": f"B:USR1@{args.grace_seconds}",
    }
    for key, value in directives.items():
        text = _replace(text, rf"^#SBATCH --{key}=.*$", f"#SBATCH --{key}={value}")
    extra = [f"#SBATCH --{key}={value}" for key, value in (("partition", args.partition), ("account", args.account))
             if value]
    if extra:
        text = _replace(text, r"^#SBATCH --job-name=.*$", "\n".join([f"#SBATCH --job-name={job_name_of(args)}",
                                                                       *extra]))
    text = _replace(text, r"^PYTHON=.*$", f"PYTHON=${{PYTHON:-{shlex.quote(args.python)}}}")
    text = _replace(text, r'^TRAIN_ARGS=\("\$@"\)$', f"TRAIN_ARGS=({shlex.join(train_args(args))})")
    return _replace(text, r"^#!/bin/bash$", "#!/bin/bash\n# Rendered by launch/gpu.py from launch/slurm/train.sbatch.")


def submit(args: argparse.Namespace) -> int:
    script = args.script or f"{job_name_of(args)}.sbatch"
    text = render(args)
    command = ["sbatch", script]
    if args.dry_run:
        print(shlex.join(command), flush=True)
        print(text, end="")
        return 0
    try:
        pathlib.Path(script).write_text(text)
    except OSError as e:
        sys.exit(f"launch/gpu.py submit: error: cannot write the job script {script} ({e.strerror}): give --script a "
                 "path in an existing folder you can write")
    print(shlex.join(command), flush=True)
    try:
        return subprocess.run(command).returncode  # an argument list: no shell
    except FileNotFoundError:
        sys.exit(f"launch/gpu.py submit: error: sbatch not found: the job script is {script}; submit it from a SLURM "
                 "login node")


def local(args: argparse.Namespace) -> int:
    command = [args.python, "-m", "clip_jax", "train", *train_args(args)]
    if args.gpus:
        command = ["env", f"CUDA_VISIBLE_DEVICES={args.gpus}", *command]
    print(shlex.join(command), flush=True)
    if args.dry_run:
        return 0
    # The trainer takes this process's place: a SIGTERM or Ctrl-C for the launcher (docker stop, systemd, a
    # scheduler) reaches the trainer, which saves a checkpoint; a child would have been left running, then killed.
    if args.gpus:  # as `env` would set it, without `env` between: a bad --python is then this launcher's message
        os.environ["CUDA_VISIBLE_DEVICES"] = args.gpus
        command = command[2:]
    try:
        os.execvp(command[0], command)
    except OSError as e:
        sys.exit(f"launch/gpu.py local: error: cannot run {command[0]} ({e.strerror}); give --python, the "
                 "interpreter with clip_jax installed")
    return 1  # (execvp does not return)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="launch/gpu.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.add_argument("--config", help="e.g. configs/pretrain.py:B/16 (omit to resume from the workdir's config.json)")
        p.add_argument("--workdir", required=True)
        p.add_argument("--python", default="python3", help="interpreter with clip_jax installed")
        p.add_argument("--dry-run", action="store_true", help="print instead of running")
        return p

    p = add("submit", "submit a multi-node SLURM job (one task per node, all its GPUs per task)")
    p.add_argument("--nodes", type=positive, required=True)
    p.add_argument("--gpus-per-node", type=positive, required=True)
    p.add_argument("--cpus-per-task", type=positive, default=16, help="cores per node for the data loader")
    p.add_argument("--time", default="24:00:00", help="time limit per job run; the job requeues itself after it")
    p.add_argument("--grace-seconds", type=positive, default=120,
                   help="checkpoint this long before the time limit (a step plus a checkpoint save must fit)")
    p.add_argument("--job-name", help="default: clip_jax-<workdir's last component>")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--script", help="where to write the batch script (default: JOB_NAME.sbatch)")

    p = add("local", "run on this machine's GPUs as one process (no SLURM)")
    p.add_argument("--gpus", type=gpu_indices, help="comma-separated GPU indices (default: all)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    args.overrides = trainer_overrides(parser, rest)
    if args.command == "submit":
        limit = slurm_seconds(args.time)
        if limit is not None and args.grace_seconds >= limit:  # USR1 would come before the first step
            parser.error(f"--grace-seconds {args.grace_seconds} is not below the --time limit {args.time} "
                         f"({limit} s): the checkpoint signal comes that long before the limit")
        if args.job_name and re.search(r"\s", args.job_name):
            parser.error(f"--job-name {args.job_name!r} has white space, which an #SBATCH line splits at")
    # The job starts in this directory, on the GPUs asked for (`local` without --gpus: all it sees, unknown here);
    # without --config it resumes from the workdir's config.json, read here where this machine sees it.
    gpus = (args.nodes * args.gpus_per_node if args.command == "submit" else
            len(args.gpus.split(",")) if args.gpus else None)
    fewer = "--nodes or --gpus-per-node" if args.command == "submit" else "--gpus, e.g. --gpus=0 for one"
    check_recipe(f"launch/gpu.py {args.command}", args.config, args.overrides, pathlib.Path.cwd(), gpus, args.workdir,
                 fewer)
    return submit(args) if args.command == "submit" else local(args)


if __name__ == "__main__":
    sys.exit(main())
