"""Chaos test of exact resume: a tiny training run SIGKILLed at uniformly random moments and relaunched (the same
command) until a launch finishes, K times over; each cycle's final train state (params, optimizer state, step,
rng) is compared bit for bit with an uninterrupted run's, and its metrics.jsonl with that run's records.

  python benchmarks/chaos_resume.py                              # 10 cycles, 1 process x 8 CPU devices
  python benchmarks/chaos_resume.py --cycles 20 --processes 2    # 2 processes x 4 CPU devices (jax.distributed)

Each cycle: a fresh workdir; 1 to 3 kills (drawn per cycle), each at a moment drawn uniformly from [0, the
uninterrupted run's duration] after its launch starts (a launch that finishes first is not killed, and a cycle
whose first launch finishes first is drawn again); then launches until one finishes. With 2 processes both are
killed at once, as a scheduler kills a job. After each kill the workdir tells what the run was doing: the last
logged step, the committed checkpoints and the temporary folders of saves in flight. Results are printed and saved
as JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the comparison only reads checkpoints

import jax  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from machine import environment_facts  # noqa: E402
from result_files import checked_out_folder, count, new_result_path  # noqa: E402

from clip_jax.files import results_json  # noqa: E402
from clip_jax.train.checkpoint import read_state  # noqa: E402

# The tests' tiny model; a checkpoint (asynchronous) every 10 steps and a log record every 10. 300 steps in one
# process take 30 s on a 2-core CPU, a third of it start-up (imports, compilation from the cache, restore) and the
# final evaluation; two processes take several times longer (a cross-process all-reduce every step, barriers at
# every save).
RUN = [
    *(f"--config.model.{tower}.{k}={v}" for tower in ("vision", "text")
      for k, v in dict(width=32, layers=1, heads=2, head_dim=16, mlp_dim=64).items()),
    "--config.model.vision.image_size=32", "--config.model.vision.patch_size=16",
    "--config.model.text.context_length=16", "--config.model.text.vocab_size=600", "--config.model.embed_dim=16",
    "--config.data.tokenizer_vocab_size=600", "--config.batch_size=16", "--config.optimizer.warmup_steps=20",
    "--config.checkpoint.every_steps=10", "--config.log.every_steps=10",
    "--config.log.progress_bar=False", "--config.log.tensorboard=False", "--config.eval.num_examples=64",
    "--config.eval.batch_size=64",
]
TMP_SUFFIX = ".orbax-checkpoint-tmp"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cycles", type=count, default=10)
    p.add_argument("--processes", type=int, default=1, choices=(1, 2))
    p.add_argument("--steps", type=count, default=300, help="train steps of the run")
    p.add_argument("--max-kills", type=count, default=3, help="kills per cycle are drawn from 1..max-kills")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=count, default=600, help="seconds before a launch counts as hung")
    p.add_argument("--keep", action="store_true", help="keep the workdirs and logs (printed)")
    p.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    args = p.parse_args()
    checked_out_folder(args.out)  # before the cycles' minutes, not after them
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Launch:
    """`python -m clip_jax train --config configs/demo.py --workdir W ...` as `processes` processes (one JAX
    cluster on this machine when there are two), output appended to `log`."""

    def __init__(self, workdir: pathlib.Path, steps: int, processes: int, cache: pathlib.Path, log: pathlib.Path):
        argv = [sys.executable, "-m", "clip_jax", "train", "--config", "configs/demo.py", "--workdir", str(workdir),
                *RUN, f"--config.total_steps={steps}"]
        base = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
        base.update({
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={8 // processes}", "JAX_PLATFORMS": "cpu",
            "JAX_DEFAULT_MATMUL_PRECISION": "float32", "JAX_COMPILATION_CACHE_DIR": str(cache),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
        })
        cluster = [{}]
        if processes > 1:
            address = f"127.0.0.1:{free_port()}"
            cluster = [{"JAX_COORDINATOR_ADDRESS": address, "JAX_NUM_PROCESSES": str(processes),
                        "JAX_PROCESS_ID": str(i)} for i in range(processes)]
        self.log = log.open("a")
        self.start = time.monotonic()
        self.procs = [subprocess.Popen(argv, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT, env={**base, **c})
                      for c in cluster]

    def wait(self, seconds: float) -> list[int] | None:
        """The exit codes once every process has ended within `seconds` of the start, else None. A process that
        failed gets the others killed (they would wait for it in a collective)."""
        while time.monotonic() - self.start < seconds:
            codes = [p.poll() for p in self.procs]
            if all(c is not None for c in codes):
                self.log.close()
                return codes
            if any(c not in (None, 0) for c in codes):
                self.kill()
                return [p.wait() for p in self.procs]
            time.sleep(0.05)
        return None

    def kill(self) -> list[int]:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
        codes = [p.wait() for p in self.procs]
        self.log.close()
        return codes

    def seconds(self) -> float:
        return time.monotonic() - self.start


def records(workdir: pathlib.Path) -> list[dict]:
    """The whole lines of metrics.jsonl."""
    path = workdir / "metrics.jsonl"
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def what_it_was_doing(workdir: pathlib.Path, steps: int, output: str) -> dict:
    """What a killed launch left: how far it got, by its output and its workdir."""
    folder, metrics = workdir / "checkpoints", workdir / "metrics.jsonl"
    names = sorted(p.name for p in folder.iterdir()) if folder.exists() else []
    text = metrics.read_text() if metrics.exists() else ""
    logged = [r["step"] for r in records(workdir) if r.get("split") == "train"]
    if "compiled train step" not in output:
        phase = "starting (imports, config, data, restore, compilation)"
    elif any(r.get("split") == "eval" and r["step"] == steps for r in records(workdir)):
        phase = "writing results"
    elif logged and logged[-1] == steps:
        phase = "final checkpoint and evaluation"
    else:
        phase = "training"
    return {
        "phase": phase,
        "last_logged_step": logged[-1] if logged else None,
        "checkpoints": sorted(int(n) for n in names if n.isdigit()),
        "saves_in_flight": [n for n in names if n.endswith(TMP_SUFFIX)],
        "cut_metrics_line": bool(text) and not text.endswith("\n"),
    }


def identical(workdir: pathlib.Path, reference: pathlib.Path, steps: int) -> dict:
    """Bitwise equality of the final train states and data positions; one metrics record per (step, split) as in
    the reference, with the same losses."""
    want, got = read_state(reference, steps), read_state(workdir, steps)
    (want_leaves, want_def), (got_leaves, got_def) = jax.tree.flatten(want), jax.tree.flatten(got)
    state_equal = want_def == got_def and all(
        w.dtype == g.dtype and np.array_equal(w, g) for w, g in zip(want_leaves, got_leaves, strict=True))
    data = lambda w: sorted(p.read_text() for p in (w / "checkpoints" / str(steps) / "data").glob("*.json"))
    key = lambda r: (r["step"], r["split"], r.get("loss"))
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return {
        "identical": bool(state_equal and data(workdir) == data(reference)),
        "metrics_one_record_per_step": len(records(workdir)) == len(lines)
        and [key(r) for r in records(workdir)] == [key(r) for r in records(reference)],
    }


def run_cycle(i: int, rng: np.random.Generator, args: argparse.Namespace, root: pathlib.Path,
              reference: pathlib.Path, duration: float) -> dict:
    workdir, log = root / f"cycle{i}", root / f"cycle{i}.log"
    kills = int(rng.integers(1, args.max_kills + 1))
    launches = []
    while True:
        planned = float(rng.uniform(0, duration)) if len(launches) < kills else None
        mark = log.stat().st_size if log.exists() else 0
        launch = Launch(workdir, args.steps, args.processes, root / "jax_cache", log)
        codes = launch.wait(planned if planned is not None else args.timeout)
        entry = {"kill_at_s": None if planned is None else round(planned, 2)}
        if codes is None:  # still running at the planned moment (or hung)
            codes = launch.kill()
            entry["killed"] = True
            entry.update(what_it_was_doing(workdir, args.steps, log.read_text()[mark:]))
        else:
            entry["killed"] = False
        entry["exit_codes"] = codes
        entry["seconds"] = round(launch.seconds(), 2)
        launches.append(entry)
        if not entry["killed"]:
            break
        if planned is None:
            raise RuntimeError(f"cycle {i}: a launch hung for {args.timeout}s; see {log}")
    finished = all(c == 0 for c in launches[-1]["exit_codes"])
    result = {"cycle": i, "kills": sum(e["killed"] for e in launches), "restarts": len(launches) - 1,
              "finished": finished, "launches": launches}
    result.update(identical(workdir, reference, args.steps) if finished else {"identical": False})
    return result


def main() -> None:
    args = parse_args()
    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax: the data item is not read back, on purpose
    rng = np.random.default_rng(args.seed)
    root = pathlib.Path(tempfile.mkdtemp(prefix="chaos_resume_"))
    try:
        reference = root / "reference"
        launch = Launch(reference, args.steps, args.processes, root / "jax_cache", root / "reference.log")
        if launch.wait(args.timeout) != [0] * args.processes:
            raise RuntimeError(f"the uninterrupted run failed; see {root / 'reference.log'}")
        # The first launch compiled into the empty cache; every later one reads it: time a second run.
        shutil.rmtree(reference)
        launch = Launch(reference, args.steps, args.processes, root / "jax_cache", root / "reference.log")
        if launch.wait(args.timeout) != [0] * args.processes:
            raise RuntimeError(f"the uninterrupted run failed; see {root / 'reference.log'}")
        duration = launch.seconds()
        print(f"uninterrupted run: {duration:.1f}s", flush=True)
        cycles, unkilled = [], 0
        while len(cycles) < args.cycles:
            c = run_cycle(len(cycles) + unkilled, rng, args, root, reference, duration)
            if c["kills"] == 0:  # its launch finished before the moment drawn: not a kill/restart cycle
                unkilled += 1
                print(f"cycle {c['cycle']}: finished before its kill; drawn again", flush=True)
                continue
            c["cycle"] = len(cycles)
            cycles.append(c)
            doing = "; ".join(f"{e['phase']} at {e['kill_at_s']}s (step {e['last_logged_step']}, checkpoints "
                              f"{e['checkpoints'][-3:]}, in flight {e['saves_in_flight']})"
                              for e in c["launches"] if e["killed"])
            print(f"cycle {c['cycle']}: {c['kills']} kills, identical {c['identical']}, metrics one record per step "
                  f"{c.get('metrics_one_record_per_step')}; killed while {doing}", flush=True)
    finally:
        if args.keep:
            print(f"workdirs and logs kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    kills = [e for c in cycles for e in c["launches"] if e["killed"]]
    n_identical = sum(c["identical"] for c in cycles)
    result = {
        "benchmark": "chaos_resume",
        "date": datetime.date.today().isoformat(),
        "command": " ".join([os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]]),
        "machine": {
            **environment_facts(),
            "processes": args.processes,
            "devices_per_process": 8 // args.processes,
        },
        "jax": jax.__version__,
        "orbax_checkpoint": ocp.__version__,
        "run": {"total_steps": args.steps, "checkpoint_every_steps": 10, "log_every_steps": 10,
                "uninterrupted_seconds": round(duration, 2)},
        "summary": {
            "cycles": len(cycles),
            "cycles_drawn_again": unkilled,
            "identical": n_identical,
            "metrics_one_record_per_step": sum(bool(c.get("metrics_one_record_per_step")) for c in cycles),
            "kills": len(kills),
            "kills_with_a_save_in_flight": sum(bool(e["saves_in_flight"]) for e in kills),
            "kills_by_phase": {p: sum(e["phase"] == p for e in kills) for p in sorted({e["phase"] for e in kills})},
            "text": f"{n_identical} of {len(cycles)} identical",
        },
        "cycles": cycles,
    }
    print(json.dumps(result["summary"], indent=2))
    path = new_result_path(pathlib.Path(args.out) / ("chaos_resume.json" if args.processes == 1 else
                                  f"chaos_resume_{args.processes}proc.json"))
    path.write_text(results_json(result))
    print(f"saved {path}")


if __name__ == "__main__":
    main()
